"""Snapshots of an arbiter (`ArbiterState`, `ArbiterStats`) and the recorder behind them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ._types import MemoryPressure, Priority

__all__ = ["ArbiterState", "ArbiterStats", "StatsRecorder", "WaitPercentiles"]

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
    """Counters since the arbiter was built.

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


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))
    return ordered[rank]


class _TimeAverage:
    """The time-weighted mean of a value that changes in steps."""

    __slots__ = ("area", "duration", "value")

    def __init__(self) -> None:
        self.area = 0.0
        self.duration = 0.0
        self.value: float | None = None

    def advance(self, dt: float) -> None:
        if self.value is not None and dt > 0:
            self.area += self.value * dt
            self.duration += dt

    def mean(self, default: float) -> float:
        if self.duration > 0:
            return self.area / self.duration
        return default if self.value is None else self.value


class StatsRecorder:
    """Counts outcomes and integrates pressure and quality over time."""

    __slots__ = (
        "_diffusion",
        "_llm",
        "_pressure",
        "_since",
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
        self._pressure = _TimeAverage()
        self._llm = _TimeAverage()
        self._diffusion = _TimeAverage()
        self._since: float | None = None

    @property
    def last_time(self) -> float:
        """The clock reading of the latest observation (0.0 before any)."""
        return 0.0 if self._since is None else self._since

    def record_wait(self, priority: Priority, waited: float) -> None:
        self._waits[priority].append(waited)

    def observe(
        self, now: float, pressure: float, llm: float | None, diffusion: float | None
    ) -> None:
        """Close the step that ran until ``now`` and open one with these values."""
        self._advance(now)
        self._pressure.value = pressure
        self._llm.value = llm
        self._diffusion.value = diffusion

    def _advance(self, now: float) -> None:
        if self._since is not None:
            dt = now - self._since
            self._pressure.advance(dt)
            self._llm.advance(dt)
            self._diffusion.advance(dt)
        self._since = now

    def snapshot(self, now: float) -> ArbiterStats:
        self._advance(now)
        percentiles = {}
        for priority, waits in self._waits.items():
            ordered = sorted(waits)
            percentiles[priority] = WaitPercentiles(
                count=len(ordered),
                p50=_percentile(ordered, 0.50),
                p90=_percentile(ordered, 0.90),
                p99=_percentile(ordered, 0.99),
                max=ordered[-1] if ordered else 0.0,
            )
        return ArbiterStats(
            total_allocations=self.successful + self.failed + self.cancelled,
            successful_allocations=self.successful,
            failed_allocations=self.failed,
            cancelled=self.cancelled,
            timeouts=self.timeouts,
            quality_reductions=self.quality_reductions,
            preemptions=self.preemptions,
            keep_alive_reclaims=self.keep_alive_reclaims,
            avg_memory_pressure=self._pressure.mean(0.0),
            avg_llm_quality=self._llm.mean(1.0),
            avg_diffusion_quality=self._diffusion.mean(1.0),
            wait_percentiles=percentiles,
        )
