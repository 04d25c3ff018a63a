"""Degrade before preempt: elastic holders are asked to shrink before anyone is preempted.

DESIGN.md, "Preemption and degrade-before-preempt", step 1, and ``reclaim_grace``.
"""

from __future__ import annotations

import anyio
import pytest
from arbiter_helpers import make_arbiter, request_in_background, settle

from arbiter import (
    Allocation,
    AllocationTimeout,
    Arbiter,
    ArbiterConfig,
    GiB,
    MiB,
    Priority,
    WorkloadType,
)

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]

LLM = WorkloadType.LLM_INFERENCE
IMAGE = WorkloadType.IMAGE_GENERATION
BG, NORMAL, HIGH = Priority.BACKGROUND, Priority.NORMAL, Priority.HIGH
LLM_FLOOR = 0.4


async def read_targets(alloc: Allocation, seen: list[float], changed: anyio.Event) -> None:
    async for quality in alloc.quality_changes():
        seen.append(quality)
        changed.set()


async def test_elastic_holder_that_shrinks_spares_everyone() -> None:
    # A long grace: the test would hang on it if the shrink did not end the wait.
    arbiter = make_arbiter(reclaim_grace=60)
    elastic = await arbiter.request_allocation(LLM, BG, 12 * GiB, min_memory=4 * GiB)
    rigid = await arbiter.request_allocation(LLM, BG, 8 * GiB)
    seen: list[float] = []
    changed = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_targets, elastic, seen, changed)
            await settle()
            assert seen == [1.0]
            changed = anyio.Event()
            high = await request_in_background(tg, arbiter, HIGH, 8)  # 4 GiB short
            assert not high
            # Asked to give back 4 of its 8 elastic GiB: its target drops toward the floor.
            assert len(seen) == 2 and LLM_FLOOR <= seen[1] < 1.0
            assert elastic.quality == seen[1]
            assert not elastic.preempted and not rigid.preempted
            await elastic.resize(8 * GiB)
            await settle()
            assert high and high[0].memory == 8 * GiB
            assert not elastic.preempted and not rigid.preempted
            stats = arbiter.stats()
            assert stats.quality_reductions >= 1 and stats.preemptions == 0
            high[0].release()
            elastic.release()
    assert rigid.memory == 8 * GiB


async def test_target_asked_for_matches_the_size_that_would_cover_the_shortfall() -> None:
    arbiter = make_arbiter(reclaim_grace=60)
    elastic = await arbiter.request_allocation(LLM, BG, 20 * GiB, min_memory=4 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            high = await request_in_background(tg, arbiter, HIGH, 8)  # 4 GiB short
            # min_memory maps to the floor, memory to 1.0, linear between: 16 of [4, 20]
            # covers the shortfall. The waiting 8 GiB also count in the pressure the
            # BACKGROUND holder sees, so its policy value may ask for a little more.
            assert elastic.quality <= LLM_FLOOR + (1 - LLM_FLOOR) * 12 / 16 + 1e-9
            assert elastic.quality > LLM_FLOOR
            await elastic.resize(16 * GiB)
            await settle()
            assert high and arbiter.stats().preemptions == 0
            high[0].release()


async def test_elastic_holder_that_ignores_the_request_is_preempted_after_the_grace() -> None:
    # Long enough that "not yet" below holds even when wait_all_tasks_blocked polls
    # (anyio's asyncio backend sleeps 0.1 s per poll).
    grace = 0.5
    arbiter = make_arbiter(reclaim_grace=grace)
    elastic = await arbiter.request_allocation(LLM, BG, 20 * GiB, min_memory=4 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            started = anyio.current_time()
            high = await request_in_background(tg, arbiter, HIGH, 8)
            assert not elastic.preempted and elastic.quality < 1.0
            await elastic.wait_preempted()
            assert anyio.current_time() - started >= grace
            assert elastic.preempted and not high
            stats = arbiter.stats()
            assert stats.quality_reductions >= 1 and stats.preemptions == 1
            elastic.release()
            await settle()
            assert high and high[0].memory == 8 * GiB
            high[0].release()


async def test_allocate_body_that_ignores_the_request_is_cancelled_after_the_grace() -> None:
    from arbiter import Preempted

    grace = 0.05
    arbiter = make_arbiter(reclaim_grace=grace)
    entered = anyio.Event()
    raised: list[BaseException] = []

    async def elastic_body() -> None:
        try:
            async with arbiter.allocate(LLM, BG, memory=20 * GiB, min_memory=4 * GiB):
                entered.set()
                await anyio.sleep_forever()
        except Preempted as exc:
            raised.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(elastic_body)
            await entered.wait()
            started = anyio.current_time()
            high = await arbiter.request_allocation(LLM, HIGH, 8 * GiB)
            assert anyio.current_time() - started >= grace
            assert raised and high.memory == 8 * GiB
            high.release()


async def test_no_grace_is_waited_when_no_elastic_holder_could_shrink() -> None:
    arbiter = make_arbiter(reclaim_grace=60)
    # One holder not elastic, one elastic but already at its minimum.
    rigid = await arbiter.request_allocation(LLM, BG, 12 * GiB)
    at_floor = await arbiter.request_allocation(LLM, BG, 8 * GiB, min_memory=8 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            high = await request_in_background(tg, arbiter, HIGH, 10)
            # Asked at once, not after 60 s.
            assert at_floor.preempted and not rigid.preempted
            assert arbiter.stats().quality_reductions == 0
            at_floor.release()
            await settle()
            assert high and high[0].memory == 10 * GiB
            high[0].release()


async def test_no_grace_when_the_only_elastic_holder_is_not_below_the_request() -> None:
    arbiter = make_arbiter(reclaim_grace=60)
    same = await arbiter.request_allocation(LLM, HIGH, 12 * GiB, min_memory=4 * GiB)
    lower = await arbiter.request_allocation(LLM, BG, 10 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            high = await request_in_background(tg, arbiter, HIGH, 6)
            # Not asked to shrink: its target is the policy's for the pressure, no lower.
            assert lower.preempted and not same.preempted
            assert same.quality == arbiter.recommended_quality(LLM, HIGH)
            lower.release()
            await settle()
            assert high
            high[0].release()


async def test_non_preemptible_elastic_holder_is_never_preempted() -> None:
    arbiter = make_arbiter(reclaim_grace=0)
    keep = await arbiter.request_allocation(
        LLM, BG, 20 * GiB, min_memory=4 * GiB, preemptible=False
    )
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(arbiter.request_allocation, LLM, HIGH, 8 * GiB)
            await settle()
            # What waits above it counts in its pressure: its target asks it to shrink
            # (a quality reduction) but nothing preempts it, not even with no grace.
            assert keep.quality < 1.0 and not keep.preempted
            assert arbiter.stats().quality_reductions == 1
            tg.cancel_scope.cancel()
        with pytest.raises(AllocationTimeout):
            await arbiter.request_allocation(LLM, HIGH, 8 * GiB, timeout=0.05)
    assert keep.quality == 1.0 and not keep.preempted  # the pressure has passed
    assert arbiter.stats().preemptions == 0


async def test_target_recovers_when_the_pressure_that_caused_it_has_passed() -> None:
    arbiter = make_arbiter(reclaim_grace=60)
    elastic = await arbiter.request_allocation(LLM, BG, 20 * GiB, min_memory=4 * GiB)
    with anyio.fail_after(5):
        with pytest.raises(AllocationTimeout):
            await arbiter.request_allocation(LLM, HIGH, 8 * GiB, timeout=0.05)
    # The waiter gave up: the shrink request is over and the target is back.
    assert elastic.quality == 1.0 and not elastic.preempted
    assert elastic.memory == 20 * GiB


async def test_lowest_priority_elastic_holder_is_asked_first() -> None:
    arbiter = make_arbiter(reclaim_grace=60)
    normal = await arbiter.request_allocation(IMAGE, NORMAL, 10 * GiB, min_memory=2 * GiB)
    background = await arbiter.request_allocation(LLM, BG, 10 * GiB, min_memory=2 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            high = await request_in_background(tg, arbiter, HIGH, 8)  # 4 GiB short
            assert background.quality < 1.0 and normal.quality == 1.0
            await background.resize(6 * GiB)
            await settle()
            assert high and arbiter.stats().preemptions == 0
            high[0].release()


async def test_several_elastic_holders_share_a_large_shortfall() -> None:
    arbiter = make_arbiter(reclaim_grace=60)
    first = await arbiter.request_allocation(LLM, BG, 12 * GiB, min_memory=4 * GiB)
    second = await arbiter.request_allocation(LLM, BG, 12 * GiB, min_memory=4 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            high = await request_in_background(tg, arbiter, HIGH, 12)  # 12 GiB short
            assert first.quality < 1.0 and second.quality < 1.0
            await first.resize(4 * GiB)
            await settle()
            assert not high  # 8 freed, 4 more needed
            await second.resize(8 * GiB)
            await settle()
            assert high and high[0].memory == 12 * GiB
            assert arbiter.stats().preemptions == 0
            high[0].release()


async def test_waiter_that_becomes_head_later_asks_then_escalates_after_the_grace() -> None:
    grace = 0.3
    arbiter = make_arbiter(reclaim_grace=grace)
    # 20 of 24 GiB: below the pressure threshold, so targets start at 1.0.
    fixed = await arbiter.request_allocation(LLM, NORMAL, 2 * GiB, preemptible=False)
    elastic = await arbiter.request_allocation(LLM, BG, 18 * GiB, min_memory=4 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            left = anyio.Event()

            async def hopeless() -> None:
                # Needs the whole budget while 2 GiB cannot be taken: nobody can help it.
                with pytest.raises(AllocationTimeout):
                    await arbiter.request_allocation(
                        LLM, Priority.USER_FACING, 24 * GiB, timeout=0.05
                    )
                left.set()

            started = anyio.current_time()
            tg.start_soon(hopeless)
            await settle()
            # What waits above it counts in its pressure, but nobody is preempted for a
            # request that preempting everyone could not admit.
            assert not elastic.preempted
            high = await request_in_background(tg, arbiter, HIGH, 8)
            assert not high and not elastic.preempted  # behind the hopeless one
            assert arbiter.stats().preemptions == 0
            await left.wait()
            # Once head, it asks for a shrink ...
            assert elastic.quality < 1.0 and not elastic.preempted
            # ... waits the grace, then preempts the holder that ignored it.
            await elastic.wait_preempted()
            # It became head when the other timed out (0.05 s after it started at the
            # earliest), and the grace runs from there.
            assert anyio.current_time() - started >= 0.05 + grace
            assert arbiter.stats().quality_reductions >= 1
            elastic.release()
            await settle()
            assert high and high[0].memory == 8 * GiB
            high[0].release()
    fixed.release()


async def test_growing_holder_asks_elastic_holders_first_then_preempts_after_the_grace() -> None:
    grace = 0.05
    arbiter = make_arbiter(reclaim_grace=grace)
    holder = await arbiter.request_allocation(LLM, HIGH, 4 * GiB)
    elastic = await arbiter.request_allocation(LLM, BG, 20 * GiB, min_memory=4 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            started = anyio.current_time()

            async def give_back_when_asked() -> None:
                await elastic.wait_preempted()
                elastic.release()

            tg.start_soon(give_back_when_asked)
            await holder.resize(12 * GiB)
            assert anyio.current_time() - started >= grace
            assert elastic.preempted and holder.memory == 12 * GiB
            stats = arbiter.stats()
            assert stats.quality_reductions >= 1 and stats.preemptions == 1


async def test_second_waiter_counts_promised_shrinks_and_the_next_head_asks_for_more() -> None:
    arbiter = make_arbiter(reclaim_grace=60)
    elastic = await arbiter.request_allocation(LLM, BG, 20 * GiB, min_memory=4 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            high = await request_in_background(tg, arbiter, HIGH, 8)  # 4 GiB short
            asked_once = elastic.quality
            assert asked_once < 1.0
            # 4 GiB short too, and the 4 GiB already promised go to it first: no new ask.
            top = await request_in_background(tg, arbiter, Priority.USER_FACING, 8)
            assert not elastic.preempted and arbiter.stats().preemptions == 0
            await elastic.resize(16 * GiB)
            await settle()
            assert top and not high
            # The HIGH request, head now, asks for more instead of preempting.
            assert elastic.quality < asked_once and not elastic.preempted
            await elastic.resize(elastic.memory_for_quality(elastic.quality))
            await settle()
            assert high and elastic.memory <= 8 * GiB  # a full card: its policy value fell too
            assert arbiter.stats().preemptions == 0
            high[0].release()
            top[0].release()
    elastic.release()


async def follow_target(alloc: Allocation) -> None:
    """An elastic holder that behaves well: shrinks to its target's size at each drop."""
    async for quality in alloc.quality_changes():
        wanted = alloc.memory_for_quality(quality)
        if wanted < alloc.memory:
            await alloc.resize(wanted)


def issue_7_arbiter(grace: float) -> Arbiter:
    config = ArbiterConfig.for_vram_gb(10, reclaim_grace=grace, adaptive_quality=False)
    return Arbiter(config, probe=None)


async def test_a_changed_situation_asks_first_instead_of_preempting() -> None:
    # Budget 10 GiB: an elastic NORMAL holder E of 6 GiB (min 2) that follows its target,
    # a USER_FACING holder H of 4 GiB, and a USER_FACING request X of 7 GiB. Preempting E
    # could not cover 7 GiB, so nobody is harmed; once H leaves X needs only 3 GiB, which
    # E gives by shrinking: it is asked, it shrinks, and nobody is preempted.
    arbiter = issue_7_arbiter(grace=60)
    e = await arbiter.request_allocation(LLM, NORMAL, 6 * GiB, min_memory=2 * GiB)
    h = await arbiter.request_allocation(LLM, Priority.USER_FACING, 4 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow_target, e)
            x = await request_in_background(tg, arbiter, Priority.USER_FACING, 7)
            assert not x and not e.preempted and e.quality == 1.0
            h.release()
            await settle()
            assert x and x[0].memory == 7 * GiB
            assert not e.preempted and e.memory == 3 * GiB
            stats = arbiter.stats()
            assert stats.preemptions == 0 and stats.quality_reductions >= 1
            x[0].release()
            e.release()


async def test_a_changed_situation_waits_the_grace_before_preempting() -> None:
    # The same, but E ignores the request: it is preempted only once the grace, counted
    # from the change (H leaving), has passed.
    grace = 0.3
    arbiter = issue_7_arbiter(grace=grace)
    e = await arbiter.request_allocation(LLM, NORMAL, 6 * GiB, min_memory=2 * GiB)
    h = await arbiter.request_allocation(LLM, Priority.USER_FACING, 4 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            x = await request_in_background(tg, arbiter, Priority.USER_FACING, 7)
            await anyio.sleep(0.1)
            assert not e.preempted
            h.release()
            changed = anyio.current_time()
            await settle()
            assert not e.preempted and e.quality < 1.0  # asked first
            await e.wait_preempted()
            assert anyio.current_time() - changed >= grace
            assert arbiter.stats().preemptions == 1
            e.release()
            await settle()
            assert x and x[0].memory == 7 * GiB
            x[0].release()


async def test_a_waiter_does_not_spin_while_a_preempted_victim_finishes() -> None:
    arbiter = make_arbiter(reclaim_grace=0.01)
    calls = 0
    advance = arbiter._ledger.advance

    def counting_advance(now: float) -> float | None:
        nonlocal calls
        calls += 1
        return advance(now)

    arbiter._ledger.advance = counting_advance  # type: ignore[method-assign]
    with anyio.fail_after(5):
        async with arbiter, anyio.create_task_group() as tg:
            elastic = await arbiter.request_allocation(LLM, BG, 20 * GiB, min_memory=4 * GiB)
            high = await request_in_background(tg, arbiter, HIGH, 8)
            await elastic.wait_preempted()
            calls = 0
            await anyio.sleep(0.2)  # the victim finishes its step before it releases
            elastic.release()
            await settle()
            assert high and high[0].memory == 8 * GiB
            high[0].release()
    # Nothing is due while the victim finishes: a few wake-ups at most, not thousands.
    assert calls < 20, calls


async def test_an_unpreemptible_elastic_holder_is_asked_for_what_the_waiter_needs() -> None:
    # The weights the chats run on: never preempted, but elastic (a smaller KV cache).
    arbiter = make_arbiter(reclaim_grace=60)
    weights = await arbiter.request_allocation(
        LLM, HIGH, 20 * GiB, min_memory=8 * GiB, preemptible=False
    )
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            chat = await request_in_background(tg, arbiter, Priority.USER_FACING, 8)
            assert not chat  # 4 GiB short
            # Asked to give 4 of its 12 spare GiB, not to fall to its floor.
            assert weights.memory_for_quality(weights.quality) == 16 * GiB
            assert weights.quality > LLM_FLOOR and not weights.preempted
            await weights.resize(16 * GiB)
            await settle()
            assert chat and chat[0].memory == 8 * GiB
            stats = arbiter.stats()
            assert stats.preemptions == 0 and stats.quality_reductions >= 1
            chat[0].release()
    weights.release()


async def test_holders_below_a_waiter_give_its_shortfall_once_not_each() -> None:
    arbiter = make_arbiter(reclaim_grace=60)
    older = await arbiter.request_allocation(LLM, BG, 10 * GiB, min_memory=4 * GiB)
    newer = await arbiter.request_allocation(LLM, BG, 10 * GiB, min_memory=4 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            high = await request_in_background(tg, arbiter, HIGH, 8)
            assert not high  # 4 GiB short
            # Together their targets ask for the shortfall once: the headroom the policy
            # keeps at a full card, and the rest from the first victim in DESIGN's order
            # (the most recent grant). Each falling to its floor would give it three times.
            sizes = [a.memory_for_quality(a.quality) for a in (older, newer)]
            assert abs(20 * GiB - sum(sizes) - 4 * GiB) < MiB
            assert older.quality > 0.85 and sizes[1] < sizes[0]
            for alloc, size in zip((older, newer), sizes, strict=True):
                await alloc.resize(size)
            await settle()
            assert high and high[0].memory == 8 * GiB
            assert arbiter.stats().preemptions == 0
            high[0].release()
    older.release()
    newer.release()


async def test_an_elastic_holder_shrinks_when_other_processes_overcommit_the_card() -> None:
    arbiter = make_arbiter()
    elastic = await arbiter.request_allocation(LLM, BG, 16 * GiB, min_memory=4 * GiB)
    rigid = await arbiter.request_allocation(IMAGE, BG, 4 * GiB)
    assert elastic.quality == 1.0
    arbiter._ledger.set_external(8 * GiB, anyio.current_time())
    # 20 GiB granted beside 8 GiB of others' on a 24 GiB card: 4 GiB too many.
    assert elastic.memory_for_quality(elastic.quality) <= 12 * GiB
    elastic.release()
    rigid.release()


async def test_a_preempted_elastic_holder_is_told_its_floor() -> None:
    # No grace: the shrink request is followed at once by the preemption. A holder that
    # reads its target before unwinding must see that it should give everything.
    arbiter = make_arbiter()
    elastic = await arbiter.request_allocation(LLM, BG, 20 * GiB, min_memory=4 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            high = await request_in_background(tg, arbiter, HIGH, 8)
            assert elastic.preempted and not high
            assert elastic.quality == LLM_FLOOR
            elastic.release()
            await settle()
            assert high and high[0].memory == 8 * GiB
            high[0].release()
