"""The fragment cache: model-weight fragments in tiers VRAM <- RAM <- NVME <- CDN.

`FragmentCache` serves verified fragments listed in a manifest from the fastest tier
holding them, shares one fetch between concurrent gets, evicts with byte-accounted
S3-FIFO, and charges its VRAM tier to an `Arbiter` as a BACKGROUND elastic allocation.
"""

from __future__ import annotations

from ._buffer import Buffer
from ._cache import FragmentCache
from ._config import CacheConfig
from ._flight import ProgressCallback
from ._manifest import FragmentInfo, Manifest
from ._stats import CacheStats, CacheTier

__all__ = [
    "Buffer",
    "CacheConfig",
    "CacheStats",
    "CacheTier",
    "FragmentCache",
    "FragmentInfo",
    "Manifest",
    "ProgressCallback",
]
