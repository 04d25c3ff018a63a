"""The backend adapter's primitives behave as anyio's public ones do, on both loops."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import pytest
from cancel_arrangements import (
    ARRANGEMENTS,
    NOT_CANCELLED,
    Point,
    cancelled_by_another_task_while_it_waits,
    reached_past,
)

import arbiter._backend
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


# On asyncio the arbiter's checkpoint is a bare yield, and its check before parking is
# anyio's backend's own (see `arbiter._backend`); these show that each raises exactly
# where anyio's public function does (where the answer does not hang on the order trio
# runs two tasks in).
DECIDED = [
    arrangement
    for arrangement in ARRANGEMENTS
    if arrangement is not cancelled_by_another_task_while_it_waits
]


@pytest.mark.parametrize(
    ("ours", "anyios"),
    [
        ("checkpoint", anyio.lowlevel.checkpoint),
        ("checkpoint_if_cancelled", anyio.lowlevel.checkpoint_if_cancelled),
    ],
    ids=["checkpoint", "checkpoint_if_cancelled"],
)
@pytest.mark.parametrize("arrangement", DECIDED, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.anyio
async def test_the_checks_raise_where_anyios_raise(
    arrangement: Callable[[Point], Awaitable[None]], ours: str, anyios: Point
) -> None:
    expected = await reached_past(arrangement, anyios)
    assert await reached_past(arrangement, getattr(current_backend(), ours)) == expected
    # The arrangements cover both answers.
    assert expected is (arrangement in NOT_CANCELLED)


def _suspends(awaitable: Awaitable[None]) -> bool:
    """Whether awaiting ``awaitable`` would suspend the task (stepped by hand; closed
    without resuming if it would)."""
    steps = awaitable.__await__()
    try:
        next(steps)
    except StopIteration:
        return False
    getattr(steps, "close", lambda: None)()
    return True


@pytest.mark.parametrize("arrangement", NOT_CANCELLED, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.anyio
async def test_the_check_before_parking_never_yields_when_nothing_is_pending(
    arrangement: Callable[[Point], Awaitable[None]],
) -> None:
    """A waiter queues and parks (or a daemon decides in the order messages came)
    before any other task runs: the check alone must not let one run."""
    suspended: list[bool] = []

    async def point() -> None:
        suspended.append(_suspends(current_backend().checkpoint_if_cancelled()))

    await arrangement(point)
    assert suspended == [False]


@pytest.mark.parametrize("arrangement", DECIDED, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.anyio
async def test_a_request_with_nothing_waiting_is_cancelled_where_a_checkpoint_is(
    arrangement: Callable[[Point], Awaitable[None]],
) -> None:
    """Nothing waits, so the request is granted and then yields: a cancellation pending
    at entry is raised at that yield, and the grant is given back."""
    arbiter = make_arbiter()
    expected = await reached_past(arrangement, anyio.lowlevel.checkpoint)
    held: list[int] = []

    async def request() -> None:
        alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB)
        held.append(arbiter.state().vram_used)
        alloc.release()

    async def allocate() -> None:
        async with arbiter.allocate(LLM, Priority.NORMAL, memory=GiB):
            held.append(arbiter.state().vram_used)

    assert await reached_past(arrangement, request) == expected
    assert await reached_past(arrangement, allocate) == expected
    assert held == ([GiB, GiB] if expected else [])
    stats = arbiter.stats()
    assert (stats.successful_allocations, stats.cancelled) == ((2, 0) if expected else (0, 2))
    assert arbiter.state().vram_used == 0


def test_threads_that_first_ask_at_once_get_one_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop's `LoopEntry` is compared by identity, so every thread must get the same
    `Backend` (which keeps the entries), also when two ask for the first time at once."""

    def first_asks() -> list[object]:
        monkeypatch.setattr(arbiter._backend, "_backends", {})  # nothing made yet
        start = threading.Barrier(2)
        got: list[object] = []

        async def first_ask() -> None:
            start.wait(5)
            got.append(current_backend())

        threads = [threading.Thread(target=asyncio.run, args=(first_ask(),)) for _ in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
        return got

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can
    try:
        for _ in range(40):
            got = first_asks()
            assert len(got) == 2 and got[0] is got[1]
    finally:
        sys.setswitchinterval(switch_interval)
