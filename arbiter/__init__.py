"""gpu-arbiter: share one GPU between an LLM server and a diffusion server.

Memory is requested with ``await``, ranked by priority, degraded in quality
before anyone is preempted, checked against what NVML sees, and model-weight
fragments are cached once for both workloads in tiers VRAM <- RAM <- NVMe <- CDN.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from ._allocation import Allocation, AllocationContext, QualityChanges
from ._arbiter import Arbiter
from ._config import ArbiterConfig
from ._errors import (
    AllocationTimeout,
    ArbiterError,
    ArbiterUnavailable,
    FragmentError,
    FragmentUnavailable,
    GpuProbeError,
    InsufficientMemory,
    InsufficientQuality,
    IntegrityError,
    Preempted,
    SessionLost,
    ShuttingDown,
)
from ._gpu import (
    DetectionMethod,
    GpuDetectionResult,
    GpuDetector,
    GpuInfo,
    GpuReading,
    GpuVendor,
    MemoryProbe,
    NvmlProbe,
)
from ._quality import QualityPolicy
from ._stats import ArbiterState, ArbiterStats, WaitPercentiles
from ._types import GiB, KiB, MemoryPressure, MiB, Priority, WorkloadType

if TYPE_CHECKING:
    from .cache import CacheConfig, CacheStats, CacheTier, FragmentCache
    from .remote import RemoteArbiter

# Imported at first use: the cache brings httpx and the client brings msgspec, which a
# program that only allocates (or the `arbiter` command starting up) need not load.
_LAZY = {
    "CacheConfig": "cache",
    "CacheStats": "cache",
    "CacheTier": "cache",
    "FragmentCache": "cache",
    "RemoteArbiter": "remote",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Allocation",
    "AllocationContext",
    "AllocationTimeout",
    "Arbiter",
    "ArbiterConfig",
    "ArbiterError",
    "ArbiterState",
    "ArbiterUnavailable",
    "ArbiterStats",
    "CacheConfig",
    "CacheStats",
    "CacheTier",
    "DetectionMethod",
    "FragmentError",
    "FragmentCache",
    "FragmentUnavailable",
    "GiB",
    "GpuDetectionResult",
    "GpuDetector",
    "GpuInfo",
    "GpuProbeError",
    "GpuReading",
    "GpuVendor",
    "InsufficientMemory",
    "InsufficientQuality",
    "IntegrityError",
    "KiB",
    "MemoryPressure",
    "MemoryProbe",
    "MiB",
    "NvmlProbe",
    "Preempted",
    "Priority",
    "QualityChanges",
    "QualityPolicy",
    "RemoteArbiter",
    "SessionLost",
    "ShuttingDown",
    "WaitPercentiles",
    "WorkloadType",
    "__version__",
]
