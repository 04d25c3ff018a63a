"""The backend adapter's primitives behave as anyio's public ones do, on both loops."""

from __future__ import annotations

import anyio
import pytest

from arbiter import Arbiter, ArbiterConfig, GiB, Priority, WorkloadType
from arbiter._backend import current_backend, current_time

LLM = WorkloadType.LLM_INFERENCE


def make_arbiter() -> Arbiter:
    return Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)


@pytest.mark.anyio
async def test_clock_is_anyios_clock() -> None:
    before = anyio.current_time()
    now = current_time()
    after = anyio.current_time()
    assert before <= now <= after


def test_current_time_outside_a_loop_is_a_runtime_error() -> None:
    with pytest.raises(RuntimeError):
        current_time()


@pytest.mark.anyio
async def test_checkpoint_if_cancelled_raises_in_a_cancelled_scope_only() -> None:
    backend = current_backend()
    await backend.checkpoint_if_cancelled()  # not cancelled: returns
    with anyio.CancelScope() as scope:
        scope.cancel()
        with anyio.CancelScope(shield=True):
            await backend.checkpoint_if_cancelled()  # the shield hides the cancel
        await backend.checkpoint_if_cancelled()
        pytest.fail("the cancelled scope did not cancel")  # pragma: no cover
    assert scope.cancelled_caught


@pytest.mark.anyio
async def test_cancel_scope_nests_with_anyio_scopes() -> None:
    reached = False
    with anyio.CancelScope() as outer:
        inner = current_backend().cancel_scope()
        with inner:
            with anyio.CancelScope(shield=True):
                inner.cancel()
                await anyio.lowlevel.checkpoint()  # shielded from the inner cancel
                reached = True
            await anyio.sleep_forever()
        assert inner.cancelled_caught
    assert reached and not outer.cancelled_caught


@pytest.mark.anyio
async def test_request_in_a_cancelled_scope_is_cancelled_and_holds_nothing() -> None:
    arbiter = make_arbiter()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await arbiter.request_allocation(LLM, Priority.NORMAL, GiB)
        pytest.fail("the request was granted in a cancelled scope")  # pragma: no cover
    assert scope.cancelled_caught
    with anyio.CancelScope() as scope:
        scope.cancel()
        async with arbiter.allocate(LLM, Priority.NORMAL, memory=GiB):
            pytest.fail("the body ran in a cancelled scope")  # pragma: no cover
    assert scope.cancelled_caught
    assert arbiter.state().vram_used == 0
    stats = arbiter.stats()
    assert (stats.cancelled, stats.successful_allocations) == (2, 0)


@pytest.mark.anyio
async def test_request_in_a_shielded_scope_inside_a_cancelled_one_is_granted() -> None:
    arbiter = make_arbiter()
    with anyio.CancelScope() as scope:
        scope.cancel()
        with anyio.CancelScope(shield=True):
            async with arbiter.allocate(LLM, Priority.NORMAL, memory=GiB) as alloc:
                assert arbiter.state().vram_used == GiB
    assert alloc.released and arbiter.state().vram_used == 0
