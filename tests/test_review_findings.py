"""Regressions for what an independent review of the port found: no waiter spins on
a reclaim deadline that has passed, the core's time goes on across event loops, one
growth at a time, and wait percentiles count allocations only."""

from __future__ import annotations

import threading

import anyio
import pytest
from arbiter_helpers import settle

from arbiter import Arbiter, ArbiterConfig, GiB, Preempted, Priority, WorkloadType
from arbiter._ledger import Ledger

LLM = WorkloadType.LLM_INFERENCE


@pytest.mark.anyio
@pytest.mark.parametrize("grace", [0.0, 0.2])
async def test_a_waiter_does_not_spin_while_its_victim_unwinds(
    grace: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    advance = Ledger.advance

    def counting(self: Ledger, now: float) -> float | None:
        nonlocal calls
        calls += 1
        return advance(self, now)

    monkeypatch.setattr(Ledger, "advance", counting)
    arbiter = Arbiter(ArbiterConfig(vram_budget=10 * GiB, reclaim_grace=grace), probe=None)
    started = anyio.Event()

    async def victim() -> None:
        with pytest.raises(Preempted):
            async with arbiter.allocate(
                "image_generation", "background", memory=10 * GiB, min_memory=8 * GiB
            ):
                started.set()
                try:
                    await anyio.sleep_forever()
                finally:
                    with anyio.CancelScope(shield=True):
                        await anyio.sleep(0.3)  # a slow unwind

    async with anyio.create_task_group() as tg:
        tg.start_soon(victim)
        await started.wait()
        alloc = await arbiter.request_allocation(LLM, Priority.USER_FACING, 10 * GiB, timeout=5)
        alloc.release()
    assert calls <= 3  # once at the end of the grace, not in a loop while it unwinds


def test_the_core_clock_goes_on_when_another_loop_takes_the_arbiter_over() -> None:
    """A holder's keep_alive, started on one loop's clock, is judged on the next loop's
    clock from where the first stood (trio's clock has a large random offset)."""
    arbiter = Arbiter(ArbiterConfig(vram_budget=10 * GiB), probe=None)
    held, done = threading.Event(), threading.Event()
    outcome: list[bool] = []

    async def holder() -> None:
        alloc = await arbiter.request_allocation(LLM, "normal", 2 * GiB, keep_alive=60)
        held.set()
        # Judged on the wrong clock, keep_alive ends at once (trio's offset is huge).
        with anyio.move_on_after(0.5):
            await alloc.wait_preempted()
        outcome.append(alloc.preempted)
        alloc.release()
        done.set()

    async def services() -> None:
        async with arbiter:  # another loop (trio) takes the core's clock over
            with anyio.move_on_after(5):
                await anyio.to_thread.run_sync(done.wait)

    first = threading.Thread(target=anyio.run, args=(holder,))
    second = threading.Thread(
        target=lambda: (held.wait(10), anyio.run(services, backend="trio")), daemon=True
    )
    first.start()
    second.start()
    first.join(10)
    second.join(10)
    assert outcome == [False]
    assert arbiter.stats().keep_alive_reclaims == 0


@pytest.mark.anyio
async def test_a_second_growth_while_one_waits_is_refused() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10, allocation_timeout=None), probe=None)
    alloc = await arbiter.request_allocation(LLM, "normal", 2 * GiB)
    blocker = await arbiter.request_allocation(LLM, "normal", 8 * GiB)
    async with anyio.create_task_group() as tg:
        tg.start_soon(alloc.resize, 6 * GiB)
        await settle()
        with pytest.raises(RuntimeError, match="already waiting"):
            await alloc.resize(6 * GiB)
        blocker.release()
    assert alloc.memory == 6 * GiB


@pytest.mark.anyio
async def test_wait_percentiles_count_allocations_not_growths() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    alloc = await arbiter.request_allocation(LLM, "normal", 2 * GiB)
    await alloc.resize(4 * GiB)
    stats = arbiter.stats()
    assert stats.wait_percentiles[Priority.NORMAL].count == stats.successful_allocations == 1


@pytest.mark.anyio
async def test_a_label_is_one_line_of_reasonable_length() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    with pytest.raises(ValueError, match="label must be at most 200 characters"):
        await arbiter.request_allocation(LLM, "normal", GiB, label="x" * 201)
    async with arbiter.allocate(LLM, "normal", memory=GiB, label="x" * 200) as alloc:
        assert alloc.label == "x" * 200
