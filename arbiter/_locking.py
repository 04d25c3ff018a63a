"""The lock taken on the way out of a request whose coroutine may be dying.

A task dropped while it sleeps in the arbiter (its asyncio loop closed under it) is
finalized by the garbage collector, which closes its coroutine: ``GeneratorExit`` is
raised where it sleeps, and the handler there must give back what the core holds for
it. The collector runs wherever an object is freed, also in a thread that holds the
lock (a grant that drops a dead waiter's last reference does), so such a handler must
never wait for the lock: when it is taken, the handler's work goes to a thread of its
own, which waits instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["under_lock"]


def under_lock(
    lock: threading.Lock, exc: BaseException | None, action: Callable[[], object]
) -> None:
    """Run ``action`` under ``lock`` for a coroutine leaving with ``exc`` (None: leaving
    as it should, which may wait for the lock)."""
    if not isinstance(exc, GeneratorExit):
        with lock:
            action()
        return
    if lock.acquire(blocking=False):
        try:
            action()
        finally:
            lock.release()
        return

    def when_free() -> None:
        with lock:
            action()

    threading.Thread(target=when_free, name="gpu-arbiter: finalize", daemon=True).start()
