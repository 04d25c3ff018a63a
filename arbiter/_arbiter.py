"""The async shell: argument checks, parking waiters, lifecycle, the background tasks.

Decisions are the ledger's; this module only turns them into wake-ups, cancel
scopes and log lines. A waiter parks on a `Parker` that the releaser wakes after
the ledger has already handed it the memory.

One arbiter may serve tasks of several event loops in several threads: every call
into the ledger is made under ``Arbiter._lock`` (see `Ledger` for what it guards),
never across an ``await``, and wake-ups reach another loop through its thread-safe
entry. The ledger reads one clock, the arbiter's: that of the loop that entered
``async with arbiter``, else of the loop that last found it idle. A request's own
timeout is measured on its own loop's clock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from itertools import count
from types import TracebackType
from typing import Self

import anyio
import anyio.abc
import anyio.lowlevel
import structlog

from ._allocation import Allocation, AllocationContext
from ._arguments import DEFAULT, Default, RequestArgs, check_request
from ._backend import Backend, CancelScopeLike, LoopEntry, Parker, current_backend
from ._config import ArbiterConfig
from ._errors import (
    AllocationTimeout,
    InsufficientMemory,
    InsufficientQuality,
    ShuttingDown,
)
from ._gpu import MemoryProbe
from ._ledger import Ledger
from ._log import debug, log
from ._records import FAILED, GRANTED, Holding, Request
from ._stats import ArbiterState, ArbiterStats
from ._types import (
    MemoryPressure,
    Priority,
    WorkloadType,
    coerce_priority,
    coerce_workload,
)

__all__ = ["Arbiter"]


class _Waiter(Request):
    """A queued request and the place its task sleeps until the ledger decides."""

    __slots__ = ("parker",)
    parker: Parker


class Arbiter:
    """Hands out the memory of one GPU to awaiting tasks, by priority, then arrival.

    Build it anywhere (no event loop needed). Used without ``async with`` it is pure
    accounting; ``async with arbiter`` runs the memory-pressure poller (when a probe
    is there) and the keep_alive timer in its own task group until ``aclose()``.

    Args:
        config: the policy numbers; ``None`` detects the GPU (`ArbiterConfig.auto_detect`).
        probe: where the poller reads device memory; ``None`` uses NVML for
            ``config.device`` when NVML works, else no poller.
    """

    def __init__(
        self, config: ArbiterConfig | None = None, *, probe: MemoryProbe | None = None
    ) -> None:
        if config is None:
            config = ArbiterConfig.auto_detect()
        elif not isinstance(config, ArbiterConfig):
            raise TypeError(f"config must be an ArbiterConfig or None, got {config!r}")
        self._config = config
        self._default_timeout = config.allocation_timeout
        self._ledger = Ledger(
            config,
            wake=self._wake,
            preempt=self._preempt,
            quality_changed=self._quality_changed,
        )
        if probe is not None and not callable(getattr(probe, "read", None)):
            raise TypeError(f"probe must be a MemoryProbe (with async read()), got {probe!r}")
        self._probe = probe
        self._owns_probe = False
        self._lock = threading.Lock()
        self._loop: LoopEntry | None = None  # whose clock the ledger reads; see the module
        self._ids = count(1)
        self._closed = False
        self._task_group: anyio.abc.TaskGroup | None = None
        # The loop that runs the services, and how to reach it from another thread.
        self._home: LoopEntry | None = None
        self._services: anyio.CancelScope | None = None
        self._keep_alive_changed: anyio.Event | None = None

    @property
    def config(self) -> ArbiterConfig:
        """The configuration this arbiter was built with."""
        return self._config

    def __repr__(self) -> str:
        ledger = self._ledger
        return (
            f"<Arbiter budget={ledger.budget} granted={ledger.granted} "
            f"external={ledger.external} waiting={ledger.waiting}>"
        )

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._closed:
            raise ShuttingDown("this arbiter is closed")
        if self._task_group is not None:
            raise RuntimeError("this arbiter is already running")
        backend = current_backend()
        self._home = self._loop = backend.loop()
        with self._lock:
            self._ledger.observe(self._home.clock())
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        try:
            await task_group.start(self._serve, name="arbiter services")
        except BaseException:
            self._close()
            self._task_group = None
            await task_group.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()
        task_group, self._task_group = self._task_group, None
        if task_group is not None:
            # The body's own exception (or cancellation) passes through untouched:
            # the task group only ever holds our services, which are cancelled now.
            await task_group.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Close: every waiting and every later request raises `ShuttingDown`, the
        background tasks stop. Granted allocations stay valid until released. Idempotent."""
        self._close()
        await anyio.lowlevel.checkpoint()

    def _close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._ledger.fail_waiting(self._now())
        services, home = self._services, self._home
        if services is not None and home is not None:
            home.call(services.cancel)

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Run the poller and the keep_alive timer until the arbiter closes."""
        from ._services import start_services

        try:
            with anyio.CancelScope() as self._services:
                async with anyio.create_task_group() as services:
                    await start_services(self, services)
                    task_status.started()
        finally:
            self._services = None
            if self._owns_probe and self._probe is not None:
                self._owns_probe = False
                with anyio.CancelScope(shield=True):
                    await self._probe.aclose()

    # -- requesting memory -----------------------------------------------------

    async def request_allocation(
        self,
        workload: WorkloadType | str,
        priority: Priority | str,
        memory: int,
        *,
        min_memory: int | None = None,
        timeout: float | Default | None = DEFAULT,
        min_quality: float | None = None,
        preemptible: bool = True,
        keep_alive: float | None = None,
        label: str | None = None,
    ) -> Allocation:
        """Wait for ``memory`` bytes (or, with ``min_memory``, the largest size that fits).

        Grants go by priority, then arrival; nothing jumps the queue. The memory is
        held until `Allocation.release`.

        Raises:
            TypeError, ValueError: a bad argument (nothing is queued or counted).
            InsufficientMemory: the smallest acceptable size exceeds the budget.
            AllocationTimeout: ``timeout`` seconds passed (default: the config's).
            InsufficientQuality: the timeout passed while only a quality below
                ``min_quality`` could have been granted.
            ShuttingDown: the arbiter is closing or closed.
        """
        args = check_request(
            workload, priority, memory, min_memory, timeout, min_quality, preemptible,
            keep_alive, label,
        )  # fmt: skip
        return await self._request(args, current_backend())

    async def _request(
        self, args: RequestArgs, backend: Backend, scope: CancelScopeLike | None = None
    ) -> Allocation:
        """Admit checked arguments: fail at once, grant at once, or wait in the queue.

        A checkpoint on every path (rule 8), as anyio's ``Semaphore`` is: it checks for
        cancellation before anything is decided; a grant at once or a failure at once
        then yields (a grant cancelled at that yield is given back), and a wait yields
        by parking. So a task that allocates in a loop lets the others run. ``scope``
        (the body scope of an ``allocate()``) is registered with the grant, under the
        same lock.
        """
        (workload, priority, memory, min_memory, timeout, min_quality, preemptible, keep_alive,
         label) = args  # fmt: skip
        ledger = self._ledger
        stats = ledger.stats
        try:
            await backend.checkpoint_if_cancelled()
        except BaseException:
            with self._lock:
                stats.cancelled += 1
            raise
        smallest = memory if min_memory is None else min_memory
        limit = self._default_timeout if isinstance(timeout, Default) else timeout
        loop = backend.loop()
        clock = loop.clock
        started = clock()
        alloc = Allocation(
            self, loop, next(self._ids), workload, priority, memory, min_memory, preemptible,
            keep_alive, label, started,
        )  # fmt: skip
        request: _Waiter | None = None
        with self._lock:
            refused = smallest > ledger.budget or self._closed
            if not refused:
                if loop is not self._loop and not ledger.waiting and not ledger.granted:
                    self._adopt(loop)
                now = started if loop is self._loop else self._now()
                if min_quality is not None or not ledger.grant_now(alloc, smallest, memory, now):
                    request = _Waiter(alloc, smallest, memory, min_quality=min_quality)
                    request.may_reclaim = limit != 0
                    if ledger.submit(request, now):
                        request = None
                    else:
                        request.parker = backend.parker()
                        request.parker.arm()
                if request is None:
                    stats.successful += 1
                    alloc._scope = scope  # nothing can have preempted it yet
        if refused:
            try:
                await backend.schedule_point()
            except BaseException:
                with self._lock:
                    stats.cancelled += 1
                raise
            with self._lock:
                stats.failed += 1
            if smallest > ledger.budget:
                raise InsufficientMemory(smallest, ledger.budget)
            raise ShuttingDown("the arbiter is closed")
        if request is None:
            try:
                await backend.schedule_point()
            except BaseException:
                with self._lock:
                    ledger.release(alloc, self._now())  # the grant goes to the next waiter
                    stats.successful -= 1
                    stats.cancelled += 1
                raise
        else:
            try:
                await self._park(request, clock, started, limit)
            except BaseException as exc:
                with self._lock:
                    if isinstance(exc, ShuttingDown | AllocationTimeout | InsufficientQuality):
                        stats.failed += 1
                    else:
                        stats.cancelled += 1
                raise
            with self._lock:
                stats.successful += 1
                if scope is not None:  # a preemption from another thread sees it, or we see it
                    alloc._scope = scope
                    if alloc.preempt_requested:
                        scope.cancel()
        if keep_alive is not None:
            self._keep_alive_touched(alloc)
        if structlog.is_configured():
            log.debug(
                "allocation granted",
                id=alloc.id,
                workload=workload.value,
                priority=priority.name.lower(),
                memory=alloc.memory,
                waited=clock() - started,
            )
        return alloc

    async def _park(
        self,
        request: _Waiter,
        clock: Callable[[], float],
        started: float,
        limit: float | None,
    ) -> None:
        """Sleep until the ledger grants ``request``; take it back on timeout or cancel.

        The waiter never re-checks whether it fits: it only learns what the ledger
        decided. It wakes by itself for its deadline (on its own loop's clock) and
        for the end of the reclaim grace the ledger set (on the arbiter's clock).
        """
        ledger = self._ledger
        parker = request.parker
        deadline = math.inf if limit is None else started + limit
        with self._lock:  # the ledger may already have set a reclaim deadline
            wake_at = self._wake_at(request, deadline, clock(), self._now())
        try:
            while True:
                await parker.park(wake_at)
                with self._lock:
                    state = request.state
                    if state is GRANTED:
                        return
                    if state is FAILED:
                        break
                    own_now = clock()
                    now = self._now()
                    if own_now >= deadline:
                        ledger.withdraw(request, now)
                        break
                    if request.reclaim_deadline <= now:
                        ledger.escalate(request, now)
                        if request.state is GRANTED:
                            return
                    wake_at = self._wake_at(request, deadline, own_now, now)
                    parker.arm()
        except BaseException:
            with self._lock:
                ledger.withdraw(request, self._now())  # gives back a grant that raced it
            raise
        if request.state is FAILED:
            if request.grow and request.holding.released:
                raise RuntimeError("the allocation was released while it waited to grow")
            raise ShuttingDown("the arbiter closed while the request waited")
        holding = request.holding
        assert limit is not None and isinstance(holding, Allocation)
        debug(
            "allocation timed out",
            id=holding.id,
            memory=request.max_size,
            min_memory=request.min_size,
            priority=holding.priority.name.lower(),
            waited=clock() - started,
            grow=request.grow,
        )
        if request.best_quality is not None and request.min_quality is not None:
            raise InsufficientQuality(request.min_quality, request.best_quality)
        if not request.grow:  # a grow is no allocation: stats count requests only
            with self._lock:
                ledger.stats.timeouts += 1
        raise AllocationTimeout(limit)

    def allocate(
        self,
        workload: WorkloadType | str,
        priority: Priority | str,
        *,
        memory: int,
        min_memory: int | None = None,
        timeout: float | Default | None = DEFAULT,
        min_quality: float | None = None,
        preemptible: bool = True,
        keep_alive: float | None = None,
        label: str | None = None,
    ) -> AllocationContext:
        """``async with arbiter.allocate(...) as alloc:`` the body holds the memory.

        The body runs in a cancel scope owned by the allocation: preemption cancels it,
        the memory returns once the body has unwound, and the ``async with`` raises
        `Preempted` if the body was cut short. Same arguments as `request_allocation`.
        """
        args = check_request(
            workload, priority, memory, min_memory, timeout, min_quality, preemptible,
            keep_alive, label,
        )  # fmt: skip
        return AllocationContext(self, args)

    @staticmethod
    def _wake_at(request: Request, deadline: float, own_now: float, now: float) -> float:
        """When a waiter must wake by itself, on its own clock: at its deadline, or at
        the reclaim deadline the ledger set on the arbiter's clock, if that is sooner."""
        due = request.reclaim_deadline
        if due == math.inf:
            return deadline
        return min(deadline, own_now + (due - now))

    def release_allocation(self, alloc: Allocation) -> None:
        """Return ``alloc``'s memory at once; the same as ``alloc.release()``. Any thread."""
        if not isinstance(alloc, Allocation) or alloc._arbiter is not self:
            raise TypeError(f"alloc must be an Allocation of this arbiter, got {alloc!r}")
        self._release(alloc)

    def _release(self, alloc: Allocation) -> None:
        with self._lock:
            if alloc.released:
                return
            memory = alloc.memory
            self._ledger.release(alloc, self._now())
            alloc._signal_preempt()
            alloc._signal_quality()
        if alloc.keep_alive is not None:
            self._keep_alive_touched(alloc)
        if structlog.is_configured():
            log.debug(
                "allocation released",
                id=alloc.id,
                priority=alloc.priority.name.lower(),
                memory=memory,
                preempted=alloc.preempt_requested,
            )

    async def _resize(self, alloc: Allocation, memory: int, timeout: float | None) -> None:
        if alloc.min_memory is not None and memory < alloc.min_memory:
            raise ValueError(f"memory must be >= min_memory ({alloc.min_memory}), got {memory}")
        ledger = self._ledger
        backend = current_backend()
        with self._lock:
            if not alloc.released and memory <= alloc.memory:
                ledger.shrink(alloc, memory, self._now())
                shrunk = True
            else:
                shrunk = False
        if shrunk:
            await backend.checkpoint()
            return
        # Growing is a request: a checkpoint first, on every path (rule 8).
        await backend.checkpoint()
        clock = backend.loop().clock
        started = clock()
        with self._lock:
            if alloc.released:
                raise RuntimeError(f"cannot resize {alloc.id}: it is released")
            if memory > ledger.budget:
                raise InsufficientMemory(memory, ledger.budget)
            if self._closed:
                raise ShuttingDown("the arbiter is closed")
            delta = memory - alloc.memory
            if delta <= 0:  # it shrank meanwhile (preemption or its own resize)
                ledger.shrink(alloc, memory, self._now())
                return
            request = _Waiter(alloc, delta, delta, grow=True)
            request.may_reclaim = timeout != 0
            if ledger.submit(request, self._now()):
                return
            request.parker = backend.parker()
            request.parker.arm()
        await self._park(request, clock, started, timeout)

    # -- hooks called by the ledger (under the lock) ---------------------------

    @staticmethod
    def _wake(request: Request) -> None:
        parker = getattr(request, "parker", None)
        if parker is not None:
            parker.wake()

    @staticmethod
    def _preempt(holding: Holding) -> None:
        assert isinstance(holding, Allocation)
        debug("allocation preempted", id=holding.id, memory=holding.memory)
        holding._on_preempt()

    @staticmethod
    def _quality_changed(holding: Holding) -> None:
        assert isinstance(holding, Allocation)
        holding._signal_quality()

    def _set_busy(self, alloc: Allocation, busy: bool) -> None:
        with self._lock:
            self._ledger.set_busy(alloc, busy, self._now())
        self._keep_alive_touched(alloc)

    def _keep_alive_touched(self, alloc: Allocation) -> None:
        # Read after the ledger changed: the timer replaces the event before it reads
        # the ledger, so whichever event this finds, the timer sees the change.
        changed, home = self._keep_alive_changed, self._home
        if alloc.keep_alive is not None and changed is not None and home is not None:
            home.call(changed.set)

    # -- the clock and snapshots (any thread) ----------------------------------

    def _adopt(self, loop: LoopEntry) -> None:
        """Read ``loop``'s clock from now on, unless the services' loop owns the arbiter."""
        if self._task_group is None:
            self._loop = loop

    def _now(self) -> float:
        loop = self._loop
        if loop is None:  # never used in a loop: pure accounting from sync code
            return self._ledger.stats.last_time
        return loop.clock()

    def recommended_quality(
        self, workload: WorkloadType | str, priority: Priority | str = Priority.NORMAL
    ) -> float:
        """The quality target a new request of this workload and priority would get now."""
        workload, priority = coerce_workload(workload), coerce_priority(priority)
        with self._lock:
            return self._ledger.recommended(workload, priority)

    def state(self) -> ArbiterState:
        """A snapshot of what is held, used and waiting now."""
        ledger = self._ledger
        with self._lock:
            pressure = ledger.pressure
            return ArbiterState(
                active_llm_workloads=ledger.active(False),
                active_diffusion_workloads=ledger.active(True),
                llm_quality=ledger.recommended(WorkloadType.LLM_INFERENCE, Priority.NORMAL),
                diffusion_quality=ledger.recommended(
                    WorkloadType.IMAGE_GENERATION, Priority.NORMAL
                ),
                memory_pressure=pressure,
                pressure_level=MemoryPressure.from_ratio(pressure),
                vram_used=ledger.granted,
                external_used=ledger.external,
                vram_available=ledger.available,
                waiting=ledger.waiting,
            )

    def stats(self) -> ArbiterStats:
        """Counters, time-weighted averages and wait percentiles since construction."""
        with self._lock:
            return self._ledger.stats.snapshot(self._now())
