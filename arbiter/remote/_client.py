"""`RemoteArbiter`: the API of `Arbiter`, served by an ``arbiter serve`` daemon.

One connection is one session with the daemon. Calls that may block are sent and
awaited; sync calls (``state()``, ``stats()``, ``recommended_quality()``,
``release()``) answer from what the daemon last pushed, or are sent without waiting,
in order. The daemon pushes preemptions and quality targets; a preemption cancels the
``allocate()`` body's cancel scope at once.

When the connection drops without the daemon ending the session, held allocations
are kept for up to the ttl while the client reconnects and re-claims them; a
session the daemon ended (silent past the ttl) loses everything with `SessionLost`.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import msgspec

from .._allocation import Allocation, AllocationContext
from .._arguments import DEFAULT, Default, RequestArgs, check_request
from .._backend import Backend, LoopEntry, Parker, current_backend
from .._config import ArbiterConfig
from .._errors import (
    AllocationTimeout,
    ArbiterError,
    ArbiterUnavailable,
    InsufficientMemory,
    InsufficientQuality,
    Preempted,
    SessionLost,
    ShuttingDown,
)
from .._log import log, note
from .._records import Holding
from .._stats import ArbiterState, ArbiterStats
from .._types import (
    Priority,
    WorkloadType,
    coerce_priority,
    coerce_workload,
)
from ._wire import (
    PROTOCOL_VERSION,
    Busy,
    DaemonMessage,
    Error,
    Failed,
    FrameBuffer,
    FrameError,
    FrameSender,
    Goodbye,
    Granted,
    HandshakeReply,
    Hello,
    Ping,
    Reclaim,
    Reclaimed,
    Refused,
    Release,
    Request,
    Resize,
    Resized,
    Snapshot,
    Status,
    StatusReply,
    Sync,
    Synced,
    Update,
    Version,
    Welcome,
    Withdraw,
    default_socket_path,
    frame,
)

__all__ = ["RemoteArbiter"]

_T = TypeVar("_T")
_WORKLOADS = tuple(WorkloadType)
_PRIORITIES = tuple(Priority)
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(DaemonMessage)
_HANDSHAKE_DECODER = msgspec.msgpack.Decoder(HandshakeReply)
_VERSION_DECODER = msgspec.msgpack.Decoder(Version)
_RECEIVE_BYTES = 65536
# How long a client waits for the daemon's answer to its hello.
HANDSHAKE_TIMEOUT = 5.0
# How often a client whose daemon went away tries to reach it again.
RECONNECT_INTERVAL = 0.05


def _error(failed: Failed) -> Exception:
    kind, args = failed.error, failed.args
    try:
        if kind == "insufficient_memory":
            return InsufficientMemory(int(args[0]), int(args[1]))
        if kind == "insufficient_quality":
            return InsufficientQuality(float(args[0]), float(args[1]))
        if kind == "timeout":
            return AllocationTimeout(float(args[0]))
        message = str(args[0]) if args else kind
        if kind == "shutting_down":
            return ShuttingDown(message)
        if kind == "type":
            return TypeError(message)
        if kind == "value":
            return ValueError(message)
        return RuntimeError(message)
    except (IndexError, TypeError, ValueError):
        return ArbiterError(f"the daemon answered {kind} {args!r}")


class MirroredHolding(Holding):
    """The client's copy of the daemon's record of one allocation: what the daemon last
    said of it (``memory``, ``preempt_requested``, ``notified_quality``), written only
    under the `RemoteArbiter`'s lock. ``key`` names it in this client's messages,
    ``instance`` is the daemon that granted it, ``lost`` why the session lost it."""

    __slots__ = ("instance", "key", "lost")

    def __init__(self, key: int, args: RequestArgs, instance: str | None) -> None:
        (workload, priority, memory, min_memory, _timeout, _min_quality, preemptible,
         keep_alive, _label) = args  # fmt: skip
        super().__init__(workload, priority, memory, min_memory, preemptible, keep_alive)
        self.key = key
        self.instance = instance
        self.lost: BaseException | None = None


def _mirror(alloc: Allocation) -> MirroredHolding:
    holding = alloc._holding
    assert isinstance(holding, MirroredHolding)
    return holding


class _Pending:
    """A call waiting for the daemon's answer: the reader sets it and wakes the caller
    (both on the owning loop)."""

    __slots__ = ("answer", "error", "parker")

    def __init__(self, parker: Parker) -> None:
        parker.arm()
        self.parker = parker
        self.answer: Any = None
        self.error: BaseException | None = None


class _Connection:
    """One session with the daemon: its socket, what it sends, what waits for answers."""

    __slots__ = ("buffer", "closed", "early", "instance", "pending", "scope", "sender", "stream")

    def __init__(
        self,
        stream: anyio.abc.SocketStream,
        instance: str,
        buffer: FrameBuffer,
        early: list[bytes],
    ) -> None:
        self.stream = stream
        self.instance = instance
        self.buffer = buffer
        self.early = early
        self.sender = FrameSender(stream)
        self.scope = anyio.CancelScope()  # of the task that reads, writes and pings
        self.pending: dict[int, _Pending] = {}
        self.closed = False

    def send(self, message: Any) -> None:
        """Send ``message`` in order with every other; never blocks."""
        if not self.closed:
            self.sender.send(frame(_ENCODER.encode(message)))


class RemoteArbiter:
    """The API of `Arbiter`, served by the ``arbiter serve`` daemon of one GPU.

    ``async with RemoteArbiter() as arbiter:`` connects (a session); every method of
    `Arbiter` then works the same, through the daemon, with the same errors.

    Args:
        socket: the daemon's socket; default ``$XDG_RUNTIME_DIR/gpu-arbiter/gpu<device>.sock``,
            else ``/tmp/gpu-arbiter-<uid>/gpu<device>.sock``.
        device: the GPU whose default socket is used when ``socket`` is not given.

    Raises:
        ArbiterUnavailable: (entering) no daemon answers on the socket, or it speaks
            another protocol version.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, device: int | str = 0):
        if socket is not None and not isinstance(socket, str | os.PathLike):
            raise TypeError(f"socket must be a path or None, got {socket!r}")
        if socket is not None and not os.fspath(socket):
            raise ValueError("socket must be a path or None, got ''")
        self._path = Path(socket) if socket is not None else default_socket_path(device)
        self._keys = itertools.count(1)
        # Guards the mirrored holdings and the handles' wake-up lists (`AllocationPort`).
        self._lock = threading.Lock()
        self._allocations: dict[int, Allocation] = {}
        # Requests on their way: their arguments, the requester's loop, when they began.
        self._pending_args: dict[int, tuple[RequestArgs, LoopEntry, float]] = {}
        # Resizes withdrawn while waiting, until the daemon answers: (allocation, old size).
        self._withdrawn_resizes: dict[int, tuple[Allocation, int]] = {}
        # Resizes on their way, by their keys: the answer is mirrored as it is read.
        self._resizing: dict[int, Allocation] = {}
        self._connection: _Connection | None = None
        self._instance: str | None = None
        self._connecting = anyio.Lock()
        self._reconnected: anyio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self._services: anyio.CancelScope | None = None
        self._config: ArbiterConfig | None = None
        self._ttl = 10.0
        self._state: ArbiterState | None = None
        self._stats: ArbiterStats | None = None
        self._recommended: list[float] = []
        self._closed = False
        # The loop that entered: every socket and session object lives there; calls from
        # other threads' loops are run there (anyio.from_thread with its token).
        self._token: Any = None
        self._home: LoopEntry | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._connection else "idle"
        return f"<RemoteArbiter {self._path} {state} holding={len(self._allocations)}>"

    @property
    def socket(self) -> Path:
        """The daemon's socket path."""
        return self._path

    @property
    def config(self) -> ArbiterConfig:
        """The daemon's arbiter configuration (known once entered)."""
        if self._config is None:
            raise RuntimeError("enter the RemoteArbiter with async with first")
        return self._config

    @property
    def ttl(self) -> float:
        """The daemon's session ttl in seconds (known once entered)."""
        return self._ttl

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._closed:
            raise ShuttingDown("this RemoteArbiter is closed")
        if self._task_group is not None:
            raise RuntimeError("this RemoteArbiter is already entered")
        self._token = anyio.lowlevel.current_token()
        self._home = current_backend().loop()
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        try:
            await task_group.start(self._supervise, name="RemoteArbiter session")
            await self._open([])
            await self.refresh()
        except BaseException:
            self._close()
            self._task_group = None
            await task_group.__aexit__(None, None, None)
            raise
        return self

    async def _supervise(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Own the sessions' tasks (reader, writer, pinger, reconnection) until closed."""
        try:
            with anyio.CancelScope() as self._services:
                async with anyio.create_task_group() as tasks:
                    self._tasks = tasks
                    task_status.started()
                    await anyio.sleep_forever()
        finally:
            self._services = self._tasks = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()
        task_group, self._task_group = self._task_group, None
        if task_group is not None:
            # The body's own exception (or cancellation) passes through untouched: the
            # task group only holds our services, which are cancelled now.
            await task_group.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Close the session: waiting and later requests raise `ShuttingDown`, and what
        this client still holds is released. Idempotent."""
        if self._foreign():
            self._in_owner_sync(self._close)
        else:
            self._close()
        await anyio.lowlevel.checkpoint()

    # -- threads --------------------------------------------------------------------

    def _foreign(self) -> bool:
        """Whether the caller runs in another thread than the loop that entered."""
        home = self._home
        return home is not None and home.thread != threading.get_ident()

    def _in_owner_sync(self, function: Any, *args: Any) -> Any:
        """Run a sync ``function`` on the owning loop (it is quick); from any thread."""
        try:
            return anyio.from_thread.run_sync(function, *args, token=self._token)
        except RuntimeError:  # the owning loop is gone: so is the session
            return None

    async def _in_owner(self, function: Any, *args: Any) -> Any:
        """Await ``function(*args)`` on the owning loop from another thread's loop.

        The wait is a worker thread of the caller's loop. Cancelled, it is withdrawn on
        the owning loop; a result that arrives anyway (a grant) is given back.
        """
        token = self._token
        lock = threading.Lock()
        box: dict[str, Any] = {"abandoned": False, "scope": None, "result": None}

        async def on_owner() -> Any:
            with anyio.CancelScope() as scope:
                with lock:
                    if box["abandoned"]:
                        return None
                    box["scope"] = scope
                return await function(*args)
            return None

        def in_worker() -> Any:
            result = anyio.from_thread.run(on_owner, token=token)
            with lock:
                box["result"] = result
                abandoned = box["abandoned"]
            if abandoned and isinstance(result, Allocation):
                result.release()
            return result

        try:
            return await anyio.to_thread.run_sync(in_worker, abandon_on_cancel=True)
        except BaseException:
            with lock:
                box["abandoned"] = True
                scope, result = box["scope"], box["result"]
            if isinstance(result, Allocation):
                result.release()
            elif scope is not None:
                self._in_owner_sync(scope.cancel)
            raise

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        connection, self._connection = self._connection, None
        closed = ShuttingDown("the RemoteArbiter closed")
        if connection is not None:
            self._end(connection, closed)
        self._lose_all(closed)
        if self._reconnected is not None:
            self._reconnected.set()
        if self._services is not None:
            self._services.cancel()

    # -- the connection -----------------------------------------------------------

    async def _open(self, reclaims: list[Reclaim]) -> _Connection:
        """Connect, say hello, start the session's reader, writer and pinger."""
        path = self._path
        try:
            stream = await anyio.connect_unix(path)
        except OSError as exc:
            raise ArbiterUnavailable(
                f"no arbiter daemon answers on {path}: {exc.strerror or exc}"
            ) from None
        try:
            hello = Hello(PROTOCOL_VERSION, self._instance, reclaims)
            buffer = FrameBuffer()
            frames: list[bytes] = []
            with anyio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.send(frame(_ENCODER.encode(hello)))
                while not frames:
                    frames = buffer.feed(await stream.receive(_RECEIVE_BYTES))
            welcome = self._read_handshake(frames[0])
        except BaseException as exc:
            await anyio.aclose_forcefully(stream)
            if isinstance(exc, ArbiterUnavailable):
                raise
            if isinstance(exc, Exception):
                raise ArbiterUnavailable(
                    f"the arbiter daemon on {path} did not answer: {type(exc).__name__} {exc}"
                ) from None
            raise
        connection = _Connection(stream, welcome.instance, buffer, frames[1:])
        self._instance = welcome.instance
        self._ttl = welcome.ttl
        self._config = welcome.config
        self._connection = connection
        if self._tasks is None:
            await anyio.aclose_forcefully(stream)
            raise ShuttingDown("the RemoteArbiter is closed")
        self._tasks.start_soon(self._run, connection)
        return connection

    def _read_handshake(self, data: bytes) -> Welcome:
        try:
            reply = _HANDSHAKE_DECODER.decode(data)
        except msgspec.MsgspecError:
            try:
                version = _VERSION_DECODER.decode(data).version
            except msgspec.MsgspecError:
                version = -1
            raise ArbiterUnavailable(
                f"the arbiter daemon on {self._path} speaks protocol {version}, "
                f"this client {PROTOCOL_VERSION}"
            ) from None
        if isinstance(reply, Refused):
            raise ArbiterUnavailable(f"the arbiter daemon on {self._path}: {reply.message}")
        if reply.version != PROTOCOL_VERSION:
            raise ArbiterUnavailable(
                f"the arbiter daemon on {self._path} speaks protocol {reply.version}, "
                f"this client {PROTOCOL_VERSION}"
            )
        return reply

    async def _live(self) -> _Connection:
        """The session, opened anew when the last one was lost."""
        if self._closed:
            raise ShuttingDown("the RemoteArbiter is closed")
        if self._task_group is None:
            raise RuntimeError("enter the RemoteArbiter with async with first")
        connection = self._connection
        if connection is not None and not connection.closed and not self._silent(connection):
            return connection
        if self._reconnected is not None:
            await self._reconnected.wait()
        async with self._connecting:
            if self._closed:
                raise ShuttingDown("the RemoteArbiter is closed")
            connection = self._connection
            if connection is not None and not connection.closed:
                return connection
            return await self._open([])

    async def _run(self, connection: _Connection) -> None:
        """Read, write and ping for one session; then follow the loss rules."""
        reason = "closed"
        try:
            with connection.scope:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(connection.sender.run)
                    tasks.start_soon(self._ping, connection)
                    reason = await self._read(connection)
                    tasks.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(connection.stream)
        if connection.closed or self._closed:
            return
        if self._connection is connection:
            self._connection = None
        if reason == "expired":
            self._end(
                connection, SessionLost("the daemon ended this session (silent past its ttl)")
            )
        elif reason == "bad_input":
            self._end(connection, ArbiterUnavailable("the daemon closed this session: bad input"))
        else:
            self._end(
                connection,
                ArbiterUnavailable(f"the arbiter daemon on {self._path} went away"),
                keep_held=True,
            )
            if self._allocations:
                await self._reconnect()

    def _end(
        self, connection: _Connection, error: BaseException, *, keep_held: bool = False
    ) -> None:
        connection.closed = True
        self._withdrawn_resizes.clear()
        for pending in connection.pending.values():
            pending.error = copy.copy(error)  # each raise its own traceback
            pending.parker.wake()
        connection.pending.clear()
        if not keep_held:
            self._lose_all(error)

    def _lose_all(self, error: BaseException) -> None:
        allocations = list(self._allocations.values())
        self._allocations.clear()
        for alloc in allocations:
            self._lose(alloc, error)

    def _lose(self, alloc: Allocation, error: BaseException) -> None:
        """The session's allocation is gone: its body is cancelled, and raises ``error``."""
        with self._lock:
            if self._let_go(alloc):
                _mirror(alloc).lost = error
                scope = alloc._scope
                if scope is not None:
                    alloc._loop.call(scope.cancel)

    @staticmethod
    def _let_go(alloc: Allocation) -> bool:
        """Mark ``alloc`` released in the mirror and wake its sleepers (under the lock);
        False when it already was."""
        holding = alloc._holding
        if holding.released:
            return False
        holding.released = True
        holding.memory = 0
        alloc._on_release()
        return True

    async def _reconnect(self) -> None:
        """Re-claim held allocations from a daemon back within the ttl, or lose them."""
        self._reconnected = anyio.Event()
        deadline = anyio.current_time() + self._ttl
        try:
            while not self._closed and self._allocations:
                reclaims = [self._reclaim(alloc) for alloc in self._allocations.values()]
                try:
                    async with self._connecting:
                        await self._open(reclaims)
                    note("arbiter daemon reconnected", socket=str(self._path))
                    return
                except ArbiterUnavailable:
                    if anyio.current_time() + RECONNECT_INTERVAL >= deadline:
                        break
                    await anyio.sleep(RECONNECT_INTERVAL)
            error = ArbiterUnavailable(
                f"the arbiter daemon on {self._path} did not come back within {self._ttl:g} s"
            )
            self._lose_all(error)
        finally:
            event, self._reconnected = self._reconnected, None
            event.set()

    async def _ping(self, connection: _Connection) -> None:
        while not self._silent(connection):
            connection.send(Ping())
            await anyio.sleep(self._ttl / 3)

    def _silent(self, connection: _Connection) -> bool:
        """Whether this client sent nothing for the ttl (it was stopped): the daemon has
        ended the session, so it is ended here too, before anything else is sent on it."""
        if connection.closed or anyio.current_time() - connection.sender.last_sent <= self._ttl:
            return False
        if self._connection is connection:
            self._connection = None
        self._end(connection, SessionLost("the daemon ended this session (silent past ttl)"))
        connection.scope.cancel()
        return True

    async def _read(self, connection: _Connection) -> str:
        """Apply the daemon's frames until the session ends; returns why it ended."""
        pending = connection.early
        while True:
            for data in pending:
                try:
                    message = _DECODER.decode(data)
                except msgspec.MsgspecError:
                    return "bad_input"
                if isinstance(message, Goodbye):
                    return message.reason
                self._apply(connection, message)
            try:
                chunk = await connection.stream.receive(_RECEIVE_BYTES)
                pending = connection.buffer.feed(chunk)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return "closed"
            except FrameError:
                return "bad_input"

    def _apply(self, connection: _Connection, message: Any) -> None:
        if isinstance(message, Snapshot):
            self._state = message.state
            self._recommended = message.recommended
            if message.stats is not None:
                self._stats = message.stats
        elif isinstance(message, Update):
            alloc = self._allocations.get(message.key)
            if alloc is not None:
                self._update(alloc, message.quality, message.preempted)
        elif isinstance(message, Granted):
            pending = connection.pending.pop(message.key, None)
            requested = self._pending_args.get(message.key)
            if pending is None or requested is None:
                connection.send(Release(message.key))  # withdrawn: given back
                return
            args, loop, started = requested
            holding = MirroredHolding(message.key, args, connection.instance)
            holding.memory = message.memory
            holding.notified_quality = message.quality
            holding.preempt_requested = message.preempted
            alloc = holding.ticket = Allocation(
                self, holding, loop, message.number, args[-1], started
            )
            self._allocations[message.key] = alloc
            pending.answer = alloc
            pending.parker.wake()
        elif isinstance(message, Reclaimed):
            alloc = self._allocations.get(message.key)
            if alloc is None:
                if message.number is not None:
                    connection.send(Release(message.key))
            elif message.number is None:
                del self._allocations[message.key]
                mirror = _mirror(alloc)
                error: BaseException = (
                    SessionLost("the daemon ended this session (silent past its ttl)")
                    if connection.instance == mirror.instance
                    else ArbiterUnavailable("the restarted arbiter daemon could not re-admit it")
                )
                self._lose(alloc, error)
            else:
                mirror = _mirror(alloc)
                mirror.instance = connection.instance
                alloc._number = message.number  # its id with this daemon
                self._update(alloc, message.quality, mirror.preempt_requested)
        elif isinstance(message, Failed | Resized | Synced | StatusReply):
            pending = connection.pending.pop(message.key, None)
            self._pending_args.pop(message.key, None)
            withdrawn = self._withdrawn_resizes.pop(message.key, None)
            if withdrawn is not None and isinstance(message, Resized):
                alloc, size = withdrawn
                if not alloc.released and message.memory > size:
                    key = next(self._keys)  # shrinking back: answered at once, not awaited
                    connection.send(Resize(key, _mirror(alloc).key, size, 0.0, False))
            if pending is not None:
                if isinstance(message, Failed):
                    pending.error = _error(message)
                else:
                    if isinstance(message, Resized):
                        resized = self._resizing.get(message.key)
                        if resized is not None:
                            self._mirror_resize(resized, message)
                    pending.answer = message
                pending.parker.wake()
        elif isinstance(message, Error):
            log.warning("arbiter daemon reported an error", message=message.message)

    async def _call(self, connection: _Connection, key: int, message: Any) -> Any:
        """Send ``message`` and wait for its answer; a cancelled wait is withdrawn."""
        pending = connection.pending[key] = _Pending(current_backend().parker())
        connection.send(message)
        try:
            await pending.parker.park(math.inf)
        except BaseException:
            if pending.answer is None and pending.error is None:
                connection.pending.pop(key, None)
                connection.send(Withdraw(key))
            elif isinstance(pending.answer, Allocation):
                pending.answer.release()  # granted at the last moment: given back
            raise
        if pending.error is not None:
            raise pending.error
        return pending.answer

    # -- requesting memory --------------------------------------------------------

    async def request_allocation(
        self,
        workload: WorkloadType | str,
        priority: Priority | str,
        memory: int,
        *,
        min_memory: int | None = None,
        timeout: float | Default | None = DEFAULT,
        min_quality: float | None = None,
        preemptible: bool = True,
        keep_alive: float | None = None,
        label: str | None = None,
    ) -> Allocation:
        """Wait for ``memory`` bytes from the daemon; see `Arbiter.request_allocation`.

        Raises:
            the errors of `Arbiter.request_allocation`, and `SessionLost` or
            `ArbiterUnavailable` when the session ends while the request waits.
        """
        args = check_request(
            workload, priority, memory, min_memory, timeout, min_quality, preemptible,
            keep_alive, label,
        )  # fmt: skip
        return await self._admit(args, current_backend())

    def allocate(
        self,
        workload: WorkloadType | str,
        priority: Priority | str,
        *,
        memory: int,
        min_memory: int | None = None,
        timeout: float | Default | None = DEFAULT,
        min_quality: float | None = None,
        preemptible: bool = True,
        keep_alive: float | None = None,
        label: str | None = None,
    ) -> AllocationContext:
        """``async with arbiter.allocate(...) as alloc:``; see `Arbiter.allocate`.

        A preemption decided by the daemon cancels the body; the ``async with`` then
        raises `Preempted` (or `SessionLost` / `ArbiterUnavailable` when the session's
        allocations were lost).
        """
        args = check_request(
            workload, priority, memory, min_memory, timeout, min_quality, preemptible,
            keep_alive, label,
        )  # fmt: skip
        return AllocationContext(self, args)

    # == the handles' port (`AllocationPort`) ==================================

    async def _admit(
        self, args: RequestArgs, backend: Backend, body: AllocationContext | None = None
    ) -> Allocation:
        """Request on the owning loop (from any thread's loop); the allocation belongs to
        the caller's loop, where its body runs and its waits wake."""
        loop = backend.loop()
        if self._foreign():
            await backend.checkpoint_if_cancelled()
            alloc: Allocation = await self._in_owner(self._request_here, args, loop)
        else:
            alloc = await self._request_here(args, loop)
        if body is not None:
            holding = alloc._holding
            scope = backend.cancel_scope()
            with self._lock:  # a preemption read from the socket sees it, or we see it
                alloc._scope = scope
                if holding.preempt_requested or holding.released:
                    scope.cancel()
            body._start(alloc)
        return alloc

    async def _request_here(self, args: RequestArgs, loop: LoopEntry) -> Allocation:
        await anyio.lowlevel.checkpoint_if_cancelled()
        started = loop.clock()
        connection = await self._live()
        (workload, priority, memory, min_memory, timeout, min_quality, preemptible, keep_alive,
         label) = args  # fmt: skip
        key = next(self._keys)
        default = isinstance(timeout, Default)
        message = Request(
            key, workload.value, int(priority), memory, min_memory,
            None if isinstance(timeout, Default) else timeout, default, min_quality,
            preemptible, keep_alive, label,
        )  # fmt: skip
        self._pending_args[key] = (args, loop, started)
        try:
            alloc: Allocation = await self._call(connection, key, message)
        finally:
            self._pending_args.pop(key, None)
        return alloc

    def release_allocation(self, alloc: Allocation) -> None:
        """Return ``alloc``'s memory; the same as ``alloc.release()``: sent to the daemon
        in order, without waiting. Idempotent; any thread."""
        if not isinstance(alloc, Allocation) or alloc._port is not self:
            raise TypeError(f"alloc must be an allocation of this arbiter, got {alloc!r}")
        with self._lock:
            released_here = self._let_go(alloc)
        if released_here:
            self._on_home(self._send_release, alloc)

    def _send_release(self, alloc: Allocation) -> None:
        key = _mirror(alloc).key
        if self._allocations.pop(key, None) is not None:
            connection = self._connection
            if connection is not None and not connection.closed:
                connection.send(Release(key))

    def _on_home(self, function: Any, *args: Any) -> None:
        """Run a quick sync ``function`` on the owning loop, never waiting for it: at
        once there, in order through its thread-safe entry from another thread."""
        home = self._home
        if home is not None:
            home.call(function, *args)

    async def _resize(
        self, alloc: Allocation, memory: int, timeout: float | Default | None
    ) -> None:
        holding = alloc._holding
        if holding.min_memory is not None and memory < holding.min_memory:
            raise ValueError(f"memory must be >= min_memory ({holding.min_memory}), got {memory}")
        await anyio.lowlevel.checkpoint_if_cancelled()
        if holding.released:
            raise RuntimeError(f"cannot resize {alloc.id}: it is released")
        if self._foreign():
            await self._in_owner(self._resize_here, alloc, memory, timeout)
        else:
            await self._resize_here(alloc, memory, timeout)

    async def _resize_here(
        self, alloc: Allocation, memory: int, timeout: float | Default | None
    ) -> None:
        """Resize ``alloc`` on the daemon and mirror its new size and quality."""
        holding = alloc._holding
        shrinking = memory <= holding.memory
        connection = await self._live()
        key = next(self._keys)
        default = isinstance(timeout, Default)
        message = Resize(key, _mirror(alloc).key, memory,
                         None if isinstance(timeout, Default) else timeout, default)  # fmt: skip
        self._resizing[key] = alloc
        try:
            await self._call(connection, key, message)  # the reader mirrors the answer
        except RuntimeError:
            if shrinking and holding.released:
                return  # released while the shrink was on its way: nothing is held
            raise
        except BaseException:
            if key not in connection.pending and not connection.closed:
                # Withdrawn: a growth that the daemon grants anyway is given back.
                self._withdrawn_resizes[key] = (alloc, holding.memory)
            raise
        finally:
            del self._resizing[key]

    def _mirror_resize(self, alloc: Allocation, resized: Resized) -> None:
        """A resize's answer, in the order the daemon said things: a later `Update`
        then overrides its quality, never the other way round."""
        holding = alloc._holding
        with self._lock:
            if not holding.released:
                holding.memory = resized.memory
                holding.max_memory = max(holding.max_memory, resized.memory)
        self._update(alloc, resized.quality, holding.preempt_requested)

    def _quality_of(self, alloc: Allocation) -> float:
        return alloc._holding.notified_quality  # the caller holds the lock

    def _floor_of(self, alloc: Allocation) -> float:
        config = self.config
        return (config.llm_min_quality, config.diffusion_min_quality)[alloc._holding.family]

    def _set_busy(self, alloc: Allocation, busy: bool) -> None:
        holding = alloc._holding
        with self._lock:
            holding.busy_spans += 1 if busy else -1
        self._on_home(self._send_busy, alloc, busy)

    def _send_busy(self, alloc: Allocation, busy: bool) -> None:
        connection = self._connection
        if not alloc.released and connection is not None and not connection.closed:
            connection.send(Busy(_mirror(alloc).key, busy))

    def _watch(self, alloc: Allocation, delta: int) -> None:
        """Nothing to do: the daemon pushes every change of every allocation."""

    def _cut_short(self, alloc: Allocation) -> BaseException:
        lost = _mirror(alloc).lost
        if lost is not None:
            return copy.copy(lost)  # one error can end many bodies: each its own traceback
        return Preempted(f"{alloc.id} was preempted by a higher priority")

    # -- what the daemon says of an allocation (on the owning loop) -------------

    def _update(self, alloc: Allocation, quality: float, preempted: bool) -> None:
        """The daemon's word on ``alloc``'s quality target and preemption. Its size
        changes only by this client's own calls, whose answers carry it."""
        holding = alloc._holding
        with self._lock:
            if holding.released:
                return
            if quality != holding.notified_quality:
                holding.notified_quality = quality
                alloc._signal_quality()
            if preempted and not holding.preempt_requested:
                holding.preempt_requested = True
                alloc._on_preempt()

    def _reclaim(self, alloc: Allocation) -> Reclaim:
        holding = _mirror(alloc)
        return Reclaim(
            holding.key, holding.workload.value, int(holding.priority), holding.memory,
            holding.min_memory, holding.preemptible, holding.keep_alive, alloc.label,
            max(0, holding.busy_spans),
        )  # fmt: skip

    # -- snapshots ----------------------------------------------------------------

    def _snapshot_ready(self) -> None:
        if self._state is None:
            raise RuntimeError("enter the RemoteArbiter with async with first")

    def recommended_quality(
        self, workload: WorkloadType | str, priority: Priority | str = Priority.NORMAL
    ) -> float:
        """The quality target a new request would get now, as the daemon last said."""
        workload, priority = coerce_workload(workload), coerce_priority(priority)
        self._snapshot_ready()
        index = _WORKLOADS.index(workload) * len(_PRIORITIES) + _PRIORITIES.index(priority)
        return self._recommended[index]

    def state(self) -> ArbiterState:
        """The daemon's state (every session) as it last pushed it."""
        self._snapshot_ready()
        assert self._state is not None
        return self._state

    def stats(self) -> ArbiterStats:
        """The daemon's stats as last pushed (fresh after `refresh`)."""
        self._snapshot_ready()
        assert self._stats is not None
        return self._stats

    async def refresh(self) -> None:
        """Wait until the daemon has acted on every call sent so far, and take its
        state and fresh stats (which it otherwise pushes every half second)."""
        if self._foreign():
            await self._in_owner(self.refresh)
            return
        await anyio.lowlevel.checkpoint_if_cancelled()
        connection = await self._live()
        key = next(self._keys)
        await self._call(connection, key, Sync(key))

    async def _status(self) -> StatusReply:
        connection = await self._live()
        key = next(self._keys)
        reply: StatusReply = await self._call(connection, key, Status(key))
        return reply
