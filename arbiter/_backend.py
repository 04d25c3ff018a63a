"""The one adapter that knows which event loop runs: everything else speaks anyio.

Two things here cannot be had from anyio's public API:

* **Parking across threads.** One arbiter serves tasks of several event loops in
  several threads. A waiter parks on a `Parker` of its own loop; whoever grants it
  (a release in any thread) wakes it through that loop's thread-safe entry
  (asyncio's ``call_soon_threadsafe``, trio's ``TrioToken.run_sync_soon``), or
  directly when it runs in the same thread. The handover is a bare future
  on asyncio and ``wait_task_rescheduled`` on trio, as anyio's and trio's own
  semaphores hand over: no event to re-check, no re-park.
* **A cheap hot path.** An uncontended grant is a handful of dictionary updates, so
  the few primitives it needs (the clock, the checkpoint, a cancel scope for an
  ``allocate()`` body) are resolved once per event-loop library instead of
  through anyio's per-call backend lookup: on asyncio, anyio's backend class
  (``anyio.lowlevel.current_token().backend_class``, public since anyio 4.11), its
  ``checkpoint_if_cancelled`` and the class of the scopes it makes.

On asyncio a checkpoint is a bare ``sleep(0)``: the yield is the cancellation check.
anyio cancels a scope on asyncio by calling ``Task.cancel()`` on every task inside it
that is not shielded off and not waiting on a finished future, and re-schedules that
delivery (``call_soon``) on every pass of the loop for as long as such a task is
inside; a scope cancelled by the task itself (which is not cancelled while it runs)
gets its first delivery scheduled then. So a task that yields inside a cancelled scope
finds that delivery queued ahead of its own next step, and its ``sleep(0)`` raises
``CancelledError``; behind a shield (anyio's or the task's own) nothing is delivered,
and it does not. That is what anyio's ``checkpoint_if_cancelled`` followed by a yield
would decide (`tests/test_backend.py` compares the two in each arrangement of scopes).
The check alone (``checkpoint_if_cancelled``, no yield) is still anyio's.

A task that parks is not: a wake from its own thread finishes its future before
anyio's delivery runs, and anyio leaves a task waiting on a finished future be. So
whoever parks checks for cancellation first (``checkpoint_if_cancelled``). On trio the
scheduler delivers a pending cancellation as the task blocks, before anyone can wake it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Awaitable, Callable, Generator
from functools import partial
from threading import get_ident
from types import TracebackType
from typing import Any, Protocol

import anyio
import anyio.lowlevel

try:
    from sniffio import current_async_library
except ImportError:  # trio depends on sniffio, so without it trio is not what runs

    def current_async_library() -> str:
        return "asyncio"


__all__ = [
    "READY",
    "Backend",
    "CancelScopeLike",
    "LoopEntry",
    "Parker",
    "at_once",
    "current_backend",
    "current_time",
]


class CancelScopeLike(Protocol):
    """What the allocation needs of a cancel scope, on either backend."""

    @property
    def cancelled_caught(self) -> bool: ...

    def cancel(self) -> None: ...

    def __enter__(self) -> object: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...


class LoopEntry:
    """One running event loop, as seen from any thread: its clock, and a way in.

    ``clock`` reads the loop's clock (callable from any thread, also after the loop
    ends). ``call`` runs a callable in the loop's thread: directly when called there,
    else through the loop's thread-safe entry. A loop that has already finished has
    nobody left to tell, so such a call is dropped (also one made directly, in the
    thread that ran it). One entry per loop: compare them with ``is``.
    """

    __slots__ = ("_call_soon", "clock", "key", "thread")

    def __init__(
        self, key: object, clock: Callable[[], float], call_soon: Callable[..., object]
    ) -> None:
        self.key = key  # what the library knows the loop by
        self.clock = clock
        self._call_soon = call_soon
        self.thread = get_ident()

    def call(self, function: Callable[..., object], *args: Any) -> None:
        try:
            if get_ident() == self.thread:
                function(*args)
            else:
                self._call_soon(function, *args)
        except RuntimeError:  # the loop is closed (trio: RunFinishedError) or gone
            pass


class Parker(Protocol):
    """One waiter's place to sleep until someone wakes it.

    Made in the waiter's task, for its loop (the `LoopEntry` when the caller has it
    at hand, else the running one). ``arm()`` (in the waiter's task, under the
    arbiter's lock) prepares a sleep, so a ``wake()`` that comes before ``park()`` is
    not lost. ``wake()`` may be called from any thread, any number of times; in the
    waiter's own thread it wakes it directly (no trip through the loop's queue).
    ``park(deadline)`` sleeps until woken (True) or until ``deadline`` on the waiter's
    own clock (False); a cancellation propagates.
    """

    def arm(self) -> None: ...

    def wake(self) -> None: ...

    def park(self, deadline: float) -> Awaitable[bool]: ...


class _Ready:
    """An awaitable that is done at once: awaiting it never yields."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return iter(())  # type: ignore[return-value]  # an iterator that stops at once


# Awaiting it returns None at once; shared: it keeps no state.
READY = _Ready()


async def at_once(value: bool) -> bool:
    """An awaitable of ``value`` that does not yield (a wake that came before the park,
    an answer already at hand)."""
    return value


class Backend:
    """The primitives of one event-loop library.

    ``loop()`` is the running loop's `LoopEntry`. ``checkpoint()`` yields to the loop
    once and raises a cancellation pending before or arriving meanwhile (a grant made
    before it can be given back on that); ``checkpoint_if_cancelled()`` only checks,
    without yielding. ``parker(entry=None, armed=False)`` makes a `Parker` for the
    current task, in the loop of ``entry`` (a `LoopEntry` of the running loop) or the
    running one; ``armed``: as if ``arm()`` had been called.
    """

    __slots__ = (
        "cancel_scope",
        "checkpoint",
        "checkpoint_if_cancelled",
        "current_time",
        "loop",
        "parker",
    )

    def __init__(
        self,
        loop: Callable[[], LoopEntry],
        checkpoint: Callable[[], Awaitable[None]],
        checkpoint_if_cancelled: Callable[[], Awaitable[None]],
        cancel_scope: Callable[[], CancelScopeLike],
        parker: Callable[..., Parker],
    ) -> None:
        self.loop = loop
        self.current_time: Callable[[], float] = lambda: loop().clock()
        self.checkpoint = checkpoint
        self.checkpoint_if_cancelled = checkpoint_if_cancelled
        self.cancel_scope = cancel_scope
        self.parker = parker


# -- asyncio -------------------------------------------------------------------


def _asyncio_backend() -> Backend:
    import asyncio

    get_running_loop = asyncio.get_running_loop
    Future = asyncio.Future  # what every loop's create_future makes, without its frame
    sleep = asyncio.sleep
    entries = threading.local()  # each thread's current loop's entry, for reuse

    # anyio's asyncio backend, looked up once: its public functions look it up on
    # every call (through which library runs), which costs more than the check itself.
    anyio_backend = anyio.lowlevel.current_token().backend_class
    checkpoint_if_cancelled = anyio_backend.checkpoint_if_cancelled
    # The class of the scopes it makes, constructed directly: ``anyio.CancelScope()``
    # looks the backend up first, and then runs ``__init__`` a second time.
    cancel_scope: Callable[[], CancelScopeLike] = type(anyio_backend.create_cancel_scope())

    # The yield is the check: see the module's docstring.
    checkpoint = partial(sleep, 0)

    def running_loop() -> LoopEntry:
        loop = get_running_loop()
        made: LoopEntry | None = getattr(entries, "entry", None)
        if made is None or made.key is not loop:
            made = entries.entry = LoopEntry(loop, loop.time, loop.call_soon_threadsafe)
        return made

    class AsyncioParker:
        __slots__ = ("_future", "_loop", "_thread")

        def __init__(self, entry: LoopEntry | None = None, armed: bool = False) -> None:
            if entry is None:
                entry = running_loop()
            self._loop: asyncio.AbstractEventLoop = entry.key  # type: ignore[assignment]
            self._thread = entry.thread
            self._future: asyncio.Future[bool] | None = Future(loop=self._loop) if armed else None

        def arm(self) -> None:
            self._future = Future(loop=self._loop)

        def wake(self) -> None:
            try:
                if get_ident() == self._thread:  # the releaser runs in the waiter's loop
                    self._resolve(True)
                else:
                    self._loop.call_soon_threadsafe(self._resolve, True)
            except RuntimeError:  # the loop is closed (it left its waiter behind)
                pass

        def _resolve(self, woken: bool) -> None:
            future = self._future
            if future is not None and not future.done():
                future.set_result(woken)

        def park(self, deadline: float) -> Awaitable[bool]:
            future = self._future
            assert future is not None, "park() without arm()"
            if deadline == math.inf or future.done():
                return future  # the task awaits the bare future, as anyio's semaphore does
            return self._park_until(future, deadline)

        async def _park_until(self, future: asyncio.Future[bool], deadline: float) -> bool:
            timer = self._loop.call_at(deadline, self._resolve, False)
            try:
                return await future
            finally:
                timer.cancel()

    return Backend(
        running_loop,
        checkpoint,
        checkpoint_if_cancelled,
        cancel_scope,
        AsyncioParker,
    )


# -- trio ----------------------------------------------------------------------


def _trio_backend() -> Backend:
    import trio
    from outcome import Value

    lowlevel = trio.lowlevel
    current_clock = lowlevel.current_clock
    current_task = lowlevel.current_task
    current_trio_token = lowlevel.current_trio_token
    reschedule = lowlevel.reschedule
    wait_task_rescheduled = lowlevel.wait_task_rescheduled
    abort_succeeded = lowlevel.Abort.SUCCEEDED
    entries = threading.local()

    def running_loop() -> LoopEntry:
        token = current_trio_token()
        made: LoopEntry | None = getattr(entries, "entry", None)
        if made is None or made.key is not token:
            made = entries.entry = LoopEntry(
                token, current_clock().current_time, token.run_sync_soon
            )
        return made

    # A parker's states; every transition happens in the trio thread.
    idle, armed_state, parked, woken = 0, 1, 2, 3

    class TrioParker:
        __slots__ = ("_state", "_task", "_thread", "_token")

        def __init__(self, entry: LoopEntry | None = None, armed: bool = False) -> None:
            if entry is None:
                entry = running_loop()
            self._task = current_task()
            self._token: trio.lowlevel.TrioToken = entry.key  # type: ignore[assignment]
            self._thread = entry.thread
            self._state = armed_state if armed else idle

        def arm(self) -> None:
            self._state = armed_state

        def wake(self) -> None:
            if get_ident() == self._thread:
                self._wake_here()
                return
            try:
                self._token.run_sync_soon(self._wake_here)
            except RuntimeError:  # the run has finished: its waiter is gone
                pass

        def _wake_here(self) -> None:
            if self._state == parked:
                self._state = idle  # the sleep is over: it runs next with True
                reschedule(self._task, Value(True))
            elif self._state == armed_state:
                self._state = woken

        def _abort(self, _: object) -> trio.lowlevel.Abort:
            self._state = idle
            return abort_succeeded

        def park(self, deadline: float) -> Awaitable[bool]:
            if self._state == woken:
                self._state = idle
                return at_once(True)
            self._state = parked
            if deadline == math.inf:
                # No coroutine of ours around trio's: the wake or the abort ends the park.
                return wait_task_rescheduled(self._abort)
            return self._park_until(deadline)

        async def _park_until(self, deadline: float) -> bool:
            with trio.CancelScope(deadline=deadline) as timer:
                woke: bool = await wait_task_rescheduled(self._abort)
                return woke
            # The deadline cancelled the sleep (a wake in the same instant loses).
            self._state = idle
            return not timer.cancelled_caught

    return Backend(
        running_loop,
        lowlevel.checkpoint,
        lowlevel.checkpoint_if_cancelled,
        trio.CancelScope,
        TrioParker,
    )


_backends: dict[str, Backend] = {}
# One `Backend` per library, also when two threads first ask at once: each keeps the
# `LoopEntry` of its loops, and an entry is compared by identity.
_backends_lock = threading.Lock()


def _backend_for(name: str) -> Backend:
    with _backends_lock:
        made = _backends.get(name)
        if made is None:
            if name == "trio":
                made = _trio_backend()
            elif name == "asyncio":
                made = _asyncio_backend()
            else:
                raise RuntimeError(f"gpu-arbiter runs on asyncio or trio, not {name!r}")
            _backends[name] = made
        return made


def current_backend() -> Backend:
    """The primitives of the running event loop's library.

    Raises ``RuntimeError`` outside one (without sniffio installed, asyncio is assumed:
    outside a loop, the first call raises and later ones return asyncio's primitives,
    whose ``loop()`` raises).
    """
    name = current_async_library()
    made = _backends.get(name)  # read without the lock: once made, never replaced
    return made if made is not None else _backend_for(name)


def current_time() -> float:
    """The running event loop's clock, as ``anyio.current_time`` reads it."""
    return current_backend().current_time()
