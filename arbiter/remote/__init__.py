"""Cross-process arbitration: the ``arbiter serve`` daemon and `RemoteArbiter`."""

from __future__ import annotations

from ._client import RemoteArbiter
from ._handle import RemoteAllocation, RemoteAllocationContext

__all__ = ["RemoteAllocation", "RemoteAllocationContext", "RemoteArbiter"]
