"""The one adapter that knows which event loop runs: everything else speaks anyio.

An uncontended grant is a handful of dictionary updates, so the few primitives it
needs (the clock, the cancellation check, a cancel scope for an ``allocate()``
body) cost more than the accounting when taken through anyio's per-call backend
lookup. `current_backend` resolves them once per event-loop library:

* trio: its native ``CancelScope``, clock and ``checkpoint_if_cancelled``; anyio's
  scopes on trio are trio's underneath, so they nest with ours.
* asyncio: the loop's clock; anyio's own cancel scope class, built directly (the
  public constructor looks the backend up and runs ``__init__`` twice); and a
  cancellation check that reads ``current_effective_deadline`` (sync, public) and
  awaits only when the task is cancelled: the test anyio's ``checkpoint_if_cancelled``
  makes, without its second backend lookup and coroutine.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from functools import cache
from types import TracebackType
from typing import Protocol

import anyio
import anyio.lowlevel

try:
    from sniffio import current_async_library
except ImportError:  # trio depends on sniffio, so without it trio is not what runs

    def current_async_library() -> str:
        return "asyncio"


__all__ = ["Backend", "CancelScopeLike", "current_backend", "current_time"]


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


class Backend:
    """The hot path's primitives, bound to one event-loop library.

    ``clock()`` returns the running loop's clock as a function that stays valid (and
    callable from sync code) for the life of that loop: an allocation keeps it, so
    its release reads the same clock without looking the loop up again.
    """

    __slots__ = ("cancel_scope", "checkpoint_if_cancelled", "clock", "current_time")

    def __init__(
        self,
        clock: Callable[[], Callable[[], float]],
        checkpoint_if_cancelled: Callable[[], Awaitable[None]],
        cancel_scope: Callable[[], CancelScopeLike],
    ) -> None:
        self.clock = clock
        self.current_time: Callable[[], float] = lambda: clock()()
        self.checkpoint_if_cancelled = checkpoint_if_cancelled
        self.cancel_scope = cancel_scope


async def _asyncio_checkpoint_if_cancelled() -> None:
    if anyio.current_effective_deadline() == -math.inf:
        await anyio.lowlevel.checkpoint_if_cancelled()


def _asyncio_backend() -> Backend:
    import asyncio

    get_running_loop = asyncio.get_running_loop

    def clock() -> Callable[[], float]:
        return get_running_loop().time

    return Backend(
        clock,
        _asyncio_checkpoint_if_cancelled,
        type(anyio.CancelScope()),  # called in the loop: anyio needs it to pick the class
    )


def _trio_backend() -> Backend:
    import trio

    current_clock = trio.lowlevel.current_clock

    def clock() -> Callable[[], float]:
        return current_clock().current_time

    return Backend(clock, trio.lowlevel.checkpoint_if_cancelled, trio.CancelScope)


@cache
def _backend_for(name: str) -> Backend:
    if name == "trio":
        return _trio_backend()
    if name == "asyncio":
        return _asyncio_backend()
    # Whatever else anyio learns to run on: its public API.
    return Backend(
        lambda: anyio.current_time, anyio.lowlevel.checkpoint_if_cancelled, anyio.CancelScope
    )


def current_backend() -> Backend:
    """The primitives of the running event loop's library.

    Raises ``RuntimeError`` (sniffio's ``AsyncLibraryNotFoundError``) outside one.
    """
    return _backend_for(current_async_library())


def current_time() -> float:
    """The running event loop's clock, as ``anyio.current_time`` reads it."""
    return current_backend().current_time()
