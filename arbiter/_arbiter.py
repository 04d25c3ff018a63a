"""The async shell around the core: parking waiters, lifecycle, the background tasks.

Decisions are the core's (`Ledger`); this module drives it through its port and turns
what it reports into wake-ups, cancel scopes and log lines. A waiter parks on a
`Parker` that the releaser wakes after the core has already handed it the memory.

One arbiter may serve tasks of several event loops in several threads: every call
into the core is made under ``Arbiter._lock`` (see `Ledger` for what it guards),
never across an ``await``, and wake-ups reach another loop through its thread-safe
entry. The core reads one clock, the arbiter's: that of the loop that entered
``async with arbiter``, else of the loop that last found it idle, carried on from
where the previous one stood. A request's own timeout is measured on its own loop's
clock.

The core owns time: `Ledger.advance` makes every timed decision and says when it is
next due. ``async with arbiter`` runs one timer task that calls it then; without it,
a waiter that the core gave a reclaim deadline calls it itself.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from itertools import count
from types import TracebackType
from typing import Any, Protocol, Self, cast

import anyio
import anyio.abc
import anyio.lowlevel

from ._allocation import Allocation, AllocationContext
from ._arguments import DEFAULT, Default, RequestArgs, check_request
from ._backend import Backend, LoopEntry, Parker, current_backend
from ._config import ArbiterConfig
from ._errors import (
    AllocationTimeout,
    InsufficientMemory,
    InsufficientQuality,
    Preempted,
    ShuttingDown,
)
from ._gpu import GpuReading, MemoryProbe
from ._ledger import Event, Ledger, Outcome
from ._locking import under_lock
from ._log import configured, debug, log
from ._records import FAILED, GRANTED, Family, Growth, Holding, NewAllocation, Request
from ._stats import ArbiterState, ArbiterStats
from ._types import (
    MemoryPressure,
    Priority,
    WorkloadType,
    coerce_priority,
    coerce_workload,
)

__all__ = ["AllocationOwner", "Arbiter"]

# Enum members are looked up through their metaclass; the grant path reads these.
_GRANTED, _FAILED, _PREEMPT, _QUALITY = Event.GRANTED, Event.FAILED, Event.PREEMPT, Event.QUALITY


class AllocationOwner(Protocol):
    """Who holds allocations besides the arbiter itself: a daemon's client session."""

    def allocation_changed(self, alloc: Allocation, preempted: bool) -> None:
        """``alloc`` was asked to give its memory back (``preempted``), or its quality
        target moved.
        Called under the arbiter's lock, in whichever thread decided it: it must not
        call back into the arbiter's public methods."""
        ...


class Arbiter:
    """Hands out the memory of one GPU to awaiting tasks, by priority, then arrival.

    Build it anywhere (no event loop needed). Used without ``async with`` it is pure
    accounting; ``async with arbiter`` runs the memory-pressure poller (when a probe
    is there) and the core's timer (keep_alive, reclaim graces) in its own task group
    until ``aclose()``.

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
        if probe is not None and not callable(getattr(probe, "read", None)):
            raise TypeError(f"probe must be a MemoryProbe (with async read()), got {probe!r}")
        self._config = config
        self._default_timeout = config.allocation_timeout
        self._ledger = Ledger(config, sink=self._on_event)
        self._probe = probe
        self._owns_probe = False
        self._lock = threading.Lock()
        self._loop: LoopEntry | None = None  # whose clock the core reads; see the module
        self._clock_offset = 0.0  # added to it, so the core's time never jumps
        self._ids = count(1)
        self._closed = False
        self._task_group: anyio.abc.TaskGroup | None = None
        # The loop that runs the services, and how to reach it from another thread.
        self._home: LoopEntry | None = None
        self._services: anyio.CancelScope | None = None
        self._timer_changed: anyio.Event | None = None

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

    # == lifecycle =============================================================

    async def __aenter__(self) -> Self:
        if self._closed:
            raise ShuttingDown("this arbiter is closed")
        if self._task_group is not None:
            raise RuntimeError("this arbiter is already running")
        home = self._home = current_backend().loop()
        with self._lock:
            self._adopt(home)
            self._ledger.observe(self._now())
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
        """Run the core's timer and, when a probe is there, the poller, until closed."""
        try:
            with anyio.CancelScope() as self._services:
                async with anyio.create_task_group() as services:
                    self._timer_changed = anyio.Event()
                    services.start_soon(self._run_timer, name="arbiter timer")
                    await self._start_poller(services)
                    task_status.started()
        finally:
            self._services = None
            if self._owns_probe and self._probe is not None:
                self._owns_probe = False
                with anyio.CancelScope(shield=True):
                    await self._probe.aclose()

    async def _run_timer(self) -> None:
        """Call the core's `advance` whenever it says it is next due."""
        while True:
            # Replaced before the core is read: a change made after this read sets the
            # new event, whichever thread makes it (see `_poke_timer`).
            changed = self._timer_changed = anyio.Event()
            with self._lock:
                now = self._now()
                due = self._ledger.advance(now)
                home = self._home
                assert home is not None
                # The core's time on the clock of the loop that runs the services.
                deadline = math.inf if due is None else home.clock() + (due - now)
            with anyio.CancelScope(deadline=deadline):
                await changed.wait()

    def _poke_timer(self) -> None:
        changed, home = self._timer_changed, self._home
        if changed is not None and home is not None:
            home.call(changed.set)

    async def _start_poller(self, task_group: anyio.abc.TaskGroup) -> None:
        probe = self._probe
        if probe is None:
            from ._gpu import open_default_probe

            probe = await open_default_probe(self._config.device)
            if probe is None:
                return
            self._probe = probe
            self._owns_probe = True
        from ._poller import MemoryPoller

        ledger = self._ledger

        def on_reading(reading: GpuReading) -> None:
            with self._lock:
                if reading.external is not None:
                    external = reading.external
                else:
                    # No per-process figures: whatever is used beyond our grants is
                    # someone else's (Ollama's estimate): never count on what we cannot see.
                    external = max(0, reading.used - ledger.granted)
                ledger.set_external(external, self._now())

        poller = MemoryPoller(
            probe,
            interval=self._config.poll_interval,
            max_backoff=max(self._config.poll_interval, self._config.poll_backoff_max),
            on_reading=on_reading,
        )
        task_group.start_soon(poller.run, name="arbiter poller")

    # == requesting memory =====================================================

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
        return await self._admit(args, current_backend())

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

    async def _admit(
        self,
        args: RequestArgs,
        backend: Backend,
        body: AllocationContext | None = None,
        owner: AllocationOwner | None = None,
    ) -> Allocation:
        """Admit checked arguments: fail at once, grant at once, or wait in the queue.

        A checkpoint on every path (rule 8), taken as anyio's ``Semaphore`` takes it: a
        cancellation check before anything is decided (a request already cancelled must
        not even be granted or queue: either may lower others' quality targets, or make
        it the head that asks holders for memory), then the decision, then a yield. So
        requests are decided in the order they are made (rule 3), and:

        * a grant or a failure at once yields after it (a grant cancelled at that yield
          is given back);
        * a request that waits queues behind a head of its priority or higher (nothing
          but the queue moves: the head does not fit) and parks, the park being its
          yield.

        So a task that allocates in a loop lets the others run.
        ``body`` (an ``allocate()``): its scope is the allocation's before it can be
        granted (a preemption that comes before the body starts, from any thread,
        cancels it, and the body starts cancelled), and the body starts here, granted.
        ``owner`` (a daemon's session) is told of the allocation's preemption and quality
        changes, and can have everything it holds released at once (`_release_owner`);
        by default the arbiter itself owns it.
        """
        (workload, priority, memory, min_memory, timeout, min_quality, preemptible, keep_alive,
         label) = args  # fmt: skip
        ledger = self._ledger
        tallies = ledger.tallies
        smallest = memory if min_memory is None else min_memory
        try:
            await backend.checkpoint_if_cancelled()
        except BaseException as exc:
            under_lock(self._lock, exc, lambda: ledger.count_unqueued(Outcome.CANCELLED))
            raise
        loop = backend.loop()
        clock = loop.clock
        started = clock()
        holding = Holding(
            workload, priority, memory, min_memory, preemptible, keep_alive, owner or self
        )
        alloc = holding.ticket = Allocation(self, holding, loop, next(self._ids), label, started)
        if body is not None:
            alloc._scope = backend.cancel_scope()
        request: NewAllocation | None = None
        with self._lock:
            refused = smallest > ledger.budget or self._closed
            if not refused:
                if loop is self._loop:
                    now = started + self._clock_offset
                else:
                    if self._task_group is None and not tallies.waiting and not tallies.granted:
                        self._adopt(loop)
                    now = self._now()
                if (
                    tallies.waiting  # nothing jumps the queue: no need to ask
                    or min_quality is not None
                    or not ledger.grant_now(holding, smallest, memory, now)
                ):
                    limit = self._default_timeout if isinstance(timeout, Default) else timeout
                    parker = backend.parker(loop, True)
                    request = NewAllocation(holding, smallest, memory, min_quality, parker)
                    request.may_reclaim = limit != 0
                    if ledger.submit(request, now):
                        request = None
                    elif request.reclaim_deadline == math.inf:  # the common case
                        wake_at = math.inf if limit is None else started + limit
                    else:
                        wake_at = self._first_wake(request, started, limit, clock, now)
        if refused:
            await self._refuse(backend)
            if smallest > ledger.budget:
                raise InsufficientMemory(smallest, ledger.budget)
            raise ShuttingDown("the arbiter is closed")
        if request is None:
            try:
                await backend.checkpoint()
            except BaseException as exc:
                # The memory goes to the next waiter.
                under_lock(self._lock, exc, lambda: ledger.ungrant(holding, self._now()))
                raise
        else:
            # The first sleep here, not in `_park`: a handover resumes one coroutine less.
            try:
                await parker.park(wake_at)
            except BaseException as exc:
                self._withdraw(exc, request)  # gives back a grant that raced it
                raise
            if request.state is not GRANTED:  # read without the lock: see `_park`
                await self._park(request, clock, started, limit, None)
        if keep_alive is not None:
            self._poke_timer()
        if configured():
            log.debug(
                "allocation granted",
                id=alloc.id,
                workload=workload.value,
                priority=priority.name.lower(),
                memory=holding.memory,
                waited=clock() - started,
            )
        if body is not None:
            body._start(alloc)
        return alloc

    def _grant_at_once(self, args: RequestArgs, owner: AllocationOwner) -> Allocation | None:
        """Grant ``args`` to ``owner`` now, if nothing waits and it fits; else ``None``
        and nothing changed. It never waits nor yields: it serves a daemon's request
        message, whose client's own call was the checkpoint."""
        (workload, priority, memory, min_memory, _timeout, min_quality, preemptible,
         keep_alive, label) = args  # fmt: skip
        if min_quality is not None:
            return None
        smallest = memory if min_memory is None else min_memory
        loop = current_backend().loop()
        holding = Holding(workload, priority, memory, min_memory, preemptible, keep_alive, owner)
        ledger = self._ledger
        with self._lock:
            if self._closed or not ledger.grant_now(holding, smallest, memory, self._now()):
                return None
            alloc = holding.ticket = Allocation(
                self, holding, loop, next(self._ids), label, loop.clock()
            )
        if keep_alive is not None:
            self._poke_timer()
        return alloc

    def _count_unqueued(self, outcome: Outcome) -> None:
        """Count a request that ended before it reached the core's queue (a daemon's,
        held back while a restarted daemon admits re-claims first)."""
        with self._lock:
            self._ledger.count_unqueued(outcome)

    async def _refuse(self, backend: Backend) -> None:
        """The checkpoint of a request refused at once, and its count."""
        try:
            await backend.checkpoint()
        except BaseException as exc:
            under_lock(self._lock, exc, lambda: self._ledger.count_unqueued(Outcome.CANCELLED))
            raise
        with self._lock:
            self._ledger.count_unqueued(Outcome.REFUSED)

    def _first_wake(
        self,
        request: Request,
        started: float,
        limit: float | None,
        clock: Callable[[], float],
        now: float,
    ) -> float:
        """When a request queued at ``started`` (own clock) and ``now`` (the core's)
        first wakes by itself (under the lock: the core may already have set a reclaim
        deadline)."""
        deadline = math.inf if limit is None else started + limit
        if request.reclaim_deadline == math.inf:
            return deadline
        return self._wake_at(request, deadline, clock(), now)

    async def _park(
        self,
        request: Request,
        clock: Callable[[], float],
        started: float,
        limit: float | None,
        wake_at: float | None,
    ) -> None:
        """Sleep until the core grants ``request``; take it back on timeout or cancel.

        The waiter never re-checks whether it fits: it only learns what the core
        decided. It wakes by itself for its deadline (on its own loop's clock) and
        for the reclaim deadline the core set (on the arbiter's clock), when it calls
        the core's `advance`; ``wake_at`` is the first of these (`_first_wake`), or
        None when the caller has slept once already.
        """
        ledger = self._ledger
        parker: Parker = request.ticket  # type: ignore[assignment]
        deadline = math.inf if limit is None else started + limit
        try:
            if wake_at is not None:
                await parker.park(wake_at)
            while True:
                # The core leaves WAITING once, under the lock and before it wakes the
                # waiter; GRANTED and FAILED are final: read without the lock.
                state = request.state
                if state is GRANTED or state is FAILED:
                    break
                with self._lock:
                    state = request.state
                    if state is GRANTED or state is FAILED:
                        break
                    own_now = clock()
                    now = self._now()
                    if own_now >= deadline:
                        quality_unmet = (
                            request.best_quality is not None and request.min_quality is not None
                        )
                        ledger.withdraw(
                            request,
                            now,
                            Outcome.QUALITY_UNMET if quality_unmet else Outcome.TIMED_OUT,
                        )
                        break
                    if request.reclaim_deadline <= now:
                        ledger.advance(now)
                        if request.state is GRANTED:
                            break
                    wake_at = self._wake_at(request, deadline, own_now, now)
                    parker.arm()
                await parker.park(wake_at)
        except BaseException as exc:
            self._withdraw(exc, request)  # gives back a grant that raced it
            raise
        if request.state is GRANTED:
            return
        growth = type(request) is Growth
        if request.state is FAILED:
            if growth and request.holding.released:
                raise RuntimeError("the allocation was released while it waited to grow")
            raise ShuttingDown("the arbiter closed while the request waited")
        assert limit is not None
        holding = request.holding
        alloc = holding.ticket  # None once released (a growth whose holder let go since)
        debug(
            "allocation timed out",
            id=alloc.id if isinstance(alloc, Allocation) else None,
            memory=request.max_size,
            min_memory=request.min_size,
            priority=holding.priority.name.lower(),
            waited=clock() - started,
            grow=growth,
        )
        if request.best_quality is not None and request.min_quality is not None:
            raise InsufficientQuality(request.min_quality, request.best_quality)
        raise AllocationTimeout(limit)

    def _withdraw(self, exc: BaseException, request: Request) -> None:
        """Take back a request whose waiter leaves with ``exc`` (a grant that raced it
        goes to the next waiter)."""
        under_lock(
            self._lock, exc, lambda: self._ledger.withdraw(request, self._now(), Outcome.CANCELLED)
        )

    @staticmethod
    def _wake_at(request: Request, deadline: float, own_now: float, now: float) -> float:
        """When a waiter must wake by itself, on its own clock: at its deadline, or at
        the reclaim deadline the core set on the arbiter's clock, if that is sooner and
        still ahead (a passed one was handed to `advance`: waking for it again would
        spin while the request is not the head)."""
        due = request.reclaim_deadline
        if due <= now or due == math.inf:
            return deadline
        return min(deadline, own_now + (due - now))

    # == the handles' port (`AllocationPort`) ==================================

    def release_allocation(self, alloc: Allocation) -> None:
        """Return ``alloc``'s memory at once; the same as ``alloc.release()``. Any thread."""
        if not isinstance(alloc, Allocation) or alloc._port is not self:
            raise TypeError(f"alloc must be an Allocation of this arbiter, got {alloc!r}")
        holding = alloc._holding
        with self._lock:
            if holding.released:
                return
            memory = holding.memory
            self._ledger.release(holding, self._now())
            self._let_go(alloc)
        if holding.keep_alive is not None:
            self._poke_timer()
        if configured():
            log.debug(
                "allocation released",
                id=alloc.id,
                priority=holding.priority.name.lower(),
                memory=memory,
                preempted=holding.preempt_requested,
            )

    async def _resize(
        self, alloc: Allocation, memory: int, timeout: float | Default | None
    ) -> None:
        """Resize ``alloc`` (arguments checked by the handle).

        Growing is a request (rule 8): checked for cancellation, decided, then a yield,
        at which a growth granted at once and cancelled there is given back; or a park.
        """
        holding = alloc._holding
        if holding.min_memory is not None and memory < holding.min_memory:
            raise ValueError(f"memory must be >= min_memory ({holding.min_memory}), got {memory}")
        limit = self._default_timeout if isinstance(timeout, Default) else timeout
        ledger = self._ledger
        backend = current_backend()
        with self._lock:
            shrunk = not holding.released and memory <= holding.memory
            if shrunk:
                ledger.shrink(holding, memory, self._now())
        if shrunk:
            await backend.checkpoint()
            return
        await backend.checkpoint_if_cancelled()
        loop = backend.loop()
        clock = loop.clock
        started = clock()
        failure: Exception | None = None
        request: Growth | None = None
        waits = False
        with self._lock:
            if holding.released:
                failure = RuntimeError(f"cannot resize {alloc.id}: it is released")
            elif memory > ledger.budget:
                failure = InsufficientMemory(memory, ledger.budget)
            elif self._closed:
                failure = ShuttingDown("the arbiter is closed")
            elif holding.growing:
                # Each growth is measured from the size held: a second one would add
                # its difference on top of the first.
                failure = RuntimeError(f"cannot resize {alloc.id}: a growth is already waiting")
            elif memory <= holding.memory:  # it shrank meanwhile (preemption or its own resize)
                ledger.shrink(holding, memory, self._now())
            else:
                parker = backend.parker(loop)
                request = Growth(holding, memory - holding.memory, parker)
                request.may_reclaim = limit != 0
                now = self._now()
                waits = not ledger.submit(request, now)
                if waits:
                    parker.arm()
                    wake_at = self._first_wake(request, started, limit, clock, now)
        if not waits:
            try:
                await backend.checkpoint()
            except BaseException as exc:
                if request is not None:  # the growth goes back; the old size is kept
                    self._withdraw(exc, request)
                raise
            if failure is not None:
                raise failure
            return
        assert request is not None
        await self._park(request, clock, started, limit, wake_at)

    def _quality_of(self, alloc: Allocation) -> float:
        return self._ledger.target(alloc._holding)  # the caller holds the lock

    def _floor_of(self, alloc: Allocation) -> float:
        return self._ledger.floor(alloc._holding)

    def _set_busy(self, alloc: Allocation, busy: bool) -> None:
        with self._lock:
            self._ledger.set_busy(alloc._holding, busy, self._now())
        if alloc._holding.keep_alive is not None:
            self._poke_timer()

    def _watch(self, alloc: Allocation, delta: int) -> None:
        self._ledger.watch(alloc._holding, delta)  # the caller holds the lock

    def _cut_short(self, alloc: Allocation) -> BaseException:
        return Preempted(f"{alloc.id} was preempted by a higher priority")

    @staticmethod
    def _let_go(alloc: Allocation) -> None:
        """After the core released ``alloc`` (under the lock): its sleepers return, and
        the core reports nothing more of it. Without its ticket the record and its
        handle no longer point at each other, and are freed as soon as the holder drops
        the handle instead of by the cycle collector."""
        alloc._holding.ticket = None
        alloc._on_release()

    # == owners (a daemon's sessions) ==========================================

    def _release_owner(self, owner: AllocationOwner) -> None:
        """Release everything ``owner`` holds and withdraw what it waits for, in one
        step of the core (a session that ended). Any thread."""
        ledger = self._ledger
        with self._lock:
            held = [h.ticket for h in ledger.holdings() if h.owner is owner]
            ledger.release_owner(owner, self._now())
            for alloc in held:
                assert isinstance(alloc, Allocation)
                self._let_go(alloc)
        self._poke_timer()

    # == what the core reports (under the lock) ================================

    def _on_event(self, event: Event, ticket: Any) -> None:
        if event is _GRANTED or event is _FAILED:
            ticket.wake()  # the request's parker
        elif event is _PREEMPT:
            assert isinstance(ticket, Allocation)
            debug("allocation preempted", id=ticket.id, memory=ticket.memory)
            ticket._on_preempt()
            owner = ticket._holding.owner
            if owner is not self:
                cast(AllocationOwner, owner).allocation_changed(ticket, True)
        elif event is _QUALITY:
            assert isinstance(ticket, Allocation)
            ticket._signal_quality()
            owner = ticket._holding.owner
            if owner is not self:
                cast(AllocationOwner, owner).allocation_changed(ticket, False)
        else:  # RETIME: the waiter re-parks with the new deadline; the timer looks again
            ticket.wake()
            self._poke_timer()

    # == the clock and snapshots (any thread) ==================================

    def _adopt(self, loop: LoopEntry) -> None:
        """Read ``loop``'s clock from now on (under the lock). The core's time goes on
        from where it stands, so the times it keeps (reclaim deadlines, idle-since, the
        averages' last step) stay true whatever the new clock reads."""
        if self._loop is not None:
            self._clock_offset = self._now() - loop.clock()
        self._loop = loop

    def _now(self) -> float:
        loop = self._loop
        if loop is None:  # never used in a loop: pure accounting from sync code
            return self._ledger.stats.last_time
        return loop.clock() + self._clock_offset

    def recommended_quality(
        self, workload: WorkloadType | str, priority: Priority | str = Priority.NORMAL
    ) -> float:
        """The quality target a new request of this workload and priority would get now."""
        workload, priority = coerce_workload(workload), coerce_priority(priority)
        with self._lock:
            return self._ledger.recommended(workload, priority)

    def _allocations(self) -> tuple[list[Allocation], list[tuple[Allocation, int, float]]]:
        """Every allocation held, and every request in the queue (the allocation it is
        for, the bytes it waits for, the seconds it has waited), read at one moment: a
        daemon's status."""
        ledger = self._ledger
        with self._lock:
            now = self._now()
            held = [cast(Allocation, h.ticket) for h in ledger.holdings()]
            queued = [
                (cast(Allocation, r.holding.ticket), r.max_size, now - r.enqueued_at)
                for r in ledger.waiters()
            ]
        return held, queued

    def _recommended_table(self) -> list[float]:
        """`recommended_quality` of every workload and priority (declaration order,
        priorities within workloads), read at one moment: a daemon's snapshot."""
        ledger = self._ledger
        by_family: dict[Family, list[float]] = {}
        table: list[float] = []
        with self._lock:
            for workload in WorkloadType:
                family = Family.of(workload)
                row = by_family.get(family)
                if row is None:
                    row = by_family[family] = [ledger.recommended(workload, p) for p in Priority]
                table += row
        return table

    def state(self) -> ArbiterState:
        """A snapshot of what is held, used and waiting now."""
        ledger = self._ledger
        with self._lock:
            pressure = ledger.pressure
            return ArbiterState(
                active_llm_workloads=ledger.active(Family.LLM),
                active_diffusion_workloads=ledger.active(Family.DIFFUSION),
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
