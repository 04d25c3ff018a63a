"""The simulation engine: replay a trace through the real `Arbiter` in virtual time.

Each scheduler is a configuration of the same `Arbiter` on a `FakeGpu`, run on an
asyncio loop whose clock is virtual (`VirtualTimeLoop`): whenever nothing is ready
to run, the clock jumps to the next timer, so an hour of trace runs in seconds and
the library's own code runs unchanged. asyncio runs ready callbacks first in, first
out, so the same trace gives the same run, byte for byte, every time (trio shuffles
its run queue on purpose, which made runs differ).

What a simulated job does (the same for every scheduler):

* at its row's ``at`` it requests its memory (``preemptible=False`` when the row
  says so) and records how long it waited;
* it holds the memory for ``duration`` seconds of work. An elastic job (adaptive
  only) runs at the quality of the memory it holds (``min_memory`` gives the floor,
  ``memory`` 1.0, linear between) and follows its quality target: it shrinks to the
  target's size when the target drops, and grows back with ``resize`` as far as the
  arbiter grants at once when it rises: into free memory, unless a request at its
  priority or above waits (a growth queues like a request of its priority, so it goes
  after those and before lower ones, as `Arbiter.resize` would decide). A job that
  holds its full ``memory`` runs at 1.0, whatever target was announced;
* when preempted it loses its progress (a ``resumable`` row keeps it), is re-queued
  at its priority, and once re-granted first reloads for ``memory / load_bps``
  seconds while holding its memory, then works on; it counts as completed when it
  finishes, or as a timeout if a request of it waits its whole ``timeout``.

``goodput`` sums quality x memory x seconds of kept work over completed jobs,
divided by budget x span: work lost to preemption and reloads does not count.
"""

from __future__ import annotations

import asyncio
import math
import selectors
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from .._arbiter import Arbiter
from .._backend import current_backend
from .._config import ArbiterConfig
from .._errors import AllocationTimeout, InsufficientMemory
from .._quality import elastic_share_quality, size_for_quality
from .._types import GiB, MiB, Priority, WorkloadType
from ..testing import FakeGpu
from ._record import RecordedHolding, Recorder, SchedulerResult
from ._trace import Trace, TraceRow

if TYPE_CHECKING:
    from .._allocation import Allocation

__all__ = [
    "DEFAULT_LOAD_GBPS",
    "SCHEDULERS",
    "Scheduler",
    "SimulationDeadlock",
    "VirtualTimeLoop",
    "simulate",
    "simulate_scheduler",
]

RowsProgress = Callable[[int], None]

# Weights come back from host RAM at this many GiB per second after a preemption.
DEFAULT_LOAD_GBPS = 4.0

# Elastic holders grow in steps of at least this much (a real server would not
# reallocate for a few bytes of rounding); they shrink by whatever they are asked.
_RESIZE_STEP = 64 * MiB
# A holder that cannot grow retries at most every this many poll intervals.
_RETRY_LIMIT = 16


# -- virtual time ----------------------------------------------------------------


class SimulationDeadlock(RuntimeError):
    """Every task waits for something that no timer will ever bring."""


class _VirtualSelector(selectors.BaseSelector):
    """A selector that never waits: a select with a timeout moves the clock instead.

    The loop registers only its own self-pipe; nothing else does I/O in a simulation.
    """

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._keys: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._keys.pop(fd)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise SimulationDeadlock("every simulated task waits and no timer is due")
        self._loop.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose ``time()`` is virtual: it starts at 0 and, when nothing
    is ready, jumps to the next timer instead of sleeping."""

    def __init__(self) -> None:
        self._virtual_now = 0.0
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward (the loop's select does, when idle)."""
        if seconds > 0:
            self._virtual_now += seconds


# -- schedulers ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scheduler:
    """A way to configure and call the same `Arbiter`.

    ``real_priorities``: each row at its own priority (else all at ``NORMAL``);
    ``preemptible``: holders may be preempted (and asked to shrink), unless their row
    says ``preemptible: false``; ``elastic``: rows with ``min_memory_gb`` are
    requested elastic; ``adaptive_quality``: quality targets follow memory pressure.
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


# -- one run ---------------------------------------------------------------------


class _Run:
    """One scheduler's replay of one trace: the arbiter, the fake GPU and the jobs."""

    __slots__ = (
        "arbiter",
        "clock",
        "config",
        "fake",
        "floors",
        "load_bps",
        "progress",
        "recorder",
        "scheduler",
        "sleep",
        "start",
        "trace",
    )

    def __init__(
        self,
        trace: Trace,
        scheduler: Scheduler,
        budget: int,
        progress: RowsProgress | None,
        load_gbps: float,
    ) -> None:
        self.trace = trace
        self.scheduler = scheduler
        self.config = scheduler.config(budget)
        self.floors = (self.config.llm_min_quality, self.config.diffusion_min_quality)
        self.load_bps = load_gbps * GiB
        self.fake = FakeGpu(budget)
        self.arbiter = Arbiter(self.config, probe=self.fake)
        self.recorder = Recorder(
            budget,
            sorted({row.priority for row in trace.rows}, reverse=True),
            [w for w in WorkloadType if any(row.workload is w for row in trace.rows)],
            trace.first_arrival,
        )
        self.progress = progress
        self.clock: Callable[[], float] = anyio.current_time
        self.sleep: Callable[[float], Awaitable[None]] = anyio.sleep
        self.start = 0.0

    def now(self) -> float:
        return self.clock() - self.start

    async def run(self) -> SchedulerResult:
        # The loop's own clock and sleep, called directly: every event of every job
        # reads the one, most jobs call the other (anyio's would look up the loop's
        # library each time, then call the same).
        self.clock = current_backend().loop().clock
        if _asyncio_loop() is not None:
            self.sleep = asyncio.sleep
        self.start = self.clock()
        async with self.arbiter, anyio.create_task_group() as background:
            background.start_soon(self._drive_external)
            if _asyncio_loop() is not None:
                await self._run_jobs_on_asyncio()
            else:
                async with anyio.create_task_group() as jobs:
                    for row in self.trace.rows:
                        await self._arrival(row)
                        jobs.start_soon(self._job, row)
            background.cancel_scope.cancel()
        return self.recorder.result(self.scheduler.name)

    async def _arrival(self, row: TraceRow) -> None:
        await self.sleep(max(0.0, self.start + row.at - self.clock()))

    async def _run_jobs_on_asyncio(self) -> None:
        """Each row's job in a plain asyncio task, as a task group would run it: the
        first failure cancels the others and is raised, and cancellation reaches them all.

        (An anyio task carries a cancel scope and an event of its own, and every step of
        it passes through a wrapper: for jobs that need neither, most of what a short
        job costs.)
        """
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()
        failures: list[BaseException] = []
        settled = loop.create_future()

        def finished(task: asyncio.Task[None]) -> None:
            pending.discard(task)
            if not task.cancelled() and (error := task.exception()) is not None:
                failures.append(error)
            if (failures or not pending) and not settled.done():
                settled.set_result(None)

        try:
            for row in self.trace.rows:
                await self._arrival(row)
                if failures:
                    break
                task = loop.create_task(self._job(row))
                pending.add(task)
                task.add_done_callback(finished)
            if pending and not failures:
                await settled
        finally:
            for task in list(pending):
                task.cancel()
            while pending:  # let them unwind (they release what they hold)
                await asyncio.wait(list(pending))
        if failures:
            raise failures[0]

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
        preemptible = scheduler.preemptible and row.preemptible
        done = 0.0  # seconds of work kept
        useful = 0.0  # quality-seconds of the work kept
        lost = lost_at_grant = 0.0  # its `RecordedHolding.shortfall`, summed over kept runs
        reload = 0.0  # the first grant finds its weights where the trace says they are
        while True:
            asked = self.now()
            try:
                alloc = await self.arbiter.request_allocation(
                    row.workload,
                    priority,
                    row.memory,
                    min_memory=min_memory,
                    timeout=row.timeout,
                    preemptible=preemptible,
                )
            except AllocationTimeout:
                recorder.waited(row.priority, self.now() - asked)
                recorder.timed_out()
                return
            except InsufficientMemory:
                recorder.rejected()
                return
            granted = self.now()
            recorder.waited(row.priority, granted - asked)
            holding = recorder.grant(
                row.workload, alloc.memory, self._quality(alloc), granted, granted + reload
            )
            try:
                seconds = reload + row.duration - done
                if min_memory is not None:
                    finished = await self._hold_elastic(alloc, holding, seconds)
                elif preemptible:
                    with anyio.move_on_after(seconds):
                        await alloc.wait_preempted()
                    finished = not alloc.preempted
                else:
                    await self.sleep(seconds)
                    finished = True
            finally:
                alloc.release()
            now = self.now()
            recorder.release(holding, now)
            shortfall = holding.shortfall()
            if finished:
                kept = (lost + shortfall[0], lost_at_grant + shortfall[1])
                recorder.completed(row.priority, now, row.memory, useful + holding.useful, kept)
                return
            recorder.preempted(row.workload, now)
            if row.resumable:
                done += max(0.0, now - (granted + reload))
                useful += holding.useful
                lost += shortfall[0]
                lost_at_grant += shortfall[1]
            else:
                done = useful = lost = lost_at_grant = 0.0
            reload = row.memory / self.load_bps

    def _quality(self, alloc: Allocation) -> float:
        """The quality ``alloc`` runs at: that of the memory it holds."""
        if alloc.min_memory is None:
            return 1.0
        floor = self.floors[alloc.workload is not WorkloadType.LLM_INFERENCE]
        return elastic_share_quality(alloc.memory, alloc.min_memory, alloc.max_memory, floor)

    async def _hold_elastic(
        self, alloc: Allocation, holding: RecordedHolding, seconds: float
    ) -> bool:
        """Hold for ``seconds`` while following the quality target; False if preempted."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow_quality, alloc, holding)
            with anyio.move_on_after(seconds):
                await alloc.wait_preempted()
            tg.cancel_scope.cancel()
        return not alloc.preempted

    async def _follow_quality(self, alloc: Allocation, holding: RecordedHolding) -> None:
        """Resize to match each quality target.

        While the holder is below its target's size (it could not grow: something
        waited) it retries growing, since the memory it waits for frees without a new
        target: after ``poll_interval``, then twice as long each time up to
        `_RETRY_LIMIT` poll intervals, as a server polling its allocator would.
        """
        changes = alloc.quality_changes()
        retry = self.config.poll_interval
        try:
            quality = await changes.__anext__()  # the current target
            while True:
                before = alloc.memory
                wanted = await self._fit(alloc, holding, quality)
                if wanted - alloc.memory < _RESIZE_STEP:
                    retry = self.config.poll_interval
                    quality = await changes.__anext__()  # nothing to retry: just wait
                    continue
                if alloc.memory != before:
                    retry = self.config.poll_interval
                with anyio.move_on_after(retry):
                    quality = await changes.__anext__()
                    retry = self.config.poll_interval
                    continue
                retry = min(retry * 2, self.config.poll_interval * _RETRY_LIMIT)
        except StopAsyncIteration:
            return
        finally:
            with anyio.CancelScope(shield=True):
                await changes.aclose()

    async def _fit(self, alloc: Allocation, holding: RecordedHolding, quality: float) -> int:
        """Shrink to the size of ``quality``, or grow toward it if the arbiter grants;
        the size ``quality`` wants."""
        # `alloc.memory_for_quality`, without checking a target the arbiter computed.
        min_memory = alloc.min_memory
        assert min_memory is not None
        floor = self.floors[alloc.workload is not WorkloadType.LLM_INFERENCE]
        wanted = size_for_quality(quality, min_memory, alloc.max_memory, floor)
        if wanted < alloc.memory:
            await alloc.resize(wanted)
        elif wanted - alloc.memory >= _RESIZE_STEP:
            # Grow only into memory that is free now, and only when the arbiter would
            # grant the growth at once: it queues like a request of this priority, so
            # behind any waiter at this priority or above, ahead of lower ones (which do
            # not fit the free memory anyway). A holder that behaves well never makes the
            # arbiter preempt (or wait) for its comfort. (The ledger's counters and head,
            # not a whole `state()` snapshot: this runs at every target change.)
            ledger = self.arbiter._ledger
            size = min(wanted, alloc.memory + ledger.available)
            if size - alloc.memory < _RESIZE_STEP:
                return wanted
            if ledger.waiting:
                head = ledger.head()
                if head is not None and head.priority >= alloc.priority:
                    return wanted
            try:
                await alloc.resize(size, timeout=0)
            except AllocationTimeout:
                return wanted
        else:
            return wanted
        now = self.now()
        self.recorder.resize(holding, alloc.memory, now)
        self.recorder.quality(holding, self._quality(alloc), now)
        return wanted


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop; None under another library (trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def simulate_scheduler(
    trace: Trace,
    scheduler: Scheduler,
    budget: int,
    progress: RowsProgress | None = None,
    load_gbps: float = DEFAULT_LOAD_GBPS,
) -> SchedulerResult:
    """Replay ``trace`` through an `Arbiter` configured as ``scheduler`` with ``budget`` bytes.

    Runs in whatever clock the event loop has; `simulate` gives it a virtual one.
    """
    return await _Run(trace, scheduler, budget, progress, load_gbps).run()


def simulate(
    trace: Trace,
    schedulers: Sequence[Scheduler],
    budget: int,
    progress: RowsProgress | None = None,
    *,
    load_gbps: float = DEFAULT_LOAD_GBPS,
) -> list[SchedulerResult]:
    """Replay ``trace`` once per scheduler, each on a fresh `VirtualTimeLoop`.

    ``progress`` is called with 1 each time a job of any run ends; ``load_gbps`` is
    how fast a preempted job reloads its memory (GiB per second).
    """
    if not math.isfinite(load_gbps) or load_gbps <= 0:
        raise ValueError(f"load_gbps must be a finite number > 0, got {load_gbps!r}")
    results = []
    for scheduler in schedulers:
        result = anyio.run(
            simulate_scheduler,
            trace,
            scheduler,
            budget,
            progress,
            load_gbps,
            backend="asyncio",
            backend_options={"loop_factory": VirtualTimeLoop},
        )
        results.append(result)
    return results
