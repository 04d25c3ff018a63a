"""Cross-process arbitration: the ``arbiter serve`` daemon and `RemoteArbiter`."""

from __future__ import annotations

from ._client import RemoteAllocation, RemoteAllocationContext, RemoteArbiter

__all__ = ["RemoteAllocation", "RemoteAllocationContext", "RemoteArbiter"]
