"""DESIGN.md "State and stats": every field of `ArbiterState`, the counters' identity
over every kind of outcome, honest time-weighted averages, wait percentiles per priority.

The time weighting is checked exactly on the sync `Ledger`, whose methods take the
time from the caller; on a real event loop only its plausibility is checked.
"""

from __future__ import annotations

import dataclasses
import math

import anyio
import pytest
from arbiter_helpers import settle

from arbiter import (
    AllocationTimeout,
    Arbiter,
    ArbiterConfig,
    ArbiterState,
    ArbiterStats,
    GiB,
    InsufficientMemory,
    InsufficientQuality,
    MemoryPressure,
    Priority,
    ShuttingDown,
    WorkloadType,
)
from arbiter._ledger import Ledger
from arbiter._records import Holding, NewAllocation
from arbiter.testing import FakeGpu

pytestmark = pytest.mark.virtual_time

LLM = WorkloadType.LLM_INFERENCE
IMAGE = WorkloadType.IMAGE_GENERATION
VIDEO = WorkloadType.VIDEO_GENERATION
NORMAL = Priority.NORMAL


def make_arbiter(gb: float = 10, **overrides: object) -> Arbiter:
    return Arbiter(ArbiterConfig.for_vram_gb(gb, **overrides), probe=None)


# -- state() -------------------------------------------------------------------


def test_state_of_an_idle_arbiter() -> None:
    state = make_arbiter().state()
    assert isinstance(state, ArbiterState)
    assert state == ArbiterState(
        active_llm_workloads=0,
        active_diffusion_workloads=0,
        llm_quality=1.0,
        diffusion_quality=1.0,
        memory_pressure=0.0,
        pressure_level=MemoryPressure.LOW,
        vram_used=0,
        external_used=0,
        vram_available=10 * GiB,
        waiting=0,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.vram_used = 1  # type: ignore[misc]


@pytest.mark.anyio
async def test_state_counts_each_family_memory_and_waiters() -> None:
    arbiter = make_arbiter()
    llm = await arbiter.request_allocation(LLM, NORMAL, 4 * GiB)
    image = await arbiter.request_allocation(IMAGE, NORMAL, 2 * GiB)
    video = await arbiter.request_allocation(VIDEO, Priority.HIGH, 1 * GiB)
    state = arbiter.state()
    assert state.active_llm_workloads == 1
    assert state.active_diffusion_workloads == 2  # image and video are one family
    assert state.vram_used == 7 * GiB
    assert state.vram_available == 3 * GiB
    assert state.external_used == 0
    assert math.isclose(state.memory_pressure, 0.7)
    assert state.pressure_level is MemoryPressure.from_ratio(0.7)
    assert state.waiting == 0
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: arbiter.request_allocation(LLM, NORMAL, 5 * GiB, timeout=None))
        await settle()
        tg.start_soon(lambda: arbiter.request_allocation(IMAGE, NORMAL, 1 * GiB, timeout=None))
        await settle()
        state = arbiter.state()
        assert state.waiting == 2  # the second fits but waits behind the first
        assert state.active_llm_workloads == 1  # waiters are not active
        assert state.vram_used == 7 * GiB
        tg.cancel_scope.cancel()
    for alloc in (llm, image, video):
        alloc.release()
    state = arbiter.state()
    assert (state.active_llm_workloads, state.active_diffusion_workloads) == (0, 0)
    assert state.vram_used == 0 and state.memory_pressure == 0.0 and state.waiting == 0


@pytest.mark.anyio
async def test_state_waiting_counts_growing_resizes() -> None:
    arbiter = make_arbiter()
    alloc = await arbiter.request_allocation(LLM, NORMAL, 4 * GiB)
    other = await arbiter.request_allocation(IMAGE, NORMAL, 6 * GiB)
    async with anyio.create_task_group() as tg:
        tg.start_soon(alloc.resize, 6 * GiB)
        await settle()
        assert arbiter.state().waiting == 1
        assert arbiter.state().vram_used == 10 * GiB
        other.release()
    state = arbiter.state()
    assert (state.waiting, state.vram_used, alloc.memory) == (0, 6 * GiB, 6 * GiB)


@pytest.mark.anyio
async def test_pressure_level_rises_with_pressure() -> None:
    arbiter = make_arbiter(100)
    levels = list(MemoryPressure)
    seen = []
    for _ in range(10):
        await arbiter.request_allocation(LLM, NORMAL, 10 * GiB)
        state = arbiter.state()
        assert state.pressure_level is MemoryPressure.from_ratio(state.memory_pressure)
        seen.append(levels.index(state.pressure_level))
    assert seen == sorted(seen)
    assert levels[seen[0]] is MemoryPressure.LOW
    assert levels[seen[-1]] is MemoryPressure.CRITICAL
    assert len(set(seen)) == 4


@pytest.mark.anyio
async def test_state_qualities_are_what_recommended_quality_gives_a_normal_request() -> None:
    arbiter = make_arbiter()
    await arbiter.request_allocation(IMAGE, Priority.HIGH, 9 * GiB + 512 * 1024**2)  # 0.95
    state = arbiter.state()
    assert state.llm_quality == arbiter.recommended_quality(LLM, NORMAL)
    assert state.diffusion_quality == arbiter.recommended_quality(IMAGE, NORMAL)
    assert state.diffusion_quality == arbiter.recommended_quality(VIDEO)
    assert arbiter.config.llm_min_quality <= state.llm_quality < 1.0
    assert arbiter.config.diffusion_min_quality <= state.diffusion_quality < 1.0


@pytest.mark.anyio
async def test_state_external_use_and_available_never_negative() -> None:
    fake = FakeGpu(total=16 * GiB)
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10, poll_interval=0.01), probe=fake)
    async with arbiter:
        alloc = await arbiter.request_allocation(LLM, NORMAL, 4 * GiB)
        fake.external_used = 12 * GiB  # other processes took more than our budget
        with anyio.fail_after(5):
            while arbiter.state().external_used != 12 * GiB:  # noqa: ASYNC110 (no event)
                await anyio.sleep(0.005)
        state = arbiter.state()
        assert state.vram_used == 4 * GiB
        assert state.vram_available == 0
        assert math.isclose(state.memory_pressure, 1.6)
        assert state.pressure_level is MemoryPressure.CRITICAL
        with pytest.raises(AllocationTimeout):
            await arbiter.request_allocation(LLM, NORMAL, 1, timeout=0)
        alloc.release()


# -- stats(): the identity ---------------------------------------------------------


def _identity(stats: ArbiterStats) -> None:
    assert stats.total_allocations == (
        stats.successful_allocations + stats.failed_allocations + stats.cancelled
    )


@pytest.mark.anyio
async def test_stats_identity_holds_with_every_kind_of_outcome() -> None:
    arbiter = make_arbiter()
    assert isinstance(arbiter.stats(), ArbiterStats)
    # Successful at once.
    first = await arbiter.request_allocation(IMAGE, NORMAL, 9 * GiB)
    # Argument errors are not requests: not counted.
    with pytest.raises(ValueError):
        await arbiter.request_allocation(LLM, NORMAL, 0)
    with pytest.raises(TypeError):
        await arbiter.request_allocation(LLM, NORMAL, 1.5)  # type: ignore[arg-type]
    # InsufficientMemory.
    with pytest.raises(InsufficientMemory):
        await arbiter.request_allocation(LLM, NORMAL, 11 * GiB)
    # AllocationTimeout.
    with pytest.raises(AllocationTimeout):
        await arbiter.request_allocation(LLM, NORMAL, 2 * GiB, timeout=0.01)
    stats = arbiter.stats()
    assert stats.timeouts == 1
    # InsufficientQuality: 1 GiB is free, but pressure keeps the quality below 0.99.
    with pytest.raises(InsufficientQuality):
        await arbiter.request_allocation(LLM, NORMAL, 1 * GiB, min_quality=0.99, timeout=0.01)
    # Cancelled while waiting, and cancelled before it could even queue.
    with anyio.move_on_after(0.01):
        await arbiter.request_allocation(LLM, NORMAL, 2 * GiB, timeout=None)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await arbiter.request_allocation(LLM, NORMAL, 1 * GiB)
    # Successful after a wait.
    got: list[object] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_take, arbiter, got)
        await settle()
        first.release()
    # ShuttingDown, for a waiter and for a newcomer.
    async with anyio.create_task_group() as tg:
        tg.start_soon(_expect_shutting_down, arbiter)
        await settle()
        await arbiter.aclose()
    with pytest.raises(ShuttingDown):
        await arbiter.request_allocation(LLM, NORMAL, 1)
    stats = arbiter.stats()
    _identity(stats)
    assert stats.successful_allocations == 2
    assert stats.failed_allocations == 5  # memory, timeout, quality, 2 x shutting down
    assert stats.cancelled == 2
    assert stats.total_allocations == 9
    assert stats.timeouts >= 1


async def _take(arbiter: Arbiter, got: list[object]) -> None:
    got.append(await arbiter.request_allocation(LLM, NORMAL, 8 * GiB, timeout=None))


async def _expect_shutting_down(arbiter: Arbiter) -> None:
    with pytest.raises(ShuttingDown):
        await arbiter.request_allocation(IMAGE, NORMAL, 10 * GiB, timeout=None)


@pytest.mark.anyio
async def test_allocate_outcomes_count_like_request_allocation() -> None:
    arbiter = make_arbiter(allocation_timeout=0.01)
    async with arbiter.allocate(LLM, NORMAL, memory=10 * GiB):
        with pytest.raises(AllocationTimeout):
            async with arbiter.allocate(LLM, NORMAL, memory=1 * GiB):
                pass
    with pytest.raises(RuntimeError):
        async with arbiter.allocate(LLM, NORMAL, memory=1 * GiB):
            raise RuntimeError("the body failed, the allocation did not")
    stats = arbiter.stats()
    _identity(stats)
    assert (stats.successful_allocations, stats.failed_allocations) == (2, 1)


# -- stats(): time-weighted averages, exactly, on the sync core -------------------


def test_time_weighted_averages_on_the_ledger() -> None:
    ledger = Ledger(ArbiterConfig(vram_budget=100))
    llm = Holding(LLM, NORMAL, 50, None)
    image = Holding(IMAGE, NORMAL, 40, None)
    assert ledger.submit(NewAllocation(llm, 50, 50), now=0.0)  # pressure 0.5 for 10 s
    assert ledger.submit(NewAllocation(image, 40, 40), now=10.0)  # 0.9 for 10 s
    llm_at_09 = ledger.recommended(LLM, NORMAL)
    diffusion_at_09 = ledger.recommended(IMAGE, NORMAL)
    assert llm_at_09 < 1.0 and diffusion_at_09 < 1.0  # above the 0.85 threshold
    ledger.release(llm, now=20.0)  # 0.4 for 20 s
    assert ledger.recommended(IMAGE, NORMAL) == 1.0
    ledger.release(image, now=40.0)  # 0.0 for 10 s
    stats = ledger.stats.snapshot(50.0)
    assert stats.avg_memory_pressure == pytest.approx((0.5 * 10 + 0.9 * 10 + 0.4 * 20) / 50)
    # A family's quality is averaged over the time it had an active allocation.
    assert stats.avg_llm_quality == pytest.approx((1.0 * 10 + llm_at_09 * 10) / 20)
    assert stats.avg_diffusion_quality == pytest.approx((diffusion_at_09 * 10 + 1.0 * 20) / 30)
    # Idle time keeps diluting the pressure, not the qualities.
    later = ledger.stats.snapshot(100.0)
    assert later.avg_memory_pressure == pytest.approx(22 / 100)
    assert later.avg_llm_quality == pytest.approx(stats.avg_llm_quality)


def test_time_weighted_averages_follow_external_use_and_shrinks() -> None:
    ledger = Ledger(ArbiterConfig(vram_budget=100))
    holding = Holding(LLM, NORMAL, 60, 20)
    assert ledger.submit(NewAllocation(holding, 20, 60), now=0.0)  # 0.6 for 5 s
    ledger.set_external(30, now=5.0)  # 0.9 for 5 s
    ledger.shrink(holding, 20, now=10.0)  # 0.5 for 10 s
    ledger.set_external(0, now=20.0)  # 0.2 for 20 s
    stats = ledger.stats.snapshot(40.0)
    assert stats.avg_memory_pressure == pytest.approx(
        (0.6 * 5 + 0.9 * 5 + 0.5 * 10 + 0.2 * 20) / 40
    )


def test_averages_before_any_time_has_passed() -> None:
    stats = Ledger(ArbiterConfig(vram_budget=100)).stats.snapshot(0.0)
    assert stats.avg_memory_pressure == 0.0
    assert stats.avg_llm_quality == 1.0
    assert stats.avg_diffusion_quality == 1.0


@pytest.mark.anyio
async def test_time_weighted_pressure_is_plausible_on_a_real_loop() -> None:
    arbiter = make_arbiter()
    alloc = await arbiter.request_allocation(LLM, NORMAL, 5 * GiB)
    await anyio.sleep(0.05)
    assert arbiter.stats().avg_memory_pressure == pytest.approx(0.5)
    alloc.release()
    await anyio.sleep(0.05)
    average = arbiter.stats().avg_memory_pressure
    assert 0.0 < average < 0.5
    assert arbiter.stats().avg_llm_quality == 1.0


# -- stats(): wait percentiles per priority -----------------------------------------


def test_wait_percentiles_per_priority_on_the_ledger() -> None:
    ledger = Ledger(ArbiterConfig(vram_budget=100))
    holder = Holding(LLM, Priority.USER_FACING, 100, None)
    assert ledger.submit(NewAllocation(holder, 100, 100), now=0.0)
    waiters = [Holding(LLM, NORMAL, 100, None) for _ in range(100)]
    for holding in waiters:
        assert not ledger.submit(NewAllocation(holding, 100, 100), now=0.0)
    # Each waiter is granted one second after the one before: waits 1, 2, ... 100 s.
    ledger.release(holder, now=1.0)
    for n, holding in enumerate(waiters[:-1], start=2):
        ledger.release(holding, now=float(n))
    ledger.release(waiters[-1], now=101.0)
    high = Holding(IMAGE, Priority.HIGH, 10, None)
    assert ledger.submit(NewAllocation(high, 10, 10), now=200.0)
    stats = ledger.stats.snapshot(300.0)
    assert set(stats.wait_percentiles) == set(Priority)
    normal = stats.wait_percentiles[NORMAL]
    assert normal.count == 100
    assert 49.0 <= normal.p50 <= 51.0
    assert 89.0 <= normal.p90 <= 91.0
    assert 98.0 <= normal.p99 <= 100.0
    assert normal.max == 100.0
    granted_at_once = stats.wait_percentiles[Priority.HIGH]
    assert granted_at_once.count == 1
    assert granted_at_once.p50 == granted_at_once.p99 == granted_at_once.max == 0.0
    assert stats.wait_percentiles[Priority.BACKGROUND].count == 0


@pytest.mark.anyio
async def test_wait_percentiles_per_priority_on_a_real_loop() -> None:
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 10 * GiB, preemptible=False)

    async def waiter() -> None:
        await arbiter.request_allocation(IMAGE, Priority.USER_FACING, 4 * GiB, timeout=None)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.05)
        holder.release()
    stats = arbiter.stats()
    user_facing = stats.wait_percentiles[Priority.USER_FACING]
    assert user_facing.count == 1
    assert user_facing.max >= 0.04  # it waited about 50 ms (clocks may round)
    assert user_facing.p50 == user_facing.max
    normal = stats.wait_percentiles[NORMAL]
    assert normal.count == 1
    assert normal.max < user_facing.max  # granted at once
