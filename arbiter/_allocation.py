"""The Allocation handle a holder keeps, and the async iterator of its quality targets."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING

import anyio.lowlevel

from ._arguments import DEFAULT, Default, RequestArgs
from ._backend import CancelScopeLike, LoopEntry, Parker, current_backend
from ._checks import check_quality_argument
from ._errors import Preempted
from ._quality import size_for_quality
from ._records import Holding
from ._types import Priority, WorkloadType, check_memory, check_timeout

if TYPE_CHECKING:
    from ._arbiter import Arbiter

__all__ = ["Allocation", "AllocationContext", "QualityChanges"]


class Allocation(Holding):
    """GPU memory granted by an `Arbiter`, held until `release`.

    ``memory`` is the bytes held now, ``quality`` the current quality target in
    ``[floor, 1.0]``. ``preempted`` is true once a higher priority (or the
    keep_alive timer) asked for the memory back; ``released`` once it is returned.
    """

    __slots__ = (
        "_arbiter",
        "_loop",
        "_number",
        "_preempt_waiters",
        "_quality_waiters",
        "_scope",
        "created_at",
        "label",
    )

    def __init__(
        self,
        arbiter: Arbiter,
        loop: LoopEntry,
        number: int,
        workload: WorkloadType,
        priority: Priority,
        memory: int,
        min_memory: int | None,
        preemptible: bool,
        keep_alive: float | None,
        label: str | None,
        created_at: float,
    ) -> None:
        Holding.__init__(self, workload, priority, memory, min_memory, preemptible, keep_alive)
        self._arbiter = arbiter
        self._loop = loop  # the event loop it was requested in
        self._number = number
        self.label = label
        self.created_at = created_at
        # The cancel scope of an `Arbiter.allocate` body; preemption cancels it.
        self._scope: CancelScopeLike | None = None
        # Tasks sleeping in `wait_preempted` and `quality_changes` (any loop). These
        # three fields are guarded by the arbiter's lock.
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
    def quality(self) -> float:
        """The current quality target, in ``[min_quality(workload), 1.0]``; after
        `release`, the target it had when released."""
        arbiter = self._arbiter
        with arbiter._lock:
            return arbiter._ledger.target(self)

    @property
    def preempted(self) -> bool:
        """True once the arbiter asked for this allocation's memory back."""
        return self.preempt_requested

    def release(self) -> None:
        """Return the memory at once and hand it to waiters. Idempotent; never blocks."""
        self._arbiter.release_allocation(self)

    async def resize(self, memory: int, *, timeout: float | Default | None = DEFAULT) -> None:
        """Change the held memory to ``memory`` bytes.

        Shrinking (not below ``min_memory``: ``ValueError``) returns memory at once.
        Growing (up to the budget: else `InsufficientMemory`) queues like a new request
        of this priority and may preempt like one; on `AllocationTimeout` the old size
        is kept. Raises ``RuntimeError`` when the allocation is (or, while growing,
        becomes) released.
        """
        check_memory(memory, "memory")
        limit = self._arbiter._default_timeout if isinstance(timeout, Default) else timeout
        limit = check_timeout(limit)
        await self._arbiter._resize(self, memory, limit)

    def memory_for_quality(self, quality: float) -> int:
        """The bytes this allocation needs to run at ``quality``: for an elastic one,
        ``min_memory`` at its floor and its full size at 1.0, linear between; for any
        other, its size.

        Raises:
            TypeError, ValueError: ``quality`` is not a number in [0, 1].
        """
        quality = check_quality_argument(quality)
        if self.min_memory is None:
            return self.max_memory
        floor = self._arbiter._ledger.floor(self)
        return size_for_quality(quality, self.min_memory, self.max_memory, floor)

    def quality_changes(self) -> QualityChanges:
        """An async iterator of quality targets: the current one first, then each change.

        A slow reader gets the latest value, never a backlog. It ends when the
        allocation is released.
        """
        return QualityChanges(self)

    async def wait_preempted(self) -> None:
        """Return when preemption is requested or the allocation is released."""
        backend = current_backend()
        with self._arbiter._lock:
            if self.preempt_requested or self.released:
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
        self._arbiter._set_busy(self, True)
        try:
            yield
        finally:
            self._arbiter._set_busy(self, False)

    async def _sleep(self, parker: Parker, waiters: list[Parker] | None) -> None:
        """Park until woken; a cancelled sleeper takes itself off ``waiters``."""
        try:
            await parker.park(math.inf)
        except BaseException:
            with self._arbiter._lock:
                if waiters is not None and parker in waiters:
                    waiters.remove(parker)
            raise

    # Hooks the arbiter calls, under its lock, when the ledger decides something
    # about this holder. They only schedule: the body's scope is cancelled in the
    # loop that runs it.

    def _on_preempt(self) -> None:
        scope = self._scope
        if scope is not None:
            self._loop.call(scope.cancel)
        self._signal_preempt()

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
        arbiter = alloc._arbiter
        backend = current_backend()
        if self._last is None:
            await backend.checkpoint()
            with arbiter._lock:
                if alloc.released:
                    raise StopAsyncIteration
                self._watching = True
                arbiter._ledger.watch(alloc, +1)
                self._last = quality = arbiter._ledger.target(alloc)
            return quality
        while True:
            with arbiter._lock:
                if alloc.released:
                    break
                quality = arbiter._ledger.target(alloc)
                if quality != self._last:
                    self._last = quality
                    return quality
                parker = backend.parker()
                parker.arm()
                if alloc._quality_waiters is None:
                    alloc._quality_waiters = []
                alloc._quality_waiters.append(parker)
            await alloc._sleep(parker, alloc._quality_waiters)
        self._stop_watching()
        raise StopAsyncIteration

    def _stop_watching(self) -> None:
        if self._watching:
            self._watching = False
            arbiter = self._alloc._arbiter
            with arbiter._lock:
                arbiter._ledger.watch(self._alloc, -1)

    async def aclose(self) -> None:
        """Stop reading; safe to call more than once."""
        self._stop_watching()
        await anyio.lowlevel.checkpoint()


class AllocationContext:
    """What `Arbiter.allocate` returns: an async context manager around an allocation.

    Its body runs in a cancel scope owned by the allocation; see `Arbiter.allocate`.
    """

    __slots__ = ("_alloc", "_arbiter", "_args")

    def __init__(self, arbiter: Arbiter, args: RequestArgs) -> None:
        self._arbiter = arbiter
        self._args = args
        self._alloc: Allocation | None = None

    async def __aenter__(self) -> Allocation:
        if self._alloc is not None:
            raise RuntimeError("this allocate() context was already entered")
        backend = current_backend()
        scope = backend.cancel_scope()
        alloc = self._alloc = await self._arbiter._request(self._args, backend, scope)
        scope.__enter__()
        return alloc

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        alloc = self._alloc
        assert alloc is not None and alloc._scope is not None
        try:
            swallowed = alloc._scope.__exit__(exc_type, exc, tb)
        finally:
            self._arbiter._release(alloc)
        if alloc._scope.cancelled_caught:
            raise Preempted(f"{alloc.id} was preempted by a higher priority")
        return swallowed
