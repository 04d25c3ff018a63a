"""MemoryPoller: reads a probe on an interval and hands each reading to the arbiter.

It survives a failing probe (one warning per outage, exponential backoff, one info line
when readings resume) and stops only when its task is cancelled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from ._checks import check_seconds
from ._gpu import GpuReading, MemoryProbe
from ._log import log, note

__all__ = ["MemoryPoller", "PollerStatistics", "backoff_delay"]


_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class PollerStatistics:
    """A snapshot of a `MemoryPoller`.

    Args:
        reads: successful reads.
        failures: failed reads, over the poller's life.
        consecutive_failures: failed reads since the last success (0 while healthy).
        last_reading: the latest successful reading, or ``None`` before the first.
        last_reading_at: when it was taken, on the event loop's clock, or ``None``.
        delay: the wait before the next read, in seconds (``interval`` while healthy).
    """

    reads: int
    failures: int
    consecutive_failures: int
    last_reading: GpuReading | None
    last_reading_at: float | None
    delay: float


def backoff_delay(interval: float, max_backoff: float, consecutive_failures: int) -> float:
    """The wait after ``consecutive_failures`` failed reads: ``interval`` doubled once per
    failure, capped at ``max_backoff`` (``interval`` when nothing failed)."""
    if consecutive_failures <= 0:
        return interval
    # Capping the exponent keeps the float finite however long the outage lasts.
    return min(interval * 2.0 ** min(consecutive_failures, 64), max_backoff)


class MemoryPoller:
    """Reads ``probe`` every ``interval`` seconds and calls ``on_reading`` with each reading.

    When a read raises an ``Exception`` the poller logs one warning for the outage
    (structlog ``"arbiter"`` logger, event ``"gpu probe failed"``), calls ``on_failure``,
    and retries after a delay doubling from ``interval`` up to ``max_backoff``; when a read
    succeeds again it logs ``"gpu probe recovered"`` once. Exceptions raised by the
    callbacks are logged (once per streak) and ignored. The poller does not own the probe:
    closing it is the caller's business.

    Args:
        probe: where to read GPU memory.
        interval: seconds between reads while the probe works, > 0.
        max_backoff: the longest wait between failed reads, >= ``interval``.
        on_reading: called with every successful reading, on the event loop.
        on_failure: called with every read error, or ``None``.

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range.
    """

    __slots__ = (
        "_callback_failing",
        "_consecutive_failures",
        "_failures",
        "_interval",
        "_last_reading",
        "_last_reading_at",
        "_max_backoff",
        "_on_failure",
        "_on_reading",
        "_outage_started_at",
        "_probe",
        "_reads",
    )

    def __init__(
        self,
        probe: MemoryProbe,
        *,
        interval: float,
        max_backoff: float,
        on_reading: Callable[[GpuReading], None],
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        if not callable(getattr(probe, "read", None)):
            raise TypeError(f"probe must have an async read() method, got {probe!r}")
        self._interval = check_seconds("interval", interval)
        self._max_backoff = check_seconds("max_backoff", max_backoff)
        if self._max_backoff < self._interval:
            raise ValueError(
                f"max_backoff must be >= interval ({interval!r} s), got {max_backoff!r}"
            )
        if not callable(on_reading):
            raise TypeError(f"on_reading must be callable, got {on_reading!r}")
        if on_failure is not None and not callable(on_failure):
            raise TypeError(f"on_failure must be callable or None, got {on_failure!r}")
        self._probe = probe
        self._on_reading = on_reading
        self._on_failure = on_failure
        self._reads = 0
        self._failures = 0
        self._consecutive_failures = 0
        self._last_reading: GpuReading | None = None
        self._last_reading_at: float | None = None
        self._outage_started_at = 0.0
        self._callback_failing = False

    def __repr__(self) -> str:
        return (
            f"MemoryPoller(interval={self._interval:g}, max_backoff={self._max_backoff:g}, "
            f"reads={self._reads}, failures={self._failures})"
        )

    @property
    def probe(self) -> MemoryProbe:
        """The probe being read."""
        return self._probe

    @property
    def interval(self) -> float:
        """Seconds between reads while the probe works."""
        return self._interval

    def statistics(self) -> PollerStatistics:
        """A snapshot of the poller's counters and its latest reading."""
        return PollerStatistics(
            reads=self._reads,
            failures=self._failures,
            consecutive_failures=self._consecutive_failures,
            last_reading=self._last_reading,
            last_reading_at=self._last_reading_at,
            delay=backoff_delay(self._interval, self._max_backoff, self._consecutive_failures),
        )

    async def run(self) -> None:
        """Read until cancelled: the first read at once, then one per delay.

        Returns only by cancellation (which propagates); never raises anything else.
        """
        while True:
            started = anyio.current_time()
            try:
                reading = await self._probe.read()
            except Exception as exc:
                self._failed(exc, started)
            else:
                self._succeeded(reading, anyio.current_time())
            # The delay counts from the start of the read, so a slow probe does not
            # stretch the interval; a read slower than the delay is followed at once.
            delay = backoff_delay(self._interval, self._max_backoff, self._consecutive_failures)
            await anyio.sleep_until(started + delay)

    def _succeeded(self, reading: GpuReading, now: float) -> None:
        if self._consecutive_failures:
            note(
                "gpu probe recovered",
                failures=self._consecutive_failures,
                outage_s=round(now - self._outage_started_at, 3),
            )
            self._consecutive_failures = 0
        self._reads += 1
        self._last_reading = reading
        self._last_reading_at = now
        self._call(self._on_reading, reading, "on_reading")

    def _failed(self, exc: Exception, started: float) -> None:
        self._failures += 1
        self._consecutive_failures += 1
        if self._consecutive_failures == 1:
            self._outage_started_at = started
            log.warning(
                "gpu probe failed",
                error=f"{type(exc).__name__}: {exc}",
                retry_s=backoff_delay(self._interval, self._max_backoff, 1),
                max_backoff_s=self._max_backoff,
            )
        if self._on_failure is not None:
            self._call(self._on_failure, exc, "on_failure")

    def _call(self, callback: Callable[[_T], None], value: _T, name: str) -> None:
        try:
            callback(value)
        except Exception as exc:
            # A broken callback must not stop the poller; logging it on every read would
            # flood the log, so only the first of a streak is reported.
            if not self._callback_failing:
                self._callback_failing = True
                log.error("gpu poller callback failed", callback=name, exc_info=exc)
            return
        self._callback_failing = False
