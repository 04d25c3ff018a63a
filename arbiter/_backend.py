"""The one adapter that knows which event loop runs: everything else speaks anyio.

anyio's ``CancelScope`` on trio wraps a native ``trio.CancelScope`` and costs
several times as much to enter and leave; an ``allocate()`` body is entered on
every grant, so on trio we open the native scope, which anyio's own task groups
and scopes nest with (they are trio's underneath).
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

import anyio

try:
    from sniffio import current_async_library
except ImportError:  # trio depends on sniffio, so without it trio is not what runs

    def current_async_library() -> str:
        return "asyncio"


__all__ = ["CancelScopeLike", "open_cancel_scope"]


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


def open_cancel_scope() -> CancelScopeLike:
    """A new, not yet entered cancel scope for the running backend."""
    if current_async_library() == "trio":
        import trio

        return trio.CancelScope()
    return anyio.CancelScope()
