"""Regressions for what an independent review found in the daemon: a key sent twice in
one read, a re-claim claiming a huge count of busy spans, and a client that never
reads its replies. A real daemon process."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from remote_helpers import start_daemon, status_json, stop

from arbiter import GiB
from arbiter.remote._wire import PROTOCOL_VERSION, Hello, Reclaim, Request, Status

pytestmark = [
    pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="Unix sockets"),
    pytest.mark.real_processes,
]

_encode = msgspec.msgpack.Encoder().encode


def frame(message: Any) -> bytes:
    body = _encode(message)
    return struct.pack("!I", len(body)) + body


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "d.sock"
    proc = start_daemon(sock, "--ttl", "3", vram_gb=10)
    try:
        yield sock
    finally:
        stop(proc, timeout=5)


def until(condition: Any, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "the daemon never got there"
        time.sleep(0.02)


def test_a_key_sent_twice_in_one_read_leaks_nothing(daemon: Path) -> None:
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(daemon))
        client.sendall(frame(Hello(PROTOCOL_VERSION)))
        request = Request(7, "llm_inference", 1, GiB, None, 1.0, False, None, True, None, "dup")
        client.sendall(frame(request) + frame(request))  # one read, the same key twice
        until(lambda: status_json(daemon)["state"]["vram_used"] == GiB)
        time.sleep(0.2)
        assert status_json(daemon)["state"]["vram_used"] == GiB  # the second was refused
    until(lambda: status_json(daemon)["state"]["vram_used"] == 0)
    assert status_json(daemon)["holders"] == []


def test_a_reclaim_claiming_huge_busy_counts_leaves_the_daemon_responsive(daemon: Path) -> None:
    claim = Reclaim(
        key=1,
        workload="llm_inference",
        priority=1,
        memory=GiB,
        min_memory=None,
        preemptible=True,
        keep_alive=None,
        label=None,
        busy=2**62,
    )
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(daemon))
        client.sendall(frame(Hello(PROTOCOL_VERSION, None, [claim])))
        started = time.monotonic()
        status = status_json(daemon)
        assert time.monotonic() - started < 5
        assert status["state"]["vram_used"] in (0, GiB)


def test_a_client_that_never_reads_is_cut_off_and_the_daemon_goes_on(daemon: Path) -> None:
    """Replies a client does not read queue up in the daemon only to `MAX_OUTBOX`; past
    it that client is disconnected (its session ends) and nobody else notices."""
    hold = Request(1, "llm_inference", 1, GiB, None, 1.0, False, None, True, None, "x" * 200)
    with socket.socket(socket.AF_UNIX) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(str(daemon))
        client.sendall(frame(Hello(PROTOCOL_VERSION)) + frame(hold))
        until(lambda: status_json(daemon)["state"]["vram_used"] == GiB)
        queries = b"".join(frame(Status(key)) for key in range(2, 2_002))
        client.settimeout(10)
        cut_off = False
        try:
            for _ in range(200):  # up to 400,000 queries, none of whose replies is read
                client.sendall(queries)
                if status_json(daemon)["state"]["vram_used"] == 0:
                    cut_off = True
                    break
        except OSError:  # the daemon shut the connection while we were still sending
            cut_off = True
        assert cut_off, "the daemon kept queueing replies for a client that never reads"
    until(lambda: status_json(daemon)["state"]["vram_used"] == 0)
    assert status_json(daemon)["holders"] == []
