"""The sync core: who holds what, who waits in which order, who is granted next.

No ``await``, no clock, no I/O: every method takes ``now`` from the caller and
reports what happened through three hooks (``wake``, ``preempt``,
``quality_changed``) that the async shell turns into events and cancellations.

Invariants (checked by ``check_invariants`` and the stateful tests):

* ``granted`` is the sum of ``memory`` over live holdings, including grants
  handed to waiters that have not run yet; ``granted + external <= budget``
  holds after every grant (external use may later exceed it; then nobody is
  granted until it falls).
* Grants follow one order: priority, then arrival. After every operation the
  head of the queue does not fit (or the queue is empty): the releaser hands
  memory over, waiters never re-check for themselves.
* ``on_the_way`` is the memory of holdings asked to give everything back
  (preempted or reclaimed for keep_alive) that have not released yet.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from itertools import count

from ._config import ArbiterConfig
from ._preemption import DegradeBeforePreempt
from ._records import FAILED, GRANTED, WAITING, WITHDRAWN, FamilyTally, Holding, Request
from ._stats import StatsRecorder
from ._targets import QualityTargets
from ._types import Priority

# The records and their states are part of the ledger's interface.
__all__ = ["FAILED", "GRANTED", "WAITING", "WITHDRAWN", "Holding", "Ledger", "Request"]

_PRIORITIES_HIGH_FIRST = sorted(Priority, reverse=True)


def _noop(_: object) -> None:
    pass


class Ledger(QualityTargets, DegradeBeforePreempt):
    """Accounting and grant decisions for one GPU budget."""

    def __init__(
        self,
        config: ArbiterConfig,
        *,
        wake: Callable[[Request], None] = _noop,
        preempt: Callable[[Holding], None] = _noop,
        quality_changed: Callable[[Holding], None] = _noop,
    ) -> None:
        self.config = config
        self.budget = config.vram_budget
        self.granted = 0
        self.external = 0
        self.on_the_way = 0
        self.waiting = 0
        self.stats = StatsRecorder()
        self._wake = wake
        self._preempt = preempt
        self._quality_changed = quality_changed
        self._policy = config.effective_policy
        self._threshold = config.pressure_threshold
        self._floors = (config.llm_min_quality, config.diffusion_min_quality)
        self._queues: dict[Priority, deque[Request]] = {p: deque() for p in Priority}
        # Per priority, in grant order: victims are picked most recent first.
        self._holders: dict[Priority, dict[Holding, None]] = {p: {} for p in Priority}
        # The elastic subset, so asking for shrinks never scans the rigid holders.
        self._elastic: dict[Priority, dict[Holding, None]] = {p: {} for p in Priority}
        self._families = (FamilyTally(), FamilyTally())  # llm, diffusion: index by `diffusion`
        self._asked: dict[Holding, None] = {}  # holders with shrink requests pending
        self._watched: dict[Holding, None] = {}  # a dict: notified in a stable order
        self._keep_alive: dict[Holding, None] = {}
        self._seq = count()

    # -- queries ---------------------------------------------------------------

    @property
    def available(self) -> int:
        return max(0, self.budget - self.granted - self.external)

    @property
    def pressure(self) -> float:
        return (self.granted + self.external) / self.budget

    def active(self, diffusion: bool) -> int:
        return self._families[diffusion].count

    def holdings(self) -> Iterator[Holding]:
        for held in self._holders.values():
            yield from held

    def head(self) -> Request | None:
        """The next request to be granted; cancelled entries are dropped lazily."""
        for priority in _PRIORITIES_HIGH_FIRST:
            queue = self._queues[priority]
            while queue and queue[0].state is not WAITING:
                queue.popleft()
            if queue:
                return queue[0]
        return None

    # -- requests --------------------------------------------------------------

    def grant_now(self, holding: Holding, min_size: int, max_size: int, now: float) -> bool:
        """The fast path of a new allocation: grant it at once if nothing waits and it
        fits, without queueing a request; False (and nothing changed) otherwise."""
        if self.waiting:
            return False
        free = self.budget - self.granted - self.external
        if free < min_size:
            return False
        self._hold(holding, max_size if max_size < free else free, now)
        self.stats.record_wait(holding.priority, 0.0)
        self._refresh(now)
        return True

    def submit(self, request: Request, now: float) -> bool:
        """Queue ``request``; True when it was granted at once (nothing ahead, and it fits)."""
        request.enqueued_at = now
        if request.grow:
            request.holding.growing.append(request)
        self._queues[request.priority].append(request)
        self.waiting += 1
        self._dispatch(now)
        return request.state is GRANTED

    def withdraw(self, request: Request, now: float) -> None:
        """Take back a request whose waiter timed out or was cancelled.

        A grant that raced with it is returned, so the memory goes to the next waiter.
        """
        if request.state is WAITING:
            request.state = WITHDRAWN
            if request.grow:
                request.holding.growing.remove(request)
            self.waiting -= 1
            self._drop_stale()
            self._end_reclaim(request)
        elif request.state is GRANTED:
            request.state = WITHDRAWN
            if request.grow:
                # The holder may have shrunk (or released) since: undo no more than it holds.
                holding = request.holding
                if not holding.released:
                    holding.max_memory = max(request.max_before, holding.memory - request.size)
                    if not holding.elastic:
                        self._elastic[holding.priority].pop(holding, None)
                    self._give_back(holding, min(request.size, holding.memory), now)
            else:
                self.release(request.holding, now)
            return
        else:
            return
        self._dispatch(now)

    def observe(self, now: float) -> None:
        """Start (or continue) the time-weighted averages at ``now``."""
        self._refresh(now)

    def fail_waiting(self, now: float) -> list[Request]:
        """Fail every waiting request (the arbiter is closing); returns them."""
        failed = []
        for queue in self._queues.values():
            for request in queue:
                if request.state is WAITING:
                    request.state = FAILED
                    self._end_reclaim(request)
                    failed.append(request)
            queue.clear()
        self.waiting = 0
        for request in failed:
            self._wake(request)
        self._refresh(now)
        return failed

    def escalate(self, request: Request, now: float) -> None:
        """The reclaim grace of ``request`` has passed: preempt if shrinking was not enough."""
        if request.state is WAITING and request.reclaim_phase == 1:
            request.reclaim_phase = 2
            request.reclaim_deadline = float("inf")
            self._dispatch(now)

    # -- holdings --------------------------------------------------------------

    def release(self, holding: Holding, now: float) -> None:
        """Return all of ``holding``'s memory; idempotent."""
        if holding.released:
            return
        holding.notified_quality = self.target(holding)  # what `quality` reads from now on
        holding.released = True
        if holding.growing:
            self._fail_growing(holding)
        if holding.granted_seq < 0:
            return
        memory = holding.memory
        if holding.preempt_requested:
            self.on_the_way -= memory
        self.granted -= memory
        family = self._families[holding.diffusion]
        family.granted -= memory
        family.at[holding.priority] -= memory
        family.count -= 1
        holding.memory = 0
        del self._holders[holding.priority][holding]
        # Membership tests first: most holders are in none of these registries.
        if holding.shrink_asks:
            self._asked.pop(holding, None)
        if holding.min_memory is not None:
            self._elastic[holding.priority].pop(holding, None)
        if holding.keep_alive is not None:
            self._keep_alive.pop(holding, None)
        if holding.watchers:
            self._watched.pop(holding, None)
        self._dispatch(now)

    def _fail_growing(self, holding: Holding) -> None:
        """``holding`` is released: nothing is left to grow."""
        for growing in holding.growing:
            if growing.state is not WAITING:
                continue
            growing.state = FAILED
            self.waiting -= 1
            self._end_reclaim(growing)
            self._wake(growing)
        holding.growing.clear()
        self._drop_stale()

    def _drop_stale(self) -> None:
        """Once nothing waits, the queues hold only requests that left early: let them go
        now (``_dispatch`` looks at the queues only while something waits)."""
        if not self.waiting:
            for queue in self._queues.values():
                queue.clear()

    def shrink(self, holding: Holding, size: int, now: float) -> None:
        """Lower ``holding`` to ``size`` bytes at once, waking whoever now fits."""
        self._give_back(holding, holding.memory - size, now)

    def _give_back(self, holding: Holding, amount: int, now: float) -> None:
        holding.memory -= amount
        self.granted -= amount
        self._families[holding.diffusion].granted -= amount
        self._families[holding.diffusion].at[holding.priority] -= amount
        if holding.preempt_requested:
            self.on_the_way -= amount
        self._dispatch(now)

    def set_external(self, external: int, now: float) -> None:
        """Record memory used on the device by other processes."""
        if external != self.external:
            self.external = external
            self._dispatch(now)

    def watch(self, holding: Holding, delta: int) -> None:
        """Count a reader of ``holding``'s quality changes in (+1) or out (-1)."""
        holding.watchers += delta
        if holding.watchers > 0 and not holding.released:
            self._watched[holding] = None
        else:
            self._watched.pop(holding, None)

    def set_busy(self, holding: Holding, busy: bool, now: float) -> None:
        holding.busy_spans += 1 if busy else -1
        if holding.busy_spans == 0:
            holding.idle_since = now

    def reclaim_idle(self, now: float) -> float | None:
        """Ask holders idle past their keep_alive to give back; the next expiry, if any."""
        next_due: float | None = None
        for holding in list(self._keep_alive):
            if holding.busy_spans or holding.preempt_requested:
                continue
            assert holding.keep_alive is not None
            due = holding.idle_since + holding.keep_alive
            if due <= now:
                self.stats.keep_alive_reclaims += 1
                self._request_preemption(holding)
            elif next_due is None or due < next_due:
                next_due = due
        return next_due

    # -- the grant loop --------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        while self.waiting and (request := self.head()) is not None:
            size = self._fit(request)
            if size is None:
                self._reclaim_for(request, now)
                break
            self._queues[request.priority].popleft()
            self.waiting -= 1
            self._grant(request, size, now)
        self._refresh(now)

    def _fit(self, request: Request) -> int | None:
        free = self.budget - self.granted - self.external
        if free < request.min_size:
            return None
        size = min(request.max_size, free)
        if request.min_quality is not None:
            # The target it would have right after the grant.
            holding = request.holding
            if request.grow:
                quality = self._target_at(holding, holding.memory + size, self.granted + size)
            else:
                quality = self._target_at(holding, size, self.granted + size)
            if quality < request.min_quality:
                if request.best_quality is None or quality > request.best_quality:
                    request.best_quality = quality
                return None
        return size

    def _grant(self, request: Request, size: int, now: float) -> None:
        """Hand ``size`` bytes to ``request``, which is no longer queued."""
        request.state = GRANTED
        request.size = size
        holding = request.holding
        if request.grow:
            holding.growing.remove(request)
            if holding.preempt_requested:  # it all goes back with the holder
                self.on_the_way += size
            self.granted += size
            self._families[holding.diffusion].granted += size
            self._families[holding.diffusion].at[holding.priority] += size
            holding.memory += size
            request.max_before = holding.max_memory
            if holding.memory > holding.max_memory:
                holding.max_memory = holding.memory
                if holding.elastic:  # min_memory == old size: it just became elastic
                    self._elastic[holding.priority].setdefault(holding, None)
        else:
            self._hold(holding, size, now)
        self.stats.record_wait(request.priority, now - request.enqueued_at)
        self._end_reclaim(request)
        self._wake(request)

    def _hold(self, holding: Holding, size: int, now: float) -> None:
        """Register a new holding of ``size`` bytes."""
        self.granted += size
        family = self._families[holding.diffusion]
        family.granted += size
        family.at[holding.priority] += size
        family.count += 1
        holding.memory = size
        holding.granted_seq = next(self._seq)
        self._holders[holding.priority][holding] = None
        if holding.min_memory is not None and holding.elastic:
            self._elastic[holding.priority][holding] = None
        if holding.keep_alive is not None:
            holding.idle_since = now
            self._keep_alive[holding] = None

    # -- quality targets -------------------------------------------------------

    def _refresh(self, now: float) -> None:
        """Record the time-weighted averages and tell watchers whose target moved."""
        pressure = (self.granted + self.external) / self.budget
        llm_family, diffusion_family = self._families
        if pressure < self._threshold:  # every policy gives 1.0
            llm = 1.0 if llm_family.count else None
            diffusion = 1.0 if diffusion_family.count else None
        else:
            llm = self._policy_for(False, Priority.NORMAL, pressure) if llm_family.count else None
            diffusion = (
                self._policy_for(True, Priority.NORMAL, pressure)
                if diffusion_family.count
                else None
            )
        self.stats.observe(now, pressure, llm, diffusion)
        self._retarget_all()

    def check_invariants(self) -> None:
        """Assert the invariants written at the top of this module (for tests)."""
        live = list(self.holdings())
        assert self.granted == sum(h.memory for h in live), "granted != sum of holdings"
        assert self.on_the_way == sum(h.memory for h in live if h.preempt_requested)
        assert self.waiting == sum(
            1 for q in self._queues.values() for r in q if r.state is WAITING
        )
        for family in self._families:
            assert sum(family.at) == family.granted, "per-priority tallies drift"
        head = self.head()
        if head is not None:
            assert self._fit(head) is None, "the head fits but was left waiting"
