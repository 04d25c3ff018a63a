"""The daemon: one real `Arbiter` served to other processes on a Unix socket.

A connection is a session (`._sessions`, where `SessionHost` drives the arbiter). This
module is the server around it: the socket and its lock, peer credentials, the
handshake, frames in, the ttl, and the way out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from .._arbiter import Arbiter
from .._gpu import MemoryProbe
from .._log import log
from .._types import Priority, WorkloadType
from ._sessions import DaemonConfig, Session, SessionHost
from ._wire import (
    PROTOCOL_VERSION,
    ClientMessage,
    Error,
    FrameBuffer,
    FrameError,
    FrameSender,
    Goodbye,
    Hello,
    Reclaimed,
    Refused,
    Version,
    Welcome,
    default_socket_path,
    frame,
)

__all__ = ["DaemonConfig", "DaemonRefused", "SessionHost", "SocketClaim", "claim_socket", "serve"]

_PEERCRED = struct.Struct("3i")
_RECEIVE_BYTES = 65536
# What a full process or system (file descriptors, kernel memory) makes accept() fail
# with: the listener is fine, and a connection that ends makes room again.
_OUT_OF_ROOM = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_RETRY = 0.1  # seconds between tries while out of room
_MAX_REASON = 300  # characters of an error's text sent back (msgspec's quote the input)
_WORKLOADS = tuple(WorkloadType)
_PRIORITIES = tuple(Priority)


class DaemonRefused(Exception):
    """The daemon cannot start (a live daemon serves the socket, a bad folder): one line."""


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


def _is_stale_socket(path: Path) -> bool:
    """Whether a socket is at ``path`` (False: nothing is).

    Raises:
        DaemonRefused: something else is there (a file, a folder, a link), which the
            daemon never removes; or the path cannot be read.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise DaemonRefused(f"cannot use {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        raise DaemonRefused(f"{path} is there and is not a socket: not replacing it")
    return True


def claim_socket(path: Path, ttl: float) -> SocketClaim:
    """Make the socket's folder (0700), take its lock, and remove a stale socket.

    Call it last before serving: a stale socket, and the handover a predecessor left,
    are how a restart knows to wait for re-claims, and they are gone once claimed.

    Raises:
        DaemonRefused: a live daemon holds the socket, the folder cannot be made, or
            something other than a socket is at the path (it is never removed).
    """
    folder = path.parent
    _is_stale_socket(path)  # before anything is made beside what is not ours
    try:
        # A folder made here, or the default one, is 0700 (mkdir's mode passes through
        # the umask). Any other folder is the user's: never chmod it (`--socket
        # /tmp/x.sock` as root would close /tmp to everyone else).
        ours = not folder.exists() or folder == default_socket_path().parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if ours and folder.stat().st_uid == os.getuid():
            folder.chmod(0o700)
        lock = open(path.with_name(path.name + ".lock"), "a")
    except OSError as exc:
        raise DaemonRefused(f"cannot use {folder}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise DaemonRefused(f"a live daemon already serves {path}") from None
    try:
        stale = _is_stale_socket(path)  # again, under the lock
        if stale:
            path.unlink(missing_ok=True)
    except DaemonRefused:
        lock.close()
        raise
    except OSError as exc:
        lock.close()
        raise DaemonRefused(
            f"cannot replace the stale socket {path}: {exc.strerror or exc}"
        ) from None
    # A predecessor died: its clients may come back to re-claim.
    hold = ttl if stale else 0.0
    handover = path.with_name(path.name + ".handover")
    with contextlib.suppress(OSError, ValueError):
        stopped = float(handover.read_text())
        hold = max(hold, min(ttl, stopped + ttl - time.time()))
    with contextlib.suppress(OSError):
        handover.unlink()
    return SocketClaim(path, lock, max(0.0, hold))


def _reason(exc: BaseException) -> str:
    """An error's text, short enough to send back whatever input it quotes."""
    text = str(exc)
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


async def _refuse(stream: anyio.abc.SocketStream, refusal: Refused, **logged: object) -> None:
    """Log a refused session and tell its client why, if it still listens."""
    log.warning("session refused", **logged)
    with contextlib.suppress(Exception):
        await stream.send(frame(msgspec.msgpack.encode(refusal)))


def peer_credentials(stream: anyio.abc.SocketStream) -> tuple[int, int]:
    """``(pid, uid)`` of the process at the other end of a Unix socket."""
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, _gid = _PEERCRED.unpack(data)
    return pid, uid


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
        self._connections = 0  # open, a session yet or not

    @property
    def _ttl(self) -> float:
        return self.host.config.ttl

    async def accept(self, listener: anyio.abc.SocketListener) -> None:
        """Serve each connection the listener accepts, until cancelled.

        A process out of file descriptors (or a system out of memory for sockets) makes
        accepting fail until a connection ends: it waits and tries again, as trio's
        ``serve_listeners`` does, and the sessions it has go on.
        """
        async with anyio.create_task_group() as tasks:
            out_of_room = False
            while True:
                try:
                    stream = await listener.accept()
                except (anyio.BrokenResourceError, OSError) as exc:
                    cause = exc if isinstance(exc, OSError) else exc.__cause__
                    if not isinstance(cause, OSError) or cause.errno not in _OUT_OF_ROOM:
                        raise
                    if not out_of_room:
                        log.warning("cannot accept connections", reason=cause.strerror)
                        out_of_room = True
                    await anyio.sleep(_ACCEPT_RETRY)
                    continue
                out_of_room = False
                tasks.start_soon(self.handle_connection, stream)

    async def handle_connection(self, stream: anyio.abc.SocketStream) -> None:
        """Serve one connection until it closes, goes silent past the ttl or misbehaves."""
        self._connections += 1
        try:
            async with stream:
                await self._serve_connection(stream)
        finally:
            self._connections -= 1

    async def _serve_connection(self, stream: anyio.abc.SocketStream) -> None:
        try:
            pid, uid = peer_credentials(stream)
        except OSError:
            return
        config = self.host.config
        if uid != os.getuid() and uid not in config.allow_uids:
            refusal = Refused("uid", f"uid {uid} is not allowed by this daemon")
            await _refuse(stream, refusal, pid=pid, uid=uid)
            return
        if self._connections > config.max_connections:
            refusal = Refused(
                "busy", f"the daemon serves at most {config.max_connections} connections"
            )
            await _refuse(stream, refusal, pid=pid, reason="too many connections")
            return
        buffer = FrameBuffer()
        received = await self._receive_hello(stream, buffer, pid)
        if received is None:
            return
        hello, early = received
        welcome = Welcome(PROTOCOL_VERSION, self.host.instance, self._ttl, self.host.arbiter.config)
        try:
            await stream.send(frame(msgspec.msgpack.encode(welcome)))
        except (anyio.BrokenResourceError, OSError):
            return
        # Only now is the session known to the rest of the daemon: nothing may be
        # sent on it before the welcome.
        session = Session(self.host, next(self._numbers), pid, uid, FrameSender(stream))
        self.host.open(session)
        self._streams[session.number] = stream
        log.info("session opened", session=session.number, pid=pid, reclaims=len(hello.reclaims))
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
                problem = Refused("bad_input", f"bad hello: {_reason(exc)}")
        if problem is not None:
            await _refuse(stream, problem, pid=pid, reason=problem.message)
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
        ttl = self._ttl
        # One scope for the session's silence: each receive moves its deadline on.
        with anyio.CancelScope() as silence:
            while True:
                for data in pending:
                    if session.sender.closed:  # cut off: nothing it asks is answered
                        return "closed"
                    try:
                        message = _DECODER.decode(data)
                    except msgspec.MsgspecError as exc:
                        session.push(Error(f"bad frame: {_reason(exc)}"))
                        continue
                    try:
                        host.handle(session, message)
                    except Exception as exc:
                        session.push(Error(f"bad request: {type(exc).__name__}: {_reason(exc)}"))
                silence.deadline = anyio.current_time() + ttl
                try:
                    chunk = await stream.receive(_RECEIVE_BYTES)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return "closed"
                try:
                    pending = buffer.feed(chunk)
                except FrameError as exc:
                    session.push(Goodbye("bad_input", str(exc)))
                    return "bad_input"
        session.push(Goodbye("expired", f"silent for {ttl:g} s (the ttl)"))
        return "expired"

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
        async with listener, anyio.create_task_group() as tasks:
            tasks.start_soon(daemon.tick)
            tasks.start_soon(host.admit_new_after_hold)
            tasks.start_soon(daemon.accept, listener)
            task_status.started(host)
    finally:
        # No longer accepting: record the handover (before anyone can start in our
        # place), end the sessions, remove the socket.
        with anyio.CancelScope(shield=True):
            held = any(session.held for session in host.sessions.values())
            if held:
                with contextlib.suppress(OSError):
                    await anyio.Path(claim.handover_path).write_text(repr(time.time()))
            await daemon.close_all()
            with contextlib.suppress(FileNotFoundError):
                await anyio.Path(claim.path).unlink()
        log.info("daemon stopped", socket=str(claim.path), handover=held)
