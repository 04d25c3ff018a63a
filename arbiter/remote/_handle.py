"""The handle a `RemoteArbiter` hands out: `RemoteAllocation`, its quality iterator and
the ``allocate()`` context. A handle knows its arbiter only through `RemotePort`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Protocol, Self

import anyio
import anyio.from_thread
import anyio.lowlevel

from .._arguments import DEFAULT, Default, RequestArgs
from .._checks import check_ratio
from .._config import ArbiterConfig
from .._errors import Preempted
from .._quality import size_for_quality
from .._types import check_memory, check_timeout
from ._wire import Granted, Reclaim

__all__ = ["RemoteAllocation", "RemoteAllocationContext", "RemotePort", "RemoteQualityChanges"]


class RemotePort(Protocol):
    """What a handle asks of its `RemoteArbiter` (the client's side of the port)."""

    _instance: str | None
    _owner_thread: int | None
    _token: Any

    @property
    def config(self) -> ArbiterConfig: ...

    def _foreign(self) -> bool: ...

    def _in_owner_sync(self, function: Any, *args: Any) -> Any: ...

    async def _in_owner(self, function: Any, *args: Any) -> Any: ...

    async def _request(self, args: RequestArgs) -> RemoteAllocation: ...

    async def _resize(
        self, alloc: RemoteAllocation, memory: int, timeout: float | Default | None
    ) -> tuple[int, float]: ...

    def _set_busy(self, alloc: RemoteAllocation, busy: bool) -> None: ...

    def _release(self, alloc: RemoteAllocation) -> None: ...


class RemoteAllocation:
    """Memory granted by the daemon to a `RemoteArbiter`: the API of `Allocation`."""

    __slots__ = (
        "_busy",
        "_instance",
        "_key",
        "_loop_thread",
        "_loop_token",
        "_lost",
        "_owner",
        "_preempt_event",
        "_quality_event",
        "_scope",
        "created_at",
        "id",
        "keep_alive",
        "label",
        "max_memory",
        "memory",
        "min_memory",
        "preempted",
        "preemptible",
        "priority",
        "quality",
        "released",
        "workload",
    )

    def __init__(self, owner: RemotePort, key: int, args: RequestArgs, id: str) -> None:
        (workload, priority, memory, min_memory, _timeout, _min_quality, preemptible,
         keep_alive, label) = args  # fmt: skip
        self._owner = owner
        self._key = key
        self.id = id
        self.workload = workload
        self.priority = priority
        self.memory = memory
        self.max_memory = memory
        self.min_memory = min_memory
        self.preemptible = preemptible
        self.keep_alive = keep_alive
        self.label = label
        self.quality = 1.0
        self.created_at = anyio.current_time()
        self.preempted = False
        self.released = False
        self._busy = 0
        self._instance = owner._instance
        # The loop whose tasks wait on this allocation (its body, its events).
        self._loop_thread = owner._owner_thread
        self._loop_token: Any = owner._token
        self._lost: BaseException | None = None
        self._scope: anyio.CancelScope | None = None
        self._preempt_event: anyio.Event | None = None
        self._quality_event: anyio.Event | None = None

    @classmethod
    def _granted(cls, owner: RemotePort, granted: Granted, args: RequestArgs) -> Self:
        alloc = cls(owner, granted.key, args, granted.id)
        alloc.memory = granted.memory
        alloc.quality = granted.quality
        return alloc

    def __repr__(self) -> str:
        return (
            f"<RemoteAllocation {self.id} {self.workload.value} {self.priority.name.lower()} "
            f"memory={self.memory} quality={self.quality:.2f}"
            f"{' preempted' if self.preempted else ''}{' released' if self.released else ''}>"
        )

    def release(self) -> None:
        """Return the memory: sent to the daemon in order, without waiting. Idempotent;
        from any thread."""
        if self.released:
            return
        if self._owner._foreign():
            self._owner._in_owner_sync(self.release)
            return
        self.released = True
        self._owner._release(self)
        self._signal()

    def _adopt(self) -> None:
        """Belong to the calling thread's loop (requested there through the owner)."""
        self._loop_thread = threading.get_ident()
        self._loop_token = anyio.lowlevel.current_token()
        if self.preempted or self.released:
            self._signal()

    def _in_loop(self, function: Any) -> None:
        """Run ``function`` (a cancel, an event) in this allocation's loop, never blocking
        the caller: from the owning loop to another thread's, a helper thread waits."""
        if self._loop_thread == threading.get_ident():
            function()
            return

        def deliver() -> None:
            with contextlib.suppress(RuntimeError):  # that loop is gone
                anyio.from_thread.run_sync(function, token=self._loop_token)

        threading.Thread(target=deliver, daemon=True, name="arbiter signal").start()

    async def resize(self, memory: int, *, timeout: float | Default | None = DEFAULT) -> None:
        """Change the held memory; see `Allocation.resize`."""
        check_memory(memory, "memory")
        if not isinstance(timeout, Default):
            timeout = check_timeout(timeout)
        if self.released:
            raise RuntimeError(f"cannot resize {self.id}: it is released")
        if memory < self.memory and self.min_memory is not None and memory < self.min_memory:
            raise ValueError(f"memory must be >= min_memory ({self.min_memory}), got {memory}")
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._owner._foreign():
            await self._owner._in_owner(self._resize_here, memory, timeout)
        else:
            await self._resize_here(memory, timeout)

    async def _resize_here(self, memory: int, timeout: float | Default | None) -> None:
        shrinking = memory <= self.memory
        try:
            memory, quality = await self._owner._resize(self, memory, timeout)
        except RuntimeError:
            if shrinking and self.released:
                return  # released while the shrink was on its way: nothing is held
            raise
        self.memory = memory
        self.max_memory = max(self.max_memory, memory)
        self._update(memory, quality, self.preempted)

    def memory_for_quality(self, quality: float) -> int:
        """The bytes needed to run at ``quality``; see `Allocation.memory_for_quality`."""
        quality = check_ratio("quality", quality, zero=True)
        if self.min_memory is None:
            return self.max_memory
        config = self._owner.config
        floor = (
            config.diffusion_min_quality if self.workload.is_diffusion else config.llm_min_quality
        )
        return size_for_quality(quality, self.min_memory, self.max_memory, floor)

    def quality_changes(self) -> RemoteQualityChanges:
        """The current quality target, then each change; ends when released."""
        return RemoteQualityChanges(self)

    async def wait_preempted(self) -> None:
        """Return when preemption is requested or the allocation is released (or lost)."""
        if self.preempted or self.released:
            await anyio.lowlevel.checkpoint()
            return
        if self._preempt_event is None:
            self._preempt_event = anyio.Event()
        await self._preempt_event.wait()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Mark a working span; see `Allocation.busy`."""
        self._send_busy(True)
        try:
            yield
        finally:
            self._send_busy(False)

    def _send_busy(self, busy: bool) -> None:
        if self._owner._foreign():
            self._owner._in_owner_sync(self._send_busy, busy)
            return
        self._busy += 1 if busy else -1
        if not self.released:
            self._owner._set_busy(self, busy)

    # What the client learns from the daemon.

    def _reclaim(self) -> Reclaim:
        return Reclaim(
            self._key, self.workload.value, int(self.priority), self.memory,
            self.min_memory, self.preemptible, self.keep_alive, self.label, max(0, self._busy),
        )  # fmt: skip

    def _update(self, memory: int, quality: float, preempted: bool) -> None:
        self.memory = memory
        if quality != self.quality:
            self.quality = quality
            self._signal_quality()
        if preempted and not self.preempted:
            self.preempted = True
            self._in_loop(self._on_preempt)

    def _on_preempt(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        if self._preempt_event is not None:
            self._preempt_event.set()

    def _lose(self, error: BaseException | None) -> None:
        """The session's allocations are gone: the body is cancelled with ``error``."""
        if self.released:
            return
        self.released = True
        self._lost = error
        self._in_loop(self._on_lost)

    def _on_lost(self) -> None:
        if self._lost is not None and self._scope is not None:
            self._scope.cancel()
        self._signal_here()

    def _signal(self) -> None:
        self._in_loop(self._signal_here)

    def _signal_here(self) -> None:
        if self._preempt_event is not None:
            self._preempt_event.set()
        self._signal_quality_here()

    def _signal_quality(self) -> None:
        self._in_loop(self._signal_quality_here)

    def _signal_quality_here(self) -> None:
        event, self._quality_event = self._quality_event, None
        if event is not None:
            event.set()

    def _quality_signal(self) -> anyio.Event:
        if self._quality_event is None:
            self._quality_event = anyio.Event()
        return self._quality_event


class RemoteQualityChanges:
    """Iterates a remote allocation's quality targets; see `Allocation.quality_changes`."""

    __slots__ = ("_alloc", "_last")

    def __init__(self, alloc: RemoteAllocation) -> None:
        self._alloc = alloc
        self._last: float | None = None

    def __aiter__(self) -> RemoteQualityChanges:
        return self

    async def __anext__(self) -> float:
        alloc = self._alloc
        if self._last is None:
            await anyio.lowlevel.checkpoint()
            if alloc.released:
                raise StopAsyncIteration
            self._last = alloc.quality
            return self._last
        while not alloc.released:
            if alloc.quality != self._last:
                self._last = alloc.quality
                return self._last
            await alloc._quality_signal().wait()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop reading; safe to call more than once."""
        await anyio.lowlevel.checkpoint()


class RemoteAllocationContext:
    """What `RemoteArbiter.allocate` returns; its body runs in the allocation's cancel scope."""

    __slots__ = ("_alloc", "_args", "_owner")

    def __init__(self, owner: RemotePort, args: RequestArgs) -> None:
        self._owner = owner
        self._args = args
        self._alloc: RemoteAllocation | None = None

    async def __aenter__(self) -> RemoteAllocation:
        if self._alloc is not None:
            raise RuntimeError("this allocate() context was already entered")
        alloc = await self._owner._request(self._args)
        self._alloc = alloc
        scope = alloc._scope = anyio.CancelScope()
        if alloc.preempted or alloc._lost is not None:
            scope.cancel()
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
            alloc.release()
        if alloc._scope.cancelled_caught:
            if alloc._lost is not None:
                raise alloc._lost
            raise Preempted(f"{alloc.id} was preempted by a higher priority")
        return swallowed
