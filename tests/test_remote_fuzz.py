"""Bad input: random and malformed frames thrown at the daemon while a well-behaved
client keeps its allocation; the daemon answers or closes only the offending session."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from remote_helpers import LINUX_ONLY, Client, daemon, daemon_log, status_json

from arbiter import GiB
from arbiter.remote._wire import MAX_FRAME, PROTOCOL_VERSION, Hello, frame

pytestmark = [LINUX_ONLY, pytest.mark.real_processes]

HOLD = """
async def main():
    async with RemoteArbiter(SOCK) as arbiter:
        alloc = await arbiter.request_allocation("llm_inference", "normal", 4 * GiB)
        say("granted", alloc.id)
        await line()
        await arbiter.refresh()
        say("still", alloc.id, alloc.released, alloc.preempted, arbiter.state().vram_used)
        alloc.release()
anyio.run(main)
"""


@pytest.fixture
def holder_and_socket(tmp_path: Path) -> Iterator[tuple[Client, Path]]:
    sock = tmp_path / "fuzz.sock"
    with daemon(sock, "--ttl", "5") as proc:
        holder = Client(sock, HOLD)
        try:
            yield holder, sock
        finally:
            holder.close()
        assert proc.poll() is None, "the daemon died"
    log = daemon_log(sock).read_text()
    assert "session failed" not in log and "Traceback" not in log, log
    assert "session refused" in log and "exceeds" in log


def _connect(sock: Path) -> socket.socket:
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(5)
    raw.connect(str(sock))
    return raw


def _hello() -> bytes:
    return frame(msgspec.msgpack.encode(Hello(PROTOCOL_VERSION)))


def _drain(raw: socket.socket) -> None:
    with contextlib.suppress(OSError):
        raw.settimeout(0.05)
        while raw.recv(65536):
            pass


def _garbage(rng: random.Random) -> bytes:
    """One malformed thing: a frame of the wrong shape, or bytes that are no frame."""
    enc = msgspec.msgpack.encode
    key = rng.randrange(1, 6)
    # fmt: off
    choices: list[Any] = [
        lambda: frame(rng.randbytes(rng.randrange(0, 64))),
        lambda: frame(enc(["Nope", 1, 2])),
        lambda: frame(
            enc(
                [
                    "Request",
                    key,
                    "llm_inference",
                    1,
                    "lots",
                    None,
                    None,
                    True,
                    None,
                    True,
                    None,
                    None,
                ]
            )
        ),
        lambda: frame(
            enc(
                ["Request", key, "llm_inference", 99, GiB, None, None, True, None, True, None, None]
            )
        ),
        lambda: frame(
            enc(["Request", key, "nope", 1, -5, None, None, True, None, True, None, None])
        ),
        lambda: frame(
            enc(
                [
                    "Request",
                    key,
                    "llm_inference",
                    1,
                    2 * GiB,
                    3 * GiB,
                    -1.0,
                    False,
                    float("nan"),
                    True,
                    -3.0,
                    None,
                ]
            )
        ),
        lambda: frame(enc(["Release", key])),
        lambda: frame(enc(["Release", "alloc-1"])),
        lambda: frame(enc(["Withdraw", key])),
        lambda: frame(enc(["Resize", key, key, 0, None, True])),
        lambda: frame(enc(["Resize", key + 10, 1, 20 * GiB, 0.0, False])),
        lambda: frame(enc(["Busy", key, False])),
        lambda: frame(enc(["Busy", key, True])),
        lambda: frame(enc(["Status", 2**64 - 1])),
        lambda: frame(b"\x92\xa6Status\xcf" + b"\xff" * 8),
        lambda: frame(enc({"op": "Request"})),
        lambda: frame(enc(["Sync"])),
        lambda: frame(b"\xc1"),
    ]
    # fmt: on
    return rng.choice(choices)()  # type: ignore[no-any-return]


def test_garbage_never_reaches_other_sessions(holder_and_socket: tuple[Client, Path]) -> None:
    holder, sock = holder_and_socket
    granted = holder.expect("granted").split()[1]
    rng = random.Random(12)
    for round_ in range(40):
        with _connect(sock) as raw:
            kind = round_ % 5
            if kind == 0:  # no hello at all, just bytes
                raw.sendall(rng.randbytes(rng.randrange(1, 200)))
            elif kind == 1:  # a length over the limit
                raw.sendall(_hello() + struct.pack("!I", MAX_FRAME + 1) + b"x" * 100)
            elif kind == 2:  # a frame cut short, then the connection closed
                raw.sendall(_hello() + struct.pack("!I", 1000) + b"y" * 10)
            elif kind == 3:  # a wrong version
                raw.sendall(frame(msgspec.msgpack.encode({"version": 7, "other": [1, 2]})))
            else:  # a session speaking nonsense: answered frame by frame
                raw.sendall(_hello())
                raw.sendall(b"".join(_garbage(rng) for _ in range(20)))
            _drain(raw)
    # An oversized hello, and a valid session whose allocation requests over budget.
    with _connect(sock) as raw:
        raw.sendall(struct.pack("!I", 2**31) + b"z" * 1000)
        _drain(raw)
    status = status_json(sock)
    assert [h["id"] for h in status["holders"]] == [granted]
    assert status["state"]["vram_used"] == 4 * GiB
    holder.tell("check")
    assert holder.expect("still").split()[1:] == [granted, "False", "False", str(4 * GiB)]
