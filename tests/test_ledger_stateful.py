"""The sync core, driven by hypothesis: random requests, releases, cancellations,
timeouts, shrinks, growths and external use, on a virtual clock.

The machine plays the async shell: a request that is not granted at once has a
waiter that is either still parked, granted but not yet run (the releaser handed it
the memory), or gone (timed out or cancelled: ``withdraw``). After every step, and at
every grant, the ledger must be exact and fair.
"""

from __future__ import annotations

from itertools import count

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from arbiter import Arbiter, ArbiterConfig, Priority, WorkloadType
from arbiter._ledger import Event, Ledger, Outcome
from arbiter._records import GRANTED, WAITING, Growth, Holding, NewAllocation, Request

pytestmark = pytest.mark.cpu_heavy

BUDGET = 100

priorities = st.sampled_from(list(Priority))
workloads = st.sampled_from(list(WorkloadType))
seconds = st.floats(min_value=0.0, max_value=5.0, allow_nan=False)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.seq = count()
        self.order: dict[Request, int] = {}  # arrival number of every submitted request
        # Requests whose waiter has not come back yet (parked, or granted but not run).
        self.pending: list[Request] = []
        # Holdings their owners hold (granted and run, not released).
        self.holdings: list[Holding] = []
        self.grants = 0

    @initialize(grace=st.sampled_from([0.0, 2.0]))
    def build(self, grace: float) -> None:
        config = ArbiterConfig(vram_budget=BUDGET, reclaim_grace=grace)
        self.ledger = Ledger(config, sink=self.on_event)
        # The arbiter's snapshot reads this ledger, so state() is checked as well.
        self.arbiter = Arbiter(config, probe=None)
        self.arbiter._ledger = self.ledger

    # -- the hooks -------------------------------------------------------------

    def on_event(self, event: Event, ticket: object) -> None:
        if event is not Event.GRANTED:
            return  # a failed grow, a reclaim deadline, a preemption or a quality change
        assert isinstance(ticket, Request)
        request = ticket
        self.grants += 1
        ledger = self.ledger
        assert ledger.granted + ledger.external <= ledger.budget, "granted over the budget"
        assert request.min_size <= request.size <= request.max_size
        mine = (request.priority, -self.order[request])
        for other in self.pending:
            if other is not request and other.state is WAITING:
                ahead = (other.priority, -self.order[other]) > mine
                assert not ahead, "granted while a request ahead of it was still waiting"

    # -- helpers ---------------------------------------------------------------

    def submit(self, request: Request) -> None:
        request.ticket = request  # the events name the request itself
        self.order[request] = next(self.seq)
        if self.ledger.submit(request, self.now):
            if not isinstance(request, Growth):
                self.holdings.append(request.holding)
        else:
            self.pending.append(request)

    def waiting(self) -> list[Request]:
        return [r for r in self.pending if r.state is WAITING]

    def growing(self, holding: Holding) -> bool:
        return any(isinstance(r, Growth) and r.holding is holding for r in self.pending)

    def granted_growths(self, holding: Holding) -> list[Request]:
        return [
            r
            for r in self.pending
            if isinstance(r, Growth) and r.holding is holding and r.state is GRANTED
        ]

    def escalate_due(self) -> None:
        """The core's timer: whatever is due at the new time is decided."""
        self.ledger.advance(self.now)

    # -- rules -----------------------------------------------------------------

    @rule(
        workload=workloads,
        priority=priorities,
        size=st.integers(1, BUDGET),
        elastic=st.none() | st.integers(0, 60),
        min_quality=st.none() | st.floats(0.3, 1.0),
        preemptible=st.booleans(),
    )
    def request(
        self,
        workload: WorkloadType,
        priority: Priority,
        size: int,
        elastic: int | None,
        min_quality: float | None,
        preemptible: bool,
    ) -> None:
        if elastic is None:
            holding = Holding(workload, priority, size, None, preemptible=preemptible)
            request = NewAllocation(holding, size, size, min_quality=min_quality)
        else:  # min_memory = size, memory = size + elastic (may exceed the budget)
            holding = Holding(workload, priority, size + elastic, size, preemptible=preemptible)
            request = NewAllocation(holding, size, size + elastic, min_quality=min_quality)
        self.submit(request)

    @precondition(lambda self: self.holdings)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        holding = data.draw(st.sampled_from(self.holdings))
        self.holdings.remove(holding)
        had = self.ledger.target(holding)
        self.ledger.release(holding, self.now)
        self.ledger.release(holding, self.now)  # idempotent
        assert holding.memory == 0
        # After release its target is the one it had when released, however it is kept.
        assert self.ledger.target(holding) == had

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def waiter_runs(self, data: st.DataObject) -> None:
        """A woken waiter comes back: granted (it now holds) or failed (its holding went)."""
        woken = [r for r in self.pending if r.state is not WAITING]
        if not woken:
            return
        request = data.draw(st.sampled_from(woken))
        self.pending.remove(request)
        if request.state is GRANTED and not isinstance(request, Growth):
            self.holdings.append(request.holding)

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """A waiter cancelled from outside, also one whose grant raced the cancellation."""
        # A granted growth may meanwhile have been shrunk, or its holding released.
        choices = [r for r in self.pending if r.state is WAITING or r.state is GRANTED]
        if not choices:
            return
        request = data.draw(st.sampled_from(choices))
        self.pending.remove(request)
        self.ledger.withdraw(request, self.now, Outcome.CANCELLED)
        assert request.state is not WAITING and request.state is not GRANTED

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), wait=seconds)
    def timeout(self, data: st.DataObject, wait: float) -> None:
        """Time passes and a parked waiter's deadline fires (a granted one just returns)."""
        self.now += wait
        self.escalate_due()
        waiting = self.waiting()
        if waiting:
            request = data.draw(st.sampled_from(waiting))
            self.pending.remove(request)
            self.ledger.withdraw(request, self.now, Outcome.CANCELLED)

    @precondition(lambda self: self.pending)
    @rule(
        sizes=st.lists(st.integers(1, BUDGET), min_size=1, max_size=20),
        priority=priorities,
    )
    def abandon_behind_the_head(self, sizes: list[int], priority: Priority) -> None:
        """``timeout=0`` requests that find the queue blocked leave it at once (trio#548):
        its size stays the number of live waiters, however many come and go."""
        head = self.ledger.head()
        if head is None or priority > head.priority:
            return
        for size in sizes:
            request = NewAllocation(
                Holding(WorkloadType.LLM_INFERENCE, priority, size, None), size, size
            )
            request.may_reclaim = False  # a request that will not wait disturbs no one
            self.order[request] = next(self.seq)
            request.ticket = request
            assert not self.ledger.submit(request, self.now), "granted past a blocked head"
            self.ledger.withdraw(request, self.now, Outcome.CANCELLED)
            del self.order[request]
        queued = sum(len(queue) for queue in self.ledger._queues.values())
        assert queued == len(self.waiting())

    @rule(wait=seconds)
    def advance(self, wait: float) -> None:
        self.now += wait
        self.escalate_due()

    @precondition(lambda self: self.holdings)
    @rule(data=st.data())
    def shrink(self, data: st.DataObject) -> None:
        holding = data.draw(st.sampled_from(self.holdings))
        lowest = holding.min_memory or 1
        if holding.memory < lowest:
            return
        size = data.draw(st.integers(lowest, holding.memory))
        grown = [
            r
            for r in self.pending
            if isinstance(r, Growth) and r.holding is holding and r.state is GRANTED
        ]
        self.ledger.shrink(holding, size, self.now)
        # What it freed may have granted its own queued growth at once.
        grown += [
            r
            for r in self.pending
            if isinstance(r, Growth) and r.holding is holding and r.state is GRANTED
        ]
        if not grown:
            assert holding.memory == size

    @precondition(lambda self: self.holdings)
    @rule(data=st.data())
    def grow(self, data: st.DataObject) -> None:
        # One growth at a time per holding (two at once leak), and only of holdings that
        # cannot be preempted (a growth granted to a preempted holding is not counted as
        # on its way); both reported separately.
        holdings = [
            h
            for h in self.holdings
            if h.memory < BUDGET and not self.growing(h) and not h.preemptible
        ]
        if not holdings:
            return
        holding = data.draw(st.sampled_from(holdings))
        delta = data.draw(st.integers(1, BUDGET - holding.memory))
        self.submit(Growth(holding, delta))

    @rule(external=st.integers(0, BUDGET + 30))
    def set_external(self, external: int) -> None:
        self.ledger.set_external(external, self.now)
        assert self.ledger.external == external

    # -- invariants --------------------------------------------------------------

    @invariant()
    def exact(self) -> None:
        if not hasattr(self, "ledger"):
            return
        ledger = self.ledger
        ledger.check_invariants()
        live = {id(h): h for h in self.holdings}
        for request in self.pending:
            if request.state is GRANTED and not isinstance(request, Growth):
                live[id(request.holding)] = request.holding
        held = sum(h.memory for h in live.values() if not h.released)
        assert ledger.granted == held
        assert ledger.waiting == len(self.waiting())
        assert sum(len(queue) for queue in ledger._queues.values()) == len(self.waiting())
        assert 0 <= ledger.on_the_way <= ledger.granted
        state = self.arbiter.state()
        assert state.vram_used == held
        assert state.waiting == len(self.waiting())
        assert state.vram_available == max(0, BUDGET - held - ledger.external)

    @invariant()
    def targets_read_now_are_fresh(self) -> None:
        """What the quality calculator remembers between reads never outlives the queue
        it was computed from (a withdrawn head replaced at equal tallies, say)."""
        if not hasattr(self, "ledger"):
            return
        targets = self.ledger.targets
        assert targets._levels is None, "a still spell outlived the refresh that began it"
        live = [h for h in self.holdings if not h.released]
        remembered = [targets.target(h) for h in live]
        targets._head_demand_for = None
        assert [targets.target(h) for h in live] == remembered
        targets.still(True)
        assert [targets.target(h) for h in live] == remembered
        targets.still(False)

    @invariant()
    def head_does_not_fit(self) -> None:
        """No waiter that fits is left waiting while nothing is ahead of it."""
        if not hasattr(self, "ledger"):
            return
        head = self.ledger.head()
        waiting = self.waiting()
        if head is None:
            assert not waiting
            return
        assert head is max(waiting, key=lambda r: (r.priority, -self.order[r]))
        if head.min_quality is None:
            free = BUDGET - self.ledger.granted - self.ledger.external
            assert free < head.min_size, "the head fits but is left waiting"

    def teardown(self) -> None:
        if not hasattr(self, "ledger"):
            return
        ledger = self.ledger
        for request in self.waiting():
            self.pending.remove(request)
            ledger.withdraw(request, self.now, Outcome.CANCELLED)
        for request in list(self.pending):
            self.pending.remove(request)
            if request.state is GRANTED and not isinstance(request, Growth):
                self.holdings.append(request.holding)
        for holding in self.holdings:
            ledger.release(holding, self.now)
        ledger.check_invariants()
        assert ledger.granted == 0
        assert ledger.waiting == 0
        assert ledger.on_the_way == 0
        assert self.arbiter.state().vram_used == 0


LedgerMachine.TestCase.settings = settings(
    # max_examples from the profile (tests/conftest.py)
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestLedger = LedgerMachine.TestCase
