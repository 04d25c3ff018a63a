"""The wire format: frames, their limit, the codec's validation, the default socket path,
and a daemon speaking another protocol version seen from the client."""

from __future__ import annotations

import struct
from pathlib import Path

import anyio
import anyio.abc
import msgspec
import pytest

from arbiter import ArbiterConfig, ArbiterUnavailable, RemoteArbiter
from arbiter.remote._wire import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    ClientMessage,
    FrameBuffer,
    FrameError,
    Refused,
    Release,
    Request,
    Welcome,
    default_socket_path,
    frame,
)


def test_frames_are_cut_whole_across_chunks() -> None:
    data = frame(b"abc") + frame(b"") + frame(b"x" * 1000)
    buffer = FrameBuffer()
    got: list[bytes] = []
    for i in range(0, len(data), 7):
        got += buffer.feed(data[i : i + 7])
    assert got == [b"abc", b"", b"x" * 1000]
    assert buffer.pending == 0


def test_a_frame_over_the_limit_is_refused_before_it_is_buffered() -> None:
    with pytest.raises(FrameError, match="exceeds"):
        FrameBuffer().feed(struct.pack("!I", MAX_FRAME + 1))
    assert FrameBuffer().feed(struct.pack("!I", MAX_FRAME)) == []  # at the limit: waits
    with pytest.raises(FrameError):
        frame(b"x" * (MAX_FRAME + 1))


def test_the_codec_validates_types() -> None:
    decoder = msgspec.msgpack.Decoder(ClientMessage)
    request = Request(1, "llm_inference", 1, 5, None, None, True, None, True, None, "x")
    assert decoder.decode(msgspec.msgpack.encode(request)) == request
    assert decoder.decode(msgspec.msgpack.encode(Release(3))) == Release(3)
    for bad in (["Request", 1, "llm_inference", 1, "5"], ["Nope"], {"key": 1}, [1, 2]):
        with pytest.raises(msgspec.ValidationError):
            decoder.decode(msgspec.msgpack.encode(bad))


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_socket_path(1) == Path("/run/user/1000/gpu-arbiter/gpu1.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_path().name == "gpu0.sock"
    assert default_socket_path().parent.name.startswith("gpu-arbiter-")


@pytest.mark.anyio
@pytest.mark.parametrize(
    "answer",
    [
        Welcome(PROTOCOL_VERSION + 1, "x", 10.0, ArbiterConfig()),
        Refused("version", "the daemon speaks protocol 2, the client 1"),
        {"version": 9, "unknown": True},
    ],
    ids=["newer", "refused", "unreadable"],
)
async def test_a_daemon_of_another_version_is_a_clear_unavailable(
    tmp_path: Path, answer: object
) -> None:
    sock = tmp_path / "v.sock"

    async def answer_hello(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(frame(msgspec.msgpack.encode(answer)))

    async with await anyio.create_unix_listener(sock) as listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, answer_hello)
        with pytest.raises(ArbiterUnavailable, match="protocol"):
            async with RemoteArbiter(sock):
                pass
        tg.cancel_scope.cancel()
