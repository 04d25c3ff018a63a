"""Flight: one load of a fragment from below RAM, shared by every get that wants it.

Single flight: the first get of a fragment that no faster tier holds starts a flight in
the cache's own task group, and every get of that fragment until it lands waits on the
same flight. A waiter that is cancelled leaves; the flight goes on for the others (and
fills the tiers for the next get).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import anyio

from .._log import log
from ._buffer import Buffer
from ._manifest import FragmentInfo
from ._stats import CacheTier

__all__ = ["BytesProgress", "Flight", "ProgressCallback", "ProgressTracker"]


ProgressCallback = Callable[[int, int], None]
# Bytes that just arrived (a reader's or a download's step), for a ProgressTracker.
BytesProgress = Callable[[int], None]
"""Called as ``progress(bytes_done, bytes_total)`` from the event loop thread."""


class ProgressTracker:
    """Turns byte deltas into ``progress(done, total)`` calls; a callback that raises is
    logged once and dropped, so that it cannot break a load others share."""

    __slots__ = ("_callback", "done", "total")

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self._callback = callback
        self.total = total
        self.done = 0

    @property
    def reports(self) -> bool:
        """Whether there is a callback to report to."""
        return self._callback is not None

    def advance(self, delta: int) -> None:
        """Add ``delta`` bytes (negative when a download starts over) and report."""
        self.done += delta
        if self._callback is None:
            return
        try:
            self._callback(self.done, self.total)
        except Exception:
            log.exception("progress callback failed; it is no longer called")
            self._callback = None

    def finish(self) -> None:
        """Report the total as done (for loads that took no measurable steps)."""
        if self.done != self.total:
            self.advance(self.total - self.done)


class Flight:
    """One shared load: its outcome (``data`` and ``source``, or ``error``) once ``landed``."""

    __slots__ = (
        "_listeners",
        "bytes_done",
        "data",
        "error",
        "info",
        "landed",
        "source",
        "want_data",
    )

    def __init__(self, info: FragmentInfo, *, want_data: bool) -> None:
        self.info = info
        self.want_data = want_data
        self.landed = anyio.Event()
        self.data: Buffer | None = None
        self.source: CacheTier | None = None
        self.error: BaseException | None = None
        self.bytes_done = 0
        self._listeners: list[Callable[[int], None]] = []

    def listen(self, listener: Callable[[int], None]) -> None:
        """Send byte deltas to ``listener``, starting with what is done already."""
        self._listeners.append(listener)
        if self.bytes_done:
            listener(self.bytes_done)

    @property
    def watched(self) -> bool:
        """Whether anyone listens to the progress now."""
        return bool(self._listeners)

    def unlisten(self, listener: Callable[[int], None]) -> None:
        """Stop sending deltas to ``listener``."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def advance(self, delta: int) -> None:
        """Record ``delta`` more bytes done (negative when a download starts over)."""
        self.bytes_done += delta
        for listener in list(self._listeners):
            listener(delta)

    def rewind(self) -> None:
        """Forget the progress of a source that failed before the next one is tried."""
        if self.bytes_done:
            self.advance(-self.bytes_done)

    def outcome(self) -> tuple[Buffer | None, CacheTier]:
        """The landed result, or a fresh copy of its error raised in the waiter's task."""
        if self.error is not None:
            raise copy.copy(self.error) from self.error
        assert self.source is not None, "outcome() before the flight landed"
        return self.data, self.source
