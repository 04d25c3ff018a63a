"""The `Allocation` handle a holder keeps, and the async iterator of its quality targets.

A handle is the core's ticket (its `Holding`, read but never written here) plus the
`AllocationPort` it came from: everything it asks or changes goes through that port,
so the same handle serves any arbiter that implements it.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Coroutine, Iterator
from contextlib import contextmanager
from threading import Lock
from types import TracebackType
from typing import Any, Protocol

import anyio.lowlevel

from ._arguments import DEFAULT, Default, RequestArgs
from ._backend import (
    READY,
    Backend,
    CancelScopeLike,
    LoopEntry,
    Parker,
    at_once,
    current_backend,
)
from ._checks import check_ratio
from ._locking import under_lock
from ._quality import size_for_quality
from ._records import Holding
from ._types import Priority, WorkloadType, check_memory, check_timeout

__all__ = ["Allocation", "AllocationContext", "AllocationPort", "QualityChanges"]


class AllocationPort(Protocol):
    """What a handle needs of the arbiter that granted it."""

    _lock: Lock  # guards the handles' wake-up lists as well as the core

    async def _admit(
        self, args: RequestArgs, backend: Backend, body: AllocationContext | None = None
    ) -> Allocation:
        """Request memory. For an ``allocate()`` (``body``) the port makes the body's cancel
        scope, the allocation's before it can be granted, and calls ``body._start(alloc)``
        last."""
        ...

    def release_allocation(self, alloc: Allocation) -> None: ...

    async def _resize(
        self, alloc: Allocation, memory: int, timeout: float | Default | None
    ) -> None: ...

    def _quality_of(self, alloc: Allocation) -> float: ...  # the caller holds the lock

    def _floor_of(self, alloc: Allocation) -> float: ...

    def _set_busy(self, alloc: Allocation, busy: bool) -> None: ...

    def _watch(self, alloc: Allocation, delta: int) -> None: ...

    def _cut_short(self, alloc: Allocation) -> BaseException:
        """What the ``async with`` of an ``allocate()`` body that was cancelled raises."""
        ...


class Allocation:
    """GPU memory granted by an `Arbiter`, held until `release`.

    ``memory`` is the bytes held now, ``quality`` the current quality target in
    ``[floor, 1.0]``. ``preempted`` is true once a higher priority (or the
    keep_alive timer) asked for the memory back; ``released`` once it is returned.
    """

    __slots__ = (
        "_holding",
        "_loop",
        "_number",
        "_port",
        "_preempt_waiters",
        "_quality_waiters",
        "_scope",
        "created_at",
        "label",
    )

    def __init__(
        self,
        port: AllocationPort,
        holding: Holding,
        loop: LoopEntry,
        number: int,
        label: str | None,
        created_at: float,
    ) -> None:
        self._port = port
        self._holding = holding  # the core's record: this handle's ticket
        self._loop = loop  # the event loop it was requested in
        self._number = number
        self.label = label
        self.created_at = created_at
        # The cancel scope of an `Arbiter.allocate` body; preemption cancels it.
        self._scope: CancelScopeLike | None = None
        # Tasks sleeping in `wait_preempted` and `quality_changes` (any loop). These
        # three fields are guarded by the port's lock.
        self._preempt_waiters: list[Parker] | None = None
        self._quality_waiters: list[Parker] | None = None

    def __repr__(self) -> str:
        return (
            f"<Allocation {self.id} {self.workload.value} {self.priority.name.lower()} "
            f"memory={self.memory} quality={self.quality:.2f}"
            f"{' preempted' if self.preempted else ''}{' released' if self.released else ''}>"
        )

    @property
    def id(self) -> str:
        """Unique within its arbiter: ``alloc-1``, ``alloc-2``, ... in request order."""
        return f"alloc-{self._number}"

    @property
    def workload(self) -> WorkloadType:
        return self._holding.workload

    @property
    def priority(self) -> Priority:
        return self._holding.priority

    @property
    def memory(self) -> int:
        """Bytes held now (0 once released)."""
        return self._holding.memory

    @property
    def min_memory(self) -> int | None:
        return self._holding.min_memory

    @property
    def max_memory(self) -> int:
        """The most this allocation has asked for: its request's ``memory``, or more
        after growing past it."""
        return self._holding.max_memory

    @property
    def preemptible(self) -> bool:
        return self._holding.preemptible

    @property
    def keep_alive(self) -> float | None:
        return self._holding.keep_alive

    @property
    def quality(self) -> float:
        """The current quality target, in ``[min_quality(workload), 1.0]``; after
        `release`, the target it had when released."""
        port = self._port
        with port._lock:
            return port._quality_of(self)

    @property
    def preempted(self) -> bool:
        """True once the arbiter asked for this allocation's memory back."""
        return self._holding.preempt_requested

    @property
    def released(self) -> bool:
        return self._holding.released

    def release(self) -> None:
        """Return the memory at once and hand it to waiters. Idempotent; never blocks;
        any thread."""
        self._port.release_allocation(self)

    async def resize(self, memory: int, *, timeout: float | Default | None = DEFAULT) -> None:
        """Change the held memory to ``memory`` bytes.

        Shrinking (not below ``min_memory``: ``ValueError``) returns memory at once.
        Growing (up to the budget: else `InsufficientMemory`) queues like a new request
        of this priority and may preempt like one; on `AllocationTimeout` the old size
        is kept. Raises ``RuntimeError`` when the allocation is (or, while growing,
        becomes) released, or when another growth of it is still waiting.
        """
        check_memory(memory, "memory")
        if not isinstance(timeout, Default):
            timeout = check_timeout(timeout)
        await self._port._resize(self, memory, timeout)

    def memory_for_quality(self, quality: float) -> int:
        """The bytes this allocation needs to run at ``quality``: for an elastic one,
        ``min_memory`` at its floor and its full size at 1.0, linear between; for any
        other, its size.

        Raises:
            TypeError, ValueError: ``quality`` is not a number in [0, 1].
        """
        quality = check_ratio("quality", quality, zero=True)
        holding = self._holding
        if holding.min_memory is None:
            return holding.max_memory
        floor = self._port._floor_of(self)
        return size_for_quality(quality, holding.min_memory, holding.max_memory, floor)

    def quality_changes(self) -> QualityChanges:
        """An async iterator of quality targets: the current one first, then each change.

        A slow reader gets the latest value, never a backlog. It ends when the
        allocation is released.
        """
        return QualityChanges(self)

    async def wait_preempted(self) -> None:
        """Return when preemption is requested or the allocation is released."""
        backend = current_backend()
        with self._port._lock:
            if self.preempted or self.released:
                parker = None
            else:
                parker = backend.parker()
                parker.arm()
                if self._preempt_waiters is None:
                    self._preempt_waiters = []
                self._preempt_waiters.append(parker)
        if parker is None:
            await backend.checkpoint()
        else:
            await self._sleep(parker, self._preempt_waiters)

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Mark a working span: a busy holder is never reclaimed for keep_alive, and
        idle holders are preempted before busy ones of the same priority."""
        self._port._set_busy(self, True)
        try:
            yield
        finally:
            self._port._set_busy(self, False)

    async def _sleep(self, parker: Parker, waiters: list[Parker] | None) -> None:
        """Park until woken; a cancelled sleeper takes itself off ``waiters``."""
        try:
            await parker.park(math.inf)
        except BaseException as exc:

            def leave() -> None:
                if waiters is not None and parker in waiters:
                    waiters.remove(parker)

            under_lock(self._port._lock, exc, leave)
            raise

    # Called by the port, under its lock, when the core decides something about this
    # holder. They only schedule: the body's scope is cancelled in the loop that runs it.

    def _on_preempt(self) -> None:
        scope = self._scope
        if scope is not None:
            self._loop.call(scope.cancel)
        self._signal_preempt()

    def _on_release(self) -> None:
        """Released: every sleeper returns (`wait_preempted`; `quality_changes` ends)."""
        if self._preempt_waiters or self._quality_waiters:
            self._signal_preempt()
            self._signal_quality()

    def _signal_preempt(self) -> None:
        waiters, self._preempt_waiters = self._preempt_waiters, None
        if waiters:
            for parker in waiters:
                parker.wake()

    def _signal_quality(self) -> None:
        waiters, self._quality_waiters = self._quality_waiters, None
        if waiters:
            for parker in waiters:
                parker.wake()


class QualityChanges:
    """Iterates an allocation's quality targets; see `Allocation.quality_changes`."""

    __slots__ = ("_alloc", "_last", "_watching")

    def __init__(self, alloc: Allocation) -> None:
        self._alloc = alloc
        self._last: float | None = None
        self._watching = False

    def __aiter__(self) -> QualityChanges:
        return self

    async def __anext__(self) -> float:
        alloc = self._alloc
        port = alloc._port
        backend = current_backend()
        if self._last is None:
            await backend.checkpoint()
            with port._lock:
                if alloc.released:
                    raise StopAsyncIteration
                self._watching = True
                port._watch(alloc, +1)
                self._last = quality = port._quality_of(alloc)
            return quality
        # Each step is a checkpoint, also one with its answer at hand; and checked first:
        # on asyncio a park woken from this thread returns before anyio's delivery.
        await backend.checkpoint_if_cancelled()
        yielded = False
        try:
            while True:
                with port._lock:
                    if alloc.released:
                        answer = None
                    else:
                        if not self._watching:  # a step cancelled earlier stopped it
                            self._watching = True
                            port._watch(alloc, +1)
                        answer = port._quality_of(alloc)
                        if answer == self._last:
                            parker = backend.parker()
                            parker.arm()
                            if alloc._quality_waiters is None:
                                alloc._quality_waiters = []
                            alloc._quality_waiters.append(parker)
                if answer == self._last:
                    await alloc._sleep(parker, alloc._quality_waiters)
                elif not yielded:
                    await backend.checkpoint()  # then the answer is read afresh
                elif answer is None:
                    break
                else:
                    self._last = answer
                    return answer
                yielded = True
        except BaseException as exc:
            # A reader cancelled mid-step (its task gone, usually) stops watching: the
            # core need not keep its target fresh for nobody. Reading on watches again.
            self._stop_watching(exc)
            raise
        self._stop_watching()
        raise StopAsyncIteration

    def _stop_watching(self, exc: BaseException | None = None) -> None:
        """Stop watching (``exc``: what the step that stops is leaving with)."""
        if self._watching:
            self._watching = False
            port, alloc = self._alloc._port, self._alloc
            under_lock(port._lock, exc, lambda: port._watch(alloc, -1))

    async def aclose(self) -> None:
        """Stop reading; safe to call more than once."""
        self._stop_watching()
        await anyio.lowlevel.checkpoint()


class AllocationContext:
    """What `Arbiter.allocate` returns: an async context manager around an allocation.

    Its body runs in a cancel scope owned by the allocation; see `Arbiter.allocate`.
    """

    __slots__ = ("_alloc", "_args", "_entry", "_port")

    def __init__(self, port: AllocationPort, args: RequestArgs) -> None:
        self._port = port
        self._args = args
        self._alloc: Allocation | None = None
        # The port's request under way, from entry to grant or failure: one at a time.
        self._entry: Coroutine[Any, Any, Allocation] | None = None

    def __aenter__(self) -> Awaitable[Allocation]:
        # Not a coroutine: the ``async with`` awaits the port's `_admit` itself, which
        # calls `_start` once granted. One coroutine less per allocation to make and to
        # pass each yield through.
        if self._alloc is not None or getattr(self._entry, "cr_frame", None) is not None:
            # Granted, or a request still under way. One that failed, or was closed
            # before it ran, has no frame left: the context may be entered again.
            raise RuntimeError("this allocate() context was already entered")
        self._entry = self._port._admit(self._args, current_backend(), self)
        return self._entry

    def _start(self, alloc: Allocation) -> None:
        """``alloc`` is granted: the body runs in its scope from here on (called by the
        port in the task that entered, as the last step of its `_admit`)."""
        self._alloc = alloc
        self._entry = None
        assert alloc._scope is not None
        alloc._scope.__enter__()

    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Awaitable[bool | None]:
        # Not a coroutine: nothing here waits, so the ``async with`` awaits an answer
        # that is ready (a coroutine would cost a frame and an object per allocation).
        alloc = self._alloc
        assert alloc is not None and alloc._scope is not None
        scope = alloc._scope
        try:
            swallowed = scope.__exit__(exc_type, exc, tb)
        finally:
            self._port.release_allocation(alloc)
        if scope.cancelled_caught:
            raise self._port._cut_short(alloc)
        # trio's scope answers True on a clean exit too: nothing to swallow then.
        return at_once(True) if swallowed and exc_type is not None else READY
