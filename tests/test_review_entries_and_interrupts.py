"""Found by the review of the allocation hot-path speed pass, against both ports.

One ``allocate()`` context entered by two tasks at once (shared by request handlers): the
second entry is refused while the first is under way, nothing leaks, and each body runs in
the scope its allocation owns, so a preemption cancels the right body. A context
cancelled while queued, or entered through an exit stack, holds nothing afterwards. An
interrupt (a signal handler's exception) raised as the arbiter takes its lock leaves the
lock free: the lock is taken by ``with``, which has no gap between acquiring and the
cleanup that releases it.
"""

from __future__ import annotations

import linecache
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import pytest
import sniffio
from remote_helpers import LINUX_ONLY, daemon

from arbiter import (
    Allocation,
    AllocationTimeout,
    Arbiter,
    ArbiterConfig,
    GiB,
    Preempted,
    Priority,
    RemoteArbiter,
    WorkloadType,
)

pytestmark = [pytest.mark.anyio]

LLM = WorkloadType.LLM_INFERENCE
BUDGET_GB = 10


@pytest.fixture(scope="module")
def daemon_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    sock = tmp_path_factory.mktemp("entries") / "gpu.sock"
    with daemon(sock, vram_gb=BUDGET_GB):
        yield sock


@pytest.fixture(params=["local", pytest.param("remote", marks=LINUX_ONLY)])
async def arbiter(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "local":
        async with Arbiter(ArbiterConfig.for_vram_gb(BUDGET_GB), probe=None) as local:
            yield local
        return
    # Its own daemon: a finding's leak ends with this client's session, not in the
    # contract module's shared daemon.
    async with RemoteArbiter(request.getfixturevalue("daemon_socket")) as remote:
        yield remote


async def settle(arbiter: Any) -> None:
    """Until what was sent has been acted on (and, remote, its state pushed back)."""
    await anyio.wait_all_tasks_blocked()
    if isinstance(arbiter, RemoteArbiter):
        with anyio.fail_after(10):
            await arbiter.refresh()
        await anyio.wait_all_tasks_blocked()


async def test_a_context_entered_by_two_tasks_at_once_leaks_nothing(arbiter: Any) -> None:
    holder = await arbiter.request_allocation(LLM, Priority.NORMAL, 9 * GiB)
    shared = arbiter.allocate(LLM, Priority.NORMAL, memory=2 * GiB)
    outcomes: list[str] = []
    both = anyio.Event()  # the bodies overlap, as concurrent request handlers' do

    def record(outcome: str) -> None:
        outcomes.append(outcome)
        if len(outcomes) == 2:
            both.set()

    async def enter() -> None:
        try:
            async with shared:
                record("body")
                await both.wait()
        except RuntimeError as exc:  # a refused second entry is fine; a leak is not
            record(f"refused: {exc}")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(enter)
            tg.start_soon(enter)
            await settle(arbiter)  # both queued: 1 GiB is free
            holder.release()
        await settle(arbiter)
    assert len(outcomes) == 2
    assert arbiter.state().vram_used == 0, f"memory left held after {outcomes}"


async def test_preempting_the_first_of_two_entries_of_one_context_cancels_its_body(
    arbiter: Any,
) -> None:
    holder = await arbiter.request_allocation(LLM, Priority.NORMAL, 9 * GiB)
    shared = arbiter.allocate(LLM, Priority.NORMAL, memory=6 * GiB)
    in_body = anyio.Event()
    preempted: list[Preempted] = []

    wrongly_cut_short: list[Allocation | None] = []
    ended: list[str] = []

    async def enter() -> None:
        alloc = None
        try:
            async with shared as alloc:
                if in_body.is_set():
                    ended.append("second body")
                in_body.set()
                await anyio.sleep_forever()
        except Preempted as exc:
            ended.append("preempted")
            preempted.append(exc)
            if alloc is None or not alloc.preempted:
                wrongly_cut_short.append(alloc)
        except RuntimeError:
            ended.append("refused")  # the second entry refused: fine

    async def high() -> None:
        alloc = await arbiter.request_allocation(LLM, Priority.HIGH, 10 * GiB)
        alloc.release()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(enter)
            tg.start_soon(enter)
            await settle(arbiter)
            holder.release()  # 10 GiB free: the first entry gets 6, the second waits
            await in_body.wait()
            tg.start_soon(high)  # preempts the body that holds 6 GiB, then releases
            for _ in range(20):  # bounded: a body that is never cancelled fails fast
                await settle(arbiter)
                if preempted and len(ended) == 2:  # and the second entry ran or failed
                    break
            tg.cancel_scope.cancel()
        # A grant that raced the cancellation of `high` is given back when it arrives:
        # remote, that can be a round trip after the one `settle` waits for.
        while arbiter.state().vram_used:
            await settle(arbiter)
    assert preempted, "the preempted allocation's body was never cancelled"
    assert not wrongly_cut_short, "a body was cut short whose allocation was not preempted"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_entry_refused_before_it_reached_the_port_leaves_the_context_usable(
    backend: str,
) -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(2), probe=None)
    context = arbiter.allocate(LLM, Priority.NORMAL, memory=GiB)
    with pytest.raises(sniffio.AsyncLibraryNotFoundError):
        context.__aenter__()  # outside any event loop: refused, nothing requested

    async def enter() -> int:
        async with context as alloc:
            return alloc.memory

    assert anyio.run(enter, backend=backend) == GiB
    assert arbiter.state().vram_used == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_entry_closed_before_it_ran_leaves_the_context_usable(backend: str) -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(2), probe=None)
    context = arbiter.allocate(LLM, Priority.NORMAL, memory=GiB)

    async def enter_after_an_entry_that_never_ran() -> int:
        entry = context.__aenter__()
        with pytest.raises(RuntimeError, match="already entered"):
            context.__aenter__()  # the first is under way until it runs or is closed
        entry.close()  # as a task cancelled before it started closes it
        async with context as alloc:
            return alloc.memory

    assert anyio.run(enter_after_an_entry_that_never_ran, backend=backend) == GiB
    assert arbiter.state().vram_used == 0


# -- what held ----------------------------------------------------------------


async def test_a_context_cancelled_while_queued_holds_nothing_and_enters_again(
    arbiter: Any,
) -> None:
    holder = await arbiter.request_allocation(LLM, Priority.NORMAL, 9 * GiB)
    context = arbiter.allocate(LLM, Priority.NORMAL, memory=2 * GiB)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def enter() -> None:
                async with context:
                    pytest.fail("granted without memory")

            tg.start_soon(enter)
            await settle(arbiter)  # parked in _admit
            tg.cancel_scope.cancel()
        with pytest.raises(AllocationTimeout):  # a timed-out entry is a failed entry too
            async with arbiter.allocate(LLM, Priority.NORMAL, memory=2 * GiB, timeout=0):
                pytest.fail("granted without memory")
        holder.release()
        await settle(arbiter)
        assert arbiter.state().vram_used == 0
        async with context as alloc:  # the cancelled entry held nothing
            assert alloc.memory == 2 * GiB
        assert alloc.released
        await settle(arbiter)
    assert arbiter.state().vram_used == 0


async def test_a_context_entered_through_an_async_exit_stack_releases_on_exit(
    arbiter: Any,
) -> None:
    from contextlib import AsyncExitStack

    with anyio.fail_after(10):
        async with AsyncExitStack() as stack:
            alloc = await stack.enter_async_context(
                arbiter.allocate(LLM, Priority.NORMAL, memory=2 * GiB)
            )
            assert alloc.memory == 2 * GiB
        assert alloc.released
        await settle(arbiter)
    assert arbiter.state().vram_used == 0


# -- the lock taken by acquire()/release() -----------------------------------


class Interrupt(Exception):
    """What a signal handler raises (as Python's own SIGINT handler raises
    KeyboardInterrupt): at the interpreter's next check, wherever that is."""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupt


def _interrupt_once_it_has_the_lock(
    arbiter: Arbiter, function: str, stop: threading.Event
) -> threading.Thread:
    """Hold ``arbiter``'s lock until the main thread waits for it in ``function``, then
    let a signal arrive (in this thread: the main thread's wait goes on) and let go: the
    main thread takes the lock and its handler runs at its next check, right there."""
    main = threading.main_thread().ident
    assert main is not None

    def waits_here(frame: FrameType | None) -> bool:
        if frame is None or frame.f_code.co_name != function:
            return False
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
        return "lock" in line and frame.f_locals.get("self") is arbiter

    def hold() -> None:
        with arbiter._lock:
            deadline = time.monotonic() + 10
            while not stop.is_set() and time.monotonic() < deadline:
                if waits_here(sys._current_frames().get(main)):
                    # Never elsewhere: a signal at a random point could hit
                    # another test. Not waiting there: the test fails, no raise.
                    signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
                    return
                time.sleep(0.001)

    thread = threading.Thread(target=hold)
    thread.start()
    return thread


@pytest.fixture
def interrupt_as_it_takes_the_lock() -> Iterator[Callable[[Arbiter, str], threading.Thread]]:
    """Starts `_interrupt_once_it_has_the_lock`; each helper is stopped and joined before
    SIGUSR1's handler is put back, so no signal outlives the test."""
    if threading.current_thread() is not threading.main_thread() or sys.platform == "win32":
        pytest.skip("signal handlers run in the main thread of a POSIX process")
    stop = threading.Event()
    helpers: list[threading.Thread] = []

    def start(arbiter: Arbiter, function: str) -> threading.Thread:
        helpers.append(_interrupt_once_it_has_the_lock(arbiter, function, stop))
        return helpers[-1]

    previous = signal.signal(signal.SIGUSR1, _interrupt)
    try:
        yield start
    finally:
        stop.set()
        for helper in helpers:
            helper.join(10)
        signal.signal(signal.SIGUSR1, previous)


def _lock_was_left_held(arbiter: Arbiter) -> bool:
    held = arbiter._lock.locked()
    if held:  # let the test's teardown (and the next test) run
        arbiter._lock.release()
    return held


def test_an_interrupt_as_release_takes_the_lock_leaves_the_lock_free(
    interrupt_as_it_takes_the_lock: Callable[[Arbiter, str], threading.Thread],
) -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(BUDGET_GB), probe=None)

    async def request() -> Allocation:
        return await arbiter.request_allocation(LLM, Priority.NORMAL, GiB)

    alloc = anyio.run(request)
    thread = interrupt_as_it_takes_the_lock(arbiter, "release_allocation")
    with pytest.raises(Interrupt):
        alloc.release()
    thread.join(10)
    assert not _lock_was_left_held(arbiter), "the arbiter's lock is held by nobody"


async def test_an_interrupt_as_a_request_takes_the_lock_leaves_the_lock_free(
    interrupt_as_it_takes_the_lock: Callable[[Arbiter, str], threading.Thread],
) -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(BUDGET_GB), probe=None)
    thread = interrupt_as_it_takes_the_lock(arbiter, "_admit")
    with pytest.raises(Interrupt):
        async with arbiter.allocate(LLM, Priority.NORMAL, memory=GiB):
            pass
    thread.join(10)
    assert not _lock_was_left_held(arbiter), "the arbiter's lock is held by nobody"
