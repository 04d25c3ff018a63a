"""DESIGN.md "Arbiter": construction without a loop, ``async with``, ``aclose()``.

On close every waiting request raises `ShuttingDown`, so does every new one, and
granted allocations stay valid until released.
"""

from __future__ import annotations

import anyio
import pytest
from arbiter_helpers import settle

from arbiter import (
    Allocation,
    Arbiter,
    ArbiterConfig,
    ArbiterError,
    GiB,
    Priority,
    ShuttingDown,
    WorkloadType,
)
from arbiter.testing import FakeGpu

pytestmark = pytest.mark.virtual_time

LLM = WorkloadType.LLM_INFERENCE
NORMAL = Priority.NORMAL


def test_built_without_a_running_event_loop() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(24), probe=None)
    assert arbiter.config.vram_budget == 24 * GiB
    state = arbiter.state()
    assert state.vram_used == 0 and state.vram_available == 24 * GiB and state.waiting == 0
    stats = arbiter.stats()
    assert stats.total_allocations == 0
    assert arbiter.recommended_quality(LLM) == 1.0
    assert "Arbiter" in repr(arbiter)


def test_built_with_a_fake_gpu_without_a_running_event_loop() -> None:
    fake = FakeGpu(total=24 * GiB)
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(20), probe=fake)
    assert arbiter.state().external_used == 0
    assert fake.reads == 0  # nothing runs before `async with`


def test_config_must_be_an_arbiter_config() -> None:
    with pytest.raises(TypeError, match="config"):
        Arbiter({"vram_budget": GiB})  # type: ignore[arg-type]


def test_one_arbiter_serves_successive_event_loops_as_pure_accounting() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)

    async def take() -> Allocation:
        return await arbiter.request_allocation(LLM, NORMAL, 4 * GiB)

    first = anyio.run(take, backend="asyncio")
    second = anyio.run(take, backend="trio")
    assert arbiter.state().vram_used == 8 * GiB
    first.release()  # sync, outside any loop: the last clock reading stands in
    second.release()
    assert arbiter.state().vram_used == 0
    assert (first.id, second.id) == ("alloc-1", "alloc-2")


@pytest.mark.anyio
async def test_async_with_runs_the_poller_until_exit() -> None:
    fake = FakeGpu(total=12 * GiB, external_used=3 * GiB)
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10, poll_interval=0.01), probe=fake)
    async with arbiter as entered:
        assert entered is arbiter
        with anyio.fail_after(5):
            while arbiter.state().external_used != 3 * GiB:  # noqa: ASYNC110 (no event to wait on)
                await anyio.sleep(0.005)
        alloc = await arbiter.request_allocation(LLM, NORMAL, 7 * GiB, timeout=0)
    reads = fake.reads
    await anyio.sleep(0.05)
    assert fake.reads == reads  # the poller stopped with the block
    assert alloc.released is False  # granted allocations outlive the block
    alloc.release()
    assert arbiter.state().vram_used == 0


@pytest.mark.anyio
async def test_aclose_after_async_with_is_idempotent() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=FakeGpu(total=10 * GiB))
    async with arbiter:
        pass
    await arbiter.aclose()
    await arbiter.aclose()
    with pytest.raises(ShuttingDown):
        await arbiter.request_allocation(LLM, NORMAL, 1 * GiB)


@pytest.mark.anyio
async def test_aclose_without_async_with_is_idempotent() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    await arbiter.aclose()
    await arbiter.aclose()
    with pytest.raises(ShuttingDown):
        await arbiter.request_allocation(LLM, NORMAL, 1 * GiB)


async def _waiters_then_close(arbiter: Arbiter, close_from_outside: bool) -> None:
    """Hold everything, queue waiters, close, and check what the contract promises."""
    held = await arbiter.request_allocation(LLM, NORMAL, 8 * GiB, preemptible=False)
    outcomes: list[str] = []

    async def waiter(memory: int, priority: Priority) -> None:
        try:
            await arbiter.request_allocation(LLM, priority, memory, timeout=None)
        except ShuttingDown as exc:
            assert isinstance(exc, ArbiterError)
            outcomes.append("shutting down")
        else:
            outcomes.append("granted")

    async with anyio.create_task_group() as tg:
        if close_from_outside:
            async with arbiter:
                for memory, priority in [(4 * GiB, NORMAL), (1 * GiB, Priority.BACKGROUND)]:
                    tg.start_soon(waiter, memory, priority)
                    await settle()  # trio starts a batch in any order
                assert arbiter.state().waiting == 2
            # Leaving the block closed the arbiter: the waiters (outside it) fail.
        else:
            for memory, priority in [(4 * GiB, NORMAL), (1 * GiB, Priority.BACKGROUND)]:
                tg.start_soon(waiter, memory, priority)
                await settle()
            assert arbiter.state().waiting == 2
            await arbiter.aclose()
    assert outcomes == ["shutting down", "shutting down"]
    state = arbiter.state()
    assert state.waiting == 0
    assert state.vram_used == 8 * GiB
    # Later requests fail too, even one that would fit, through either entry point.
    with pytest.raises(ShuttingDown):
        await arbiter.request_allocation(LLM, NORMAL, 1 * GiB, timeout=None)
    with pytest.raises(ShuttingDown):
        async with arbiter.allocate(LLM, NORMAL, memory=1 * GiB):
            pytest.fail("granted after close")
    # The granted allocation is still valid until released.
    assert held.released is False and held.memory == 8 * GiB
    held.release()
    assert held.released
    assert arbiter.state().vram_used == 0
    arbiter._ledger.check_invariants()
    stats = arbiter.stats()
    assert stats.successful_allocations == 1
    assert stats.failed_allocations == 4
    assert stats.total_allocations == 5


@pytest.mark.anyio
async def test_leaving_async_with_fails_waiters_and_later_requests() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=FakeGpu(total=10 * GiB))
    await _waiters_then_close(arbiter, close_from_outside=True)


@pytest.mark.anyio
async def test_aclose_fails_waiters_and_later_requests() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    await _waiters_then_close(arbiter, close_from_outside=False)


@pytest.mark.anyio
async def test_allocation_held_through_close_is_released_by_allocate_exit() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    async with arbiter.allocate(LLM, NORMAL, memory=6 * GiB) as alloc:
        await arbiter.aclose()
        assert alloc.released is False
        assert arbiter.state().vram_used == 6 * GiB
    assert alloc.released
    assert arbiter.state().vram_used == 0
