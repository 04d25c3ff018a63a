"""gpu-arbiter: share one GPU between an LLM server and a diffusion server.

Memory is requested with ``await``, ranked by priority, degraded in quality
before anyone is preempted, checked against what NVML sees, and model-weight
fragments are cached once for both workloads in tiers VRAM <- RAM <- NVMe <- CDN.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._config import ArbiterConfig
from ._errors import (
    AllocationTimeout,
    ArbiterError,
    FragmentUnavailable,
    InsufficientMemory,
    InsufficientQuality,
    IntegrityError,
    Preempted,
    ShuttingDown,
)
from ._quality import QualityPolicy
from ._types import GiB, KiB, MemoryPressure, MiB, Priority, WorkloadType

__all__ = [
    "AllocationTimeout",
    "ArbiterConfig",
    "ArbiterError",
    "FragmentUnavailable",
    "GiB",
    "InsufficientMemory",
    "InsufficientQuality",
    "IntegrityError",
    "KiB",
    "MemoryPressure",
    "MiB",
    "Preempted",
    "Priority",
    "QualityPolicy",
    "ShuttingDown",
    "WorkloadType",
    "__version__",
]
