"""Churn: dozens of tasks with seeded random sizes, priorities, timeouts (0 included),
elastic requests and cancellations from outside, on both backends. When the dust
settles the ledger must be exact and every request counted once.
"""

from __future__ import annotations

import random
from collections import Counter

import anyio
import anyio.lowlevel
import pytest
from arbiter_helpers import settle

from arbiter import (
    AllocationTimeout,
    Arbiter,
    ArbiterConfig,
    GiB,
    InsufficientMemory,
    MiB,
    Priority,
    ShuttingDown,
    WorkloadType,
)

# Real time on both backends: the churn is also a check of the real timers under load.

BUDGET_GB = 16
TASKS = 60


async def _churn(arbiter: Arbiter, rng: random.Random, outcomes: Counter[str]) -> None:
    budget = arbiter.config.vram_budget

    async def worker(n: int, scope: anyio.CancelScope) -> None:
        await anyio.sleep(rng.random() * 0.02)  # arrivals spread over 20 ms
        memory = rng.randint(1, budget // MiB + 512) * MiB  # some can never fit
        min_memory = rng.randint(1, memory // MiB) * MiB if rng.random() < 0.3 else None
        timeout = rng.choice([0, 0.001, 0.01, 0.05, None, None])
        priority = rng.choice(list(Priority))
        workload = rng.choice(list(WorkloadType))
        hold = rng.random() * 0.01
        alloc = None
        with scope:
            try:
                parked.add(n)
                try:
                    alloc = await arbiter.request_allocation(
                        workload, priority, memory, min_memory=min_memory, timeout=timeout
                    )
                finally:
                    parked.discard(n)
            except AllocationTimeout:
                outcomes["timeout"] += 1
                return
            except InsufficientMemory:
                assert (min_memory or memory) > budget
                outcomes["impossible"] += 1
                return
            try:
                assert (min_memory or memory) <= alloc.memory <= memory
                state = arbiter.state()
                assert state.vram_used + state.external_used <= budget
                if rng.random() < 0.5:
                    await anyio.sleep(hold)
                else:
                    for _ in range(rng.randint(0, 5)):
                        await anyio.lowlevel.checkpoint()
            finally:
                alloc.release()
        if alloc is None:
            assert scope.cancelled_caught
            outcomes["cancelled"] += 1
        else:
            outcomes["granted"] += 1

    async def canceller(scopes: list[anyio.CancelScope]) -> None:
        for _ in range(len(scopes) // 4):
            await anyio.sleep(rng.random() * 0.01)
            # Mostly waiters (the interesting case), else anyone, holders included.
            victims = sorted(parked) if parked and rng.random() < 0.8 else range(len(scopes))
            scopes[rng.choice(victims)].cancel()

    parked: set[int] = set()

    scopes = [anyio.CancelScope() for _ in range(TASKS)]
    async with anyio.create_task_group() as tg:
        for n, scope in enumerate(scopes):
            tg.start_soon(worker, n, scope)
        tg.start_soon(canceller, scopes)


def _assert_settled(arbiter: Arbiter, outcomes: Counter[str]) -> None:
    state = arbiter.state()
    assert state.vram_used == 0
    assert state.waiting == 0
    assert state.vram_available == arbiter.config.vram_budget
    assert state.active_llm_workloads == state.active_diffusion_workloads == 0
    arbiter._ledger.check_invariants()
    stats = arbiter.stats()
    assert stats.total_allocations == (
        stats.successful_allocations + stats.failed_allocations + stats.cancelled
    )
    assert stats.total_allocations == sum(outcomes.values())
    assert stats.successful_allocations == outcomes["granted"]
    assert stats.cancelled == outcomes["cancelled"]
    assert stats.failed_allocations == (
        outcomes["timeout"] + outcomes["impossible"] + outcomes["shutting down"]
    )
    assert stats.timeouts >= outcomes["timeout"]


@pytest.mark.anyio
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_churn_leaves_an_exact_ledger(seed: int) -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(BUDGET_GB, reclaim_grace=0.005), probe=None)
    outcomes: Counter[str] = Counter()
    with anyio.fail_after(20):
        await _churn(arbiter, random.Random(seed), outcomes)
    assert sum(outcomes.values()) == TASKS
    assert outcomes["granted"] > 0 and outcomes["timeout"] > 0 and outcomes["cancelled"] > 0
    _assert_settled(arbiter, outcomes)


@pytest.mark.anyio
async def test_churn_then_close_fails_every_waiter_and_leaves_an_exact_ledger() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(BUDGET_GB, reclaim_grace=0.005), probe=None)
    rng = random.Random(7)
    outcomes: Counter[str] = Counter()
    held = await arbiter.request_allocation(
        WorkloadType.LLM_INFERENCE, Priority.USER_FACING, 12 * GiB, preemptible=False
    )
    outcomes["granted"] += 1

    async def waiter() -> None:
        try:
            alloc = await arbiter.request_allocation(
                rng.choice(list(WorkloadType)),
                rng.choice(list(Priority)),
                rng.randint(5, 16) * GiB,
                timeout=None,
            )
        except ShuttingDown:
            outcomes["shutting down"] += 1
        else:
            outcomes["granted"] += 1
            alloc.release()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(waiter)
            await settle()
            await arbiter.aclose()
    assert outcomes["shutting down"] > 0
    assert held.released is False and arbiter.state().vram_used == 12 * GiB
    held.release()
    _assert_settled(arbiter, outcomes)
