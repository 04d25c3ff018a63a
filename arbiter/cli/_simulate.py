"""The simulation engine: replay a trace through the real `Arbiter` in virtual time.

Each scheduler is a configuration of the same `Arbiter` on a `FakeGpu`, run on trio
under ``trio.testing.MockClock(autojump_threshold=0)``: whenever every task is
blocked the clock jumps to the next deadline, so an hour of trace runs in seconds
and the library's own code runs unchanged.

What a simulated job does (the same for every scheduler):

* at its row's ``at`` it requests its memory and records how long it waited;
* it holds the memory for ``duration`` seconds; an elastic job (``min_memory_gb``,
  adaptive only) holds for ``duration * quality``, the quality of its first grant,
  since a lower quality means fewer steps or pixels (and a job keeps them once begun);
* while it holds, an elastic job follows its quality target: it shrinks to the
  target's size when the target drops, and grows back with ``resize`` as far as the
  arbiter grants at once (free memory, nobody waiting) when it rises;
* when preempted it is re-queued at its priority and resumes the work it had left
  (a resident model, re-granted smaller, still stays for the rest of its duration);
  it counts as completed when it finishes, or as a timeout if a request of it waits
  its whole ``timeout``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from .._arbiter import Arbiter
from .._config import ArbiterConfig
from .._errors import AllocationTimeout, InsufficientMemory, Preempted
from .._types import MiB, Priority, WorkloadType
from ..testing import FakeGpu
from ._record import Holding, Recorder, SchedulerResult
from ._trace import Trace, TraceRow

if TYPE_CHECKING:
    from .._allocation import Allocation

__all__ = ["SCHEDULERS", "Scheduler", "simulate", "simulate_scheduler"]

Progress = Callable[[int], None]

# Elastic holders grow in steps of at least this much (a real server would not
# reallocate for a few bytes of rounding); they shrink by whatever they are asked.
_RESIZE_STEP = 64 * MiB


@dataclass(frozen=True, slots=True)
class Scheduler:
    """A way to configure and call the same `Arbiter`.

    ``real_priorities``: each row at its own priority (else all at ``NORMAL``);
    ``preemptible``: holders may be preempted (and asked to shrink);
    ``elastic``: rows with ``min_memory_gb`` are requested elastic;
    ``adaptive_quality``: quality targets follow memory pressure.
    """

    name: str
    description: str
    real_priorities: bool
    preemptible: bool
    elastic: bool
    adaptive_quality: bool

    def config(self, budget: int) -> ArbiterConfig:
        """The `ArbiterConfig` of this scheduler for a budget of ``budget`` bytes.

        Defaults otherwise; rows carry their own timeouts, so there is no default one.
        """
        return ArbiterConfig(
            vram_budget=budget, adaptive_quality=self.adaptive_quality, allocation_timeout=None
        )


SCHEDULERS: dict[str, Scheduler] = {
    s.name: s
    for s in (
        Scheduler("fifo", "one queue, no priorities: a semaphore", False, False, False, False),
        Scheduler("priority", "no preemption, no degradation", True, False, False, False),
        Scheduler("adaptive", "the full arbiter", True, True, True, True),
    )
}


class _Run:
    """One scheduler's replay of one trace: the arbiter, the fake GPU and the jobs."""

    __slots__ = ("arbiter", "config", "fake", "progress", "recorder", "scheduler", "start", "trace")

    def __init__(
        self, trace: Trace, scheduler: Scheduler, budget: int, progress: Progress | None
    ) -> None:
        self.trace = trace
        self.scheduler = scheduler
        self.config = scheduler.config(budget)
        self.fake = FakeGpu(budget)
        self.arbiter = Arbiter(self.config, probe=self.fake)
        self.recorder = Recorder(
            budget,
            sorted({row.priority for row in trace.rows}, reverse=True),
            [w for w in WorkloadType if any(row.workload is w for row in trace.rows)],
            trace.first_arrival,
        )
        self.progress = progress
        self.start = 0.0

    def now(self) -> float:
        return anyio.current_time() - self.start

    async def run(self) -> SchedulerResult:
        self.start = anyio.current_time()
        async with self.arbiter, anyio.create_task_group() as background:
            background.start_soon(self._drive_external)
            async with anyio.create_task_group() as jobs:
                for row in self.trace.rows:
                    await anyio.sleep_until(self.start + row.at)
                    jobs.start_soon(self._job, row)
            background.cancel_scope.cancel()
        return self.recorder.result(self.scheduler.name)

    async def _drive_external(self) -> None:
        for step in self.trace.external:
            await anyio.sleep_until(self.start + step.at)
            self.fake.external_used = step.used

    async def _job(self, row: TraceRow) -> None:
        try:
            await self._serve(row)
        finally:
            if self.progress is not None:
                self.progress(1)

    async def _serve(self, row: TraceRow) -> None:
        scheduler, recorder = self.scheduler, self.recorder
        priority = row.priority if scheduler.real_priorities else Priority.NORMAL
        min_memory = row.min_memory if scheduler.elastic and row.elastic else None
        # Seconds of holding the job needs, fixed at its first grant (a render keeps the
        # steps and pixels it started with), and seconds it has held so far.
        work: float | None = None
        done = 0.0
        while True:
            asked = self.now()
            holding: Holding | None = None
            granted = 0.0
            try:
                async with self.arbiter.allocate(
                    row.workload,
                    priority,
                    memory=row.memory,
                    min_memory=min_memory,
                    timeout=row.timeout,
                    preemptible=scheduler.preemptible,
                    label=f"line {row.line}",
                ) as alloc:
                    granted = self.now()
                    recorder.waited(row.priority, granted - asked)
                    holding = recorder.grant(row.workload, alloc.memory, alloc.quality, granted)
                    if work is None:
                        # Lower quality means fewer steps or pixels: less time.
                        scale = alloc.quality if min_memory is not None else 1.0
                        work = row.duration * scale
                    elastic = None if min_memory is None else (min_memory, row.memory)
                    await self._hold(alloc, holding, elastic, max(0.0, work - done))
            except Preempted:
                assert holding is not None
                now = self.now()
                recorder.release(holding, now)
                recorder.preempted(row.workload, now)
                done += now - granted
                continue  # re-queued at its priority; it resumes where it was cut
            except AllocationTimeout:
                if holding is not None:
                    raise  # only the request itself waits with a timeout
                recorder.waited(row.priority, self.now() - asked)
                recorder.timed_out()
                return
            except InsufficientMemory:
                if holding is not None:
                    raise
                recorder.rejected()
                return
            assert holding is not None
            now = self.now()
            recorder.release(holding, now)
            recorder.completed(row.priority, now)
            return

    async def _hold(
        self, alloc: Allocation, holding: Holding, elastic: tuple[int, int] | None, seconds: float
    ) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow_quality, alloc, holding, elastic)
            await anyio.sleep(seconds)
            tg.cancel_scope.cancel()

    async def _follow_quality(
        self, alloc: Allocation, holding: Holding, elastic: tuple[int, int] | None
    ) -> None:
        """Record each quality target; an elastic holder also resizes to match it.

        While an elastic holder is below its target's size it retries growing every
        ``poll_interval``, since the memory it was waiting for frees without a new target.
        """
        changes = alloc.quality_changes()
        try:
            while True:
                below = (
                    elastic is not None
                    and alloc.memory_for_quality(alloc.quality) - alloc.memory >= _RESIZE_STEP
                )
                with anyio.move_on_after(self.config.poll_interval if below else math.inf):
                    try:
                        quality = await changes.__anext__()
                    except StopAsyncIteration:
                        return
                    self.recorder.quality(holding, quality, self.now())
                if elastic is not None:
                    await self._fit(alloc, holding)
        finally:
            with anyio.CancelScope(shield=True):
                await changes.aclose()

    async def _fit(self, alloc: Allocation, holding: Holding) -> None:
        wanted = alloc.memory_for_quality(alloc.quality)
        if wanted < alloc.memory:
            await alloc.resize(wanted)
        elif wanted - alloc.memory >= _RESIZE_STEP:
            # Grow only into memory that is free now while nobody waits: a holder that
            # behaves well takes no memory another request is queued for, and never makes
            # the arbiter preempt (or wait) for its comfort.
            state = self.arbiter.state()
            size = min(wanted, alloc.memory + state.vram_available)
            if state.waiting or size - alloc.memory < _RESIZE_STEP:
                return
            try:
                await alloc.resize(size, timeout=0)
            except AllocationTimeout:
                return
        else:
            return
        self.recorder.resize(holding, alloc.memory, self.now())


async def simulate_scheduler(
    trace: Trace, scheduler: Scheduler, budget: int, progress: Progress | None = None
) -> SchedulerResult:
    """Replay ``trace`` through an `Arbiter` configured as ``scheduler`` with ``budget`` bytes.

    Runs in whatever clock the event loop has; `simulate` gives it a virtual one.
    """
    return await _Run(trace, scheduler, budget, progress).run()


def simulate(
    trace: Trace,
    schedulers: Sequence[Scheduler],
    budget: int,
    progress: Progress | None = None,
) -> list[SchedulerResult]:
    """Replay ``trace`` once per scheduler, each on trio in virtual time (a fresh clock each).

    ``progress`` is called with 1 each time a job of any run ends.
    """
    from trio.testing import MockClock

    results = []
    for scheduler in schedulers:
        result = anyio.run(
            simulate_scheduler,
            trace,
            scheduler,
            budget,
            progress,
            backend="trio",
            backend_options={"clock": MockClock(autojump_threshold=0)},
        )
        results.append(result)
    return results
