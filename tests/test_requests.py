"""DESIGN.md "Requesting memory", rules 1-7, one example (or a few) per rule.

The arbiters here are pure accounting (no ``async with``, ``probe=None``) unless the
rule needs the poller, which then reads a `FakeGpu`. Budgets are 10 GiB and sizes whole
GiB so that every figure can be checked exactly.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest
from arbiter_helpers import settle

from arbiter import (
    Allocation,
    AllocationTimeout,
    Arbiter,
    ArbiterConfig,
    GiB,
    InsufficientMemory,
    InsufficientQuality,
    Priority,
    WorkloadType,
)
from arbiter._ledger import Event, Ledger, Outcome
from arbiter._records import Growth, Holding, NewAllocation
from arbiter.testing import FakeGpu

pytestmark = pytest.mark.virtual_time

LLM = WorkloadType.LLM_INFERENCE
IMAGE = WorkloadType.IMAGE_GENERATION
BACKGROUND, NORMAL, HIGH, USER_FACING = (
    Priority.BACKGROUND,
    Priority.NORMAL,
    Priority.HIGH,
    Priority.USER_FACING,
)


def make_arbiter(gb: float = 10, **overrides: Any) -> Arbiter:
    return Arbiter(ArbiterConfig.for_vram_gb(gb, **overrides), probe=None)


def assert_exact(arbiter: Arbiter, *, used: int, waiting: int = 0) -> None:
    state = arbiter.state()
    assert state.vram_used == used
    assert state.waiting == waiting
    arbiter._ledger.check_invariants()


# -- the fast path ------------------------------------------------------------


@pytest.mark.anyio
async def test_request_that_fits_is_granted_at_once_with_its_fields() -> None:
    arbiter = make_arbiter()
    before = anyio.current_time()
    alloc = await arbiter.request_allocation(LLM, NORMAL, 4 * GiB, label="chat", timeout=0)
    assert isinstance(alloc, Allocation)
    assert alloc.memory == 4 * GiB
    assert alloc.workload is LLM
    assert alloc.priority is NORMAL
    assert alloc.min_memory is None
    assert alloc.label == "chat"
    assert alloc.released is False
    assert alloc.preempted is False
    assert before <= alloc.created_at <= anyio.current_time()
    other = await arbiter.request_allocation(IMAGE, HIGH, 6 * GiB, timeout=0)
    assert isinstance(alloc.id, str) and alloc.id != other.id
    assert_exact(arbiter, used=10 * GiB)
    alloc.release()
    other.release()
    assert_exact(arbiter, used=0)


# -- rule 3: one order, priority then arrival -----------------------------------


async def _grant_order(arbiter: Arbiter, arrivals: list[tuple[str, Priority]]) -> list[str]:
    """Queue ``arrivals`` (each wanting the whole budget) behind a holder, release the
    holder, and return the order in which they were granted."""
    budget = arbiter.config.vram_budget
    holder = await arbiter.request_allocation(LLM, USER_FACING, budget, preemptible=False)
    granted: list[str] = []

    async def waiter(name: str, priority: Priority) -> None:
        alloc = await arbiter.request_allocation(LLM, priority, budget, timeout=None)
        granted.append(name)
        alloc.release()

    async with anyio.create_task_group() as tg:
        for name, priority in arrivals:
            tg.start_soon(waiter, name, priority)
            await settle()  # arrival order is the start order
        assert arbiter.state().waiting == len(arrivals)
        assert granted == []
        holder.release()
    assert_exact(arbiter, used=0)
    return granted


@pytest.mark.anyio
async def test_grants_follow_priority_then_arrival() -> None:
    arrivals = [
        ("bg1", BACKGROUND),
        ("n1", NORMAL),
        ("h1", HIGH),
        ("uf1", USER_FACING),
        ("n2", NORMAL),
        ("bg2", BACKGROUND),
        ("uf2", USER_FACING),
        ("h2", HIGH),
    ]
    order = await _grant_order(make_arbiter(), arrivals)
    assert order == ["uf1", "uf2", "h1", "h2", "n1", "n2", "bg1", "bg2"]


@pytest.mark.anyio
async def test_grants_within_one_priority_are_fifo() -> None:
    arrivals = [(f"w{i}", NORMAL) for i in range(8)]
    assert await _grant_order(make_arbiter(), arrivals) == [f"w{i}" for i in range(8)]


@pytest.mark.anyio
async def test_head_of_line_blocking_small_request_waits_behind_large() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 6 * GiB)
    granted: list[str] = []

    async def waiter(name: str, memory: int) -> None:
        await arbiter.request_allocation(LLM, NORMAL, memory, timeout=None)
        granted.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "large", 8 * GiB)
        await settle()
        tg.start_soon(waiter, "small", 2 * GiB)  # 4 GiB are free: it would fit
        await settle()
        assert granted == []
        assert arbiter.state().waiting == 2
        assert arbiter.state().vram_available == 4 * GiB
        arbiter._ledger.check_invariants()
        holder.release()
        # Both are granted by that release (trio may resume them in either order).
        assert_exact(arbiter, used=10 * GiB)
    assert sorted(granted) == ["large", "small"]
    assert_exact(arbiter, used=10 * GiB)


@pytest.mark.anyio
async def test_new_request_that_fits_does_not_barge_past_a_waiter() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 8 * GiB)
    granted: list[str] = []

    async def waiter(name: str, priority: Priority, memory: int) -> None:
        await arbiter.request_allocation(LLM, priority, memory, timeout=None)
        granted.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "first", NORMAL, 4 * GiB)
        await settle()
        # 2 GiB are free, yet a waiter of the same priority is ahead: no fast path.
        with pytest.raises(AllocationTimeout):
            await arbiter.request_allocation(LLM, NORMAL, 1 * GiB, timeout=0)
        # Nor for a lower priority, which is behind it in the order too.
        with pytest.raises(AllocationTimeout):
            await arbiter.request_allocation(LLM, BACKGROUND, 1 * GiB, timeout=0)
        tg.start_soon(waiter, "second", NORMAL, 2 * GiB)
        await settle()
        assert granted == []
        assert_exact(arbiter, used=8 * GiB, waiting=2)
        holder.release()
        assert_exact(arbiter, used=6 * GiB)  # both granted by that release
    assert sorted(granted) == ["first", "second"]
    assert_exact(arbiter, used=6 * GiB)


@pytest.mark.anyio
async def test_higher_priority_request_that_fits_goes_ahead_of_lower_waiters() -> None:
    arbiter = make_arbiter()
    await arbiter.request_allocation(LLM, USER_FACING, 8 * GiB, preemptible=False)

    async def waiter() -> None:
        await arbiter.request_allocation(LLM, BACKGROUND, 4 * GiB, timeout=None)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await settle()
        # Nothing waits ahead of a HIGH request: it is granted at once.
        alloc = await arbiter.request_allocation(LLM, HIGH, 2 * GiB, timeout=0)
        assert alloc.memory == 2 * GiB
        assert_exact(arbiter, used=10 * GiB, waiting=1)
        tg.cancel_scope.cancel()
    assert_exact(arbiter, used=10 * GiB)


@pytest.mark.anyio
async def test_releaser_hands_memory_to_a_waiter_that_has_not_run_yet() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 10 * GiB)
    got: list[Allocation] = []

    async def waiter() -> None:
        got.append(await arbiter.request_allocation(LLM, NORMAL, 6 * GiB, timeout=None))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await settle()
        holder.release()
        # No checkpoint since release(): the waiter has not run, but the memory is its.
        assert got == []
        state = arbiter.state()
        assert state.vram_used == 6 * GiB
        assert state.vram_available == 4 * GiB
        assert state.waiting == 0
        arbiter._ledger.check_invariants()
        # A newcomer cannot take it, however fast it is.
        with pytest.raises(AllocationTimeout):
            await arbiter.request_allocation(LLM, NORMAL, 6 * GiB, timeout=0)
    assert len(got) == 1 and got[0].memory == 6 * GiB
    assert_exact(arbiter, used=6 * GiB)


@pytest.mark.anyio
async def test_release_allocation_is_the_same_as_release() -> None:
    arbiter = make_arbiter()
    alloc = await arbiter.request_allocation(LLM, NORMAL, 10 * GiB)
    got: list[Allocation] = []

    async def waiter() -> None:
        got.append(await arbiter.request_allocation(IMAGE, NORMAL, 10 * GiB, timeout=None))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await settle()
        arbiter.release_allocation(alloc)
        assert alloc.released
        assert arbiter.state().vram_used == 10 * GiB  # now the waiter's
        arbiter.release_allocation(alloc)  # idempotent
        alloc.release()
        assert_exact(arbiter, used=10 * GiB)
    got[0].release()
    assert_exact(arbiter, used=0)


@pytest.mark.anyio
async def test_queue_behind_a_timed_out_head_is_considered_at_once() -> None:
    arbiter = make_arbiter()
    await arbiter.request_allocation(LLM, NORMAL, 6 * GiB)
    seen_at_timeout: list[tuple[int, int]] = []
    granted: list[int] = []

    async def head() -> None:
        with pytest.raises(AllocationTimeout):
            await arbiter.request_allocation(LLM, NORMAL, 8 * GiB, timeout=0.05)
        state = arbiter.state()
        seen_at_timeout.append((state.vram_used, state.waiting))

    async def behind() -> None:
        alloc = await arbiter.request_allocation(LLM, NORMAL, 3 * GiB, timeout=None)
        granted.append(alloc.memory)

    async with anyio.create_task_group() as tg:
        tg.start_soon(head)
        await settle()
        tg.start_soon(behind)
        await settle()
        assert granted == []
    # When the head left, the request behind it already held its memory.
    assert seen_at_timeout == [(9 * GiB, 0)]
    assert granted == [3 * GiB]
    assert_exact(arbiter, used=9 * GiB)


@pytest.mark.anyio
async def test_queue_behind_a_cancelled_head_is_considered_at_once() -> None:
    arbiter = make_arbiter()
    await arbiter.request_allocation(LLM, NORMAL, 6 * GiB)
    seen_at_cancel: list[tuple[int, int]] = []
    granted: list[int] = []

    async def head(scope: anyio.CancelScope) -> None:
        with scope:
            try:
                await arbiter.request_allocation(LLM, NORMAL, 8 * GiB, timeout=None)
            except anyio.get_cancelled_exc_class():
                state = arbiter.state()
                seen_at_cancel.append((state.vram_used, state.waiting))
                raise

    async def behind() -> None:
        alloc = await arbiter.request_allocation(LLM, NORMAL, 3 * GiB, timeout=None)
        granted.append(alloc.memory)

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(head, scope)
        await settle()
        tg.start_soon(behind)
        await settle()
        assert_exact(arbiter, used=6 * GiB, waiting=2)
        scope.cancel()
    assert seen_at_cancel == [(9 * GiB, 0)]
    assert granted == [3 * GiB]
    assert_exact(arbiter, used=9 * GiB)


# -- rule 4: elastic requests -----------------------------------------------------


@pytest.mark.anyio
async def test_elastic_request_gets_everything_when_it_all_fits() -> None:
    arbiter = make_arbiter()
    alloc = await arbiter.request_allocation(LLM, NORMAL, 8 * GiB, min_memory=2 * GiB)
    assert alloc.memory == 8 * GiB
    assert alloc.min_memory == 2 * GiB
    assert_exact(arbiter, used=8 * GiB)


@pytest.mark.anyio
async def test_elastic_request_gets_the_largest_size_that_fits_at_once() -> None:
    arbiter = make_arbiter()
    await arbiter.request_allocation(IMAGE, NORMAL, 6 * GiB)
    alloc = await arbiter.request_allocation(LLM, NORMAL, 8 * GiB, min_memory=2 * GiB, timeout=0)
    assert alloc.memory == 4 * GiB
    assert_exact(arbiter, used=10 * GiB)


@pytest.mark.anyio
async def test_elastic_waiter_gets_the_largest_size_that_fits_at_grant_time() -> None:
    arbiter = make_arbiter()
    await arbiter.request_allocation(LLM, NORMAL, 5 * GiB)
    second = await arbiter.request_allocation(LLM, NORMAL, 4 * GiB)
    got: list[Allocation] = []

    async def waiter() -> None:
        got.append(
            await arbiter.request_allocation(
                IMAGE, NORMAL, 8 * GiB, min_memory=3 * GiB, timeout=None
            )
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await settle()
        assert_exact(arbiter, used=9 * GiB, waiting=1)  # 1 GiB free < min_memory
        second.release()
    assert got[0].memory == 5 * GiB
    assert_exact(arbiter, used=10 * GiB)


# -- rule 5: timeouts and cancellation leave the ledger exact ----------------------


@pytest.mark.anyio
async def test_timeouts_leave_the_ledger_exact() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 10 * GiB, preemptible=False)
    outcomes: list[str] = []

    async def waiter(priority: Priority, memory: int, min_memory: int | None, t: float) -> None:
        try:
            await arbiter.request_allocation(
                IMAGE, priority, memory, min_memory=min_memory, timeout=t
            )
        except AllocationTimeout as exc:
            assert exc.timeout == t
            outcomes.append("timeout")

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, NORMAL, 4 * GiB, None, 0.02)
        tg.start_soon(waiter, HIGH, 9 * GiB, 2 * GiB, 0.04)
        tg.start_soon(waiter, BACKGROUND, 1 * GiB, None, 0.01)
        tg.start_soon(waiter, NORMAL, 2 * GiB, 1 * GiB, 0.03)
        tg.start_soon(waiter, NORMAL, 10 * GiB, None, 0.0)
    assert outcomes == ["timeout"] * 5
    assert_exact(arbiter, used=10 * GiB)
    assert arbiter.stats().timeouts == 5
    holder.release()
    assert_exact(arbiter, used=0)


@pytest.mark.anyio
async def test_allocation_timeout_is_a_timeout_error() -> None:
    arbiter = make_arbiter()
    await arbiter.request_allocation(LLM, NORMAL, 10 * GiB)
    start = anyio.current_time()
    with pytest.raises(TimeoutError) as info:
        await arbiter.request_allocation(LLM, NORMAL, 1 * GiB, timeout=0.05)
    assert isinstance(info.value, AllocationTimeout)
    assert info.value.timeout == 0.05
    assert anyio.current_time() - start >= 0.04  # it did wait (clocks may round)


@pytest.mark.anyio
async def test_timeout_zero_grants_what_fits_and_fails_at_once_otherwise() -> None:
    arbiter = make_arbiter(allocation_timeout=None)
    alloc = await arbiter.request_allocation(LLM, NORMAL, 6 * GiB, timeout=0)
    assert alloc.memory == 6 * GiB
    with pytest.raises(AllocationTimeout) as info:
        with anyio.fail_after(5):
            await arbiter.request_allocation(LLM, NORMAL, 6 * GiB, timeout=0)
    assert info.value.timeout == 0
    assert_exact(arbiter, used=6 * GiB)


@pytest.mark.anyio
async def test_cancelled_waiters_leave_the_ledger_exact() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, USER_FACING, 10 * GiB, preemptible=False)
    cancelled: list[int] = []

    async def waiter(priority: Priority, memory: int, min_memory: int | None) -> None:
        try:
            await arbiter.request_allocation(
                LLM, priority, memory, min_memory=min_memory, timeout=None
            )
        except anyio.get_cancelled_exc_class():
            cancelled.append(memory)
            raise

    async with anyio.create_task_group() as tg:
        for priority, memory, min_memory in [
            (NORMAL, 3 * GiB, None),
            (HIGH, 8 * GiB, 1 * GiB),
            (BACKGROUND, 1 * GiB, None),
            (USER_FACING, 5 * GiB, None),
        ]:
            tg.start_soon(waiter, priority, memory, min_memory)
        await settle()
        assert_exact(arbiter, used=10 * GiB, waiting=4)
        tg.cancel_scope.cancel()
    assert sorted(cancelled) == [1 * GiB, 3 * GiB, 5 * GiB, 8 * GiB]
    assert_exact(arbiter, used=10 * GiB)
    assert arbiter.stats().cancelled == 4
    holder.release()
    assert_exact(arbiter, used=0)


@pytest.mark.anyio
async def test_cancellation_racing_a_grant_passes_the_memory_on() -> None:
    """Release, then cancel the waiter that was just granted, in the same tick."""
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 10 * GiB)
    held_by: list[str] = []

    async def waiter(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            alloc = await arbiter.request_allocation(LLM, NORMAL, 10 * GiB, timeout=None)
            try:
                # A backend may deliver the cancellation only at the next checkpoint,
                # after the grant: then this holder gives the memory back on its way out.
                held_by.append(name)
                await anyio.sleep_forever()
            finally:
                alloc.release()

    first, second = anyio.CancelScope(), anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "first", first)
        await settle()
        tg.start_soon(waiter, "second", second)
        await settle()
        holder.release()
        assert arbiter.state().vram_used == 10 * GiB  # granted to "first", not run yet
        first.cancel()
        await settle()
        # Whichever way the race went, "second" now holds the memory and nothing leaked.
        assert held_by[-1] == "second"
        assert_exact(arbiter, used=10 * GiB)
        second.cancel()
    assert_exact(arbiter, used=0)
    stats = arbiter.stats()
    assert stats.total_allocations == (
        stats.successful_allocations + stats.failed_allocations + stats.cancelled
    )


def test_ledger_withdraw_after_a_raced_grant_gives_the_memory_to_the_next_waiter() -> None:
    """The shell withdraws a request whose timeout or cancellation raced its grant."""
    granted: list[object] = []

    def sink(event: Event, ticket: object) -> None:
        if event is Event.GRANTED:
            granted.append(ticket)

    ledger = Ledger(ArbiterConfig(vram_budget=100), sink=sink)
    holder = Holding(LLM, NORMAL, 100, None)
    assert ledger.submit(NewAllocation(holder, 100, 100, ticket="holder"), now=0.0)
    first_holding = Holding(LLM, NORMAL, 70, None)
    first = NewAllocation(first_holding, 70, 70, ticket="first")
    second = NewAllocation(Holding(LLM, NORMAL, 60, None), 60, 60, ticket="second")
    assert not ledger.submit(first, now=1.0)
    assert not ledger.submit(second, now=2.0)
    granted.clear()
    ledger.release(holder, now=3.0)
    assert granted == ["first"] and ledger.granted == 70
    ledger.withdraw(first, now=3.0, outcome=Outcome.TIMED_OUT)  # it timed out before it ran
    assert granted == ["first", "second"]
    assert ledger.granted == 60 and ledger.waiting == 0
    assert first_holding.memory == 0
    stats = ledger.stats.snapshot(3.0)
    assert (stats.successful_allocations, stats.timeouts) == (2, 1)
    ledger.check_invariants()


def test_ledger_lets_go_of_a_withdrawn_request_at_once() -> None:
    """A withdrawn request leaves the queue at once, even behind a blocked head."""
    ledger = Ledger(ArbiterConfig(vram_budget=100))
    holder = Holding(LLM, NORMAL, 100, None)
    assert ledger.submit(NewAllocation(holder, 100, 100), now=0.0)
    waiters = [NewAllocation(Holding(LLM, p, 50, None), 50, 50) for p in (HIGH, NORMAL)]
    for request in waiters:
        assert not ledger.submit(request, now=1.0)
    ledger.withdraw(waiters[1], now=2.0, outcome=Outcome.CANCELLED)  # behind the head
    assert list(ledger.waiters()) == [waiters[0]]
    ledger.withdraw(waiters[0], now=3.0, outcome=Outcome.CANCELLED)
    assert ledger.waiting == 0 and not list(ledger.waiters())
    ledger.check_invariants()


def test_ledger_drops_a_failed_growth_at_once() -> None:
    """Releasing a holder fails its queued growth; the queue lets go of it (and of the
    released holder) at once."""
    ledger = Ledger(ArbiterConfig(vram_budget=100))
    big, small = Holding(LLM, NORMAL, 60, None), Holding(LLM, NORMAL, 20, None)
    assert ledger.grant_now(big, 60, 60, now=0.0) and ledger.grant_now(small, 20, 20, now=0.0)
    assert not ledger.submit(Growth(small, 40), now=1.0)
    ledger.release(small, now=2.0)
    assert ledger.waiting == 0 and not list(ledger.waiters())
    ledger.check_invariants()


def test_ledger_releases_everything_an_owner_holds_or_waits_for() -> None:
    ledger = Ledger(ArbiterConfig(vram_budget=100))
    session, other = object(), object()
    mine = Holding(LLM, NORMAL, 50, None, owner=session)
    theirs = Holding(LLM, NORMAL, 30, None, owner=other)
    assert ledger.grant_now(mine, 50, 50, now=0.0) and ledger.grant_now(theirs, 30, 30, now=0.0)
    waiting = NewAllocation(Holding(LLM, NORMAL, 40, None, owner=session), 40, 40)
    assert not ledger.submit(waiting, now=1.0)
    ledger.release_owner(session, now=2.0)
    assert mine.released and not theirs.released and waiting.state == "withdrawn"
    assert ledger.granted == 30 and ledger.waiting == 0
    ledger.check_invariants()


# -- rule 2: the impossible request ------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("timeout", [None, 0, 30.0])
async def test_impossible_request_fails_at_once(timeout: float | None) -> None:
    arbiter = make_arbiter(24, allocation_timeout=None)
    await arbiter.request_allocation(LLM, NORMAL, 24 * GiB)  # no room, yet no wait
    with anyio.fail_after(5):
        with pytest.raises(InsufficientMemory) as info:
            await arbiter.request_allocation(LLM, NORMAL, 100 * GiB, timeout=timeout)
    assert info.value.requested == 100 * GiB
    assert info.value.available == 24 * GiB
    assert str(info.value) == "requested 100.0 GiB, budget 24.0 GiB"
    assert_exact(arbiter, used=24 * GiB)
    assert arbiter.stats().failed_allocations == 1


@pytest.mark.anyio
async def test_elastic_request_is_impossible_only_when_its_minimum_exceeds_the_budget() -> None:
    arbiter = make_arbiter()
    with pytest.raises(InsufficientMemory) as info:
        await arbiter.request_allocation(LLM, NORMAL, 20 * GiB, min_memory=11 * GiB)
    assert info.value.requested == 11 * GiB
    assert "11.0 GiB" in str(info.value) and "10.0 GiB" in str(info.value)
    alloc = await arbiter.request_allocation(LLM, NORMAL, 20 * GiB, min_memory=4 * GiB)
    assert alloc.memory == 10 * GiB
    exact = await make_arbiter().request_allocation(LLM, NORMAL, 10 * GiB)  # == budget fits
    assert exact.memory == 10 * GiB


# -- the default timeout -------------------------------------------------------------


@pytest.mark.anyio
async def test_default_timeout_comes_from_the_config() -> None:
    arbiter = make_arbiter(allocation_timeout=0.05)
    await arbiter.request_allocation(LLM, NORMAL, 10 * GiB)
    with pytest.raises(AllocationTimeout) as info:
        await arbiter.request_allocation(LLM, NORMAL, 1 * GiB)
    assert info.value.timeout == 0.05
    with pytest.raises(AllocationTimeout) as info:
        async with arbiter.allocate(LLM, NORMAL, memory=1 * GiB):
            pytest.fail("granted without memory")
    assert info.value.timeout == 0.05
    assert_exact(arbiter, used=10 * GiB)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("config_timeout", "timeout"),
    [(None, {}), (0.01, {"timeout": None})],
    ids=["config-none", "explicit-none"],
)
async def test_timeout_none_waits_as_long_as_it_takes(
    config_timeout: float | None, timeout: dict[str, Any]
) -> None:
    arbiter = make_arbiter(allocation_timeout=config_timeout)
    holder = await arbiter.request_allocation(LLM, NORMAL, 10 * GiB)
    got: list[Allocation] = []

    async def waiter() -> None:
        got.append(await arbiter.request_allocation(LLM, NORMAL, 1 * GiB, **timeout))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.1)
        assert got == []
        assert arbiter.state().waiting == 1
        holder.release()
    assert got[0].memory == 1 * GiB
    assert_exact(arbiter, used=1 * GiB)


# -- rule 6: external use ------------------------------------------------------------


async def _until(condition: Any) -> None:
    """Wait for what the poller will have read; it sets no event a test could wait on."""
    with anyio.fail_after(5):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.005)


@pytest.mark.anyio
async def test_external_use_counts_and_waiters_wake_when_it_falls() -> None:
    fake = FakeGpu(total=12 * GiB)
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10, poll_interval=0.01), probe=fake)
    got: list[Allocation] = []
    async with anyio.create_task_group() as tg:
        async with arbiter:
            fake.external_used = 6 * GiB
            await _until(lambda: arbiter.state().external_used == 6 * GiB)
            state = arbiter.state()
            assert state.vram_available == 4 * GiB
            assert math.isclose(state.memory_pressure, 0.6)

            async def waiter() -> None:
                got.append(await arbiter.request_allocation(LLM, NORMAL, 6 * GiB, timeout=None))

            tg.start_soon(waiter)
            await settle()
            assert got == [] and arbiter.state().waiting == 1
            fake.external_used = 1 * GiB
            await _until(lambda: got)
            assert got[0].memory == 6 * GiB
            assert arbiter.state().external_used == 1 * GiB
            assert_exact(arbiter, used=6 * GiB)
            got[0].release()


# -- rule 7: min_quality -------------------------------------------------------------


@pytest.mark.anyio
async def test_min_quality_unmet_until_timeout_raises_insufficient_quality() -> None:
    arbiter = make_arbiter()
    await arbiter.request_allocation(IMAGE, NORMAL, 9 * GiB)  # pressure 0.9 > threshold
    assert arbiter.recommended_quality(LLM) < 0.99
    with pytest.raises(InsufficientQuality) as info:
        await arbiter.request_allocation(LLM, NORMAL, 1 * GiB, min_quality=0.99, timeout=0.02)
    assert info.value.minimum == 0.99
    assert 0.4 <= info.value.available < 0.99
    assert_exact(arbiter, used=9 * GiB)
    stats = arbiter.stats()
    assert stats.failed_allocations == 1


@pytest.mark.anyio
async def test_min_quality_without_memory_times_out_plainly() -> None:
    arbiter = make_arbiter()
    await arbiter.request_allocation(IMAGE, NORMAL, 10 * GiB)
    with pytest.raises(AllocationTimeout):
        await arbiter.request_allocation(LLM, NORMAL, 1 * GiB, min_quality=0.5, timeout=0.01)
    assert_exact(arbiter, used=10 * GiB)


@pytest.mark.anyio
async def test_min_quality_met_is_granted_at_once() -> None:
    arbiter = make_arbiter()
    alloc = await arbiter.request_allocation(LLM, NORMAL, 2 * GiB, min_quality=1.0, timeout=0)
    assert alloc.memory == 2 * GiB
    assert alloc.quality == 1.0


@pytest.mark.anyio
async def test_elastic_min_quality_waits_for_a_share_large_enough() -> None:
    arbiter = make_arbiter(adaptive_quality=False)  # the share alone decides
    holder = await arbiter.request_allocation(IMAGE, NORMAL, 6 * GiB)
    got: list[Allocation] = []

    async def waiter() -> None:
        got.append(
            await arbiter.request_allocation(
                LLM, NORMAL, 10 * GiB, min_memory=2 * GiB, min_quality=0.9, timeout=None
            )
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await settle()
        # 4 GiB would fit min_memory, but that share gives far less than 0.9.
        assert got == [] and arbiter.state().waiting == 1
        holder.release()
    assert got[0].memory == 10 * GiB
    assert got[0].quality >= 0.9
    assert_exact(arbiter, used=10 * GiB)


# -- allocate() as a context manager -------------------------------------------------


@pytest.mark.anyio
async def test_allocate_releases_on_exit() -> None:
    arbiter = make_arbiter()
    async with arbiter.allocate(LLM, USER_FACING, memory=6 * GiB, label="x") as alloc:
        assert alloc.memory == 6 * GiB and alloc.label == "x"
        assert_exact(arbiter, used=6 * GiB)
    assert alloc.released
    assert_exact(arbiter, used=0)


@pytest.mark.anyio
async def test_allocate_releases_on_exception_and_lets_it_through() -> None:
    arbiter = make_arbiter()
    with pytest.raises(KeyError, match="boom"):
        async with arbiter.allocate(LLM, NORMAL, memory=6 * GiB) as alloc:
            raise KeyError("boom")
    assert alloc.released
    assert_exact(arbiter, used=0)


@pytest.mark.anyio
async def test_an_allocate_context_is_entered_once_but_again_after_a_failed_entry() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 8 * GiB)
    context = arbiter.allocate(LLM, NORMAL, memory=4 * GiB, timeout=0)
    with pytest.raises(AllocationTimeout):
        async with context:
            pytest.fail("granted without memory")
    holder.release()
    async with context as alloc:  # the failed entry held nothing: it may be tried again
        assert alloc.memory == 4 * GiB
        with pytest.raises(RuntimeError, match="already entered"):
            async with context:
                pytest.fail("entered twice")
    assert alloc.released
    assert_exact(arbiter, used=0)


@pytest.mark.anyio
async def test_allocate_exit_hands_memory_to_the_next_waiter() -> None:
    arbiter = make_arbiter()
    got: list[Allocation] = []

    async def waiter() -> None:
        async with arbiter.allocate(IMAGE, NORMAL, memory=8 * GiB, timeout=None) as alloc:
            got.append(alloc)

    async with anyio.create_task_group() as tg:
        async with arbiter.allocate(LLM, NORMAL, memory=6 * GiB):
            tg.start_soon(waiter)
            await settle()
            assert got == [] and arbiter.state().waiting == 1
        assert arbiter.state().vram_used == 8 * GiB  # handed over on exit
    assert got[0].released
    assert_exact(arbiter, used=0)


@pytest.mark.anyio
async def test_allocate_cancelled_while_waiting_leaves_nothing() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 10 * GiB)
    with anyio.move_on_after(0.02) as scope:
        async with arbiter.allocate(LLM, NORMAL, memory=1 * GiB, timeout=None):
            pytest.fail("granted without memory")
    assert scope.cancelled_caught
    assert_exact(arbiter, used=10 * GiB)
    holder.release()
    assert_exact(arbiter, used=0)
    assert arbiter.stats().cancelled == 1
