"""The daemon: one real `Arbiter` served to other processes on a Unix socket.

A connection is a session. `SessionHost` is the daemon's one door into the arbiter
(only its public API): it runs each remote request as a task that awaits the real
``request_allocation``, holds the granted `Allocation` on the session's behalf, watches
its preemption and quality and pushes them to the client, and releases everything the
session holds when it ends. The rest of this module is the server around it: the
socket, peer credentials, the handshake, frames in and out, the ttl.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from .._allocation import Allocation
from .._arbiter import Arbiter
from .._arguments import DEFAULT
from .._errors import (
    AllocationTimeout,
    InsufficientMemory,
    InsufficientQuality,
    ShuttingDown,
)
from .._gpu import MemoryProbe
from .._log import log
from .._stats import ArbiterStats
from .._types import Priority, WorkloadType
from ._wire import (
    PROTOCOL_VERSION,
    Busy,
    ClientMessage,
    Error,
    Failed,
    FrameBuffer,
    FrameError,
    FrameSender,
    Goodbye,
    Granted,
    Hello,
    HolderInfo,
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
    WaiterInfo,
    Welcome,
    Withdraw,
    frame,
)

__all__ = ["DaemonConfig", "DaemonRefused", "SessionHost", "SocketClaim", "claim_socket", "serve"]

_PEERCRED = struct.Struct("3i")
_RECEIVE_BYTES = 65536
_WORKLOADS = tuple(WorkloadType)
_PRIORITIES = tuple(Priority)


class DaemonRefused(Exception):
    """The daemon cannot start (a live daemon serves the socket, a bad folder): one line."""


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """How the daemon serves; every number here is a policy.

    Args:
        socket: the Unix socket path.
        ttl: seconds a silent session lives; also how long a restarted daemon waits
            for re-claims before it grants anything new.
        allow_uids: uids served besides the daemon's own.
        snapshot_interval: how often sessions with nothing else to receive are sent
            the daemon's changed state.
        stats_interval: how often fresh stats (percentiles sort their samples) are
            computed for the snapshots.
    """

    socket: Path
    ttl: float = 10.0
    allow_uids: frozenset[int] = field(default_factory=frozenset)
    snapshot_interval: float = 0.05
    stats_interval: float = 0.5

    def __post_init__(self) -> None:
        for name in ("ttl", "snapshot_interval", "stats_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number of seconds, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")


# -- the socket -----------------------------------------------------------------------


@dataclass(slots=True)
class SocketClaim:
    """The right to serve a socket path: a lock held for the daemon's life.

    ``hold_new_for`` is how long the new daemon grants nothing new (0 on a clean
    start): a predecessor died (its socket was stale) or handed over with holders.
    """

    path: Path
    lock: IO[str]
    hold_new_for: float

    @property
    def handover_path(self) -> Path:
        return self.path.with_name(self.path.name + ".handover")

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.lock.close()


def claim_socket(path: Path, ttl: float) -> SocketClaim:
    """Make the socket's folder (0700), take its lock, and remove a stale socket.

    Raises:
        DaemonRefused: a live daemon holds the socket, or the folder cannot be made.
    """
    folder = path.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.stat().st_uid == os.getuid():
            folder.chmod(0o700)
        lock = open(path.with_name(path.name + ".lock"), "a")
    except OSError as exc:
        raise DaemonRefused(f"cannot use {folder}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise DaemonRefused(f"a live daemon already serves {path}") from None
    hold = 0.0
    if path.exists() or path.is_symlink():
        hold = ttl  # the predecessor died: its clients may come back to re-claim
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    handover = path.with_name(path.name + ".handover")
    with contextlib.suppress(OSError, ValueError):
        stopped = float(handover.read_text())
        hold = max(hold, min(ttl, stopped + ttl - time.time()))
    with contextlib.suppress(OSError):
        handover.unlink()
    return SocketClaim(path, lock, max(0.0, hold))


def peer_credentials(stream: anyio.abc.SocketStream) -> tuple[int, int]:
    """``(pid, uid)`` of the process at the other end of a Unix socket."""
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, _gid = _PEERCRED.unpack(data)
    return pid, uid


# -- sessions ---------------------------------------------------------------------------


_ENCODER = msgspec.msgpack.Encoder()


class _Held:
    """An allocation held for a session, with the busy spans the client opened."""

    __slots__ = ("alloc", "busy", "sent_quality")

    def __init__(self, alloc: Allocation) -> None:
        self.alloc = alloc
        self.busy: list[contextlib.AbstractContextManager[None]] = []
        self.sent_quality = alloc.quality


class _Waiting:
    """A request or growing resize in progress for a session."""

    __slots__ = ("label", "memory", "priority", "scope", "since", "workload")

    def __init__(
        self,
        workload: WorkloadType,
        priority: Priority,
        memory: int,
        label: str | None,
        since: float,
    ) -> None:
        self.workload = workload
        self.priority = priority
        self.memory = memory
        self.label = label
        self.since = since
        self.scope = anyio.CancelScope()


class Session:
    """One client connection: what it holds, what it waits for, what it is sent."""

    __slots__ = (
        "closed",
        "held",
        "host",
        "number",
        "pid",
        "sender",
        "snapshot_version",
        "task_group",
        "uid",
        "waiting",
    )

    def __init__(
        self, host: SessionHost, number: int, pid: int, uid: int, sender: FrameSender
    ) -> None:
        self.host = host
        self.number = number
        self.pid = pid
        self.uid = uid
        self.sender = sender
        self.held: dict[int, _Held] = {}
        self.waiting: dict[int, _Waiting] = {}
        self.snapshot_version = -1
        self.closed = False
        self.task_group: anyio.abc.TaskGroup | None = None

    def push(self, message: Any) -> None:
        """Send ``message`` (after the daemon's state, when it changed); never blocks."""
        if self.closed:
            return
        data = frame(_ENCODER.encode(message))
        host = self.host
        if self.snapshot_version != host.version:
            # State first: a client that reads a grant already sees it in state().
            self.snapshot_version = host.version
            data = host.snapshot_frame() + data
        self.sender.send(data)

    def send_snapshot(self) -> None:
        """Send the daemon's state if it changed since this session last got it."""
        host = self.host
        if not self.closed and self.snapshot_version != host.version:
            self.snapshot_version = host.version
            self.sender.send(host.snapshot_frame())

    def key_in_use(self, key: int) -> bool:
        return key in self.held or key in self.waiting


def _failure(key: int, exc: BaseException) -> Failed:
    if isinstance(exc, InsufficientMemory):
        return Failed(key, "insufficient_memory", [exc.requested, exc.available])
    if isinstance(exc, InsufficientQuality):
        return Failed(key, "insufficient_quality", [exc.minimum, exc.available])
    if isinstance(exc, AllocationTimeout):
        return Failed(key, "timeout", [exc.timeout])
    if isinstance(exc, ShuttingDown):
        return Failed(key, "shutting_down", [str(exc)])
    if isinstance(exc, TypeError):
        return Failed(key, "type", [str(exc)])
    if isinstance(exc, ValueError):
        return Failed(key, "value", [str(exc)])
    return Failed(key, "runtime", [str(exc)])


class SessionHost:
    """The daemon's use of the arbiter, on behalf of sessions (the arbiter's public API).

    Args:
        arbiter: the running arbiter.
        config: the daemon's config.
        probe: the arbiter's probe; when it has ``own_pids``, the sessions' pids are
            set there so that their GPU memory does not count as external.
        hold_new_for: seconds from now during which nothing new is granted (re-claims are).
    """

    def __init__(
        self,
        arbiter: Arbiter,
        config: DaemonConfig,
        *,
        probe: MemoryProbe | None = None,
        hold_new_for: float = 0.0,
    ) -> None:
        self.arbiter = arbiter
        self.config = config
        self.instance = uuid.uuid4().hex
        self.sessions: dict[int, Session] = {}
        self.version = 0
        self._probe = probe
        self._snapshot: tuple[int, bytes] | None = None
        self._stats: ArbiterStats = arbiter.stats()
        self.last_state = arbiter.state()  # for readers in other threads (metrics)
        self._stats_version = -1
        self._admit_new_at = anyio.current_time() + hold_new_for
        self._admit_new = anyio.Event()
        if hold_new_for <= 0:
            self._admit_new.set()
        self.on_grant: Callable[[Priority, float], None] | None = None

    # -- snapshots --------------------------------------------------------------

    def changed(self) -> None:
        self.version += 1

    def refresh_stats(self) -> None:
        self._stats = self.arbiter.stats()
        self._stats_version = self.version
        self.changed()

    @property
    def last_stats(self) -> ArbiterStats:
        """The stats last computed (every ``stats_interval``, or on a client's sync)."""
        return self._stats

    def stats_stale(self) -> bool:
        return self._stats_version != self.version

    def snapshot_frame(self) -> bytes:
        """The state now (and the last stats) as one frame, built once per version."""
        cached = self._snapshot
        if cached is not None and cached[0] == self.version:
            return cached[1]
        arbiter = self.arbiter
        recommended = [
            arbiter.recommended_quality(workload, priority)
            for workload in _WORKLOADS
            for priority in _PRIORITIES
        ]
        data = frame(_ENCODER.encode(Snapshot(arbiter.state(), recommended, self._stats)))
        self._snapshot = (self.version, data)
        return data

    # -- sessions ---------------------------------------------------------------

    def open(self, session: Session) -> None:
        self.sessions[session.number] = session
        self._update_pids()
        self.changed()

    def close(self, session: Session) -> None:
        """Release everything ``session`` holds and withdraw what it waits for. Idempotent."""
        if session.closed:
            return
        session.closed = True
        for waiting in session.waiting.values():
            waiting.scope.cancel()
        for held in session.held.values():
            self._drop(held)
        session.held.clear()
        self.sessions.pop(session.number, None)
        self._update_pids()
        self.changed()

    def _update_pids(self) -> None:
        probe = self._probe
        if probe is not None and hasattr(probe, "own_pids"):
            probe.own_pids = frozenset(s.pid for s in self.sessions.values())

    @staticmethod
    def _drop(held: _Held) -> None:
        while held.busy:
            held.busy.pop().__exit__(None, None, None)
        held.alloc.release()

    # -- operations -------------------------------------------------------------

    def handle(self, session: Session, message: ClientMessage) -> None:
        """Act on one decoded message from ``session``."""
        if isinstance(message, Ping):
            return  # any frame is a sign of life; the reader already counted it
        self.changed()
        if isinstance(message, Request):
            if session.key_in_use(message.key):
                session.push(Failed(message.key, "value", [f"key {message.key} is in use"]))
                return
            assert session.task_group is not None
            session.task_group.start_soon(self._request, session, message)
        elif isinstance(message, Release):
            held = session.held.pop(message.key, None)
            if held is not None:
                self._drop(held)
        elif isinstance(message, Withdraw):
            waiting = session.waiting.get(message.key)
            if waiting is not None:
                waiting.scope.cancel()
        elif isinstance(message, Resize):
            if session.key_in_use(message.key):
                session.push(Failed(message.key, "value", [f"key {message.key} is in use"]))
            elif message.alloc not in session.held:
                session.push(Failed(message.key, "runtime", [f"no allocation {message.alloc}"]))
            else:
                assert session.task_group is not None
                session.task_group.start_soon(self._resize, session, message)
        elif isinstance(message, Busy):
            held = session.held.get(message.key)
            if held is not None:
                if message.busy:
                    span = held.alloc.busy()
                    span.__enter__()
                    held.busy.append(span)
                elif held.busy:
                    held.busy.pop().__exit__(None, None, None)
        elif isinstance(message, Sync):
            assert session.task_group is not None
            session.task_group.start_soon(self._sync, session, message.key)
        else:
            assert isinstance(message, Status)
            session.push(self.status(message.key))

    async def _request(self, session: Session, message: Request) -> None:
        key = message.key
        try:
            workload = WorkloadType(message.workload)
            priority = Priority(message.priority)
        except ValueError as exc:
            session.push(Failed(key, "value", [str(exc)]))
            return
        started = anyio.current_time()
        waiting = _Waiting(workload, priority, message.memory, message.label, started)
        session.waiting[key] = waiting
        timeout: Any = DEFAULT if message.default_timeout else message.timeout
        alloc: Allocation | None = None
        try:
            with waiting.scope:
                if not self._admit_new.is_set():
                    timeout = await self._wait_admission(timeout)
                alloc = await self.arbiter.request_allocation(
                    workload,
                    priority,
                    message.memory,
                    min_memory=message.min_memory,
                    timeout=timeout,
                    min_quality=message.min_quality,
                    preemptible=message.preemptible,
                    keep_alive=message.keep_alive,
                    label=message.label,
                )
        except Exception as exc:  # any bad argument is that request's failure, never ours
            session.push(_failure(key, exc))
            return
        finally:
            session.waiting.pop(key, None)
            self.changed()
        if alloc is None:
            return  # withdrawn, or the session closed
        if session.closed:
            alloc.release()
            return
        held = _Held(alloc)
        session.held[key] = held
        session.push(Granted(key, alloc.id, alloc.memory, held.sent_quality, alloc.preempted))
        waited = anyio.current_time() - started
        if self.on_grant is not None:
            self.on_grant(priority, waited)
        log.info(
            "allocation granted",
            id=alloc.id,
            pid=session.pid,
            label=alloc.label,
            workload=workload.value,
            priority=priority.name.lower(),
            memory=alloc.memory,
            waited_s=round(waited, 6),
        )
        await self._watch(session, key, held)

    async def _sync(self, session: Session, key: int) -> None:
        # Tasks run in the order they were started: one checkpoint lets the requests
        # received before this Sync reach the arbiter (and park) before it is answered.
        await anyio.lowlevel.checkpoint()
        self.refresh_stats()
        session.push(Synced(key))

    async def _wait_admission(self, timeout: Any) -> Any:
        """Wait (a restarted daemon) until new grants are admitted; the timeout left."""
        limit = self.arbiter.config.allocation_timeout if timeout is DEFAULT else timeout
        started = anyio.current_time()
        with anyio.move_on_after(math.inf if limit is None else limit):
            await self._admit_new.wait()
        if not self._admit_new.is_set():
            assert limit is not None
            raise AllocationTimeout(limit)
        return None if limit is None else max(0.0, limit - (anyio.current_time() - started))

    async def admit_new_after_hold(self) -> None:
        """Open new grants once the hold of a restarted daemon is over."""
        await anyio.sleep_until(self._admit_new_at)
        self._admit_new.set()

    async def _watch(self, session: Session, key: int, held: _Held) -> None:
        """Push the allocation's preemption and quality changes until it is released."""
        alloc = held.alloc
        assert session.task_group is not None
        # Both watchers end when the allocation is released.
        session.task_group.start_soon(self._watch_preempted, session, key, held)
        async for quality in alloc.quality_changes():
            if quality != held.sent_quality and not session.closed:
                held.sent_quality = quality
                self.changed()
                session.push(Update(key, alloc.memory, quality, alloc.preempted))

    async def _watch_preempted(self, session: Session, key: int, held: _Held) -> None:
        alloc = held.alloc
        await alloc.wait_preempted()
        if alloc.preempted and not alloc.released and not session.closed:
            self.changed()
            session.push(Update(key, alloc.memory, alloc.quality, True))
            log.info("allocation preempted", id=alloc.id, pid=session.pid, memory=alloc.memory)

    async def _resize(self, session: Session, message: Resize) -> None:
        held = session.held[message.alloc]
        alloc = held.alloc
        waiting = _Waiting(
            alloc.workload, alloc.priority, message.memory, alloc.label, anyio.current_time()
        )
        session.waiting[message.key] = waiting
        timeout: Any = DEFAULT if message.default_timeout else message.timeout
        try:
            with waiting.scope:
                await alloc.resize(message.memory, timeout=timeout)
        except Exception as exc:
            session.push(_failure(message.key, exc))
            return
        finally:
            session.waiting.pop(message.key, None)
            self.changed()
        if waiting.scope.cancelled_caught:
            return
        held.sent_quality = alloc.quality
        session.push(Resized(message.key, alloc.memory, alloc.quality))

    async def reclaim(self, session: Session, reclaim: Reclaim) -> None:
        """Admit an allocation a client held with this daemon's predecessor, if it fits."""
        try:
            alloc = await self.arbiter.request_allocation(
                WorkloadType(reclaim.workload),
                Priority(reclaim.priority),
                reclaim.memory,
                min_memory=reclaim.min_memory if reclaim.min_memory != reclaim.memory else None,
                timeout=0,
                preemptible=reclaim.preemptible,
                keep_alive=reclaim.keep_alive,
                label=reclaim.label,
            )
        except Exception:
            session.push(Reclaimed(reclaim.key, None, 0.0))
            return
        if session.key_in_use(reclaim.key) or alloc.memory != reclaim.memory:
            alloc.release()
            session.push(Reclaimed(reclaim.key, None, 0.0))
            return
        held = _Held(alloc)
        for _ in range(max(0, reclaim.busy)):
            span = alloc.busy()
            span.__enter__()
            held.busy.append(span)
        session.held[reclaim.key] = held
        session.push(Reclaimed(reclaim.key, alloc.id, held.sent_quality))
        log.info("allocation reclaimed", id=alloc.id, pid=session.pid, memory=alloc.memory)
        assert session.task_group is not None
        session.task_group.start_soon(self._watch, session, reclaim.key, held)

    # -- status -------------------------------------------------------------------

    def status(self, key: int) -> StatusReply:
        now = anyio.current_time()
        holders: list[HolderInfo] = []
        waiters: list[WaiterInfo] = []
        for session in self.sessions.values():
            for held in session.held.values():
                alloc = held.alloc
                holders.append(
                    HolderInfo(
                        id=alloc.id,
                        pid=session.pid,
                        label=alloc.label,
                        workload=alloc.workload.value,
                        priority=alloc.priority.name.lower(),
                        memory=alloc.memory,
                        quality=alloc.quality,
                        busy=bool(held.busy),
                        age_s=max(0.0, now - alloc.created_at),
                    )
                )
            for wkey, waiting in session.waiting.items():
                waiters.append(
                    WaiterInfo(
                        id=f"{session.pid}/{wkey}",
                        pid=session.pid,
                        label=waiting.label,
                        workload=waiting.workload.value,
                        priority=waiting.priority.name.lower(),
                        memory=waiting.memory,
                        waited_s=max(0.0, now - waiting.since),
                    )
                )
        return StatusReply(key, holders, waiters)


# -- the server -----------------------------------------------------------------------


_DECODER = msgspec.msgpack.Decoder(ClientMessage)
_VERSION_DECODER = msgspec.msgpack.Decoder(Version)
_HELLO_DECODER = msgspec.msgpack.Decoder(Hello)


class Daemon:
    """Serves one `SessionHost` on a listening Unix socket."""

    def __init__(self, host: SessionHost) -> None:
        self.host = host
        self._numbers = iter(range(1, 1 << 62))
        self._streams: dict[int, anyio.abc.SocketStream] = {}

    @property
    def _ttl(self) -> float:
        return self.host.config.ttl

    async def handle_connection(self, stream: anyio.abc.SocketStream) -> None:
        """Serve one connection until it closes, goes silent past the ttl or misbehaves."""
        async with stream:
            try:
                pid, uid = peer_credentials(stream)
            except OSError:
                return
            config = self.host.config
            if uid != os.getuid() and uid not in config.allow_uids:
                log.warning("session refused", pid=pid, uid=uid)
                goodbye = Refused("uid", f"uid {uid} is not allowed by this daemon")
                with contextlib.suppress(Exception):
                    await stream.send(frame(msgspec.msgpack.encode(goodbye)))
                return
            buffer = FrameBuffer()
            received = await self._receive_hello(stream, buffer, pid)
            if received is None:
                return
            hello, early = received
            welcome = Welcome(
                PROTOCOL_VERSION, self.host.instance, self._ttl, self.host.arbiter.config
            )
            try:
                await stream.send(frame(msgspec.msgpack.encode(welcome)))
            except (anyio.BrokenResourceError, OSError):
                return
            # Only now is the session known to the rest of the daemon: nothing may be
            # sent on it before the welcome.
            session = Session(self.host, next(self._numbers), pid, uid, FrameSender(stream))
            self.host.open(session)
            self._streams[session.number] = stream
            log.info(
                "session opened", session=session.number, pid=pid, reclaims=len(hello.reclaims)
            )
            reason = "closed"
            try:
                async with anyio.create_task_group() as tasks:
                    session.task_group = tasks
                    for reclaim in hello.reclaims:
                        if hello.previous == self.host.instance:
                            # This daemon ended that session (it was silent): nothing
                            # of it may come back.
                            session.push(Reclaimed(reclaim.key, None, 0.0))
                        else:
                            await self.host.reclaim(session, reclaim)
                    tasks.start_soon(session.sender.run)
                    reason = await self._read(session, stream, buffer, early)
                    if reason in ("expired", "bad_input"):
                        with anyio.move_on_after(self._ttl):
                            await session.sender.flush()
                    tasks.cancel_scope.cancel()
            except Exception as exc:  # a bug serving one session must not end the others
                reason = "failed"
                log.error("session failed", session=session.number, pid=pid, exc_info=exc)
            finally:
                self.host.close(session)
                self._streams.pop(session.number, None)
                event = "session expired" if reason == "expired" else "session closed"
                log.info(event, session=session.number, pid=pid, reason=reason)

    async def _receive_hello(
        self, stream: anyio.abc.SocketStream, buffer: FrameBuffer, pid: int
    ) -> tuple[Hello, list[bytes]] | None:
        """The client's hello and any frames it sent behind it, or ``None`` (refused)."""
        frames: list[bytes] = []
        with anyio.move_on_after(self._ttl):
            try:
                while not frames:
                    frames = buffer.feed(await stream.receive(_RECEIVE_BYTES))
            except FrameError as exc:
                log.warning("session refused", pid=pid, reason=str(exc))
                return None
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return None
        if not frames:
            log.warning("session refused", pid=pid, reason="no hello")
            return None
        try:
            version = _VERSION_DECODER.decode(frames[0]).version
        except msgspec.MsgspecError:
            version = -1
        problem = None
        hello = None
        if version != PROTOCOL_VERSION:
            problem = Refused(
                "version", f"the daemon speaks protocol {PROTOCOL_VERSION}, the client {version}"
            )
        else:
            try:
                hello = _HELLO_DECODER.decode(frames[0])
            except msgspec.MsgspecError as exc:
                problem = Refused("bad_input", f"bad hello: {exc}")
        if problem is not None:
            log.warning("session refused", pid=pid, reason=problem.message)
            with contextlib.suppress(Exception):
                await stream.send(frame(msgspec.msgpack.encode(problem)))
            return None
        assert hello is not None
        return hello, frames[1:]

    async def _read(
        self,
        session: Session,
        stream: anyio.abc.SocketStream,
        buffer: FrameBuffer,
        pending: list[bytes],
    ) -> str:
        """Read and act on frames; returns why the session ends."""
        host = self.host
        while True:
            for data in pending:
                try:
                    message = _DECODER.decode(data)
                except msgspec.MsgspecError as exc:
                    session.push(Error(f"bad frame: {exc}"))
                    continue
                try:
                    host.handle(session, message)
                except Exception as exc:
                    session.push(Error(f"bad request: {type(exc).__name__}: {exc}"))
            chunk = b""
            with anyio.move_on_after(self._ttl):
                try:
                    chunk = await stream.receive(_RECEIVE_BYTES)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return "closed"
            if not chunk:
                session.push(Goodbye("expired", f"silent for {self._ttl:g} s (the ttl)"))
                return "expired"
            try:
                pending = buffer.feed(chunk)
            except FrameError as exc:
                session.push(Goodbye("bad_input", str(exc)))
                return "bad_input"

    async def tick(self) -> None:
        """Send changed state to idle sessions; refresh the stats now and then."""
        host = self.host
        config = host.config
        last_state = host.arbiter.state()
        next_stats = anyio.current_time() + config.stats_interval
        while True:
            await anyio.sleep(config.snapshot_interval)
            state = host.last_state = host.arbiter.state()
            if state != last_state:
                last_state = state
                host.changed()
            if anyio.current_time() >= next_stats:
                next_stats = anyio.current_time() + config.stats_interval
                if host.stats_stale():
                    host.refresh_stats()
            for session in list(host.sessions.values()):
                session.send_snapshot()

    async def close_all(self) -> None:
        """End every session (their allocations released) and close their sockets."""
        for session in list(self.host.sessions.values()):
            self.host.close(session)
        for stream in list(self._streams.values()):
            with contextlib.suppress(Exception):
                await stream.aclose()


@contextlib.contextmanager
def _removing(path: Path) -> Iterator[None]:
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def serve(
    claim: SocketClaim,
    arbiter: Arbiter,
    config: DaemonConfig,
    probe: MemoryProbe | None = None,
    on_host: Callable[[SessionHost], None] | None = None,
    *,
    task_status: anyio.abc.TaskStatus[SessionHost] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``arbiter`` (already entered) on the claimed socket until cancelled.

    On the way out it ends every session, records a handover when allocations were
    held (so that a daemon restarted within the ttl waits for their re-claims), and
    removes its socket.
    """
    host = SessionHost(arbiter, config, probe=probe, hold_new_for=claim.hold_new_for)
    if on_host is not None:
        on_host(host)
    daemon = Daemon(host)
    listener = await anyio.create_unix_listener(claim.path, mode=0o600)
    log.info(
        "daemon started",
        socket=str(claim.path),
        pid=os.getpid(),
        budget=arbiter.config.vram_budget,
        ttl=config.ttl,
        hold_new_s=round(claim.hold_new_for, 3),
    )
    try:
        with _removing(claim.path):
            async with listener, anyio.create_task_group() as tasks:
                tasks.start_soon(daemon.tick)
                tasks.start_soon(host.admit_new_after_hold)
                tasks.start_soon(listener.serve, daemon.handle_connection)
                task_status.started(host)
    finally:
        with anyio.CancelScope(shield=True):
            held = any(session.held for session in host.sessions.values())
            if held:
                with contextlib.suppress(OSError):
                    claim.handover_path.write_text(repr(time.time()))
            await daemon.close_all()
        log.info("daemon stopped", socket=str(claim.path), handover=held)
