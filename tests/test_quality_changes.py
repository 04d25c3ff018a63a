"""Allocation.quality_changes(): the current target first, then each change, latest wins.

DESIGN.md, "Allocation".
"""

from __future__ import annotations

import itertools

import anyio
import pytest
from arbiter_helpers import make_arbiter, settle

from arbiter import (
    Allocation,
    Arbiter,
    ArbiterConfig,
    GiB,
    Priority,
    QualityPolicy,
    WorkloadType,
)

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]

LLM = WorkloadType.LLM_INFERENCE
IMAGE = WorkloadType.IMAGE_GENERATION


async def collect(alloc: Allocation, seen: list[float], ended: anyio.Event) -> None:
    async for quality in alloc.quality_changes():
        seen.append(quality)  # noqa: PERF401 (each value must show as it comes)
    ended.set()


async def test_yields_the_current_target_first_then_each_change_and_ends_on_release() -> None:
    arbiter = make_arbiter()
    alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 10 * GiB)
    seen: list[float] = []
    ended = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, alloc, seen, ended)
            await settle()
            assert seen == [1.0]
            other = await arbiter.request_allocation(IMAGE, Priority.NORMAL, 12 * GiB)
            await settle()
            assert len(seen) == 2 and seen[1] < 1.0 and seen[1] == alloc.quality
            third = await arbiter.request_allocation(IMAGE, Priority.NORMAL, 1 * GiB)
            await settle()
            assert len(seen) == 3 and seen[2] < seen[1]
            third.release()
            other.release()
            await settle()
            assert seen[-1] == 1.0 and not ended.is_set()
            alloc.release()
            await ended.wait()
    # Each change appears once: no repeats of an unchanged target.
    assert all(a != b for a, b in itertools.pairwise(seen))


async def test_first_value_is_the_current_target_when_it_is_already_lowered() -> None:
    arbiter = make_arbiter()
    await arbiter.request_allocation(IMAGE, Priority.NORMAL, 12 * GiB)
    alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 11 * GiB)
    changes = alloc.quality_changes()
    with anyio.fail_after(5):
        first = await changes.__anext__()
    assert first == alloc.quality < 1.0
    await changes.aclose()


async def test_slow_reader_gets_the_latest_value_and_no_backlog() -> None:
    arbiter = make_arbiter()
    alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 10 * GiB)
    changes = alloc.quality_changes()
    with anyio.fail_after(5):
        assert await changes.__anext__() == 1.0
        # Three changes while nobody reads.
        a = await arbiter.request_allocation(IMAGE, Priority.NORMAL, 11 * GiB)
        first_change = alloc.quality
        b = await arbiter.request_allocation(IMAGE, Priority.NORMAL, 1 * GiB)
        second_change = alloc.quality
        c = await arbiter.request_allocation(IMAGE, Priority.NORMAL, 1 * GiB)
        latest = alloc.quality
        assert 1.0 > first_change > second_change > latest
        assert await changes.__anext__() == latest
        # Nothing else is pending: the next read waits for a new change.
        async with anyio.create_task_group() as tg:
            got: list[float] = []

            async def read_next() -> None:
                got.append(await changes.__anext__())

            tg.start_soon(read_next)
            await settle()
            assert got == []
            c.release()
            b.release()
            await settle()
            assert got == [first_change]
            a.release()
    await changes.aclose()


async def test_change_and_change_back_while_not_reading_is_no_change() -> None:
    arbiter = make_arbiter()
    alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 10 * GiB)
    changes = alloc.quality_changes()
    with anyio.fail_after(5):
        assert await changes.__anext__() == 1.0
        (await arbiter.request_allocation(IMAGE, Priority.NORMAL, 12 * GiB)).release()
        async with anyio.create_task_group() as tg:
            got: list[float] = []

            async def read_next() -> None:
                try:
                    got.append(await changes.__anext__())
                except StopAsyncIteration:
                    got.append(-1.0)

            tg.start_soon(read_next)
            await settle()
            assert got == []  # latest value wins, and it equals what was last seen
            alloc.release()
            await settle()
            assert got == [-1.0]  # ended, with no stale value before the end
    with pytest.raises(StopAsyncIteration):
        await changes.__anext__()


async def test_iterating_a_released_allocation_ends_at_once() -> None:
    arbiter = make_arbiter()
    alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB)
    alloc.release()
    with anyio.fail_after(5):
        assert [q async for q in alloc.quality_changes()] == []


async def test_several_readers_each_see_every_change() -> None:
    arbiter = make_arbiter()
    alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 10 * GiB)
    seen: tuple[list[float], list[float]] = ([], [])
    ended = (anyio.Event(), anyio.Event())
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(collect, alloc, seen[i], ended[i])
            await settle()
            other = await arbiter.request_allocation(IMAGE, Priority.NORMAL, 12 * GiB)
            await settle()
            other.release()
            await settle()
            alloc.release()
    assert seen[0] == seen[1] and len(seen[0]) == 3 and seen[0][1] < 1.0


async def test_closed_reader_stops_and_others_keep_going() -> None:
    arbiter = make_arbiter()
    alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 10 * GiB)
    early = alloc.quality_changes()
    with anyio.fail_after(5):
        assert await early.__anext__() == 1.0
        await early.aclose()
        await early.aclose()  # idempotent
        seen: list[float] = []
        ended = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, alloc, seen, ended)
            await settle()
            other = await arbiter.request_allocation(IMAGE, Priority.NORMAL, 12 * GiB)
            await settle()
            assert len(seen) == 2
            other.release()
            alloc.release()


async def test_release_by_preemption_ends_the_iteration_of_an_allocate_body() -> None:
    arbiter = make_arbiter()
    seen: list[float] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            from arbiter import Preempted

            async def body() -> None:
                with pytest.raises(Preempted):
                    async with arbiter.allocate(LLM, Priority.BACKGROUND, memory=20 * GiB) as a:
                        async for quality in a.quality_changes():
                            seen.append(quality)  # noqa: PERF401

            tg.start_soon(body)
            await settle()
            high = await arbiter.request_allocation(LLM, Priority.HIGH, 10 * GiB)
            high.release()
    assert seen == [1.0]


async def test_shrink_request_lowers_the_target_and_it_comes_back() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(24, reclaim_grace=60), probe=None)
    elastic = await arbiter.request_allocation(
        LLM, Priority.BACKGROUND, 20 * GiB, min_memory=4 * GiB
    )
    seen: list[float] = []
    ended = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, elastic, seen, ended)
            await settle()

            gave_up = anyio.Event()

            async def impatient() -> None:
                with pytest.raises(TimeoutError):
                    await arbiter.request_allocation(LLM, Priority.HIGH, 8 * GiB, timeout=0.5)
                gave_up.set()

            tg.start_soon(impatient)
            await settle()
            assert len(seen) == 2 and seen[1] < 1.0
            # The waiter gives up: the pressure that caused the request has passed.
            await gave_up.wait()
            await settle()
            assert seen[-1] == 1.0 and elastic.memory == 20 * GiB
            elastic.release()
    assert seen == [1.0, seen[1], 1.0]


# -- the Quality rules of DESIGN.md: work-conserving, no inversion, a fixed point ------


async def test_a_lone_holder_is_at_full_quality_whatever_its_size() -> None:
    # A lone elastic 24 GiB request on an empty 24 GiB card: all of it, at 1.0, and it is
    # never asked to shrink, also while another process uses memory.
    arbiter = make_arbiter()
    alone = await arbiter.request_allocation(LLM, Priority.BACKGROUND, 24 * GiB, min_memory=6 * GiB)
    assert alone.memory == 24 * GiB and alone.quality == 1.0
    seen: list[float] = []
    ended = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, alone, seen, ended)
            await settle()
            arbiter._ledger.set_external(8 * GiB, anyio.current_time())
            await settle()
            alone.release()
    assert seen == [1.0]
    assert arbiter.stats().quality_reductions == 0


async def test_recommended_quality_for_the_first_request_is_full() -> None:
    arbiter = make_arbiter()
    for priority in Priority:
        assert arbiter.recommended_quality(IMAGE, priority) == 1.0


async def test_lower_priorities_filling_the_card_never_lower_a_higher_target() -> None:
    arbiter = make_arbiter()
    top = await arbiter.request_allocation(LLM, Priority.USER_FACING, 12 * GiB, min_memory=4 * GiB)
    seen: list[float] = []
    ended = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, top, seen, ended)
            await settle()
            fillers = [
                await arbiter.request_allocation(IMAGE, Priority.BACKGROUND, 4 * GiB)
                for _ in range(3)
            ]
            await settle()
            assert arbiter.state().memory_pressure == 1.0
            assert top.quality == 1.0
            for filler in fillers:
                filler.release()
            top.release()
    assert seen == [1.0]
    assert arbiter.stats().quality_reductions == 0


async def test_a_drop_that_asks_a_watched_holder_to_shrink_is_counted() -> None:
    # An elastic USER_FACING holder whose own priority fills the card: its target falls
    # and asks it to shrink; each such drop counts.
    arbiter = make_arbiter()
    elastic = await arbiter.request_allocation(
        LLM, Priority.USER_FACING, 12 * GiB, min_memory=4 * GiB
    )
    seen: list[float] = []
    ended = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, elastic, seen, ended)
            await settle()
            other = await arbiter.request_allocation(LLM, Priority.USER_FACING, 12 * GiB)
            await settle()
            assert seen[-1] < 1.0
            assert elastic.memory_for_quality(seen[-1]) < elastic.memory
            assert arbiter.stats().quality_reductions == len(seen) - 1 >= 1
            other.release()
            elastic.release()


POLICIES = [QualityPolicy.ADAPTIVE, QualityPolicy.PROPORTIONAL, QualityPolicy.FIXED]
THRESHOLDS = [0.3, 0.5, 0.85, 0.99, 1.0]


async def follow(arbiter: Arbiter, alloc: Allocation, steps: int) -> int:
    """Resize ``alloc`` to its target as the README's loop does until it settles;
    the number of resizes it took (``steps`` + 1 when it never settles)."""
    for step in range(steps + 1):
        wanted = alloc.memory_for_quality(alloc.quality)
        if wanted < alloc.memory:
            await alloc.resize(wanted)
        elif wanted > alloc.memory and arbiter.state().vram_available > 0:
            size = min(wanted, alloc.memory + arbiter.state().vram_available)
            if size == alloc.memory:
                return step
            await alloc.resize(size, timeout=0)
        else:
            return step
    return steps + 1


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("others", [[], [(Priority.HIGH, 6)], [(Priority.BACKGROUND, 9)]])
async def test_a_holder_following_its_target_settles(
    policy: QualityPolicy, threshold: float, others: list[tuple[Priority, int]]
) -> None:
    config = ArbiterConfig.for_vram_gb(
        24, pressure_threshold=threshold, quality_policy=policy, reclaim_grace=0.0
    )
    arbiter = Arbiter(config, probe=None)
    rigid = [await arbiter.request_allocation(IMAGE, priority, gb * GiB) for priority, gb in others]
    elastic = await arbiter.request_allocation(LLM, Priority.NORMAL, 24 * GiB, min_memory=2 * GiB)
    with anyio.fail_after(5):
        assert await follow(arbiter, elastic, 3) <= 2
        settled = (elastic.memory, elastic.quality)
        # Settled for good: nothing moves however often it looks again.
        assert await follow(arbiter, elastic, 3) == 0
        assert (elastic.memory, elastic.quality) == settled
    if not others:
        assert settled == (24 * GiB, 1.0)  # work-conserving
    for alloc in rigid:
        alloc.release()
    elastic.release()


@pytest.mark.parametrize(("waiting_gb", "degraded"), [(8, True), (10, False)])
async def test_only_a_waiter_that_shrinking_could_admit_lowers_targets(
    waiting_gb: int, degraded: bool
) -> None:
    # 20 GiB held by an elastic holder that cannot be preempted and could give 4 GiB;
    # 4 GiB are free. An 8 GiB waiter could be admitted by its shrinking: its target
    # falls. A 10 GiB one could not: degrading it would take its quality for nothing.
    arbiter = make_arbiter()
    keep = await arbiter.request_allocation(
        LLM, Priority.BACKGROUND, 20 * GiB, min_memory=16 * GiB, preemptible=False
    )
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(arbiter.request_allocation, IMAGE, Priority.HIGH, waiting_gb * GiB)
            await anyio.wait_all_tasks_blocked()
            assert (keep.quality < 1.0) is degraded
            tg.cancel_scope.cancel()
    assert keep.quality == 1.0  # nothing waits any more
    keep.release()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize(("first_gb", "second_gb"), [(20, 8), (14, 14), (12, 20)])
async def test_two_holders_of_one_priority_following_their_targets_settle(
    policy: QualityPolicy, threshold: float, first_gb: int, second_gb: int
) -> None:
    # Each answers the other's resizes; targets that could trade the same bytes
    # forever would never let the clock move (a simulation hung on this).
    config = ArbiterConfig.for_vram_gb(
        24, pressure_threshold=threshold, quality_policy=policy, reclaim_grace=0.0
    )
    arbiter = Arbiter(config, probe=None)
    first = await arbiter.request_allocation(
        IMAGE, Priority.BACKGROUND, first_gb * GiB, min_memory=first_gb * GiB // 2
    )
    second = await arbiter.request_allocation(
        IMAGE, Priority.BACKGROUND, second_gb * GiB, min_memory=second_gb * GiB // 2
    )
    with anyio.fail_after(5):
        for _ in range(20):
            moved = await follow(arbiter, first, 3) + await follow(arbiter, second, 3)
            if not moved:
                break
        else:
            pytest.fail("the two holders never settled")
    first.release()
    second.release()


async def test_a_cancelled_step_stops_watching_and_reading_on_watches_again() -> None:
    arbiter = make_arbiter()
    alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 10 * GiB)
    changes = alloc.quality_changes()
    with anyio.fail_after(5):
        assert await changes.__anext__() == 1.0
        assert alloc._holding.watchers == 1
        with anyio.move_on_after(0.1):  # waits for a change that does not come
            await changes.__anext__()
        assert alloc._holding.watchers == 0  # its reader gave up: nobody is told
        async with anyio.create_task_group() as tg:
            seen: list[float] = []

            async def read_on() -> None:
                seen.append(await changes.__anext__())

            tg.start_soon(read_on)
            await settle()
            assert alloc._holding.watchers == 1
            other = await arbiter.request_allocation(IMAGE, Priority.NORMAL, 12 * GiB)
        assert seen == [alloc.quality] and seen[0] < 1.0
    other.release()
    await changes.aclose()
    assert alloc._holding.watchers == 0
