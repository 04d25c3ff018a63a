"""Snapshots of an arbiter (`ArbiterState`, `ArbiterStats`) and the recorder behind them."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ._types import MemoryPressure, Priority

__all__ = ["ArbiterState", "ArbiterStats", "StatsRecorder", "WaitPercentiles", "percentile"]

# Wait percentiles are computed over this many most recent grants per priority.
WAIT_SAMPLES = 10_000


@dataclass(frozen=True, slots=True)
class ArbiterState:
    """What the arbiter holds right now. Memory in bytes; pressure is a ratio of the budget."""

    active_llm_workloads: int
    active_diffusion_workloads: int
    llm_quality: float
    diffusion_quality: float
    memory_pressure: float
    pressure_level: MemoryPressure
    vram_used: int
    external_used: int
    vram_available: int
    waiting: int


@dataclass(frozen=True, slots=True)
class WaitPercentiles:
    """Seconds waited before a grant, over the most recent grants of one priority."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True, slots=True)
class ArbiterStats:
    """Counters since the arbiter was built; averages since it started (its ``async
    with`` or its first request, whichever came first: it has no clock before).

    ``total_allocations == successful_allocations + failed_allocations + cancelled``;
    failures include timeouts, ``InsufficientMemory``, ``InsufficientQuality`` and
    ``ShuttingDown``. The averages are weighted by time on the event loop's clock;
    the quality averages cover only the time that family had an active allocation.
    """

    total_allocations: int
    successful_allocations: int
    failed_allocations: int
    cancelled: int
    timeouts: int
    quality_reductions: int
    preemptions: int
    keep_alive_reclaims: int
    avg_memory_pressure: float
    avg_llm_quality: float
    avg_diffusion_quality: float
    wait_percentiles: dict[Priority, WaitPercentiles]


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-quantile (``q`` in [0, 1]) of an ascending, non-empty sequence, with
    linear interpolation between the closest ranks (numpy's default). Every figure the
    package reports (waits, fetch latencies, simulated waits) comes from here."""
    rank = q * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class StatsRecorder:
    """Counts outcomes and integrates pressure and quality over time.

    The integrals are kept as plain floats: ``observe`` runs on every grant and release.
    """

    __slots__ = (
        "_diffusion",
        "_diffusion_area",
        "_diffusion_time",
        "_llm",
        "_llm_area",
        "_llm_time",
        "_pressure",
        "_pressure_area",
        "_since",
        "_start",
        "_waits",
        "cancelled",
        "failed",
        "keep_alive_reclaims",
        "preemptions",
        "quality_reductions",
        "successful",
        "timeouts",
    )

    def __init__(self) -> None:
        self.successful = 0
        self.failed = 0
        self.cancelled = 0
        self.timeouts = 0
        self.quality_reductions = 0
        self.preemptions = 0
        self.keep_alive_reclaims = 0
        self._waits: dict[Priority, deque[float]] = {
            p: deque(maxlen=WAIT_SAMPLES) for p in Priority
        }
        # The value of each step since `_since`, and the area under it so far.
        self._pressure = 0.0
        self._llm: float | None = None
        self._diffusion: float | None = None
        self._pressure_area = self._llm_area = self._diffusion_area = 0.0
        self._llm_time = self._diffusion_time = 0.0
        self._since: float | None = None
        self._start = 0.0

    @property
    def last_time(self) -> float:
        """The clock reading of the latest observation (0.0 before any)."""
        return 0.0 if self._since is None else self._since

    def record_grant(self, priority: Priority, waited: float) -> None:
        """Count a successful allocation that waited ``waited`` seconds."""
        self.successful += 1
        self._waits[priority].append(waited)

    def observe(
        self, now: float, pressure: float, llm: float | None, diffusion: float | None
    ) -> None:
        """Close the step that ran until ``now`` and open one with these values.

        ``llm`` / ``diffusion`` are None while that family holds nothing: its
        quality average covers only the time it was active.
        """
        since = self._since
        if since is None:
            self._start = now
        elif now > since:
            dt = now - since
            self._pressure_area += self._pressure * dt
            if self._llm is not None:
                self._llm_area += self._llm * dt
                self._llm_time += dt
            if self._diffusion is not None:
                self._diffusion_area += self._diffusion * dt
                self._diffusion_time += dt
        self._since = now
        self._pressure = pressure
        self._llm = llm
        self._diffusion = diffusion

    def snapshot(self, now: float) -> ArbiterStats:
        self.observe(now, self._pressure, self._llm, self._diffusion)
        percentiles = {}
        for priority, waits in self._waits.items():
            ordered = sorted(waits)
            percentiles[priority] = WaitPercentiles(
                count=len(ordered),
                p50=percentile(ordered, 0.50) if ordered else 0.0,
                p90=percentile(ordered, 0.90) if ordered else 0.0,
                p99=percentile(ordered, 0.99) if ordered else 0.0,
                max=ordered[-1] if ordered else 0.0,
            )
        elapsed = now - self._start
        return ArbiterStats(
            total_allocations=self.successful + self.failed + self.cancelled,
            successful_allocations=self.successful,
            failed_allocations=self.failed,
            cancelled=self.cancelled,
            timeouts=self.timeouts,
            quality_reductions=self.quality_reductions,
            preemptions=self.preemptions,
            keep_alive_reclaims=self.keep_alive_reclaims,
            avg_memory_pressure=self._pressure_area / elapsed if elapsed > 0 else self._pressure,
            avg_llm_quality=_mean(self._llm_area, self._llm_time, self._llm),
            avg_diffusion_quality=_mean(
                self._diffusion_area, self._diffusion_time, self._diffusion
            ),
            wait_percentiles=percentiles,
        )


def _mean(area: float, duration: float, current: float | None) -> float:
    """A time-weighted mean; before any time has passed, the current value (or 1.0)."""
    if duration > 0:
        return area / duration
    return 1.0 if current is None else current
