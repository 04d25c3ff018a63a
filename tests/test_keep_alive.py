"""keep_alive: an allocation idle for ``keep_alive`` seconds is asked to give its memory back.

DESIGN.md, "Allocation" (resident holders, ``busy()``). The timer runs only inside
``async with arbiter``. Time must pass here, so the values are small and the
assertions one-sided.
"""

from __future__ import annotations

import anyio
import pytest
from arbiter_helpers import make_arbiter

from arbiter import GiB, Preempted, Priority, WorkloadType

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]

LLM = WorkloadType.LLM_INFERENCE
KEEP = 0.0625  # binary-exact: multiples of it compare exactly on the virtual clock


async def test_idle_holder_is_asked_back_without_contention() -> None:
    arbiter = make_arbiter()
    with anyio.fail_after(5):
        async with arbiter:
            requested_at = anyio.current_time()  # idle from the grant, which is later
            alloc = await arbiter.request_allocation(
                LLM, Priority.USER_FACING, GiB, keep_alive=KEEP
            )
            await alloc.wait_preempted()
            assert anyio.current_time() - requested_at >= KEEP
            assert alloc.preempted and not alloc.released
            # Cooperative: the memory stays until the holder releases it.
            assert arbiter.state().vram_used == GiB
            assert arbiter.stats().keep_alive_reclaims == 1
            alloc.release()
            assert arbiter.state().vram_used == 0


async def test_allocate_body_is_cancelled_when_idle_past_keep_alive() -> None:
    arbiter = make_arbiter()
    with anyio.fail_after(5):
        async with arbiter:
            started = anyio.current_time()
            with pytest.raises(Preempted):
                async with arbiter.allocate(LLM, Priority.NORMAL, memory=GiB, keep_alive=KEEP):
                    await anyio.sleep_forever()
            assert anyio.current_time() - started >= KEEP
            assert arbiter.state().vram_used == 0


async def test_no_reclaim_outside_async_with_arbiter() -> None:
    arbiter = make_arbiter()
    alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB, keep_alive=KEEP)
    await anyio.sleep(4 * KEEP)
    assert not alloc.preempted
    assert arbiter.stats().keep_alive_reclaims == 0
    alloc.release()


async def test_no_reclaim_after_the_arbiter_closed() -> None:
    arbiter = make_arbiter()
    async with arbiter:
        alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB, keep_alive=KEEP)
    # Granted allocations stay valid after close, and no timer runs any more.
    await anyio.sleep(4 * KEEP)
    assert not alloc.preempted and alloc.memory == GiB


async def test_without_keep_alive_an_idle_holder_is_left_alone() -> None:
    arbiter = make_arbiter()
    async with arbiter:
        alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB)
        await anyio.sleep(4 * KEEP)
        assert not alloc.preempted
        alloc.release()


async def test_busy_holder_is_never_reclaimed_then_is_after_idling_again() -> None:
    arbiter = make_arbiter()
    with anyio.fail_after(5):
        async with arbiter:
            alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB, keep_alive=KEEP)
            with alloc.busy():
                await anyio.sleep(4 * KEEP)
                assert not alloc.preempted
                idle_from = anyio.current_time()  # idle from the span's end, a bit later
            await alloc.wait_preempted()
            # The idle time counts from the end of the busy span, not from the grant.
            assert anyio.current_time() - idle_from >= KEEP
            assert alloc.preempted
            alloc.release()


async def test_nested_busy_spans_keep_it_busy_until_the_outer_one_ends() -> None:
    arbiter = make_arbiter()
    with anyio.fail_after(5):
        async with arbiter:
            alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB, keep_alive=KEEP)
            with alloc.busy():
                with alloc.busy():
                    await anyio.sleep(2 * KEEP)
                await anyio.sleep(2 * KEEP)
                assert not alloc.preempted
            await alloc.wait_preempted()
            alloc.release()


async def test_a_busy_span_restarts_the_idle_clock() -> None:
    arbiter = make_arbiter()
    keep_alive = 0.5
    with anyio.fail_after(5):
        async with arbiter:
            alloc = await arbiter.request_allocation(
                LLM, Priority.NORMAL, GiB, keep_alive=keep_alive
            )
            started = anyio.current_time()
            # Short busy spans far more often than keep_alive keep it alive past it.
            while anyio.current_time() - started < 1.5 * keep_alive:
                await anyio.sleep(keep_alive / 10)
                with alloc.busy():
                    await anyio.lowlevel.checkpoint()
            assert not alloc.preempted
            alloc.release()


async def test_each_holder_has_its_own_keep_alive() -> None:
    arbiter = make_arbiter()
    with anyio.fail_after(5):
        async with arbiter:
            short = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB, keep_alive=KEEP)
            long = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB, keep_alive=60)
            await short.wait_preempted()
            assert short.preempted and not long.preempted
            short.release()
            long.release()


async def test_reclaimed_memory_goes_to_a_waiter_once_released() -> None:
    arbiter = make_arbiter()
    with anyio.fail_after(5):
        async with arbiter, anyio.create_task_group() as tg:
            idle = await arbiter.request_allocation(LLM, Priority.HIGH, 20 * GiB, keep_alive=KEEP)

            async def give_back_when_asked() -> None:
                await idle.wait_preempted()
                idle.release()

            tg.start_soon(give_back_when_asked)
            # A lower priority cannot preempt it; keep_alive frees it anyway.
            waiter = await arbiter.request_allocation(LLM, Priority.BACKGROUND, 10 * GiB)
            assert idle.released and waiter.memory == 10 * GiB
            assert arbiter.stats().preemptions == 0
            waiter.release()
