"""The daemon's wire format: length-prefixed msgpack frames of msgspec structs.

A frame is a 4-byte big-endian length and that many bytes of msgpack, at most
`MAX_FRAME` bytes. The first frame each way is a handshake (`Hello`, answered by
`Welcome` or `Goodbye`), encoded as a map so that any version can read the other's
``version``; every later frame is one member of a tagged union (`ClientMessage`
from a client, `DaemonMessage` from the daemon), encoded as an array for speed.
Decoding validates types: a frame of the wrong shape is a `msgspec.ValidationError`.

Keys: a client numbers its requests itself (``key``, an int); a granted request's
key then names its allocation within that session. Keys live in the session's own
table, so no session can name another session's allocation.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from pathlib import Path
from typing import TypeAlias

import anyio
import anyio.abc
import msgspec

from .._backend import current_backend
from .._config import ArbiterConfig
from .._stats import ArbiterState, ArbiterStats

__all__ = [
    "HEADER",
    "MAX_FRAME",
    "MAX_OUTBOX",
    "PROTOCOL_VERSION",
    "Busy",
    "ClientMessage",
    "DaemonMessage",
    "Error",
    "Failed",
    "FrameBuffer",
    "FrameError",
    "FrameSender",
    "Goodbye",
    "Granted",
    "HandshakeReply",
    "Hello",
    "HolderInfo",
    "Ping",
    "Reclaim",
    "Reclaimed",
    "Refused",
    "Release",
    "Request",
    "Resize",
    "Resized",
    "Snapshot",
    "Status",
    "StatusReply",
    "Sync",
    "Synced",
    "Update",
    "Version",
    "WaiterInfo",
    "Welcome",
    "Withdraw",
    "default_socket_path",
    "frame",
]

PROTOCOL_VERSION = 2
MAX_FRAME = 1 << 20  # 1 MiB: a bigger frame is bad input, never buffered
# What may wait to be sent to a peer that does not read: past it the peer is cut off
# (its session ends), so a client that stops reading cannot grow the daemon's memory.
MAX_OUTBOX = 8 * MAX_FRAME
HEADER = struct.Struct("!I")


def default_socket_path(device: int | str = 0) -> Path:
    """``$XDG_RUNTIME_DIR/gpu-arbiter/gpu<device>.sock``, else
    ``/tmp/gpu-arbiter-<uid>/gpu<device>.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(runtime) / "gpu-arbiter" if runtime else Path(f"/tmp/gpu-arbiter-{os.getuid()}")
    return folder / f"gpu{device}.sock"


# -- the handshake (maps: readable across versions) ----------------------------


class Reclaim(msgspec.Struct, frozen=True):
    """An allocation a client held with a daemon that went away, asked back."""

    key: int
    workload: str
    priority: int
    memory: int
    min_memory: int | None
    preemptible: bool
    keep_alive: float | None
    label: str | None
    busy: int


class Hello(msgspec.Struct, frozen=True):
    """A client's first frame. ``previous`` names the daemon instance it last spoke to."""

    version: int
    previous: str | None = None
    reclaims: list[Reclaim] = []


class Welcome(msgspec.Struct, frozen=True, tag=True):
    """The daemon's answer to a good `Hello`."""

    version: int
    instance: str
    ttl: float
    config: ArbiterConfig


class Refused(msgspec.Struct, frozen=True, tag=True):
    """The daemon's answer to a `Hello` it will not serve (or to a connection past its
    ``max_connections``): ``reason`` is ``version``, ``uid``, ``bad_input`` or ``busy``;
    ``message`` says it to a person."""

    reason: str
    message: str


HandshakeReply: TypeAlias = Welcome | Refused


class Version(msgspec.Struct):
    """What any version's handshake frame has: its version (other fields ignored)."""

    version: int = -1


# -- client to daemon -------------------------------------------------------------


class Request(msgspec.Struct, frozen=True, tag=True, array_like=True):
    key: int
    workload: str
    priority: int
    memory: int
    min_memory: int | None
    timeout: float | None
    default_timeout: bool
    min_quality: float | None
    preemptible: bool
    keep_alive: float | None
    label: str | None


class Withdraw(msgspec.Struct, frozen=True, tag=True, array_like=True):
    key: int  # a waiting request or a growing resize


class Release(msgspec.Struct, frozen=True, tag=True, array_like=True):
    key: int


class Resize(msgspec.Struct, frozen=True, tag=True, array_like=True):
    key: int  # of this resize call: its answer and its withdrawal
    alloc: int
    memory: int
    timeout: float | None
    default_timeout: bool


class Busy(msgspec.Struct, frozen=True, tag=True, array_like=True):
    key: int
    busy: bool


class Ping(msgspec.Struct, frozen=True, tag=True, array_like=True):
    pass


class Sync(msgspec.Struct, frozen=True, tag=True, array_like=True):
    key: int


class Status(msgspec.Struct, frozen=True, tag=True, array_like=True):
    key: int


ClientMessage: TypeAlias = Request | Withdraw | Release | Resize | Busy | Ping | Sync | Status

# -- daemon to client -------------------------------------------------------------


class Snapshot(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """The daemon's state now; stats only when fresh ones were computed."""

    state: ArbiterState
    recommended: list[float]  # by workload (declaration order) x priority (ascending)
    stats: ArbiterStats | None = None


class Granted(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """A request's grant; ``number`` makes the allocation's id (``alloc-<number>``)."""

    key: int
    number: int
    memory: int
    quality: float
    preempted: bool


class Failed(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """A request, resize or query failed: ``error`` names the exception, ``args`` its
    arguments."""

    key: int
    error: str
    args: list[float | int | str]


class Resized(msgspec.Struct, frozen=True, tag=True, array_like=True):
    key: int
    memory: int
    quality: float


class Update(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """An allocation's figures changed: its quality target, a preemption request."""

    key: int
    memory: int
    quality: float
    preempted: bool


class Reclaimed(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """The answer to one `Reclaim`: ``number`` is the allocation's number with this
    daemon, or ``None`` when it could not be admitted."""

    key: int
    number: int | None
    quality: float


class Synced(msgspec.Struct, frozen=True, tag=True, array_like=True):
    key: int


class HolderInfo(msgspec.Struct, frozen=True):
    id: str
    pid: int
    label: str | None
    workload: str
    priority: str
    memory: int
    quality: float
    busy: bool
    age_s: float


class WaiterInfo(msgspec.Struct, frozen=True):
    id: str
    pid: int
    label: str | None
    workload: str
    priority: str
    memory: int
    waited_s: float


class StatusReply(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """Holders, then waiters, in the order they are granted; ``omitted``: how many of
    the last were left out to fit the reply in one frame."""

    key: int
    holders: list[HolderInfo]
    waiters: list[WaiterInfo]
    omitted: int = 0


class Goodbye(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """The daemon ends the session: ``reason`` is ``expired`` or ``bad_input``."""

    reason: str
    message: str


class Error(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """Bad input that named no request: said, and otherwise ignored."""

    message: str


DaemonMessage: TypeAlias = (
    Snapshot
    | Granted
    | Failed
    | Resized
    | Update
    | Reclaimed
    | Synced
    | StatusReply
    | Error
    | Goodbye
)


# -- frames -------------------------------------------------------------------------


class FrameError(Exception):
    """The byte stream is not a sequence of frames (a length over `MAX_FRAME`)."""


def frame(payload: bytes) -> bytes:
    """``payload`` with its length in front.

    Raises:
        FrameError: ``payload`` is longer than `MAX_FRAME`.
    """
    if len(payload) > MAX_FRAME:
        raise FrameError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(payload)) + payload


class FrameBuffer:
    """Cuts received bytes into frames; keeps a partial frame for the next chunk."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every frame now complete, in order.

        Raises:
            FrameError: a frame announces more than `MAX_FRAME` bytes.
        """
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        start = 0
        end = len(buffer)
        while end - start >= 4:
            (length,) = HEADER.unpack_from(buffer, start)
            if length > MAX_FRAME:
                raise FrameError(f"frame of {length} bytes exceeds {MAX_FRAME}")
            if end - start - 4 < length:
                break
            frames.append(bytes(buffer[start + 4 : start + 4 + length]))
            start += 4 + length
        if start:
            del buffer[:start]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buffer)


class FrameSender:
    """Sends frames on a socket stream in order, from sync code too.

    A frame goes straight to the socket when nothing is queued (a Unix socket takes a
    small frame whole, without a hop through another task); what the socket does not
    take is queued for `run`, the writer task, and later frames queue behind it. A peer
    that lets more than `MAX_OUTBOX` bytes queue up is disconnected.
    """

    __slots__ = (
        "_busy",
        "_clock",
        "_outbox",
        "_queued",
        "_sock",
        "_stream",
        "_wake",
        "closed",
        "last_sent",
    )

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self._stream = stream
        self._sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        self._outbox: list[bytes] = []
        self._queued = 0  # bytes in the outbox
        self._busy = False
        self._wake = anyio.Event()
        self.closed = False
        # The loop's clock, which a call from outside its tasks (a callback from
        # another thread) can read too.
        self._clock = current_backend().loop().clock
        self.last_sent = self._clock()

    def send(self, data: bytes) -> None:
        """Send or queue ``data``; never blocks. A broken socket marks the sender closed
        (the reader sees the end of the stream)."""
        if self.closed:
            return
        self.last_sent = self._clock()
        if not self._outbox and not self._busy:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.closed = True
                return
            if sent == len(data):
                return
            data = data[sent:]
        self._outbox.append(data)
        self._queued += len(data)
        if self._queued > MAX_OUTBOX:
            self._cut_off()
            return
        self._wake.set()

    def _cut_off(self) -> None:
        """The peer does not read: drop what waits and end the connection, so its
        reader sees the end of the stream and the session ends."""
        self.closed = True
        self._outbox.clear()
        self._queued = 0
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._wake.set()

    async def run(self) -> None:
        """Send what is queued, until the socket breaks or the task is cancelled."""
        while not self.closed:
            if not self._outbox:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            await self._send_queued()

    async def flush(self) -> None:
        """Send what is queued now (a goodbye before the connection closes)."""
        if self._outbox and not self._busy:
            await self._send_queued()

    async def _send_queued(self) -> None:
        data = b"".join(self._outbox)
        self._outbox.clear()
        self._queued = 0
        self._busy = True
        try:
            await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.closed = True
        finally:
            self._busy = False
