"""Regressions for what an independent review found in the daemon: a key sent twice in
one read, a re-claim claiming a huge count of busy spans, and a client that never
reads its replies. A real daemon process."""

from __future__ import annotations

import signal
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
from arbiter.remote._wire import PROTOCOL_VERSION, Hello, Reclaim, Request, Status, Withdraw

pytestmark = [
    pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="Unix sockets"),
    pytest.mark.real_processes,
]

_encode = msgspec.msgpack.Encoder().encode


def frame(message: Any) -> bytes:
    body = _encode(message)
    return struct.pack("!I", len(body)) + body


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One daemon (10 GiB, ttl 3 s) for the tests that do not restart it."""
    sock = tmp_path_factory.mktemp("review") / "d.sock"
    proc = start_daemon(sock, "--ttl", "3", vram_gb=10)
    try:
        yield sock
    finally:
        stop(proc, timeout=5)


@pytest.fixture
def daemon(shared_daemon: Path) -> Iterator[Path]:
    """The shared daemon, handed on as it was found: nothing held, nothing waiting (the
    sessions a test closed end in the daemon a moment later)."""
    yield shared_daemon

    def idle() -> bool:
        status = status_json(shared_daemon)
        return status["holders"] == [] and status["waiters"] == []

    until(idle)


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


def _granted_keys(client: socket.socket, count: int, limit: float = 10.0) -> list[int]:
    """Read frames until ``count`` grants have come; their keys in arrival order."""
    client.settimeout(limit)
    data, keys = b"", []
    while len(keys) < count:
        chunk = client.recv(65536)
        assert chunk, "the daemon closed the session"
        data += chunk
        while len(data) >= 4 and len(data) >= 4 + struct.unpack("!I", data[:4])[0]:
            size = struct.unpack("!I", data[:4])[0]
            message = msgspec.msgpack.decode(data[4 : 4 + size])
            data = data[4 + size :]
            if isinstance(message, list) and message[0] == "Granted":
                keys.append(message[1])
    return keys


def _hold_8_gib(holder: socket.socket, daemon: Path) -> None:
    """A session on ``holder`` that holds 8 of the daemon's 10 GiB."""
    holder.connect(str(daemon))
    holder.sendall(frame(Hello(PROTOCOL_VERSION)))
    holder.sendall(frame(Request(1, "llm_inference", 1, 8 * GiB, None, 5.0, False, None, True,
                                 None, "holder")))  # fmt: skip
    assert _granted_keys(holder, 1) == [1]


def test_a_request_that_fits_does_not_pass_one_that_waits_in_the_same_read(
    daemon: Path,
) -> None:
    # The daemon grants a request that fits without a task; one read that holds a
    # waiting request and then a fitting one must still keep their order.
    with socket.socket(socket.AF_UNIX) as holder, socket.socket(socket.AF_UNIX) as client:
        _hold_8_gib(holder, daemon)
        client.connect(str(daemon))
        client.sendall(frame(Hello(PROTOCOL_VERSION)))
        big = Request(1, "llm_inference", 1, 4 * GiB, None, 10.0, False, None, True, None, "b")
        small = Request(2, "llm_inference", 1, GiB, None, 10.0, False, None, True, None, "s")
        client.sendall(frame(big) + frame(small))
        until(lambda: status_json(daemon)["state"]["waiting"] == 2)
        assert status_json(daemon)["state"]["vram_used"] == 8 * GiB
        holder.close()  # its session ends: its 8 GiB go to the queue, in order
        assert _granted_keys(client, 2) == [1, 2]
    until(lambda: status_json(daemon)["state"]["vram_used"] == 0)


def test_requests_that_end_while_a_restarted_daemon_holds_new_grants_are_counted(
    tmp_path: Path,
) -> None:
    # A daemon that starts on a stale socket grants nothing new for its ttl; what times
    # out or is withdrawn meanwhile never reaches the arbiter's queue, and still counts.
    sock = tmp_path / "stale.sock"
    first = start_daemon(sock, "--ttl", "30", vram_gb=10)
    stop(first, signal.SIGKILL)
    second = start_daemon(sock, "--ttl", "30", vram_gb=10)
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(sock))
            client.sendall(frame(Hello(PROTOCOL_VERSION)))
            timing_out = Request(
                1, "llm_inference", 1, GiB, None, 0.2, False, None, True, None, "t"
            )
            withdrawn = Request(
                2, "llm_inference", 1, GiB, None, 20.0, False, None, True, None, "w"
            )
            client.sendall(frame(timing_out) + frame(withdrawn) + frame(Withdraw(2)))
            until(lambda: status_json(sock)["stats"]["total_allocations"] == 2, limit=10)
            stats = status_json(sock)["stats"]
            assert (stats["failed_allocations"], stats["timeouts"], stats["cancelled"]) == (1, 1, 1)
            assert stats["successful_allocations"] == 0
    finally:
        stop(second, timeout=10)


def test_a_withdrawal_in_the_same_read_as_its_request_takes_it_out_of_the_queue(
    daemon: Path,
) -> None:
    with socket.socket(socket.AF_UNIX) as holder, socket.socket(socket.AF_UNIX) as client:
        _hold_8_gib(holder, daemon)
        client.connect(str(daemon))
        client.sendall(frame(Hello(PROTOCOL_VERSION)))
        waits = Request(1, "llm_inference", 1, 4 * GiB, None, 30.0, False, None, True, None, "w")
        cancelled = status_json(daemon)["stats"]["cancelled"]  # by earlier tests' sessions
        client.sendall(frame(waits) + frame(Withdraw(1)))
        until(lambda: status_json(daemon)["stats"]["cancelled"] == cancelled + 1)
        assert status_json(daemon)["state"]["waiting"] == 0


def test_the_daemon_never_chmods_a_folder_it_did_not_make(tmp_path: Path) -> None:
    # `--socket /tmp/x.sock` as root once closed /tmp to everyone else.
    from arbiter.remote._daemon import claim_socket

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o1777)
    claim = claim_socket(shared / "gpu.sock", ttl=1)
    claim.release()
    assert shared.stat().st_mode & 0o7777 == 0o1777
    made = tmp_path / "made" / "here"
    claim = claim_socket(made / "gpu.sock", ttl=1)
    claim.release()
    assert made.stat().st_mode & 0o777 == 0o700
