"""Cancellation racing a request, on every path: a request is a checkpoint on every
path, a task whose scope is already cancelled is never granted memory nor makes a
holder give any back, a grant cancelled before its waiter runs is given back to the
next waiter, and a request's timeout is measured on its loop's own clock (DESIGN,
Requesting memory, rules 5 and 8; Threads, event loops and processes)."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
import trio
from arbiter_helpers import make_arbiter, settle
from cancel_arrangements import (
    ARRANGEMENTS,
    NOT_CANCELLED,
    Point,
    cancelled_by_another_task_while_it_waits,
    reached_past,
)

from arbiter import (
    Allocation,
    AllocationTimeout,
    Arbiter,
    GiB,
    Preempted,
    Priority,
    WorkloadType,
)
from arbiter._backend import current_backend

LLM, NORMAL = WorkloadType.LLM_INFERENCE, Priority.NORMAL


def _request(
    arbiter: Arbiter, how: str, gib: int, held: list[int], **kwargs: Any
) -> Callable[[], Coroutine[Any, Any, None]]:
    async def request() -> None:
        if how == "request":
            alloc = await arbiter.request_allocation(LLM, NORMAL, gib * GiB, **kwargs)
            held.append(alloc.memory)
            alloc.release()
        else:
            async with arbiter.allocate(LLM, NORMAL, memory=gib * GiB, **kwargs) as alloc:
                held.append(alloc.memory)

    return request


def _consistent(arbiter: Arbiter) -> None:
    state, stats = arbiter.state(), arbiter.stats()
    assert (state.vram_used, state.waiting) == (0, 0)
    assert stats.total_allocations == (
        stats.successful_allocations + stats.failed_allocations + stats.cancelled
    )
    arbiter._ledger.check_invariants()


@pytest.mark.parametrize("timeout", [None, 30.0], ids=["no_timeout", "timeout"])
@pytest.mark.parametrize("how", ["request", "allocate"])
@pytest.mark.parametrize("arrangement", ARRANGEMENTS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.anyio
async def test_behind_the_head_a_request_is_cancelled_exactly_where_a_checkpoint_is(
    arrangement: Callable[[Point], Awaitable[None]], how: str, timeout: float | None
) -> None:
    """Others wait (the head does not fit), so the request checks, queues behind the
    head and parks: it must raise exactly where anyio's checkpoint raises, hold nothing
    if so, and be granted in turn if not."""
    expected = arrangement in NOT_CANCELLED
    if arrangement is not cancelled_by_another_task_while_it_waits:  # trio: either
        assert await reached_past(arrangement, anyio.lowlevel.checkpoint) is expected
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 24 * GiB)
    held: list[int] = []
    passed: list[bool] = []

    async def requester() -> None:
        passed.append(
            await reached_past(arrangement, _request(arbiter, how, 1, held, timeout=timeout))
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(_request(arbiter, "allocate", 24, held))  # the head
        await settle()
        assert arbiter.state().waiting == 1
        tg.start_soon(requester)
        await settle()
        assert held == []
        holder.release()
    assert passed == [expected]
    assert held == ([24 * GiB, GiB] if expected else [24 * GiB])
    stats = arbiter.stats()
    assert (stats.successful_allocations, stats.cancelled) == ((3, 0) if expected else (2, 1))
    _consistent(arbiter)


@pytest.mark.parametrize("arrangement", ARRANGEMENTS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.anyio
async def test_at_the_head_and_at_once_a_request_is_cancelled_exactly_where_a_checkpoint_is(
    arrangement: Callable[[Point], Awaitable[None]],
) -> None:
    """The other two ways in: it would head the queue (it does not fit, nothing
    waits), or it is refused at once (timeout 0 behind a head)."""
    expected = arrangement in NOT_CANCELLED
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 24 * GiB)
    held: list[int] = []
    outcomes: dict[str, object] = {}

    async def at_the_head() -> None:
        outcomes["head"] = await reached_past(arrangement, _request(arbiter, "request", 1, held))

    async def timeout_zero() -> None:
        try:
            outcomes["timeout 0"] = await reached_past(
                arrangement, _request(arbiter, "allocate", 1, held, timeout=0)
            )
        except* AllocationTimeout:  # an arrangement's task group wraps it
            outcomes["timeout 0"] = "timed out"

    async with anyio.create_task_group() as tg:
        tg.start_soon(at_the_head)
        await settle()
        assert arbiter.state().waiting == (1 if expected else 0)
        tg.start_soon(timeout_zero)
        await settle()
        holder.release()
    if arrangement is cancelled_by_another_task_while_it_waits:
        # The timeout-0 request waits for nothing: it may decide before the other
        # task runs (trio shuffles them; on asyncio its timer comes first).
        assert outcomes["head"] is False and outcomes["timeout 0"] in (False, "timed out")
    else:
        assert outcomes == (
            {"head": True, "timeout 0": "timed out"}
            if expected
            else {"head": False, "timeout 0": False}
        )
    stats = arbiter.stats()
    assert stats.cancelled == list(outcomes.values()).count(False)
    _consistent(arbiter)


# -- a handover racing a cancellation ---------------------------------------------------


def _release_in(releaser: str, holder: Allocation) -> None:
    """Release ``holder`` from this task's step (the loop is blocked meanwhile when it
    is another thread's doing: the wake is queued while the waiter still sleeps)."""
    if releaser == "same_task":
        holder.release()
        return

    def other_loop() -> None:
        async def release() -> None:
            holder.release()

        if releaser == "asyncio_thread":
            asyncio.run(release())
        else:
            trio.run(release)

    target = holder.release if releaser == "loopless_thread" else other_loop
    thread = threading.Thread(target=target)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()


RELEASERS = ["same_task", "loopless_thread", "asyncio_thread", "trio_thread"]


@pytest.mark.parametrize("releaser", RELEASERS)
@pytest.mark.parametrize(
    "pending",
    [
        "self_cancelled",
        "move_on_after_zero",
        "deadline_passed",
        "fail_after_zero",
    ],
)
@pytest.mark.anyio
async def test_a_waiter_queued_with_a_cancellation_pending_is_never_granted(
    releaser: str, pending: str
) -> None:
    """The waiter cancels its own scope and queues behind the head; in the same pass
    of the loop the holder is released (from this thread or another), which grants
    the head and the waiter at once. The waiter must raise, hold nothing, and its
    memory go to the one behind it."""
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 24 * GiB)
    held: list[int] = []
    raised: list[bool] = []

    async def cancelled_waiter() -> None:
        if pending == "fail_after_zero":
            try:
                with anyio.fail_after(0):
                    await _request(arbiter, "request", 1, held)()
            except TimeoutError:
                raised.append(True)
            else:
                raised.append(False)
            return
        if pending == "move_on_after_zero":
            scope = anyio.move_on_after(0)
        elif pending == "deadline_passed":
            scope = anyio.CancelScope(deadline=anyio.current_time() - 1)
        else:
            scope = anyio.CancelScope()
            scope.cancel()
        with scope:
            await _request(arbiter, "request", 1, held)()
        raised.append(scope.cancelled_caught)

    async def release() -> None:
        _release_in(releaser, holder)

    async with anyio.create_task_group() as tg:
        tg.start_soon(_request(arbiter, "allocate", 23, held))  # the head
        await settle()
        # One pass: the waiter queues and parks, the next one queues behind it, and
        # the holder goes (on trio in any order).
        tg.start_soon(cancelled_waiter)
        tg.start_soon(_request(arbiter, "allocate", 1, held))
        tg.start_soon(release)
    assert raised == [True]
    assert sorted(held) == [GiB, 23 * GiB]
    stats = arbiter.stats()
    assert (stats.successful_allocations, stats.cancelled) == (3, 1)
    _consistent(arbiter)


async def _release_soon(holder: Allocation) -> None:
    holder.release()


@pytest.mark.parametrize("position", ["head", "behind_head"])
@pytest.mark.parametrize("order", ["release_then_cancel", "cancel_then_release"])
@pytest.mark.anyio
async def test_a_waiter_cancelled_as_it_is_handed_the_memory_leaks_nothing(
    position: str, order: str
) -> None:
    await _cancel_as_handed_the_memory(position, order, "anyio_scope")


@pytest.mark.parametrize("position", ["head", "behind_head"])
@pytest.mark.parametrize("order", ["release_then_cancel", "cancel_then_release"])
def test_an_asyncio_waiter_cancelled_natively_as_it_is_handed_the_memory_leaks_nothing(
    position: str, order: str
) -> None:
    asyncio.run(_cancel_as_handed_the_memory(position, order, "native"))


async def _cancel_as_handed_the_memory(position: str, order: str, how: str) -> None:
    """Another task releases the holder (which hands the waiter its memory) and cancels
    the waiter in one step, in either order; natively (``Task.cancel()``, asyncio) or
    through the waiter's scope. Either the waiter raises and the one behind it gets
    the memory, or (only when the grant came first) it was granted and its next
    checkpoint raises; nothing leaks and the counts add up."""
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(LLM, NORMAL, 24 * GiB)
    held: list[int] = []
    waiter_got: list[int] = []
    raised: list[bool] = []
    scope = anyio.CancelScope()
    task: list[asyncio.Task[Any]] = []

    async def waiter() -> None:
        if how == "native":
            task.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            with scope:
                alloc = await arbiter.request_allocation(LLM, NORMAL, GiB)
                waiter_got.append(alloc.memory)
                try:
                    await anyio.lowlevel.checkpoint()
                finally:
                    alloc.release()
        except asyncio.CancelledError:
            raised.append(True)
            return
        raised.append(scope.cancelled_caught)

    def cancel() -> None:
        if how == "native":
            task[0].cancel()
        else:
            scope.cancel()

    async def race() -> None:
        if order == "release_then_cancel":
            holder.release()
            cancel()
        else:
            cancel()
            holder.release()

    async with anyio.create_task_group() as tg:
        if position == "behind_head":
            tg.start_soon(_request(arbiter, "allocate", 22, held))
            await settle()
        tg.start_soon(waiter)
        await settle()
        # The one behind it wants what the waiter would leave: it runs only if the
        # waiter's GiB comes back.
        tg.start_soon(_request(arbiter, "allocate", 24 if position == "head" else 2, held))
        await settle()
        assert arbiter.state().waiting == (2 if position == "head" else 3)
        tg.start_soon(race)
    assert raised == [True]
    assert waiter_got in ([], [GiB])
    stats = arbiter.stats()
    assert stats.cancelled == (0 if waiter_got else 1)
    _consistent(arbiter)


# -- clocks -------------------------------------------------------------------------------


class _SlowClockLoop(asyncio.SelectorEventLoop):
    """A loop whose clock runs at a tenth of real time, far from ``time.monotonic()``:
    a request's timeout must be measured on it (DESIGN: on its own loop's clock)."""

    def __init__(self) -> None:
        super().__init__()
        self._origin = time.monotonic()

    def time(self) -> float:
        return 1_000_000.0 + (time.monotonic() - self._origin) / 10


class _InstanceClockLoop(asyncio.SelectorEventLoop):
    pass


def _real_seconds_of_a_timeout_of_0_05(
    arbiter: Arbiter, loop: asyncio.AbstractEventLoop, real: Callable[[], float]
) -> float:
    """Runs, on ``loop`` (then closed), a request with ``timeout=0.05`` behind a holder of
    the whole card, and returns how long it took by the ``real`` clock."""

    async def main() -> float:
        holder = await arbiter.request_allocation(LLM, NORMAL, 24 * GiB)
        started = real()
        with pytest.raises(AllocationTimeout):
            await arbiter.request_allocation(LLM, NORMAL, GiB, timeout=0.05)
        elapsed = real() - started
        holder.release()
        return elapsed

    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


@pytest.mark.parametrize("loop_kind", ["subclass", "instance_attribute"])
def test_a_request_times_out_on_its_own_loops_clock(loop_kind: str) -> None:
    arbiter = make_arbiter()
    loop: asyncio.AbstractEventLoop
    if loop_kind == "subclass":
        loop = _SlowClockLoop()
    else:
        loop = _InstanceClockLoop()
        origin = time.monotonic()
        loop.time = lambda: 5_000.0 + (time.monotonic() - origin) / 10  # type: ignore[method-assign]

    # 0.05 s of the loop's clock is 0.5 s of real time: well past the 0.05 s that
    # time.monotonic() would have given.
    assert _real_seconds_of_a_timeout_of_0_05(arbiter, loop, time.monotonic) >= 0.4
    _consistent(arbiter)


def test_a_request_times_out_on_the_loops_clock_when_time_monotonic_is_faked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A test's fake clock often replaces ``time.monotonic`` (what ``BaseEventLoop.time``
    reads, looked up at each call): the loop then runs on the fake clock, and so must a
    request's timeout. The fake runs at a tenth of real time."""
    real = time.monotonic
    origin = real()
    monkeypatch.setattr(time, "monotonic", lambda: 1_000_000.0 + (real() - origin) / 10)
    arbiter = make_arbiter()
    loop = asyncio.new_event_loop()
    assert _real_seconds_of_a_timeout_of_0_05(arbiter, loop, real) >= 0.4  # of the loop's clock
    _consistent(arbiter)


@pytest.mark.parametrize("behind_head", [False, True], ids=["at_once", "behind_head"])
def test_a_native_asyncio_timeout_that_expired_is_never_granted(behind_head: bool) -> None:
    """``asyncio.timeout(0)`` schedules its cancellation with call_soon at entry, much as
    anyio does: the request must raise it and hold nothing, also when a release in the
    same step hands it the memory."""
    arbiter = make_arbiter()

    async def main() -> None:
        holder = await arbiter.request_allocation(LLM, NORMAL, 24 * GiB)
        held: list[int] = []

        async def waiter() -> None:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0):
                    alloc = await arbiter.request_allocation(LLM, NORMAL, GiB)
                    held.append(alloc.memory)
                    alloc.release()

        async def head() -> None:
            async with arbiter.allocate(LLM, NORMAL, memory=23 * GiB):
                pass

        tasks = []
        if behind_head:
            tasks.append(asyncio.create_task(head()))
            await asyncio.sleep(0.01)
        else:
            holder.release()
        tasks.append(asyncio.create_task(waiter()))
        if behind_head:
            await asyncio.sleep(0)  # the waiter queues and parks
            holder.release()  # grants the head and the waiter in this step
        await asyncio.gather(*tasks)
        assert held == []

    asyncio.run(main())
    _consistent(arbiter)


@pytest.mark.parametrize("head_leaves", ["cancelled", "granted"])
@pytest.mark.anyio
async def test_a_request_cancelled_at_entry_never_preempts_a_holder(head_leaves: str) -> None:
    """A request whose scope is already cancelled must raise before anything is decided
    (rule 8): it must not take a place in the queue from which, once the head leaves,
    it asks a lower-priority holder to give its memory back. Here the head leaves in
    the same pass of the loop (cancelled just before, or granted by a release right
    after the request parks), and the request would fit once the BACKGROUND holder is
    preempted."""
    arbiter = make_arbiter()
    high = Priority.HIGH
    pinned = await arbiter.request_allocation(LLM, high, 8 * GiB, preemptible=False)
    pinned_too = await arbiter.request_allocation(LLM, high, 12 * GiB, preemptible=False)
    head_got: list[Allocation] = []
    outcomes: dict[str, object] = {}
    head_scope = anyio.CancelScope()

    async def low_holder() -> None:
        try:
            async with arbiter.allocate(LLM, Priority.BACKGROUND, memory=4 * GiB) as alloc:
                outcomes["low granted"] = alloc.memory
                await anyio.sleep_forever()
        except Preempted:
            outcomes["low"] = "preempted"

    async def head() -> None:
        with head_scope:  # 12 GiB: more than the BACKGROUND holder can give back
            head_got.append(await arbiter.request_allocation(LLM, high, 12 * GiB))
        outcomes["head cancelled"] = head_scope.cancelled_caught

    async def cancelled_at_entry() -> None:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await arbiter.request_allocation(LLM, high, 4 * GiB)
        outcomes["cancelled at entry"] = scope.cancelled_caught

    async def release() -> None:
        pinned_too.release()

    async def race(tg: anyio.abc.TaskGroup) -> None:
        # Its first step runs before the head's, which this cancel makes runnable (or
        # before the release, started next).
        tg.start_soon(cancelled_at_entry)
        if head_leaves == "cancelled":
            head_scope.cancel()
        else:
            tg.start_soon(release)

    async with anyio.create_task_group() as tg:
        low_scope = anyio.CancelScope()

        async def low() -> None:
            with low_scope:
                await low_holder()

        tg.start_soon(low)
        await settle()
        tg.start_soon(head)
        await settle()
        assert arbiter.state().waiting == 1 and "low" not in outcomes
        await race(tg)
        await settle()
        preempted = outcomes.get("low")
        low_scope.cancel()
    pinned.release()
    pinned_too.release()
    for alloc in head_got:
        alloc.release()
    assert outcomes["cancelled at entry"] is True
    assert outcomes["head cancelled"] is (head_leaves == "cancelled")
    assert preempted is None
    assert arbiter.stats().preemptions == 0
    _consistent(arbiter)


@pytest.mark.anyio
async def test_the_body_scope_is_a_plain_anyio_cancel_scope(anyio_backend: str) -> None:
    """On asyncio the body's scope is what ``anyio.CancelScope()`` builds (its class, made
    directly): no deadline, no shield, and it cancels like one (trio's is trio's)."""
    made = current_backend().cancel_scope()
    if anyio_backend == "asyncio":
        plain = anyio.CancelScope()
        assert type(made) is type(plain) and isinstance(made, anyio.CancelScope)
    else:
        assert type(made) is trio.CancelScope
    assert (made.deadline, made.shield, made.cancel_called) == (math.inf, False, False)
    with made:
        made.cancel()
        await anyio.lowlevel.checkpoint()
    assert made.cancelled_caught


def test_a_quiet_program_never_loads_structlog_and_still_allocates() -> None:
    """The release path skips ``configured()`` while structlog is not loaded: a program
    that never imported it allocates and releases without loading it."""
    script = (
        "import sys, anyio\n"
        "from arbiter import Arbiter, ArbiterConfig, GiB, Priority, WorkloadType\n"
        "async def main():\n"
        "    a = Arbiter(ArbiterConfig.for_vram_gb(24), probe=None)\n"
        "    for _ in range(3):\n"
        "        async with a.allocate(WorkloadType.LLM_INFERENCE, Priority.NORMAL,"
        " memory=GiB):\n"
        "            pass\n"
        "        (await a.request_allocation(WorkloadType.LLM_INFERENCE,"
        " Priority.NORMAL, GiB)).release()\n"
        "    assert a.state().vram_used == 0 and a.stats().successful_allocations == 6\n"
        "for backend in ('asyncio', 'trio'):\n"
        "    anyio.run(main, backend=backend)\n"
        "print('structlog' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
