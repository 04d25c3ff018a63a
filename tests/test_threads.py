"""One arbiter shared by event loops in several threads (DESIGN, Threads, event loops
and processes): one queue, one budget, one order; a release or a preemption in one
loop reaches a waiter or a body in another within milliseconds.

Every thread is joined with a timeout, so a lost wake-up fails instead of hanging.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from arbiter import (
    Allocation,
    AllocationTimeout,
    Arbiter,
    ArbiterConfig,
    GiB,
    Preempted,
    Priority,
    WorkloadType,
)

LLM = WorkloadType.LLM_INFERENCE
IMAGE = WorkloadType.IMAGE_GENERATION
JOIN_TIMEOUT = 20.0
PAIRS = [("asyncio", "asyncio"), ("asyncio", "trio"), ("trio", "asyncio"), ("trio", "trio")]


class LoopThread(threading.Thread):
    """A thread that runs ``main`` in its own event loop and keeps its outcome."""

    def __init__(self, backend: str, main: Callable[[], Awaitable[Any]]) -> None:
        super().__init__(daemon=True, name=f"{backend} loop")
        self.backend = backend
        self.main = main
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = anyio.run(self.main, backend=self.backend)
        except BaseException as exc:
            self.error = exc

    def outcome(self) -> Any:
        self.join(JOIN_TIMEOUT)
        assert not self.is_alive(), f"the {self.backend} thread did not finish (a deadlock?)"
        if self.error is not None:
            raise self.error
        return self.result


async def wait_until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll ``condition`` (another thread changes what it reads) every millisecond."""
    with anyio.fail_after(limit):
        while True:  # an anyio.Event cannot be set from another thread's loop
            if condition():
                return
            await anyio.sleep(0.001)


def make_arbiter(gib: int = 10) -> Arbiter:
    return Arbiter(ArbiterConfig.for_vram_gb(gib, allocation_timeout=None), probe=None)


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_a_release_in_one_loop_wakes_the_waiter_in_another(first: str, second: str) -> None:
    arbiter = make_arbiter()
    held = threading.Event()

    async def holder() -> None:
        alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 8 * GiB)
        held.set()
        await wait_until(lambda: arbiter.state().waiting == 1)
        alloc.release()

    async def waiter() -> float:
        await anyio.to_thread.run_sync(held.wait)
        alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 8 * GiB)
        granted_at = time.monotonic()
        alloc.release()
        return granted_at

    threads = [LoopThread(first, holder), LoopThread(second, waiter)]
    for thread in threads:
        thread.start()
    threads[0].outcome()
    threads[1].outcome()
    assert arbiter.state().vram_used == 0
    stats = arbiter.stats()
    assert (stats.successful_allocations, stats.failed_allocations) == (2, 0)


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_a_preemption_decided_in_one_loop_cancels_the_body_in_another(
    first: str, second: str
) -> None:
    arbiter = make_arbiter()
    running = threading.Event()

    async def background() -> str:
        try:
            async with arbiter.allocate(IMAGE, Priority.BACKGROUND, memory=8 * GiB):
                running.set()
                await anyio.sleep(JOIN_TIMEOUT)
        except Preempted:
            return "preempted"
        return "finished"  # pragma: no cover

    async def user_facing() -> float:
        await anyio.to_thread.run_sync(running.wait)
        started = time.monotonic()
        alloc = await arbiter.request_allocation(LLM, Priority.USER_FACING, 6 * GiB)
        waited = time.monotonic() - started
        alloc.release()
        return waited

    threads = [LoopThread(first, background), LoopThread(second, user_facing)]
    for thread in threads:
        thread.start()
    assert threads[0].outcome() == "preempted"
    assert threads[1].outcome() < 5.0  # one-sided: "within milliseconds" on a quiet box
    assert arbiter.stats().preemptions == 1
    assert arbiter.state().vram_used == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_thread_without_a_loop_releases_and_reads_snapshots(backend: str) -> None:
    arbiter = make_arbiter()
    handed: list[Allocation] = []
    got_it = threading.Event()

    async def loop_side() -> int:
        handed.append(await arbiter.request_allocation(LLM, Priority.NORMAL, 8 * GiB))
        got_it.set()
        alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 8 * GiB)  # waits
        memory = alloc.memory
        alloc.release()
        return memory

    thread = LoopThread(backend, loop_side)
    thread.start()
    assert got_it.wait(JOIN_TIMEOUT)
    deadline = time.monotonic() + JOIN_TIMEOUT
    while arbiter.state().waiting != 1:  # from this thread, which runs no loop
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.001)
    assert arbiter.recommended_quality(LLM) == pytest.approx(arbiter.state().llm_quality)
    assert arbiter.stats().successful_allocations == 1
    handed[0].release()
    assert thread.outcome() == 8 * GiB
    assert arbiter.state().vram_used == 0


@pytest.mark.cpu_heavy
def test_many_threads_churn_and_leave_an_exact_ledger() -> None:
    """8 threads (asyncio and trio), each a few hundred random requests, timeouts and
    cancellations, on one arbiter: at the end all memory is free and stats add up."""
    arbiter = make_arbiter(16)
    outcomes: dict[str, int] = {}
    counted = threading.Lock()

    def count(outcome: str) -> None:
        with counted:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async def churn(seed: int) -> None:
        rng = random.Random(seed)

        async def one() -> None:
            priority = rng.choice(list(Priority))
            size = rng.randint(1, 6) * GiB
            timeout = rng.choice([None, 0, 0.001, 0.01])
            elastic = rng.random() < 0.3
            kwargs: dict[str, Any] = {"timeout": timeout, "preemptible": rng.random() < 0.7}
            if elastic:
                kwargs["min_memory"] = GiB
            entered = False
            try:
                with anyio.move_on_after(rng.choice([0.002, 0.02, 1.0])) as scope:
                    async with arbiter.allocate(LLM, priority, memory=size, **kwargs):
                        entered = True
                        await anyio.sleep(rng.random() * 0.002)
                if not scope.cancelled_caught:
                    count("done")
                else:
                    count("cancelled in the body" if entered else "cancelled waiting")
            except AllocationTimeout:
                count("timeout")
            except Preempted:
                count("preempted")

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(one)
                if rng.random() < 0.3:
                    await anyio.sleep(0.0005)

    threads = [
        LoopThread("asyncio" if n % 2 else "trio", lambda n=n: churn(n))  # type: ignore[misc]
        for n in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.outcome()
    state = arbiter.state()
    assert (state.vram_used, state.waiting) == (0, 0)
    arbiter._ledger.check_invariants()
    stats = arbiter.stats()
    assert sum(outcomes.values()) == 8 * 200
    assert stats.total_allocations == 8 * 200
    assert stats.total_allocations == (
        stats.successful_allocations + stats.failed_allocations + stats.cancelled
    )
    assert stats.timeouts == outcomes.get("timeout", 0)
    assert stats.failed_allocations == outcomes.get("timeout", 0)
    assert stats.cancelled == outcomes.get("cancelled waiting", 0)
    assert stats.successful_allocations == sum(
        outcomes.get(name, 0) for name in ("done", "preempted", "cancelled in the body")
    )


def test_a_waiter_left_behind_by_a_closed_loop_breaks_no_release() -> None:
    """A program that closes an asyncio loop with a task still waiting (``Task was
    destroyed but it is pending!``): the release that grants the dead waiter returns,
    the waiter behind it is served, and the dead one's grant comes back when its
    coroutine is finalized, which never waits for the lock the release holds."""
    import asyncio
    import gc

    arbiter = make_arbiter()
    outcome: dict[str, Any] = {}

    def one_thread_two_loops() -> None:
        loop = asyncio.new_event_loop()

        async def leave_a_waiter() -> None:
            outcome["holder"] = await arbiter.request_allocation(LLM, Priority.NORMAL, 8 * GiB)
            # Nothing keeps the task once its loop is gone: so it is in such programs.
            loop.create_task(arbiter.request_allocation(LLM, Priority.NORMAL, 8 * GiB))  # noqa: RUF006
            for _ in range(100):  # until it parks
                if arbiter.state().waiting:
                    break
                await asyncio.sleep(0)

        loop.run_until_complete(leave_a_waiter())
        loop.close()

        async def release_in_a_new_loop() -> None:
            async def behind() -> None:
                alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 2 * GiB)
                outcome["behind"] = alloc.memory
                alloc.release()

            async with anyio.create_task_group() as tg:
                tg.start_soon(behind)
                await wait_until(lambda: arbiter.state().waiting == 2)
                outcome["holder"].release()  # this thread: the dead loop's waiter first

        anyio.run(release_in_a_new_loop)

    thread = threading.Thread(target=one_thread_two_loops, daemon=True)
    thread.start()
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive(), "a release deadlocked"
    assert outcome["behind"] == 2 * GiB
    deadline = time.monotonic() + JOIN_TIMEOUT
    while arbiter.state().vram_used:
        assert time.monotonic() < deadline, "the dead waiter's grant never came back"
        gc.collect()
        time.sleep(0.01)
    stats = arbiter.stats()
    assert stats.total_allocations == stats.successful_allocations + stats.cancelled == 3


def test_preempting_a_holder_left_behind_by_a_closed_loop_raises_nothing() -> None:
    """Its body's scope cannot be cancelled in a loop that is gone: the preemption is
    still decided (the memory is on its way), and the request that asked for it waits
    for it as for any holder, instead of raising from inside the grant pass."""
    import asyncio

    arbiter = Arbiter(
        ArbiterConfig.for_vram_gb(10, allocation_timeout=None, reclaim_grace=0.0), probe=None
    )
    outcome: dict[str, Any] = {}

    def one_thread_two_loops() -> None:
        loop = asyncio.new_event_loop()

        async def body_left_running() -> None:
            async with arbiter.allocate(LLM, Priority.BACKGROUND, memory=8 * GiB) as alloc:
                outcome["holder"] = alloc
                await asyncio.sleep(3600)

        async def leave_a_holder() -> None:
            outcome["task"] = loop.create_task(body_left_running())  # kept: it never ends
            for _ in range(100):
                if "holder" in outcome:
                    break
                await asyncio.sleep(0)

        loop.run_until_complete(leave_a_holder())
        loop.close()

        async def preempt_it() -> None:
            try:
                await arbiter.request_allocation(LLM, Priority.USER_FACING, 8 * GiB, timeout=0.2)
                outcome["request"] = "granted"
            except AllocationTimeout:
                outcome["request"] = "timed out"

        anyio.run(preempt_it)

    thread = threading.Thread(target=one_thread_two_loops, daemon=True)
    thread.start()
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive(), "the request never ended"
    assert outcome["request"] == "timed out" and outcome["holder"].preempted
    state, stats = arbiter.state(), arbiter.stats()
    assert state.waiting == 0 and stats.preemptions == 1
    assert stats.total_allocations == stats.successful_allocations + stats.failed_allocations
