"""The sync core under preemption, driven by hypothesis on a virtual clock.

The machine plays the async shell and well-behaved holders: victims unwind and
release when they like, elastic holders asked to shrink comply (or not), and the
core's timer (`advance`) fires: reclaim graces end, keep_alive expires. After every
step the ledger's books must be exact; at every preemption request the victim must
be fair game: strictly below the waiter it is taken for, preemptible, chosen in
DESIGN.md's order, only after the grace when elastic holders were asked to shrink,
and only when enough will then be freed.
"""

from __future__ import annotations

from itertools import count

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from arbiter import ArbiterConfig, Priority, WorkloadType
from arbiter._ledger import Event, Ledger, Outcome
from arbiter._quality import size_for_quality
from arbiter._records import (
    GRANTED,
    WAITING,
    Growth,
    Holding,
    NewAllocation,
    ReclaimPhase,
    Request,
)

pytestmark = pytest.mark.cpu_heavy

BUDGET = 100

priorities = st.sampled_from(list(Priority))
workloads = st.sampled_from(list(WorkloadType))


def victim_key(holding: Holding) -> tuple[int, bool, int]:
    """DESIGN.md's preemption order: lowest priority, idle before busy, most recent."""
    return (holding.priority, holding.busy_spans > 0, -holding.granted_seq)


class DispatchCountingLedger(Ledger):
    """Counts grant-loop runs: the head is only judged after one has run."""

    dispatches = 0

    def _dispatch(self, now: float) -> None:
        self.dispatches += 1
        super()._dispatch(now)


class PreemptionMachine(RuleBasedStateMachine):
    # Whether the no-grace check counts what holders already asked by another waiter
    # could still give. It does not: what they promised counts toward the head's need
    # (see test_degrade's promised-shrinks test), so they are asked only on top of that.
    ASK_ASKED_AGAIN = False

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.seq = count()
        self.pending: list[Request] = []  # parked, or granted and not yet run
        self.holdings: list[Holding] = []  # held by their owners
        self.asked_at: dict[Request, float] = {}  # when a waiter asked for shrinks
        self.in_timer = False
        self.batch: list[Holding] = []  # victims chosen by the current ledger call
        self.batch_for: Request | None = None
        self.preempted_total = 0
        # The grant loop has run since the keep_alive timer last asked someone (the
        # timer does not re-run it, so until then the head may count on less).
        self.judged = True

    @initialize(grace=st.sampled_from([1.0, 0.0]))
    def build(self, grace: float) -> None:
        self.grace = grace
        config = ArbiterConfig(vram_budget=BUDGET, reclaim_grace=grace)
        self.keep_alive_seen = 0
        self.ledger = DispatchCountingLedger(config, sink=self.on_event)

    # -- the hooks ---------------------------------------------------------------

    def on_event(self, event: Event, ticket: object) -> None:
        if event is Event.GRANTED:
            ledger = self.ledger
            assert ledger.granted + ledger.external <= ledger.budget
        elif event is Event.PREEMPT:
            assert isinstance(ticket, Holding)
            self.on_preempt(ticket)

    def on_preempt(self, holding: Holding) -> None:
        assert not holding.released and holding.preempt_requested
        self.preempted_total += 1
        reclaims = self.ledger.stats.keep_alive_reclaims
        if self.in_timer and reclaims > self.keep_alive_seen:
            # keep_alive: any priority, but never a busy holder
            self.keep_alive_seen = reclaims
            assert holding.keep_alive is not None and holding.busy_spans == 0
            assert holding.idle_since + holding.keep_alive <= self.now
            return
        waiter = self.ledger.head()  # preemption is only ever for the head of the queue
        assert waiter is not None and waiter.state is WAITING
        assert holding.priority < waiter.priority, "equal or higher priority asked"
        assert holding.preemptible, "a preemptible=False holder asked"
        if waiter in self.asked_at:
            # "Waits up to reclaim_grace": early only once every asked holder shrank.
            promised = sum(
                max(0, h.memory - min(h.shrink_asks.values()))
                for h in self.ledger.holdings()
                if h.shrink_asks
            )
            assert self.now >= self.asked_at[waiter] + self.grace or promised == 0, (
                "preempted within the grace while asked holders could still shrink"
            )
        if self.batch_for is not waiter:
            self.batch, self.batch_for = [], waiter
        self.batch.append(holding)

    # -- helpers -------------------------------------------------------------------

    def call(self, fn: object, *args: object) -> None:
        """Run one ledger operation, then check the victims it chose as one batch."""
        self.batch, self.batch_for = [], None
        before = self.ledger.dispatches
        fn(*args, self.now)  # type: ignore[operator]
        if self.ledger.dispatches > before:
            self.judged = True
        if self.batch_for is not None:
            self.check_batch(self.batch_for, self.batch)
        self.note_asks()
        self.adopt_grants()

    def eligible(self, waiter: Request) -> list[Holding]:
        return [
            h
            for h in self.live()
            if h.preemptible and not h.preempt_requested and h.priority < waiter.priority
        ]

    def check_batch(self, waiter: Request, chosen: list[Holding]) -> None:
        ledger = self.ledger
        # Enough will be freed (else nobody should have been harmed).
        free = ledger.budget - ledger.granted - ledger.external
        assert free + ledger.on_the_way >= waiter.min_size, "preempted without covering it"
        # The chosen ones come first in the order, and none is superfluous at its end.
        if chosen:
            worst = max(victim_key(h) for h in chosen)
            for other in self.eligible(waiter):
                assert victim_key(other) > worst, "a victim was skipped"
            last = max(chosen, key=victim_key)
            assert free + ledger.on_the_way - last.memory < waiter.min_size, "one too many"
        if self.grace > 0 and waiter not in self.asked_at:
            # No grace was waited: then shrinking alone could not have covered it.
            shrinkable = sum(
                h.memory - (h.min_memory or h.memory)
                for h in self.eligible(waiter) + chosen
                if h.elastic and (self.ASK_ASKED_AGAIN or h.shrink_cap is None)
            )
            short = waiter.min_size - free - (ledger.on_the_way - sum(h.memory for h in chosen))
            assert shrinkable < short, "preempted with no grace though shrinking could do"

    def note_asks(self) -> None:
        for request in self.pending:
            if request.state is WAITING and request.reclaim_phase is ReclaimPhase.ASKED:
                self.asked_at.setdefault(request, self.now)

    def adopt_grants(self) -> None:
        """Granted waiters run; failed grows (their holder released) go away."""
        for request in list(self.pending):
            if request.state is GRANTED:
                self.pending.remove(request)
                if not isinstance(request, Growth):
                    self.holdings.append(request.holding)
            elif request.state is not WAITING:
                self.pending.remove(request)

    def live(self) -> list[Holding]:
        return [h for h in self.ledger.holdings() if not h.released]

    def waiting(self) -> list[Request]:
        return [r for r in self.pending if r.state is WAITING]

    def submit(self, request: Request) -> None:
        self.pending.append(request)
        self.call(self.ledger.submit, request)

    # -- rules -----------------------------------------------------------------------

    @rule(
        workload=workloads,
        priority=priorities,
        size=st.integers(1, 50),
        elastic=st.none() | st.integers(1, 50),
        preemptible=st.booleans(),
        keep_alive=st.none() | st.sampled_from([0.0, 0.5, 3.0]),
    )
    def request(
        self,
        workload: WorkloadType,
        priority: Priority,
        size: int,
        elastic: int | None,
        preemptible: bool,
        keep_alive: float | None,
    ) -> None:
        top = size if elastic is None else min(BUDGET, size + elastic)
        holding = Holding(
            workload,
            priority,
            top,
            None if elastic is None else size,
            preemptible=preemptible,
            keep_alive=keep_alive,
        )
        holding.ticket = holding
        self.submit(NewAllocation(holding, size, top))

    @precondition(lambda self: self.holdings)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """Any holder lets go (a victim that finished unwinding, or one done early)."""
        asked = [h for h in self.holdings if h.preempt_requested]
        prefer_asked: bool = data.draw(st.booleans())
        pool = asked if asked and prefer_asked else self.holdings
        holding = data.draw(st.sampled_from(pool))
        self.holdings.remove(holding)
        had = self.ledger.target(holding)
        self.call(self.ledger.release, holding)
        assert holding.memory == 0 and holding.released
        assert self.ledger.target(holding) == had  # the target it had when released

    @precondition(lambda self: any(h.shrink_cap is not None for h in self.holdings))
    @rule(data=st.data())
    def comply(self, data: st.DataObject) -> None:
        """An elastic holder asked to shrink resizes to what its target allows."""
        asked = [h for h in self.holdings if h.shrink_cap is not None]
        holding = data.draw(st.sampled_from(asked))
        assert holding.min_memory is not None
        target = self.ledger.target(holding)
        size = size_for_quality(
            target, holding.min_memory, holding.max_memory, self.ledger.floor(holding)
        )
        size = max(holding.min_memory, min(size, holding.memory))
        self.call(self.ledger.shrink, holding, size)

    @precondition(lambda self: self.holdings)
    @rule(data=st.data())
    def shrink(self, data: st.DataObject) -> None:
        elastic = [h for h in self.holdings if h.min_memory is not None]
        if not elastic:
            return
        holding = data.draw(st.sampled_from(elastic))
        assert holding.min_memory is not None
        if holding.memory > holding.min_memory:
            size = data.draw(st.integers(holding.min_memory, holding.memory))
            self.call(self.ledger.shrink, holding, size)

    @precondition(lambda self: self.holdings)
    @rule(data=st.data())
    def grow(self, data: st.DataObject) -> None:
        growing = {id(r.holding) for r in self.pending if isinstance(r, Growth)}
        pool = [h for h in self.holdings if h.memory < BUDGET and id(h) not in growing]
        if not pool:
            return
        holding = data.draw(st.sampled_from(pool))
        delta = data.draw(st.integers(1, BUDGET - holding.memory))
        self.submit(Growth(holding, delta))

    @precondition(lambda self: self.waiting())
    @rule(data=st.data())
    def give_up(self, data: st.DataObject) -> None:
        """A parked waiter times out or is cancelled."""
        request = data.draw(st.sampled_from(self.waiting()))
        self.call(lambda now: self.ledger.withdraw(request, now, Outcome.CANCELLED))
        assert request.state is not WAITING and request not in self.pending

    @rule(wait=st.sampled_from([0.1, 0.6, 1.0, 2.5]))
    def time_passes(self, wait: float) -> None:
        """The core's timer: graces that have passed end, keep_alive expires."""
        self.now += wait
        self.in_timer = True
        reclaims_before = self.ledger.stats.keep_alive_reclaims
        try:
            self.call(self.ledger.advance)
        finally:
            self.in_timer = False
        if self.ledger.stats.keep_alive_reclaims > reclaims_before:
            self.judged = False

    @precondition(lambda self: self.holdings)
    @rule(data=st.data())
    def toggle_busy(self, data: st.DataObject) -> None:
        holding = data.draw(st.sampled_from(self.holdings))
        self.ledger.set_busy(holding, holding.busy_spans == 0, self.now)

    @rule(external=st.integers(0, BUDGET // 4))
    def set_external(self, external: int) -> None:
        self.call(self.ledger.set_external, external)

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def books_are_exact(self) -> None:
        if not hasattr(self, "ledger"):
            return
        ledger = self.ledger
        ledger.check_invariants()
        assert 0 <= ledger.on_the_way <= ledger.granted
        for holding in self.live():
            assert 0 < holding.memory <= holding.max_memory
            if holding.min_memory is not None:
                assert holding.memory >= holding.min_memory
            floor = ledger.floor(holding)
            assert floor <= ledger.target(holding) <= 1.0

    @invariant()
    def shrink_requests_come_from_a_higher_waiter(self) -> None:
        if not hasattr(self, "ledger"):
            return
        for holding in self.live():
            if holding.shrink_cap is None:
                continue
            # preemptible=False holders are asked too (never preempted: see on_preempt)
            assert holding.elastic
            askers = [r for r in self.waiting() if holding in (r.shrunk or ())]
            assert askers, "a shrink request outlived its waiter"
            assert all(r.priority > holding.priority for r in askers)

    @invariant()
    def a_waiter_short_of_memory_is_doing_something_about_it(self) -> None:
        """The head that does not fit has asked for shrinks (and waits the grace), or
        enough is on its way, or preempting everyone allowed would not be enough."""
        if not hasattr(self, "ledger"):
            return
        ledger = self.ledger
        head = ledger.head()
        if head is None or not self.judged:
            return
        free = ledger.budget - ledger.granted - ledger.external
        short = head.min_size - free - ledger.on_the_way
        if short <= 0 or head.reclaim_phase is ReclaimPhase.ASKED:
            return
        assert sum(h.memory for h in self.eligible(head)) < short, "a waiter stalls"

    def teardown(self) -> None:
        if not hasattr(self, "ledger"):
            return
        ledger = self.ledger
        for request in self.waiting():
            ledger.withdraw(request, self.now, Outcome.CANCELLED)
        self.adopt_grants()
        for holding in self.holdings:
            ledger.release(holding, self.now)
        ledger.check_invariants()
        assert ledger.granted == 0 and ledger.waiting == 0 and ledger.on_the_way == 0
        assert ledger.stats.preemptions + ledger.stats.keep_alive_reclaims == self.preempted_total


PreemptionMachine.TestCase.settings = settings(
    # max_examples from the profile (tests/conftest.py)
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestPreemption = PreemptionMachine.TestCase
