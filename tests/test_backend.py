"""The backend adapter's primitives behave as anyio's public ones do, on both loops."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
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


# Where a task may stand when it reaches a checkpoint: each arrangement of anyio scopes
# around it, and whether a cancellation is pending there. On asyncio the arbiter's
# checkpoint is a bare yield (see `arbiter._backend`); these show that it raises exactly
# where anyio's own checkpoint does.


async def _self_cancelled(point: Callable[[], Awaitable[None]]) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        await point()


async def _deadline_passed(point: Callable[[], Awaitable[None]]) -> None:
    with anyio.CancelScope(deadline=anyio.current_time() - 1):
        await point()


async def _inside_a_plain_scope_of_a_cancelled_one(point: Callable[[], Awaitable[None]]) -> None:
    with anyio.CancelScope() as outer:
        outer.cancel()
        with anyio.CancelScope():
            await point()


async def _shielded_inside_a_cancelled_one(point: Callable[[], Awaitable[None]]) -> None:
    with anyio.CancelScope() as outer:
        outer.cancel()
        with anyio.CancelScope(shield=True):
            await point()


async def _cancelled_by_another_task_while_shielded(
    point: Callable[[], Awaitable[None]],
) -> None:
    # The other task cancels the scope while this one sits behind a shield; the
    # checkpoint comes right after the shield is left, before anything else ran.
    async def cancel(scope: anyio.CancelScope) -> None:
        scope.cancel()

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            tg.start_soon(cancel, scope)
            with anyio.CancelScope(shield=True):
                await anyio.lowlevel.checkpoint()
                await anyio.lowlevel.checkpoint()
            assert scope.cancel_called
            await point()


async def _task_group_cancelled_by_its_host(point: Callable[[], Awaitable[None]]) -> None:
    async with anyio.create_task_group() as tg:
        tg.cancel_scope.cancel()
        await point()


async def _nothing_pending(point: Callable[[], Awaitable[None]]) -> None:
    with anyio.CancelScope():
        await point()


ARRANGEMENTS = [
    _self_cancelled,
    _deadline_passed,
    _inside_a_plain_scope_of_a_cancelled_one,
    _shielded_inside_a_cancelled_one,
    _cancelled_by_another_task_while_shielded,
    _task_group_cancelled_by_its_host,
    _nothing_pending,
]


async def _reached_past(
    arrangement: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]],
    point: Callable[[], Awaitable[None]],
) -> bool:
    passed = False

    async def checkpoint_then_mark() -> None:
        nonlocal passed
        await point()
        passed = True

    await arrangement(checkpoint_then_mark)
    return passed


@pytest.mark.parametrize("arrangement", ARRANGEMENTS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.anyio
async def test_checkpoint_raises_where_anyios_checkpoint_raises(
    arrangement: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]],
) -> None:
    expected = await _reached_past(arrangement, anyio.lowlevel.checkpoint)
    assert await _reached_past(arrangement, current_backend().checkpoint) == expected
    # The arrangements cover both answers.
    cancelled = arrangement not in (_shielded_inside_a_cancelled_one, _nothing_pending)
    assert expected is not cancelled


@pytest.mark.parametrize("arrangement", ARRANGEMENTS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.anyio
async def test_a_request_with_nothing_waiting_is_cancelled_where_a_checkpoint_is(
    arrangement: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]],
) -> None:
    """Nothing waits, so the request yields first and decides after: a cancellation
    pending at entry is raised at that yield, before anything is granted."""
    arbiter = make_arbiter()
    expected = await _reached_past(arrangement, anyio.lowlevel.checkpoint)
    held: list[int] = []

    async def request() -> None:
        alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB)
        held.append(arbiter.state().vram_used)
        alloc.release()

    async def allocate() -> None:
        async with arbiter.allocate(LLM, Priority.NORMAL, memory=GiB):
            held.append(arbiter.state().vram_used)

    assert await _reached_past(arrangement, request) == expected
    assert await _reached_past(arrangement, allocate) == expected
    assert held == ([GiB, GiB] if expected else [])
    stats = arbiter.stats()
    assert (stats.successful_allocations, stats.cancelled) == ((2, 0) if expected else (0, 2))
    assert arbiter.state().vram_used == 0
