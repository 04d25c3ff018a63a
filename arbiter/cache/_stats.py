"""CacheTier, the CacheStats snapshot, and the counters behind it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import IntEnum

from .._stats import percentile

__all__ = ["CacheStats", "CacheTier", "CacheStatsRecorder"]


class CacheTier(IntEnum):
    """Where a fragment can be, fastest first: ``VRAM < RAM < NVME < CDN``."""

    VRAM = 0
    RAM = 1
    NVME = 2
    CDN = 3


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of a `FragmentCache`'s counters.

    Attributes:
        hits: gets served by each tier (a read from ``source_dir`` is an NVME hit;
            ``CDN`` stays 0: a get served by the CDN is a miss).
        misses: gets that no tier could serve, so they went to the CDN.
        bytes_read: bytes read from each tier (for CDN: bytes received, retries included).
        bytes_held: bytes each tier holds now (CDN: 0).
        evictions: fragments removed from a tier to make room.
        integrity_failures: copies (disk, source, CDN body) that failed verification.
        fetches: loads from below RAM (disk, source_dir or CDN) that ran, shared ones once.
        fetch_retries: CDN tries that were retried.
        fetch_latency_p50, fetch_latency_p90, fetch_latency_p99: seconds a load took,
            over the last ``latency_window`` loads (``None`` before the first).
    """

    hits: dict[CacheTier, int]
    misses: int
    bytes_read: dict[CacheTier, int]
    bytes_held: dict[CacheTier, int]
    evictions: int
    integrity_failures: int
    fetches: int
    fetch_retries: int
    fetch_latency_p50: float | None
    fetch_latency_p90: float | None
    fetch_latency_p99: float | None

    @property
    def hit_ratio(self) -> float:
        """Hits over gets (0.0 before the first get)."""
        hits = sum(self.hits.values())
        total = hits + self.misses
        return hits / total if total else 0.0


class CacheStatsRecorder:
    """The mutable counters a cache updates; `snapshot` freezes them."""

    __slots__ = (
        "bytes_read",
        "evictions",
        "fetch_retries",
        "fetches",
        "hits",
        "integrity_failures",
        "latencies",
        "misses",
    )

    def __init__(self, latency_window: int) -> None:
        self.hits = dict.fromkeys(CacheTier, 0)
        self.bytes_read = dict.fromkeys(CacheTier, 0)
        self.misses = 0
        self.evictions = 0
        self.integrity_failures = 0
        self.fetches = 0
        self.fetch_retries = 0
        self.latencies: deque[float] = deque(maxlen=latency_window)

    def served(self, tier: CacheTier) -> None:
        """Count one get served by ``tier`` (CDN counts as a miss)."""
        if tier is CacheTier.CDN:
            self.misses += 1
        else:
            self.hits[tier] += 1

    def snapshot(self, bytes_held: dict[CacheTier, int]) -> CacheStats:
        """A frozen copy, with ``bytes_held`` given by the tiers."""
        ordered = sorted(self.latencies)
        p50, p90, p99 = (
            (percentile(ordered, 0.5), percentile(ordered, 0.9), percentile(ordered, 0.99))
            if ordered
            else (None, None, None)
        )
        return CacheStats(
            hits=dict(self.hits),
            misses=self.misses,
            bytes_read=dict(self.bytes_read),
            bytes_held={tier: bytes_held.get(tier, 0) for tier in CacheTier},
            evictions=self.evictions,
            integrity_failures=self.integrity_failures,
            fetches=self.fetches,
            fetch_retries=self.fetch_retries,
            fetch_latency_p50=p50,
            fetch_latency_p90=p90,
            fetch_latency_p99=p99,
        )
