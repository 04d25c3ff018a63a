"""Preemption: cancel scopes for `allocate`, cooperative requests for `request_allocation`.

DESIGN.md, "Allocation" and "Preemption and degrade-before-preempt".
"""

from __future__ import annotations

import anyio
import pytest
from arbiter_helpers import make_arbiter, request_in_background, settle

from arbiter import (
    Allocation,
    AllocationTimeout,
    Arbiter,
    GiB,
    Preempted,
    Priority,
    WorkloadType,
)

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]

LLM = WorkloadType.LLM_INFERENCE
BG, NORMAL, HIGH, TOP = Priority.BACKGROUND, Priority.NORMAL, Priority.HIGH, Priority.USER_FACING


# -- allocate(): the body runs in a cancel scope -------------------------------


async def test_higher_priority_cancels_the_body_and_takes_the_memory_after_it_unwound() -> None:
    arbiter = make_arbiter()
    entered = anyio.Event()
    outcome: list[object] = []
    low: list[Allocation] = []

    async def low_body() -> None:
        try:
            async with arbiter.allocate(LLM, BG, memory=20 * GiB) as alloc:
                low.append(alloc)
                entered.set()
                await anyio.sleep_forever()
        except Preempted as exc:
            outcome.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(low_body)
            await entered.wait()
            high = await arbiter.request_allocation(LLM, HIGH, 10 * GiB)
            # The grant came only once the body had unwound and released.
            assert outcome and isinstance(outcome[0], Preempted)
            assert low[0].preempted and low[0].released and low[0].memory == 0
            assert high.memory == 10 * GiB
            assert arbiter.state().vram_used == 10 * GiB
            assert arbiter.stats().preemptions == 1
            high.release()


async def test_slow_unwinding_body_delays_the_grant_until_it_has_unwound() -> None:
    arbiter = make_arbiter()
    entered, cleaning, cleanup_done = anyio.Event(), anyio.Event(), anyio.Event()
    raised: list[BaseException] = []

    async def low_body() -> None:
        try:
            async with arbiter.allocate(LLM, BG, memory=20 * GiB):
                entered.set()
                try:
                    await anyio.sleep_forever()
                finally:
                    with anyio.CancelScope(shield=True):
                        cleaning.set()
                        await cleanup_done.wait()
        except Preempted as exc:
            raised.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(low_body)
            await entered.wait()
            high = await request_in_background(tg, arbiter, HIGH, 10)
            await cleaning.wait()
            await settle()
            # Still unwinding: the memory is not free and the waiter still waits.
            assert not high and not raised
            state = arbiter.state()
            assert state.vram_used == 20 * GiB and state.waiting == 1
            cleanup_done.set()
            await settle()
            assert raised and high and high[0].memory == 10 * GiB
            high[0].release()


async def test_preemption_requested_before_the_body_started_cancels_it_at_once(
    anyio_backend_name: str,
) -> None:
    # keep_alive=0 makes the timer ask for the memory back as soon as it looks, which
    # can be after the grant and before the granted waiter has resumed.
    arbiter = make_arbiter()
    preempted_at_start: list[bool] = []
    after_first_checkpoint: list[bool] = []
    raised: list[BaseException] = []

    async def low_body() -> None:
        try:
            async with arbiter.allocate(LLM, BG, memory=10 * GiB, keep_alive=0) as alloc:
                preempted_at_start.append(alloc.preempted)
                await anyio.lowlevel.checkpoint()
                after_first_checkpoint.append(True)
                await anyio.sleep_forever()
        except Preempted as exc:
            raised.append(exc)

    with anyio.fail_after(5):
        async with arbiter, anyio.create_task_group() as tg:
            blocker = await arbiter.request_allocation(LLM, NORMAL, 20 * GiB, keep_alive=1000)
            tg.start_soon(low_body)
            await settle()  # parked: only 4 GiB are free
            with blocker.busy():  # wakes the keep_alive timer first ...
                pass
            blocker.release()  # ... then grants the parked request
            await settle()
            assert raised and not after_first_checkpoint
    if anyio_backend_name == "asyncio":
        # asyncio wakes tasks in FIFO order, so the timer certainly asked first;
        # trio shuffles, and then only the outcome above is certain.
        assert preempted_at_start == [True]
    assert arbiter.state().vram_used == 0


async def test_body_that_finished_before_the_cancellation_reached_it_ends_normally() -> None:
    arbiter = make_arbiter()
    blocker = await arbiter.request_allocation(LLM, NORMAL, 20 * GiB, preemptible=False)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async with arbiter.allocate(LLM, BG, memory=4 * GiB) as alloc:
                high = await request_in_background(tg, arbiter, HIGH, 22)
                assert not alloc.preempted  # only 4 GiB could be freed: harm no one
                # Releasing the blocker leaves the HIGH waiter 2 GiB short: our 4 GiB
                # are asked for, and the body ends with no checkpoint in between.
                blocker.release()
                assert alloc.preempted
            # No Preempted was raised: the body was not cut short.
            assert alloc.released
            await settle()
            assert high and high[0].memory == 22 * GiB
            high[0].release()


async def test_equal_priority_is_never_preempted() -> None:
    arbiter = make_arbiter()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            holder = await arbiter.request_allocation(LLM, NORMAL, 20 * GiB)
            waiter = await request_in_background(tg, arbiter, NORMAL, 10)
            assert not holder.preempted and not waiter
            tg.cancel_scope.cancel()
        with pytest.raises(AllocationTimeout):
            await arbiter.request_allocation(LLM, NORMAL, 10 * GiB, timeout=0.05)
    assert not holder.preempted and arbiter.stats().preemptions == 0


async def test_non_preemptible_holder_is_never_preempted() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, BG, 20 * GiB, preemptible=False)
    other = await arbiter.request_allocation(LLM, BG, 2 * GiB)
    with anyio.fail_after(5), pytest.raises(AllocationTimeout):
        await arbiter.request_allocation(LLM, TOP, 10 * GiB, timeout=0.05)
    # Preempting the one preemptible holder would not have been enough: harm no one.
    assert not holder.preempted and not other.preempted
    assert arbiter.stats().preemptions == 0


async def test_lower_priority_cannot_preempt_higher() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, HIGH, 20 * GiB)
    with anyio.fail_after(5), pytest.raises(AllocationTimeout):
        await arbiter.request_allocation(LLM, NORMAL, 10 * GiB, timeout=0.05)
    assert not holder.preempted


# -- victim order -------------------------------------------------------------


async def hold_three(arbiter: Arbiter, specs: list[tuple[Priority, int]]) -> list[Allocation]:
    """Grant the holders in this order (oldest first)."""
    return [await arbiter.request_allocation(LLM, p, gib * GiB) for p, gib in specs]


@pytest.mark.parametrize(
    ("specs", "busy", "need", "victims"),
    [
        # Lowest priority first, whatever the age.
        ([(NORMAL, 8), (BG, 8), (BG, 8)], (), 8, {2}),
        ([(BG, 8), (NORMAL, 8), (NORMAL, 8)], (), 8, {0}),
        # Within one priority, the most recently granted first.
        ([(BG, 8), (BG, 8), (BG, 8)], (), 8, {2}),
        ([(BG, 8), (BG, 8), (BG, 8)], (), 16, {1, 2}),
        # Within one priority, idle before busy (even an older idle one).
        ([(BG, 8), (BG, 8), (BG, 8)], (2,), 8, {1}),
        ([(BG, 8), (BG, 8), (BG, 8)], (1, 2), 8, {0}),
        ([(BG, 8), (BG, 8), (BG, 8)], (0, 1, 2), 8, {2}),
        # Busy lower priority still goes before idle higher priority.
        ([(NORMAL, 8), (BG, 8), (NORMAL, 8)], (1,), 8, {1}),
        # Until enough will be freed: small ones first, then the next.
        ([(NORMAL, 12), (BG, 4), (BG, 8)], (), 10, {1, 2}),
        ([(NORMAL, 12), (BG, 4), (BG, 8)], (), 14, {0, 1, 2}),
    ],
)
async def test_victim_order(
    specs: list[tuple[Priority, int]], busy: tuple[int, ...], need: int, victims: set[int]
) -> None:
    arbiter = make_arbiter()
    holders = await hold_three(arbiter, specs)
    free = 24 - sum(gib for _, gib in specs)
    spans = [holders[i].busy() for i in busy]
    for span in spans:
        span.__enter__()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            got = await request_in_background(tg, arbiter, HIGH, need + free)
            assert {i for i, h in enumerate(holders) if h.preempted} == victims
            assert arbiter.stats().preemptions == len(victims)
            for span in spans:
                span.__exit__(None, None, None)
            for i in sorted(victims):
                holders[i].release()
            await settle()
            assert got and got[0].memory == (need + free) * GiB


async def test_memory_on_its_way_is_not_taken_twice() -> None:
    arbiter = make_arbiter(reclaim_grace=0.0)
    older = await arbiter.request_allocation(LLM, BG, 12 * GiB)
    newer = await arbiter.request_allocation(LLM, BG, 12 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            first = await request_in_background(tg, arbiter, HIGH, 12)
            assert newer.preempted and not older.preempted
            # A second waiter arrives and another times out while the victim unwinds:
            # each wake-up re-runs the grant loop, and nobody else is preempted.
            second = await request_in_background(tg, arbiter, NORMAL, 1)
            with pytest.raises(AllocationTimeout):
                await arbiter.request_allocation(LLM, TOP, 12 * GiB, timeout=0.01)
            await settle()
            assert not older.preempted and arbiter.stats().preemptions == 1
            assert not first and not second
            newer.release()
            await settle()
            assert first and first[0].memory == 12 * GiB
            # Now the NORMAL waiter heads the queue with nothing on its way, and the
            # BACKGROUND holder is below it: it is asked in turn.
            assert older.preempted and arbiter.stats().preemptions == 2
            older.release()
            await settle()
            assert second and second[0].memory == 1 * GiB
            second[0].release()
            first[0].release()


async def test_unwinding_bodies_count_as_on_their_way() -> None:
    arbiter = make_arbiter()
    unwinding, finish = anyio.Event(), anyio.Event()
    preempted: list[str] = []

    async def body(name: str, gib: int, started: anyio.Event) -> None:
        try:
            async with arbiter.allocate(LLM, BG, memory=gib * GiB):
                started.set()
                try:
                    await anyio.sleep_forever()
                finally:
                    with anyio.CancelScope(shield=True):
                        unwinding.set()
                        await finish.wait()
        except Preempted:
            preempted.append(name)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for name in ("older", "newer"):
                started = anyio.Event()
                tg.start_soon(body, name, 12, started)
                await started.wait()
            first = await request_in_background(tg, arbiter, HIGH, 12)
            await unwinding.wait()
            try:
                # A second waiter arrives and times out while the victim unwinds: each
                # re-runs the grant loop, and nobody else is preempted.
                with pytest.raises(AllocationTimeout):
                    await arbiter.request_allocation(LLM, TOP, 1 * GiB, timeout=0.01)
                await settle()
                assert arbiter.stats().preemptions == 1 and not first
            finally:
                finish.set()  # a failed assertion must not leave a shielded task waiting
            await settle()
            assert preempted == ["newer"] and first
            first[0].release()
            tg.cancel_scope.cancel()


# -- cooperative preemption: request_allocation holders ------------------------


async def test_raw_holder_is_asked_and_keeps_its_memory_until_release() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, BG, 20 * GiB)
    noticed = anyio.Event()

    async def watch() -> None:
        await holder.wait_preempted()
        noticed.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await settle()
            assert not noticed.is_set()
            high = await request_in_background(tg, arbiter, HIGH, 10)
            await noticed.wait()
            assert holder.preempted and not holder.released
            assert holder.memory == 20 * GiB and arbiter.state().vram_used == 20 * GiB
            assert not high
            holder.release()
            await settle()
            assert high and high[0].memory == 10 * GiB
            high[0].release()


async def test_raw_holder_is_never_forced_even_after_the_waiter_gives_up() -> None:
    arbiter = make_arbiter(reclaim_grace=0.01)
    holder = await arbiter.request_allocation(LLM, BG, 20 * GiB)
    with anyio.fail_after(5), pytest.raises(AllocationTimeout):
        await arbiter.request_allocation(LLM, HIGH, 10 * GiB, timeout=0.05)
    assert holder.preempted and not holder.released and holder.memory == 20 * GiB
    assert arbiter.state().vram_used == 20 * GiB


async def test_wait_preempted_returns_on_release_too() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, BG, 4 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder.wait_preempted)
            await settle()
            holder.release()
    assert holder.released and not holder.preempted


async def test_wait_preempted_returns_at_once_when_already_preempted() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, BG, 20 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await request_in_background(tg, arbiter, HIGH, 10)
            assert holder.preempted
            await holder.wait_preempted()
            holder.release()
            await settle()
            tg.cancel_scope.cancel()


async def test_preempted_body_waiting_to_grow_stops_waiting_and_leaks_nothing() -> None:
    arbiter = make_arbiter()
    fixed = await arbiter.request_allocation(LLM, NORMAL, 12 * GiB, preemptible=False)
    raised: list[BaseException] = []

    async def growing_body() -> None:
        try:
            async with arbiter.allocate(LLM, BG, memory=8 * GiB) as alloc:
                await alloc.resize(16 * GiB)  # 8 more, 4 free: parks
        except Preempted as exc:
            raised.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(growing_body)
            await settle()
            assert arbiter.state().waiting == 1
            high = await arbiter.request_allocation(LLM, HIGH, 12 * GiB)
            assert raised and high.memory == 12 * GiB
            assert arbiter.state().waiting == 0
            assert arbiter.state().vram_used == 24 * GiB
            high.release()
    fixed.release()
    assert arbiter.state().vram_used == 0
