"""Allocation.resize: shrinking returns memory at once, growing queues like a new request.

DESIGN.md, "Allocation".
"""

from __future__ import annotations

import anyio
import pytest
from arbiter_helpers import make_arbiter, request_in_background, settle

from arbiter import (
    Allocation,
    AllocationTimeout,
    ArbiterConfig,
    GiB,
    InsufficientMemory,
    Priority,
    WorkloadType,
)

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]

LLM = WorkloadType.LLM_INFERENCE
BG, NORMAL, HIGH, TOP = Priority.BACKGROUND, Priority.NORMAL, Priority.HIGH, Priority.USER_FACING


async def resize_in_background(
    tg: anyio.abc.TaskGroup, alloc: Allocation, gib: int
) -> list[BaseException | None]:
    """Start ``alloc.resize`` in its own task; the list receives None or the error."""
    done: list[BaseException | None] = []

    async def run() -> None:
        try:
            await alloc.resize(gib * GiB)
        except Exception as exc:
            done.append(exc)
        else:
            done.append(None)

    tg.start_soon(run)
    await settle()
    return done


# -- shrinking -----------------------------------------------------------------


async def test_shrink_returns_memory_at_once_and_wakes_waiters() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 20 * GiB, min_memory=8 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            waiter = await request_in_background(tg, arbiter, NORMAL, 10)
            assert not waiter
            await holder.resize(12 * GiB)
            # The waiter was handed the memory by the shrink itself.
            assert holder.memory == 12 * GiB
            assert arbiter.state().vram_used == 22 * GiB
            await settle()
            assert waiter and waiter[0].memory == 10 * GiB
            waiter[0].release()
    holder.release()
    assert arbiter.state().vram_used == 0


async def test_shrink_of_a_rigid_allocation() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 20 * GiB)
    await holder.resize(5 * GiB)
    assert holder.memory == 5 * GiB and arbiter.state().vram_available == 19 * GiB


async def test_shrink_below_min_memory_is_a_value_error() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 20 * GiB, min_memory=8 * GiB)
    with pytest.raises(ValueError, match="min_memory"):
        await holder.resize(8 * GiB - 1)
    assert holder.memory == 20 * GiB
    await holder.resize(8 * GiB)  # exactly the floor is allowed
    assert holder.memory == 8 * GiB


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError)])
async def test_bad_sizes_are_argument_errors(value: object, error: type[Exception]) -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 4 * GiB)
    with pytest.raises(error):
        await holder.resize(value)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await holder.resize(True)
    assert holder.memory == 4 * GiB


async def test_resize_of_a_released_allocation_is_refused() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 4 * GiB)
    holder.release()
    with pytest.raises(RuntimeError):
        await holder.resize(2 * GiB)
    with pytest.raises(RuntimeError):
        await holder.resize(8 * GiB)
    assert arbiter.state().vram_used == 0


# -- growing -------------------------------------------------------------------


async def test_grow_that_fits_is_granted_at_once() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 4 * GiB)
    with anyio.fail_after(5):
        await holder.resize(16 * GiB)
    assert holder.memory == 16 * GiB and arbiter.state().vram_used == 16 * GiB
    holder.release()
    assert arbiter.state().vram_used == 0


async def test_grow_past_the_budget_is_insufficient_memory() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 4 * GiB)
    with pytest.raises(InsufficientMemory):
        await holder.resize(24 * GiB + 1)
    assert holder.memory == 4 * GiB and arbiter.state().waiting == 0
    await holder.resize(24 * GiB)  # the whole budget is allowed
    assert holder.memory == 24 * GiB


async def test_grow_that_times_out_keeps_the_old_size() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 8 * GiB)
    other = await arbiter.request_allocation(LLM, NORMAL, 12 * GiB)
    with anyio.fail_after(5), pytest.raises(AllocationTimeout):
        await holder.resize(16 * GiB, timeout=0.05)
    assert holder.memory == 8 * GiB and arbiter.state().vram_used == 20 * GiB
    assert arbiter.state().waiting == 0 and not other.preempted
    other.release()
    holder.release()
    assert arbiter.state().vram_used == 0


async def test_grow_queues_behind_an_earlier_waiter_of_the_same_priority() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 8 * GiB)
    blocker = await arbiter.request_allocation(LLM, NORMAL, 12 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            earlier = await request_in_background(tg, arbiter, NORMAL, 10)
            # 4 GiB are free and the grow needs 2, but the earlier waiter is ahead.
            grown = await resize_in_background(tg, holder, 10)
            assert not grown and holder.memory == 8 * GiB
            assert arbiter.state().waiting == 2
            blocker.release()
            await settle()
            assert earlier and grown == [None]
            assert holder.memory == 10 * GiB
            earlier[0].release()
    holder.release()
    assert arbiter.state().vram_used == 0


async def test_grow_is_overtaken_by_a_later_higher_priority_request() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 8 * GiB, preemptible=False)
    blocker = await arbiter.request_allocation(LLM, NORMAL, 14 * GiB, preemptible=False)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            grown = await resize_in_background(tg, holder, 12)  # needs 4, 2 free
            later = await request_in_background(tg, arbiter, HIGH, 4)
            assert not grown and not later
            blocker.release()  # 16 free: the HIGH request first, then the grow
            await settle()
            assert later and grown == [None]
            later[0].release()
    assert holder.memory == 12 * GiB


async def test_grow_of_a_higher_priority_holder_preempts_like_a_request() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, HIGH, 8 * GiB)
    victim = await arbiter.request_allocation(LLM, BG, 16 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            grown = await resize_in_background(tg, holder, 16)
            assert victim.preempted and not grown
            assert arbiter.stats().preemptions == 1
            victim.release()
            await settle()
            assert grown == [None] and holder.memory == 16 * GiB


async def test_grow_never_preempts_an_equal_priority() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 8 * GiB)
    other = await arbiter.request_allocation(LLM, NORMAL, 16 * GiB)
    with anyio.fail_after(5), pytest.raises(AllocationTimeout):
        await holder.resize(16 * GiB, timeout=0.05)
    assert not other.preempted


async def test_cancelled_grow_keeps_the_old_size_and_leaks_nothing() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 8 * GiB)
    blocker = await arbiter.request_allocation(LLM, NORMAL, 16 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await resize_in_background(tg, holder, 12)
            tg.cancel_scope.cancel()
    assert holder.memory == 8 * GiB and arbiter.state().waiting == 0
    blocker.release()
    holder.release()
    assert arbiter.state().vram_used == 0


async def test_resize_to_the_same_size_is_a_no_op() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 8 * GiB, min_memory=4 * GiB)
    await holder.resize(8 * GiB)
    assert holder.memory == 8 * GiB and arbiter.state().vram_used == 8 * GiB


async def test_elastic_holder_grows_back_to_its_memory() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 16 * GiB, min_memory=4 * GiB)
    await holder.resize(4 * GiB)
    other = await arbiter.request_allocation(LLM, NORMAL, 20 * GiB)
    # Holding its minimum with no room to grow: its share gives the floor.
    assert holder.quality == pytest.approx(ArbiterConfig().llm_min_quality)
    other.release()
    await holder.resize(16 * GiB)
    assert holder.memory == 16 * GiB and holder.quality == 1.0


async def test_release_while_growing_ends_the_grow_and_leaks_nothing() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 8 * GiB)
    blocker = await arbiter.request_allocation(LLM, NORMAL, 16 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            grown = await resize_in_background(tg, holder, 12)
            holder.release()
            await settle()
            assert len(grown) == 1 and isinstance(grown[0], RuntimeError)
            assert arbiter.state().waiting == 0
            blocker.release()
    assert holder.memory == 0 and arbiter.state().vram_used == 0


async def test_grow_granted_to_a_preempted_holder_does_not_cause_later_over_preemption() -> None:
    arbiter = make_arbiter()
    other = await arbiter.request_allocation(LLM, NORMAL, 12 * GiB, preemptible=False)
    holder = await arbiter.request_allocation(LLM, BG, 8 * GiB)
    filler = await arbiter.request_allocation(LLM, NORMAL, 4 * GiB, preemptible=False)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            grown = await resize_in_background(tg, holder, 12)  # +4, none free: parks
            high = await request_in_background(tg, arbiter, HIGH, 8)  # the holder is asked
            assert holder.preempted and not grown
            other.release()  # HIGH takes 8; the grow (+4) goes to the asked holder
            await settle()
            assert high and grown == [None] and holder.memory == 12 * GiB
            holder.release()
            filler.release()
            high[0].release()
            assert arbiter.state().vram_used == 0
            # Nothing is held or asked for now. 4 GiB free; a HIGH request of 9 is 5
            # short, and the newest BACKGROUND holder (6) covers that alone.
            older = await arbiter.request_allocation(LLM, BG, 14 * GiB)
            newer = await arbiter.request_allocation(LLM, BG, 6 * GiB)
            late = await request_in_background(tg, arbiter, HIGH, 9)
            assert newer.preempted and not older.preempted
            newer.release()
            await settle()
            assert late and late[0].memory == 9 * GiB
            late[0].release()
            older.release()
