"""What one simulated scheduler did: waits, outcomes, memory and quality over time.

Plain synchronous bookkeeping: the simulation engine calls it with the virtual time
of each event, and it keeps exact time-weighted integrals (no sampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from .._stats import percentile
from .._types import Priority, WorkloadType

__all__ = ["RecordedHolding", "Recorder", "SchedulerResult", "Timeline"]

_T = TypeVar("_T")


def _quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile of ``values`` (any order); ``None`` when there are none."""
    return percentile(sorted(values), q) if values else None


@dataclass(frozen=True, slots=True)
class Timeline:
    """Step functions for the plot: each list holds ``(time, value)`` from that time on.

    ``memory`` maps each workload to bytes granted to it; ``quality`` maps each
    workload to the mean quality its holders run at (``None`` when none holds).
    """

    memory: dict[WorkloadType, list[tuple[float, int]]]
    quality: dict[WorkloadType, list[tuple[float, float | None]]]
    preemptions: list[tuple[float, WorkloadType]]


@dataclass(frozen=True, slots=True)
class SchedulerResult:
    """The figures of one scheduler over one trace (times in seconds of virtual time)."""

    name: str
    wait_p50: dict[Priority, float | None]
    wait_p99: dict[Priority, float | None]
    completed: int
    timeouts: int
    rejected: int
    preemptions: int
    mean_quality: dict[WorkloadType, float | None]
    utilization: float
    goodput: float
    completed_by_priority: dict[Priority, int]
    # Of budget x span, the completed jobs' work lost to running below quality 1.0, and
    # the part of it that their grants' sizes alone explain (what they would have lost
    # had they kept the size they were granted): why a degrading scheduler's goodput
    # falls short of its utilisation. Not in the table or the JSON: for benchmarks.
    degraded: float
    degraded_at_grant: float
    first_arrival: float
    last_completion: float
    timeline: Timeline = field(repr=False)


class RecordedHolding:
    """One granted allocation as the recorder sees it: size and quality since ``since``.

    ``useful`` is the quality-seconds of work it has done: holding time from
    ``useful_from`` on (before it, the job reloads what a preemption cost it), each
    second weighted by the quality it ran at; ``worked`` is those seconds unweighted,
    and ``granted_quality`` the quality it was granted at.
    """

    __slots__ = ("granted_quality", "memory", "quality", "since", "useful", "useful_from",
                 "worked", "workload")  # fmt: skip

    def __init__(
        self, workload: WorkloadType, memory: int, quality: float, since: float, useful_from: float
    ) -> None:
        self.workload = workload
        self.memory = memory
        self.quality = quality
        self.granted_quality = quality
        self.since = since
        self.useful_from = useful_from
        self.useful = 0.0
        self.worked = 0.0

    def shortfall(self) -> tuple[float, float]:
        """Seconds of full-quality work it fell short by, and the part of it that running
        at its granted quality throughout would have lost."""
        lost = max(0.0, self.worked - self.useful)
        return lost, min(lost, (1.0 - self.granted_quality) * self.worked)


class Recorder:
    """Collects one scheduler's run; `result` turns it into figures."""

    __slots__ = (
        "_budget",
        "_completed",
        "_degraded_area",
        "_degraded_at_grant_area",
        "_first_arrival",
        "_goodput_area",
        "_granted",
        "_granted_area",
        "_granted_since",
        "_holders",
        "_last_completion",
        "_memory",
        "_memory_steps",
        "_preemptions",
        "_quality_area",
        "_quality_steps",
        "_quality_sum",
        "_quality_time",
        "_rejected",
        "_timeouts",
        "_waits",
    )

    def __init__(
        self,
        budget: int,
        priorities: Sequence[Priority],
        workloads: Sequence[WorkloadType],
        first_arrival: float,
    ) -> None:
        self._budget = budget
        self._first_arrival = first_arrival
        self._last_completion = first_arrival
        self._waits: dict[Priority, list[float]] = {p: [] for p in priorities}
        self._completed: dict[Priority, int] = dict.fromkeys(priorities, 0)
        self._timeouts = 0
        self._rejected = 0
        self._goodput_area = 0.0
        self._degraded_area = 0.0
        self._degraded_at_grant_area = 0.0
        self._preemptions: list[tuple[float, WorkloadType]] = []
        self._granted = 0
        self._granted_area = 0.0
        self._granted_since = first_arrival
        self._memory: dict[WorkloadType, int] = dict.fromkeys(workloads, 0)
        self._memory_steps: dict[WorkloadType, list[tuple[float, int]]] = {
            w: [(first_arrival, 0)] for w in workloads
        }
        self._holders: dict[WorkloadType, int] = dict.fromkeys(workloads, 0)
        self._quality_sum: dict[WorkloadType, float] = dict.fromkeys(workloads, 0.0)
        self._quality_area: dict[WorkloadType, float] = dict.fromkeys(workloads, 0.0)
        self._quality_time: dict[WorkloadType, float] = dict.fromkeys(workloads, 0.0)
        self._quality_steps: dict[WorkloadType, list[tuple[float, float | None]]] = {
            w: [(first_arrival, None)] for w in workloads
        }

    # -- outcomes ---------------------------------------------------------------

    def waited(self, priority: Priority, seconds: float) -> None:
        """A request of the row's ``priority`` waited ``seconds`` (granted or timed out)."""
        self._waits[priority].append(max(0.0, seconds))

    def completed(
        self,
        priority: Priority,
        now: float,
        memory: int,
        useful: float,
        shortfall: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        """A job of ``memory`` bytes finished its work, ``useful`` quality-seconds of it
        kept (work lost to a preemption is not); ``shortfall`` sums its kept runs'
        `RecordedHolding.shortfall`."""
        self._completed[priority] += 1
        self._goodput_area += memory * useful
        self._degraded_area += memory * shortfall[0]
        self._degraded_at_grant_area += memory * shortfall[1]
        self._last_completion = max(self._last_completion, now)

    def timed_out(self) -> None:
        """A request waited its whole timeout; its job is dropped."""
        self._timeouts += 1

    def rejected(self) -> None:
        """A request could never fit the budget."""
        self._rejected += 1

    def preempted(self, workload: WorkloadType, now: float) -> None:
        """A job of ``workload`` was cut short by preemption (and will be re-queued)."""
        self._preemptions.append((now, workload))

    # -- holdings ---------------------------------------------------------------

    def grant(
        self,
        workload: WorkloadType,
        memory: int,
        quality: float,
        now: float,
        useful_from: float | None = None,
    ) -> RecordedHolding:
        """An allocation was granted, running at ``quality``; follow it until `release`.
        Its work counts from ``useful_from`` (default: at once)."""
        holding = RecordedHolding(
            workload, 0, quality, now, now if useful_from is None else useful_from
        )
        self._holders[workload] += 1
        self._quality_sum[workload] += quality
        self._quality_step(workload, now)
        self._set_memory(holding, memory, now)
        return holding

    def resize(self, holding: RecordedHolding, memory: int, now: float) -> None:
        """The allocation now holds ``memory`` bytes."""
        self._close_quality(holding, now)
        self._set_memory(holding, memory, now)

    def quality(self, holding: RecordedHolding, quality: float, now: float) -> None:
        """The allocation now runs at ``quality``."""
        if quality == holding.quality:
            return
        self._close_quality(holding, now)
        self._quality_sum[holding.workload] += quality - holding.quality
        holding.quality = quality
        self._quality_step(holding.workload, now)

    def release(self, holding: RecordedHolding, now: float) -> None:
        """The allocation's memory went back to the arbiter."""
        self._close_quality(holding, now)
        self._set_memory(holding, 0, now)
        self._holders[holding.workload] -= 1
        self._quality_sum[holding.workload] -= holding.quality
        self._quality_step(holding.workload, now)

    def _close_quality(self, holding: RecordedHolding, now: float) -> None:
        elapsed = max(0.0, now - holding.since)
        self._quality_area[holding.workload] += holding.quality * elapsed
        working = now - max(holding.since, holding.useful_from)
        if working > 0:
            holding.useful += holding.quality * working
            holding.worked += working
        self._quality_time[holding.workload] += elapsed
        holding.since = now

    def _quality_step(self, workload: WorkloadType, now: float) -> None:
        count = self._holders[workload]
        mean = self._quality_sum[workload] / count if count else None
        _append_step(self._quality_steps[workload], now, mean)

    def _set_memory(self, holding: RecordedHolding, memory: int, now: float) -> None:
        self._granted_area += self._granted * max(0.0, now - self._granted_since)
        self._granted_since = max(self._granted_since, now)
        delta = memory - holding.memory
        holding.memory = memory
        self._granted += delta
        self._memory[holding.workload] += delta
        _append_step(self._memory_steps[holding.workload], now, self._memory[holding.workload])

    # -- figures ----------------------------------------------------------------

    def result(self, name: str) -> SchedulerResult:
        """The figures so far, under the scheduler's ``name``."""
        span = self._last_completion - self._first_arrival
        granted_area = self._granted_area + self._granted * max(
            0.0, self._last_completion - self._granted_since
        )
        area = self._budget * span

        def share(part: float) -> float:
            return part / area if span > 0 else 0.0

        mean_quality = {
            w: (self._quality_area[w] / t if (t := self._quality_time[w]) > 0 else None)
            for w in self._quality_time
        }
        return SchedulerResult(
            name=name,
            wait_p50={p: _quantile(v, 0.50) for p, v in self._waits.items()},
            wait_p99={p: _quantile(v, 0.99) for p, v in self._waits.items()},
            completed=sum(self._completed.values()),
            timeouts=self._timeouts,
            rejected=self._rejected,
            preemptions=len(self._preemptions),
            mean_quality=mean_quality,
            utilization=share(granted_area),
            goodput=share(self._goodput_area),
            completed_by_priority=dict(self._completed),
            degraded=share(self._degraded_area),
            degraded_at_grant=share(self._degraded_at_grant_area),
            first_arrival=self._first_arrival,
            last_completion=self._last_completion,
            timeline=Timeline(
                memory={w: list(s) for w, s in self._memory_steps.items()},
                quality={w: list(s) for w, s in self._quality_steps.items()},
                preemptions=list(self._preemptions),
            ),
        )


def _append_step(steps: list[tuple[float, _T]], now: float, value: _T) -> None:
    """Add a step, folding several changes at one instant into the last."""
    if steps and steps[-1][0] == now:
        steps[-1] = (now, value)
    elif not steps or steps[-1][1] != value:
        steps.append((now, value))
