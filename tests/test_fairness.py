"""What anyio's, trio's and CPython's semaphore and capacity-limiter suites check, in our
terms: every request is a checkpoint, FIFO under contention, no lost wake-ups, and no
trace of a request once it has left (DESIGN, Requesting memory, rules 5 and 8)."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import pytest
from arbiter_helpers import settle

from arbiter import (
    Allocation,
    AllocationTimeout,
    Arbiter,
    ArbiterConfig,
    GiB,
    InsufficientMemory,
    Preempted,
    Priority,
    ShuttingDown,
    WorkloadType,
)
from arbiter._records import Holding

LLM = WorkloadType.LLM_INFERENCE
NORMAL = Priority.NORMAL


def make_arbiter(gib: int = 1) -> Arbiter:
    return Arbiter(ArbiterConfig.for_vram_gb(gib, allocation_timeout=None), probe=None)


def live_allocations() -> int:
    gc.collect()
    return sum(1 for thing in gc.get_objects() if isinstance(thing, Allocation))


# -- every request is a checkpoint --------------------------------------------


async def let_others_run_during(call: Callable[[], Awaitable[object]]) -> bool:
    """Whether a task started just before ``call`` ran before ``call`` returned or raised."""
    ran = False

    async def witness() -> None:
        nonlocal ran
        ran = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(witness)  # runnable, not yet run
        try:
            await call()
        except Exception:
            pass
        seen = ran
    return seen


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio: the test below
@pytest.mark.anyio
async def test_every_request_path_lets_other_tasks_run() -> None:
    arbiter = make_arbiter(2)

    async def granted_at_once() -> None:
        (await arbiter.request_allocation(LLM, NORMAL, GiB)).release()

    async def allocate_at_once() -> None:
        async with arbiter.allocate(LLM, NORMAL, memory=GiB):
            pass

    async def fails_at_once_timeout_zero() -> None:
        holder = await arbiter.request_allocation(LLM, NORMAL, 2 * GiB)
        try:
            await arbiter.request_allocation(LLM, NORMAL, GiB, timeout=0)
        finally:
            holder.release()

    async def too_large() -> None:
        await arbiter.request_allocation(LLM, NORMAL, 3 * GiB)

    async def grows_at_once() -> None:
        alloc = await arbiter.request_allocation(LLM, NORMAL, GiB)
        try:
            await alloc.resize(2 * GiB)
        finally:
            alloc.release()

    for call in (granted_at_once, allocate_at_once, fails_at_once_timeout_zero, too_large):
        assert await let_others_run_during(call), call.__name__
    # The grow itself, not the request before it: start the witness after the request.
    alloc = await arbiter.request_allocation(LLM, NORMAL, GiB)
    assert await let_others_run_during(lambda: alloc.resize(2 * GiB))
    alloc.release()
    assert await let_others_run_during(grows_at_once)
    await arbiter.aclose()

    async def closed() -> None:
        await arbiter.request_allocation(LLM, NORMAL, GiB)

    assert await let_others_run_during(closed)


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_every_request_path_is_a_trio_checkpoint() -> None:
    from trio.testing import assert_checkpoints

    arbiter = make_arbiter(2)
    with assert_checkpoints():
        alloc = await arbiter.request_allocation(LLM, NORMAL, 2 * GiB)
    with assert_checkpoints(), pytest.raises(AllocationTimeout):
        await arbiter.request_allocation(LLM, NORMAL, GiB, timeout=0)
    alloc.release()
    with assert_checkpoints(), pytest.raises(InsufficientMemory):
        await arbiter.request_allocation(LLM, NORMAL, 3 * GiB)
    with assert_checkpoints():
        async with arbiter.allocate(LLM, NORMAL, memory=GiB) as held:
            with assert_checkpoints():
                await held.resize(2 * GiB)
    await arbiter.aclose()
    with assert_checkpoints(), pytest.raises(ShuttingDown):
        await arbiter.request_allocation(LLM, NORMAL, GiB)


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_every_step_of_quality_changes_is_a_trio_checkpoint() -> None:
    from trio.testing import assert_checkpoints

    arbiter = make_arbiter(24)
    holder = await arbiter.request_allocation(
        LLM, Priority.BACKGROUND, 20 * GiB, min_memory=4 * GiB
    )
    changes = holder.quality_changes()
    with assert_checkpoints():
        assert await changes.__anext__() == 1.0
    async with anyio.create_task_group() as tg:
        # Its target falls for this waiter, and the change waits to be read: the step
        # that returns it at once still yields.
        tg.start_soon(arbiter.request_allocation, LLM, Priority.HIGH, 12 * GiB)
        await settle()
        with assert_checkpoints():
            assert await changes.__anext__() < 1.0
        tg.cancel_scope.cancel()
    holder.release()
    with assert_checkpoints(), pytest.raises(StopAsyncIteration):
        await changes.__anext__()
    with assert_checkpoints():
        await holder.wait_preempted()


@pytest.mark.anyio
async def test_a_grant_at_once_in_a_cancelled_scope_holds_nothing() -> None:
    arbiter = make_arbiter(2)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await arbiter.request_allocation(LLM, NORMAL, GiB)
    assert scope.cancelled_caught
    assert arbiter.state().vram_used == 0
    assert arbiter.stats().cancelled == 1


@pytest.mark.anyio
async def test_requests_that_found_nothing_waiting_and_then_a_queue_are_counted_once(
    anyio_backend: str,
) -> None:
    """A request is decided before it yields: the first, with nothing waiting, is granted
    at once; those made during its yield queue behind it or fail at once (timeout 0),
    each counted once."""
    arbiter = make_arbiter(1)
    holder = await arbiter.request_allocation(LLM, NORMAL, GiB)
    order: list[int] = []

    async def request(number: int, timeout: float | None) -> None:
        try:
            async with arbiter.allocate(LLM, NORMAL, memory=GiB, timeout=timeout):
                order.append(number)
                await anyio.lowlevel.checkpoint()
        except AllocationTimeout:
            order.append(-number)

    async with anyio.create_task_group() as tg:
        holder.release()
        # The first to run takes the memory; the others queue behind it (or fail at
        # once, with timeout 0).
        for number in range(1, 5):
            tg.start_soon(request, number, 0 if number == 3 else None)
    # On asyncio the tasks run in the order they started; trio may reverse them, and
    # the timeout-0 one succeeds when it runs first.
    assert sorted(map(abs, order)) == [1, 2, 3, 4]
    assert order.count(-3) == (1 if anyio_backend == "asyncio" else order.count(-3))
    failed = order.count(-3)
    stats = arbiter.stats()
    assert (stats.successful_allocations, stats.failed_allocations) == (5 - failed, failed)
    assert stats.timeouts == failed and stats.total_allocations == 5
    assert arbiter.state().vram_used == 0
    arbiter._ledger.check_invariants()


@pytest.mark.anyio
async def test_tasks_that_reallocate_in_a_loop_take_turns(anyio_backend: str) -> None:
    """``a,b,a,b,a,b`` as with ``anyio.Semaphore``, not ``a,a,a,b,b,b``. trio runs
    the tasks of one batch in a random order, so there the turns only interleave."""
    arbiter = make_arbiter(1)
    order: list[str] = []
    rounds = 3 if anyio_backend == "asyncio" else 40

    async def worker(name: str) -> None:
        for _ in range(rounds):
            async with arbiter.allocate(LLM, NORMAL, memory=GiB):
                order.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker, "a")
        tg.start_soon(worker, "b")
    if anyio_backend == "asyncio":
        assert order == ["a", "b", "a", "b", "a", "b"]
    else:
        last = {name: len(order) - 1 - order[::-1].index(name) for name in "ab"}
        assert order.index("a") < last["b"] and order.index("b") < last["a"]


@pytest.mark.anyio
async def test_a_deadline_fires_in_an_allocate_loop() -> None:
    arbiter = make_arbiter(1)
    rounds = 0
    with anyio.CancelScope() as scope:
        while True:
            async with arbiter.allocate(LLM, NORMAL, memory=GiB):
                rounds += 1
            # The deadline is set once a round is done: a loaded machine may take 10 ms
            # for the first one.
            if rounds == 1:
                scope.deadline = anyio.current_time() + 0.01
    assert scope.cancelled_caught
    assert arbiter.state().vram_used == 0
    assert rounds > 0


@pytest.mark.anyio
async def test_a_timeout_zero_retry_loop_lets_the_holder_release() -> None:
    arbiter = make_arbiter(1)
    holder = await arbiter.request_allocation(LLM, NORMAL, GiB)

    async def release_soon() -> None:
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        holder.release()

    tries = 0
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(release_soon)
            while True:
                tries += 1
                try:
                    alloc = await arbiter.request_allocation(LLM, NORMAL, GiB, timeout=0)
                except AllocationTimeout:
                    continue
                break
    assert tries > 1
    alloc.release()
    assert arbiter.stats().timeouts == tries - 1


# -- FIFO under contention -----------------------------------------------------


@pytest.mark.anyio
async def test_waiters_of_one_priority_are_granted_in_arrival_order() -> None:
    arbiter = make_arbiter(1)
    holder = await arbiter.request_allocation(LLM, NORMAL, GiB)
    order: list[int] = []

    async def waiter(number: int) -> None:
        async with arbiter.allocate(LLM, NORMAL, memory=GiB):
            order.append(number)

    async with anyio.create_task_group() as tg:
        for number in range(6):
            tg.start_soon(waiter, number)
            await settle()  # arrival order is start order
        holder.release()
    assert order == list(range(6))


@pytest.mark.anyio
async def test_a_task_that_releases_and_requests_again_goes_behind_the_waiters() -> None:
    arbiter = make_arbiter(1)
    first = await arbiter.request_allocation(LLM, NORMAL, GiB)
    order: list[str] = []

    async def other() -> None:
        async with arbiter.allocate(LLM, NORMAL, memory=GiB):
            order.append("other")

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        await settle()
        first.release()
        async with arbiter.allocate(LLM, NORMAL, memory=GiB):
            order.append("again")
    assert order == ["other", "again"]


@pytest.mark.anyio
async def test_a_grant_that_won_the_race_is_released_by_the_cancelled_body() -> None:
    """Handed the memory, then cancelled before it ran: on trio the waiter is granted
    (as with trio's semaphore), its body's first checkpoint raises the cancellation and
    the ``async with`` gives the memory to the next one; on asyncio the wake goes
    through the loop's queue behind anyio's delivery of the cancellation, so the
    waiter raises it and gives the grant back. Either way the next one gets it."""
    arbiter = make_arbiter(1)
    holder = await arbiter.request_allocation(LLM, NORMAL, GiB)
    scope = anyio.CancelScope()
    got: list[Allocation] = []

    async def doomed() -> None:
        with scope:
            async with arbiter.allocate(LLM, NORMAL, memory=GiB):
                await anyio.sleep_forever()

    async def next_in_line() -> None:
        got.append(await arbiter.request_allocation(LLM, NORMAL, GiB))

    async with anyio.create_task_group() as tg:
        tg.start_soon(doomed)
        await settle()
        tg.start_soon(next_in_line)
        await settle()
        holder.release()  # grants `doomed`, which has not run yet
        scope.cancel()
    assert scope.cancelled_caught
    assert [alloc.memory for alloc in got] == [GiB]
    got[0].release()
    assert arbiter.state().vram_used == 0


@pytest.mark.anyio
async def test_a_cancellation_racing_a_release_passes_the_memory_on() -> None:
    """The releaser hands the memory to a waiter whose cancellation is already on its
    way: the waiter raises its cancellation and the memory goes to the next one."""
    arbiter = make_arbiter(1)
    holder = await arbiter.request_allocation(LLM, NORMAL, GiB)
    scope = anyio.CancelScope()
    got: list[Allocation] = []

    async def doomed() -> None:
        with scope:
            await arbiter.request_allocation(LLM, NORMAL, GiB)
            pytest.fail("granted despite its cancellation")  # pragma: no cover

    async def next_in_line() -> None:
        got.append(await arbiter.request_allocation(LLM, NORMAL, GiB))

    async with anyio.create_task_group() as tg:
        tg.start_soon(doomed)
        await settle()
        tg.start_soon(next_in_line)
        await settle()
        scope.cancel()  # `doomed` is cancelled, but has not run yet ...
        holder.release()  # ... when the release grants it the memory
    assert scope.cancelled_caught
    assert [alloc.memory for alloc in got] == [GiB]
    assert arbiter.state().vram_used == GiB
    got[0].release()
    stats = arbiter.stats()
    assert (stats.successful_allocations, stats.cancelled) == (2, 1)


@pytest.mark.anyio
async def test_no_wake_up_is_lost_when_releases_come_in_bursts() -> None:
    arbiter = make_arbiter(4)
    holders = [await arbiter.request_allocation(LLM, NORMAL, GiB) for _ in range(4)]
    done = 0

    async def waiter() -> None:
        nonlocal done
        async with arbiter.allocate(LLM, NORMAL, memory=GiB):
            await anyio.lowlevel.checkpoint()
        done += 1

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(waiter)
            await settle()
            for alloc in holders:  # one burst, no yield between the releases
                alloc.release()
    assert done == 50
    assert arbiter.state().vram_used == 0


@pytest.mark.anyio
async def test_a_request_cancelled_before_it_queues_behind_the_head_leaves_at_once() -> None:
    """Behind the head a request parks at once, as a contended ``Semaphore.acquire``
    does: its park is its checkpoint, a cancellation already pending is raised there,
    and the request leaves the queue at once, counted as cancelled."""
    arbiter = make_arbiter(1)
    holder = await arbiter.request_allocation(LLM, NORMAL, GiB)
    got: list[Allocation] = []

    async def head() -> None:
        got.append(await arbiter.request_allocation(LLM, NORMAL, GiB))

    async with anyio.create_task_group() as tg:
        tg.start_soon(head)
        await settle()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await arbiter.request_allocation(LLM, NORMAL, GiB)
        assert scope.cancelled_caught
        assert arbiter.state().waiting == 1
        arbiter._ledger.check_invariants()
        holder.release()
    assert [alloc.memory for alloc in got] == [GiB]
    got[0].release()
    stats = arbiter.stats()
    assert (stats.successful_allocations, stats.cancelled) == (2, 1)


@pytest.mark.anyio
async def test_a_cancelled_request_that_would_head_the_queue_asks_nobody_for_memory() -> None:
    """A request of a higher priority than the head would head the queue and preempt:
    it checks for cancellation before anything is decided."""
    arbiter = make_arbiter(1)
    low = await arbiter.request_allocation(LLM, Priority.BACKGROUND, GiB)
    async with anyio.create_task_group() as tg:
        tg.start_soon(arbiter.request_allocation, LLM, Priority.BACKGROUND, GiB)
        await settle()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await arbiter.request_allocation(LLM, Priority.HIGH, GiB)
        assert scope.cancelled_caught
        assert not low.preempted
        assert arbiter.state().waiting == 1
        stats = arbiter.stats()
        assert (stats.preemptions, stats.cancelled) == (0, 1)
        tg.cancel_scope.cancel()
    low.release()


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_a_request_that_parks_behind_the_head_is_a_trio_checkpoint() -> None:
    from trio.testing import assert_checkpoints

    arbiter = make_arbiter(1)
    holder = await arbiter.request_allocation(LLM, NORMAL, GiB)
    async with anyio.create_task_group() as tg:
        tg.start_soon(arbiter.request_allocation, LLM, NORMAL, GiB)  # the head
        await settle()
        with assert_checkpoints(), anyio.CancelScope() as scope:
            scope.cancel()
            await arbiter.request_allocation(LLM, NORMAL, GiB)
        assert scope.cancelled_caught
        tg.cancel_scope.cancel()
    holder.release()


@pytest.mark.anyio
async def test_a_waiter_preempted_between_its_grant_and_its_body_never_runs_it() -> None:
    """The body's scope is the allocation's before the grant: a preemption that comes
    after the release handed the memory over, before the waiter ran, cancels the body
    before it starts (DESIGN: at once if requested before the body started)."""
    arbiter = make_arbiter(1)
    holder = await arbiter.request_allocation(LLM, NORMAL, GiB)
    ran: list[bool] = []
    raised: list[Preempted] = []

    async def waiter() -> None:
        try:
            async with arbiter.allocate(LLM, NORMAL, memory=GiB):
                await anyio.lowlevel.checkpoint()
                ran.append(True)
        except Preempted as exc:
            raised.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await settle()
            holder.release()  # the waiter holds the memory now, and has not run yet
            high = await arbiter.request_allocation(LLM, Priority.HIGH, GiB)
    assert raised and not ran
    assert high.memory == GiB
    high.release()
    assert arbiter.state().vram_used == 0


@pytest.mark.anyio
async def test_a_released_allocation_is_no_reference_cycle() -> None:
    """A handle and the core's record of it stop pointing at each other on release:
    they are freed as soon as the holder drops the handle, not by the cycle collector
    (which would otherwise run every few hundred grants under contention)."""
    arbiter = make_arbiter(2)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            async with arbiter.allocate(LLM, NORMAL, memory=GiB):
                pass
            (await arbiter.request_allocation(LLM, NORMAL, GiB)).release()
        gc.collect()
        cyclic = [thing for thing in gc.garbage if isinstance(thing, Allocation)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not cyclic


@pytest.mark.anyio
async def test_a_kept_released_handle_keeps_no_later_allocation_alive() -> None:
    """What a released handle keeps to answer ``quality`` later holds no later request:
    one handle kept (in a dict of models, say) must not keep every later record alive."""
    arbiter = make_arbiter(2)
    kept: list[Allocation] = []

    async def one_at_a_time() -> None:
        alloc = await arbiter.request_allocation(LLM, NORMAL, GiB + 1, timeout=None)
        await anyio.lowlevel.checkpoint()
        alloc.release()
        if not kept:
            kept.append(alloc)

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(one_at_a_time)
    gc.collect()
    assert sum(1 for thing in gc.get_objects() if isinstance(thing, Holding)) <= 2
    assert 0 < kept[0].quality <= 1.0


# -- nothing kept for requests that left (trio#548) ----------------------------


@pytest.mark.anyio
async def test_abandoned_requests_behind_a_blocked_head_leave_nothing_behind() -> None:
    arbiter = make_arbiter(10)
    holder = await arbiter.request_allocation(LLM, NORMAL, 8 * GiB)
    async with anyio.create_task_group() as tg:
        tg.start_soon(arbiter.request_allocation, LLM, NORMAL, 5 * GiB)  # the blocked head
        await settle()
        baseline = live_allocations()
        for _ in range(3):  # waiters cancelled from outside
            with anyio.move_on_after(0.001):
                await arbiter.request_allocation(LLM, NORMAL, GiB)
        for _ in range(2_000):
            with pytest.raises(AllocationTimeout):
                await arbiter.request_allocation(LLM, NORMAL, GiB, timeout=0)
        # Counted once the loop has resumed a task again: until then trio keeps the outcome
        # it delivered last (the timeout's `Cancelled`), whose traceback holds the last
        # request's frames on Python 3.12+, where a finished coroutine frame keeps its caller.
        await anyio.lowlevel.checkpoint()
        assert live_allocations() == baseline
        assert arbiter.state().waiting == 1
        arbiter._ledger.check_invariants()
        tg.cancel_scope.cancel()
    holder.release()
    assert arbiter.state().vram_used == 0


@pytest.mark.anyio
@pytest.mark.parametrize("timeout", [None, 5.0])
async def test_a_request_cancelled_before_it_is_made_is_never_granted(
    timeout: float | None,
) -> None:
    # Behind the head of the queue, and a release in the very next pass of the loop that
    # grants it: on asyncio a pending cancellation reaches a parked task only from a
    # later callback, so without a check at entry the grant won.
    arbiter = make_arbiter(2)
    holder = await arbiter.request_allocation(LLM, NORMAL, 2 * GiB, timeout=None)
    got: dict[str, object] = {}
    async with anyio.create_task_group() as tg:

        async def head() -> None:
            got["head"] = await arbiter.request_allocation(LLM, NORMAL, GiB, timeout=None)

        async def release_next() -> None:
            await anyio.lowlevel.checkpoint()
            holder.release()

        async def cancelled_first() -> None:
            with anyio.CancelScope() as scope:
                scope.cancel()
                got["behind"] = await arbiter.request_allocation(LLM, NORMAL, GiB, timeout=timeout)

        tg.start_soon(head)
        await settle()
        tg.start_soon(release_next)
        tg.start_soon(cancelled_first)
    assert "behind" not in got and "head" in got
    stats = arbiter.stats()
    assert stats.cancelled == 1
    assert stats.total_allocations == stats.successful_allocations + stats.cancelled


@pytest.mark.anyio
async def test_requests_made_in_one_pass_are_granted_in_call_order() -> None:
    # Each is decided when it is made, before it yields: the first takes the room and
    # the others queue in the order they were called (trio may run them in reverse).
    arbiter = make_arbiter(4)
    called: list[int] = []
    granted: list[int] = []
    held: list[Allocation] = []

    async def request(number: int) -> None:
        called.append(number)
        held.append(await arbiter.request_allocation(LLM, NORMAL, 4 * GiB))
        granted.append(number)

    async with anyio.create_task_group() as tg:
        for number in range(5):
            tg.start_soon(request, number)
        await settle()
        while len(granted) < 5:
            held[-1].release()
            await settle()
    assert granted == called
    held[-1].release()
    arbiter._ledger.check_invariants()


@pytest.mark.anyio
async def test_a_growth_called_before_a_request_is_granted_before_it() -> None:
    arbiter = make_arbiter(4)
    growing = await arbiter.request_allocation(LLM, NORMAL, GiB)
    other = await arbiter.request_allocation(LLM, NORMAL, GiB)
    called: list[str] = []
    granted: dict[str, Allocation] = {}

    async def grow() -> None:
        called.append("growth")  # 3 GiB more, with 2 free: it queues
        await growing.resize(4 * GiB)
        granted["growth"] = growing

    async def request() -> None:
        called.append("request")  # 3 GiB, with 2 free: it queues
        granted["request"] = await arbiter.request_allocation(LLM, NORMAL, 3 * GiB)

    async with anyio.create_task_group() as tg:
        tg.start_soon(grow)
        tg.start_soon(request)
        await settle()
        assert granted == {}
        other.release()  # 3 GiB free: enough for one, whichever came first
        await settle()
        assert list(granted) == called[:1]
        granted[called[0]].release()
    assert list(granted) == called
    granted[called[1]].release()
    assert arbiter.state().vram_used == 0


@pytest.mark.anyio
async def test_a_request_cancelled_before_it_is_made_moves_no_one_s_quality() -> None:
    # It would fit at once, and its grant would push an elastic holder's target down:
    # the check comes before the decision, so nothing is granted, even for a moment.
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10, allocation_timeout=None), probe=None)
    elastic = await arbiter.request_allocation(LLM, Priority.BACKGROUND, 5 * GiB, min_memory=GiB)
    seen: list[float] = []

    async def watch() -> None:
        async for quality in elastic.quality_changes():
            seen.append(quality)  # noqa: PERF401 (each value must show as it comes)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await settle()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await arbiter.request_allocation(LLM, NORMAL, 4 * GiB + GiB // 2)
        await settle()
        assert scope.cancelled_caught
        assert seen == [1.0] and arbiter.stats().quality_reductions == 0
        tg.cancel_scope.cancel()
    stats = arbiter.stats()
    assert (stats.successful_allocations, stats.cancelled) == (1, 1)
    elastic.release()
