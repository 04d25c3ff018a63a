"""The sync core: who holds what, who waits in which order, who is granted next.

No ``await``, no clock, no I/O. This is the port the shells drive (the in-process
`Arbiter`, and the daemon that serves it to other processes): every call takes
``now`` from the caller's clock, every timed decision (the reclaim grace, keep_alive,
the time-weighted averages) is made here from those times, and `Ledger.advance`
says when the core next needs to be called. What happens is reported through one
sink, ``sink(event, ticket)``, where the ticket is the caller's own name for the
request or holding (`Event` lists what is reported).

It is composed of three parts that own their state: the `Tallies` it keeps, a
`QualityCalculator` that reads them, and a `Reclaimer` that owns the shrink
requests it makes.

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
* The queues hold exactly the ``WAITING`` requests: a request that leaves (granted,
  withdrawn, failed) leaves its queue at once, so what the ledger keeps grows with
  the live holders and waiters, never with past requests (trio#548).
* Outcomes add up: every request that passed its argument checks is counted once,
  as successful, failed or cancelled (a growth is no allocation and is not counted).

Threads: the ledger is not thread-safe by itself. Its owner calls every method under
one ``threading.Lock`` (``Arbiter._lock``), which guards all of the ledger's state and
the records it keeps; no method awaits, so the lock is never held across an
``await``. The sink runs under it and must only schedule wake-ups (never call back).
One read is safe without it: a request's ``state`` leaves ``WAITING`` once, under the
lock, set last (after the holding holds its memory) and before its waiter is woken;
``GRANTED`` and ``FAILED`` are final for the waiter, which may read them unlocked.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from enum import Enum
from itertools import count

from ._config import ArbiterConfig
from ._preemption import Reclaimer
from ._quality import QUALITY_TOLERANCE, QualityPolicy, size_for_quality
from ._records import (
    FAILED,
    GRANTED,
    WAITING,
    WITHDRAWN,
    Family,
    Growth,
    Holding,
    NewAllocation,
    ReclaimPhase,
    Request,
    Tallies,
)
from ._stats import StatsRecorder
from ._targets import QualityCalculator
from ._types import Priority, WorkloadType

__all__ = ["Event", "Ledger", "Outcome"]

_PRIORITIES_HIGH_FIRST = sorted(Priority, reverse=True)
_NORMAL = Priority.NORMAL
_ABSENT = object()
_INF = math.inf


class Event(Enum):
    """What the core reports through its sink, with the ticket it concerns."""

    GRANTED = "granted"  # a request (its ticket) holds its memory now
    FAILED = "failed"  # a request can never be granted (closing; its holding released)
    RETIME = "retime"  # a request's reclaim deadline moved: call `advance` by then
    PREEMPT = "preempt"  # a holding (its ticket) is asked to give everything back
    QUALITY = "quality"  # a watched holding's quality target changed


class Outcome(Enum):
    """How a request that did not end in a grant ended, for the counts."""

    REFUSED = "refused"  # never queued: too large, or the arbiter is closed
    TIMED_OUT = "timed out"  # waited its whole timeout
    QUALITY_UNMET = "quality unmet"  # timed out while only a lower quality was possible
    CANCELLED = "cancelled"  # cancelled from outside


_GRANTED = Event.GRANTED  # looked up once: enum members go through their metaclass


def _ignore(event: Event, ticket: object) -> None:
    pass


class _HeadAsItWas:
    """The fields of a queue's head that quality targets read, as they were."""

    __slots__ = ("min_size", "priority")
    # Its ``min_size`` is already what admits it (`QualityCalculator.admitting_size`).
    min_quality = None

    def __init__(self, priority: Priority, min_size: int) -> None:
        self.priority = priority
        self.min_size = min_size


class Ledger:
    """Accounting and grant decisions for one GPU budget (see the module)."""

    def __init__(
        self, config: ArbiterConfig, *, sink: Callable[[Event, object], None] = _ignore
    ) -> None:
        self.config = config
        self.budget = config.vram_budget
        self._threshold = config.pressure_threshold
        self.tallies = tallies = Tallies(config.vram_budget)
        self.stats = StatsRecorder()
        self._sink = sink
        # Per priority, in arrival order; an OrderedDict so a request leaves in O(1).
        self._queues: dict[Priority, OrderedDict[Request, None]] = {
            p: OrderedDict() for p in Priority
        }
        # The same queues in grant order, for finding the head without enum lookups.
        self._queues_high_first = tuple(self._queues[p] for p in _PRIORITIES_HIGH_FIRST)
        # Per priority, in grant order: victims are picked most recent first.
        self._holders: dict[Priority, dict[Holding, None]] = {p: {} for p in Priority}
        # Per priority, the registries of the holders strictly below it: the only ones a
        # request of that priority may reclaim from (DESIGN: never an equal or lower one).
        self._holders_below = {
            p: tuple(self._holders[q] for q in Priority if q < p) for p in Priority
        }
        # The elastic subset, so asking for shrinks never scans the rigid holders.
        self._elastic: dict[Priority, dict[Holding, None]] = {p: {} for p in Priority}
        self._elastic_count = 0  # so a refresh skips the registry when it is empty
        self.targets = QualityCalculator(config, tallies, self.head, self._elastic)
        self._watched: dict[Holding, None] = {}  # a dict: notified in a stable order
        self._keep_alive: dict[Holding, None] = {}
        self.reclaimer = Reclaimer(
            config,
            tallies,
            self.targets,
            self._holders,
            self._elastic,
            self.stats,
            preempt=self._request_preemption,
            retime=self._retime,
        )
        self._seq = count()
        # What the time-weighted averages were last given at or above the pressure
        # threshold (used bytes, LLM active, diffusion active); while it stays the same
        # their step goes on unobserved. None after a step below it.
        self._observed: tuple[int, bool, bool] | None = None
        # The averages' quality values depend on pressure and on which families are
        # active, except under PROPORTIONAL (on each family's share as well).
        self._observe_always = config.effective_policy is QualityPolicy.PROPORTIONAL

    # == queries ===============================================================

    @property
    def granted(self) -> int:
        return self.tallies.granted

    @property
    def external(self) -> int:
        return self.tallies.external

    @property
    def waiting(self) -> int:
        return self.tallies.waiting

    @property
    def on_the_way(self) -> int:
        return self.tallies.on_the_way

    @property
    def available(self) -> int:
        tallies = self.tallies
        return max(0, self.budget - tallies.granted - tallies.external)

    @property
    def pressure(self) -> float:
        return (self.tallies.granted + self.tallies.external) / self.budget

    def active(self, family: Family) -> int:
        """How many allocations of ``family`` hold memory."""
        return self.tallies.families[family].count

    def holdings(self) -> Iterator[Holding]:
        for held in self._holders.values():
            yield from held

    def waiters(self) -> Iterator[Request]:
        """The queued requests, in grant order."""
        for queue in self._queues_high_first:
            yield from queue

    def head(self) -> Request | None:
        """The next request to be granted."""
        for queue in self._queues_high_first:
            if queue:
                return next(iter(queue))
        return None

    def target(self, holding: Holding) -> float:
        """``holding``'s current quality target (after release: the last one it had)."""
        view = holding.released_view
        if view is not None:
            holding.released_view = None
            holding.notified_quality = self._target_in_view(holding, view)
        return self.targets.target(holding)

    def _view(self, holding: Holding) -> tuple[object, ...]:
        """What a rigid holding's target is computed from while no elastic holder exists:
        the tallies and the head of the queue (`QualityCalculator`'s inputs)."""
        tallies = self.tallies
        llm, diffusion = tallies.families
        head = None
        if tallies.waiting:
            for queue in self._queues_high_first:
                if queue:
                    first = next(iter(queue))
                    # Its two fields, not the request: a kept handle must not keep the
                    # head's waiter (and, view by view, every later record) alive.
                    head = (first.priority, self.targets.admitting_size(first))
                    break
        return (
            head,
            holding.memory,
            tallies.granted,
            tallies.external,
            tallies.on_the_way,
            tallies.waiting,
            llm.granted,
            llm.count,
            diffusion.granted,
            diffusion.count,
            *llm.at,
            *diffusion.at,
        )

    def _target_in_view(self, holding: Holding, view: tuple[object, ...]) -> float:
        """The target a rigid ``holding`` had when ``view`` was taken (at its release)."""
        head = None if view[0] is None else _HeadAsItWas(*view[0])  # type: ignore[misc]
        tallies = Tallies(self.budget)
        llm, diffusion = tallies.families
        (tallies.granted, tallies.external, tallies.on_the_way, tallies.waiting,
         llm.granted, llm.count, diffusion.granted, diffusion.count) = view[2:10]  # type: ignore[assignment]  # fmt: skip
        tallies.holders = llm.count + diffusion.count
        levels = len(llm.at)
        llm.at[:] = view[10 : 10 + levels]  # type: ignore[assignment]
        diffusion.at[:] = view[10 + levels :]  # type: ignore[assignment]
        nobody: dict[Priority, dict[Holding, None]] = {p: {} for p in Priority}
        then = QualityCalculator(self.config, tallies, lambda: head, nobody)  # type: ignore[arg-type,return-value]
        # The holding as it was then (a rigid holder's fields do not move once released,
        # but for these two).
        held = copy.copy(holding)
        held.released = False
        held.memory = view[1]  # type: ignore[assignment]
        return then.target(held)

    def floor(self, holding: Holding) -> float:
        return self.targets.floor(holding.family)

    def recommended(self, workload: WorkloadType, priority: Priority) -> float:
        return self.targets.recommended(workload, priority)

    # == requests ==============================================================

    def grant_now(self, holding: Holding, min_size: int, max_size: int, now: float) -> bool:
        """The fast path of a new allocation: grant it at once if nothing waits and it
        fits, without queueing a request; False (and nothing changed) otherwise."""
        tallies = self.tallies
        if tallies.waiting:
            return False
        free = self.budget - tallies.granted - tallies.external
        if free < min_size:
            return False
        self._hold(holding, max_size if max_size < free else free, now)
        self.stats.record_grant(holding.priority, 0.0)
        self._refresh(now)
        return True

    def submit(self, request: Request, now: float) -> bool:
        """Queue ``request``; True when it was granted at once (nothing ahead, and it fits).

        Behind a head of its priority or higher nothing else moves: the head does not
        fit (the invariant), so no grant loop runs and no memory is asked for.
        """
        behind_head = self._head_at_or_above(request.priority)
        self._enqueue(request, now)
        if behind_head:
            return False
        self._dispatch(now)
        return request.state is GRANTED

    def _head_at_or_above(self, priority: Priority) -> bool:
        """Whether the head of the queue waits at ``priority`` or higher."""
        for queue in self._queues_high_first:
            if queue:
                return priority <= next(iter(queue)).priority
        return False

    def _enqueue(self, request: Request, now: float) -> None:
        request.enqueued_at = now
        if type(request) is Growth:
            holding = request.holding
            if holding.growing is None:
                holding.growing = [request]
            else:
                holding.growing.append(request)
        self._queues[request.priority][request] = None
        self.tallies.waiting += 1

    def withdraw(self, request: Request, now: float, outcome: Outcome) -> None:
        """Take back a request whose waiter timed out or was cancelled.

        A grant that raced with it is returned, so the memory goes to the next waiter.
        """
        counted = type(request) is NewAllocation
        if request.state is WAITING:
            request.state = WITHDRAWN
            if not counted:
                growing = request.holding.growing
                assert growing is not None and isinstance(request, Growth)
                growing.remove(request)
            self._dequeue(request)
            self.reclaimer.end(request)
            if counted:
                self._count(outcome)
            self._dispatch(now)
        elif request.state is GRANTED:
            request.state = WITHDRAWN
            holding = request.holding
            if counted:
                self.stats.successful -= 1
                self._count(outcome)
                self.release(holding, now)
            elif not holding.released:
                # The holder may have shrunk since: undo no more than it holds.
                assert isinstance(request, Growth)
                holding.max_memory = max(request.max_before, holding.memory - request.size)
                if not holding.elastic:
                    self._drop_elastic(holding)
                self._give_back(holding, min(request.size, holding.memory), now)

    def count_unqueued(self, outcome: Outcome) -> None:
        """Count a request that ended before it reached the queue (refused at once, or
        cancelled at its entry checkpoint)."""
        self._count(outcome)

    def ungrant(self, holding: Holding, now: float) -> None:
        """A grant at once whose caller was cancelled before it ran: count it as
        cancelled and hand the memory on."""
        self.stats.successful -= 1
        self.stats.cancelled += 1
        self.release(holding, now)

    def _count(self, outcome: Outcome) -> None:
        stats = self.stats
        if outcome is Outcome.CANCELLED:
            stats.cancelled += 1
        else:
            stats.failed += 1
            if outcome is Outcome.TIMED_OUT:
                stats.timeouts += 1

    def fail_waiting(self, now: float) -> None:
        """Fail every waiting request (the arbiter is closing)."""
        failed = list(self.waiters())
        for queue in self._queues.values():
            queue.clear()
        self.tallies.waiting = 0
        self.tallies.dequeued += len(failed)
        for request in failed:
            request.state = FAILED
            self.reclaimer.end(request)
            if type(request) is NewAllocation:
                self.stats.failed += 1
            self._sink(Event.FAILED, request.ticket)
        self._refresh(now)

    # == holdings ==============================================================

    def release(self, holding: Holding, now: float) -> None:
        """Return all of ``holding``'s memory; idempotent."""
        if holding.released:
            return
        if (
            holding.min_memory is None
            and self.tallies.waiting
            and not self._elastic_count
            and not holding.watchers
        ):
            # A rigid holding's target, with no elastic holder about, is a function of the
            # tallies and the queue's head: keep those, and compute it only if it is read
            # (a handle's ``quality`` after release, rarely; see `target`). With nothing
            # waiting it is cheap enough to compute now.
            holding.released_view = self._view(holding)
        else:
            holding.notified_quality = self.targets.target(holding)  # what `quality` reads
        holding.released = True
        if holding.growing:
            self._fail_growing(holding)
        if holding.granted_seq < 0:
            return
        memory = holding.memory
        tallies = self.tallies
        if holding.preempt_requested:
            tallies.on_the_way -= memory
        tallies.granted -= memory
        family = tallies.families[holding.family]
        family.granted -= memory
        family.at[holding.priority] -= memory
        family.count -= 1
        tallies.holders -= 1
        holding.memory = 0
        del self._holders[holding.priority][holding]
        # Membership tests first: most holders are in none of these registries.
        if holding.shrink_asks:
            self.reclaimer.forget(holding)
        if holding.min_memory is not None:
            self._drop_elastic(holding)
        if holding.keep_alive is not None:
            self._keep_alive.pop(holding, None)
        if holding.watchers:
            self._watched.pop(holding, None)
        if tallies.waiting:
            self._dispatch(now)
        else:
            self._refresh(now)  # what `_dispatch` comes to with nobody to hand it to

    def release_owner(self, owner: object, now: float) -> None:
        """Release every holding of ``owner`` and withdraw its waiting requests (as
        cancelled): a session that ended."""
        for request in [r for r in self.waiters() if r.holding.owner is owner]:
            self.withdraw(request, now, Outcome.CANCELLED)
        for holding in [h for h in self.holdings() if h.owner is owner]:
            self.release(holding, now)

    def _fail_growing(self, holding: Holding) -> None:
        """``holding`` is released: nothing is left to grow."""
        growths, holding.growing = holding.growing, None
        for growing in growths or ():
            if growing.state is not WAITING:
                continue
            growing.state = FAILED
            self._dequeue(growing)
            self.reclaimer.end(growing)
            self._sink(Event.FAILED, growing.ticket)

    def _dequeue(self, request: Request) -> None:
        del self._queues[request.priority][request]
        tallies = self.tallies
        tallies.waiting -= 1
        tallies.dequeued += 1

    def shrink(self, holding: Holding, size: int, now: float) -> None:
        """Lower ``holding`` to ``size`` bytes at once, waking whoever now fits."""
        self._give_back(holding, holding.memory - size, now)

    def _give_back(self, holding: Holding, amount: int, now: float) -> None:
        holding.memory -= amount
        tallies = self.tallies
        tallies.granted -= amount
        family = tallies.families[holding.family]
        family.granted -= amount
        family.at[holding.priority] -= amount
        if holding.preempt_requested:
            tallies.on_the_way -= amount
        self._dispatch(now)

    def set_external(self, external: int, now: float) -> None:
        """Record memory used on the device by other processes."""
        if external != self.tallies.external:
            self.tallies.external = external
            self._dispatch(now)

    def watch(self, holding: Holding, delta: int) -> None:
        """Count a reader of ``holding``'s quality changes in (+1) or out (-1)."""
        holding.watchers += delta
        if holding.watchers > 0 and not holding.released:
            if holding not in self._watched:
                # Unwatched, a rigid holder's last target was not kept: a change back to
                # it would be missed.
                holding.notified_quality = self.targets.target(holding)
            self._watched[holding] = None
        else:
            self._watched.pop(holding, None)

    def set_busy(self, holding: Holding, busy: bool, now: float) -> None:
        holding.busy_spans += 1 if busy else -1
        if holding.busy_spans == 0:
            holding.idle_since = now

    def _request_preemption(self, holding: Holding) -> None:
        holding.preempt_requested = True
        self.tallies.on_the_way += holding.memory
        self._sink(Event.PREEMPT, holding.ticket)

    # == time ==================================================================

    def advance(self, now: float) -> float | None:
        """Make the decisions that are due at ``now``: the end of a reclaim grace,
        keep_alive expiries. Returns when it is next due (None: nothing is timed)."""
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
        head = self.head()
        if head is not None and head.reclaim_deadline <= now:
            self._dispatch(now)
            head = self.head()
        if head is not None and head.reclaim_phase is ReclaimPhase.ASKED:
            due = head.reclaim_deadline
            if due > now and (next_due is None or due < next_due):
                next_due = due
        return next_due

    def observe(self, now: float) -> None:
        """Start (or continue) the time-weighted averages at ``now``."""
        self._refresh(now)

    def _retime(self, request: Request) -> None:
        self._sink(Event.RETIME, request.ticket)

    # == the grant loop ========================================================

    def _dispatch(self, now: float) -> None:
        tallies = self.tallies
        queues = self._queues_high_first
        while tallies.waiting:
            for queue in queues:  # the head (the loop finds one: something waits)
                if queue:
                    request = next(iter(queue))
                    break
            # `_fit`, inline but for a request with ``min_quality``: the contended hot path.
            free = self.budget - tallies.granted - tallies.external
            if free < request.min_size:
                size = None
            elif request.min_quality is None:
                size = request.max_size if request.max_size < free else free
            else:
                size = self._fit(request)
            if size is None:
                # Only holders strictly below the head can be asked for memory: with
                # none there, reclaiming has nothing to look at.
                for below in self._holders_below[request.priority]:
                    if below:
                        self.reclaimer.reclaim_for(request, now)
                        break
                break
            del queue[request]  # it leaves its queue (`_dequeue`)
            tallies.waiting -= 1
            tallies.dequeued += 1
            self._grant(request, size, now)
        self._refresh(now)

    def _fit(self, request: Request) -> int | None:
        tallies = self.tallies
        free = self.budget - tallies.granted - tallies.external
        if free < request.min_size:
            return None
        size = min(request.max_size, free)
        if request.min_quality is not None:
            # The target it would have right after the grant.
            holding = request.holding
            memory = size if type(request) is NewAllocation else holding.memory + size
            quality = self.targets.target_at(holding, memory, tallies.granted + size)
            if quality + QUALITY_TOLERANCE < request.min_quality:
                if request.best_quality is None or quality > request.best_quality:
                    request.best_quality = quality
                return None
        return size

    def _grant(self, request: Request, size: int, now: float) -> None:
        """Hand ``size`` bytes to ``request``, which is no longer queued."""
        request.size = size
        holding = request.holding
        if type(request) is NewAllocation:
            self._hold(holding, size, now)
            self.stats.record_grant(request.priority, now - request.enqueued_at)
        else:
            assert isinstance(request, Growth) and holding.growing is not None
            holding.growing.remove(request)
            tallies = self.tallies
            if holding.preempt_requested:  # it all goes back with the holder
                tallies.on_the_way += size
            tallies.granted += size
            family = tallies.families[holding.family]
            family.granted += size
            family.at[holding.priority] += size
            holding.memory += size
            request.max_before = holding.max_memory
            if holding.memory > holding.max_memory:
                holding.max_memory = holding.memory
                if holding.elastic:  # min_memory == old size: it just became elastic
                    self._add_elastic(holding)
        if request.shrunk or request.reclaim_deadline != _INF:  # it asked for memory
            self.reclaimer.end(request)
        # Last: a waiter that wakes by its own deadline in another thread reads its state
        # without the lock, and finds GRANTED only once everything else is in place.
        request.state = GRANTED
        self._sink(_GRANTED, request.ticket)

    def _hold(self, holding: Holding, size: int, now: float) -> None:
        """Register a new holding of ``size`` bytes."""
        tallies = self.tallies
        tallies.granted += size
        family = tallies.families[holding.family]
        family.granted += size
        family.at[holding.priority] += size
        family.count += 1
        tallies.holders += 1
        holding.memory = size
        holding.granted_seq = next(self._seq)
        self._holders[holding.priority][holding] = None
        if holding.min_memory is not None and holding.elastic:
            self._add_elastic(holding)
        if holding.keep_alive is not None:
            holding.idle_since = now
            self._keep_alive[holding] = None

    def _add_elastic(self, holding: Holding) -> None:
        elastic = self._elastic[holding.priority]
        if holding not in elastic:
            elastic[holding] = None
            self._elastic_count += 1

    def _drop_elastic(self, holding: Holding) -> None:
        if self._elastic[holding.priority].pop(holding, _ABSENT) is not _ABSENT:
            self._elastic_count -= 1

    # == quality targets =======================================================

    def _refresh(self, now: float) -> None:
        """Record the time-weighted averages and tell watchers whose target moved."""
        tallies = self.tallies
        used = tallies.granted + tallies.external
        llm_family, diffusion_family = tallies.families
        pressure = used / self.budget
        if pressure < self._threshold:  # every policy gives 1.0
            self._observed = None
            self.stats.observe(
                now,
                pressure,
                1.0 if llm_family.count else None,
                1.0 if diffusion_family.count else None,
            )
        else:
            # Unchanged values continue the averages' current step: nothing to record
            # (a card kept full under contention, grant after grant), and the policy's
            # values are not asked again.
            observed = (used, llm_family.count > 0, diffusion_family.count > 0)
            if observed != self._observed or self._observe_always:
                self._observed = observed
                policy_for = self.targets.policy_for
                llm = policy_for(Family.LLM, _NORMAL, pressure) if llm_family.count else None
                diffusion = (
                    policy_for(Family.DIFFUSION, _NORMAL, pressure)
                    if diffusion_family.count
                    else None
                )
                self.stats.observe(now, pressure, llm, diffusion)
        if not self._watched and not self._elastic_count:
            return
        # Nothing below moves the tallies (a sink only wakes and reads).
        still = self.targets.still(True)
        try:
            for holding in self._watched:
                if self._retarget(holding):
                    self._sink(Event.QUALITY, holding.ticket)
            if self._elastic_count:
                for elastic in self._elastic.values():
                    for holding in elastic:
                        if not holding.watchers:
                            self._retarget(holding)
        finally:
            if still:
                self.targets.still(False)

    def _retarget(self, holding: Holding) -> bool:
        """Recompute a holding's target; True when it changed. A drop that asks an
        elastic holder to shrink (watched or not: an unwatched one reads ``quality``)
        counts as a quality reduction."""
        quality = self.targets.target(holding)
        previous = holding.notified_quality
        if quality == previous:
            return False
        holding.notified_quality = quality
        if quality < previous and holding.min_memory is not None:
            floor = self.targets.floor(holding.family)
            wanted = size_for_quality(quality, holding.min_memory, holding.max_memory, floor)
            if wanted < holding.memory:
                self.stats.quality_reductions += 1
        return True

    def check_invariants(self) -> None:
        """Assert the invariants written at the top of this module (for tests)."""
        tallies = self.tallies
        live = list(self.holdings())
        assert tallies.granted == sum(h.memory for h in live), "granted != sum of holdings"
        assert tallies.on_the_way == sum(h.memory for h in live if h.preempt_requested)
        assert tallies.waiting == sum(len(q) for q in self._queues.values())
        assert tallies.holders == len(live) == sum(f.count for f in tallies.families)
        assert all(r.state is WAITING for q in self._queues.values() for r in q)
        for family in tallies.families:
            assert sum(family.at) == family.granted, "per-priority tallies drift"
        assert self._elastic_count == sum(len(e) for e in self._elastic.values())
        head = self.head()
        if head is not None:
            assert self._fit(head) is None, "the head fits but was left waiting"
