"""Cross-process arbitration: the ``arbiter serve`` daemon and `RemoteArbiter`, whose
allocations are `arbiter.Allocation` handles over the daemon's port."""

from __future__ import annotations

from ._client import RemoteArbiter

__all__ = ["RemoteArbiter"]
