"""What one client can make a real daemon process spend, and what it cannot: an error
that quotes a huge input is answered short; connections past the limit are refused;
running out of file descriptors stops no session; a status too long for one frame is
cut, not lost."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from remote_helpers import LINUX_ONLY, daemon, daemon_log, status_json

from arbiter import GiB
from arbiter.remote._sessions import DaemonConfig
from arbiter.remote._wire import MAX_FRAME, PROTOCOL_VERSION, Hello, Request, Status, frame

pytestmark = [LINUX_ONLY, pytest.mark.real_processes]

_encode = msgspec.msgpack.encode


def _connect(sock: Path) -> socket.socket:
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(10)
    raw.connect(str(sock))
    return raw


def _messages(raw: socket.socket, until: str, limit: float = 10.0) -> list[Any]:
    """The daemon's messages on ``raw`` up to the first whose tag is ``until``."""
    data, found = b"", []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        while len(data) >= 4 and len(data) >= 4 + int.from_bytes(data[:4], "big"):
            size = int.from_bytes(data[:4], "big")
            message = msgspec.msgpack.decode(data[4 : 4 + size])
            data = data[4 + size :]
            found.append(message)
            tag = message.get("type") if isinstance(message, dict) else message[0]
            if tag == until:
                return found
        chunk = raw.recv(65536)
        if not chunk:
            break
        data += chunk
    raise AssertionError(f"no {until} among {[str(m)[:60] for m in found]}")


@contextlib.contextmanager
def _connections(sock: Path, count: int) -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        opened.extend(_connect(sock) for _ in range(count))
        yield opened
    finally:
        for raw in opened:
            raw.close()


def _hello_and_waiters(count: int) -> bytes:
    """A hello and ``count`` requests of a GiB each, labelled as long as a label may be
    (each status lists them all)."""
    label = "x" * 200

    def waiter(key: int) -> bytes:
        return frame(_encode(Request(key, "llm_inference", 1, GiB, None, 600.0, False, None,
                                     True, None, label)))  # fmt: skip

    hello = frame(_encode(Hello(PROTOCOL_VERSION)))
    return hello + b"".join(waiter(key) for key in range(1, count + 1))


def _until_waiting(sock: Path, count: int) -> None:
    deadline = time.monotonic() + 20
    while status_json(sock)["state"]["waiting"] < count:
        assert time.monotonic() < deadline, "the requests never all queued"
        time.sleep(0.1)


def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "d.sock"


def _clean(sock: Path) -> None:
    log = daemon_log(sock).read_text()
    assert "session failed" not in log and "Traceback" not in log, log[-2000:]


def test_an_error_that_quotes_a_huge_input_is_answered_in_a_short_line(tmp_path: Path) -> None:
    sock = sock_path(tmp_path)
    with daemon(sock, "--ttl", "5") as proc:
        with _connect(sock) as raw:
            huge_tag = frame(_encode(["X" * (MAX_FRAME - 64)]))  # msgspec quotes it back
            raw.sendall(frame(_encode(Hello(PROTOCOL_VERSION))) + huge_tag)
            error = _messages(raw, "Error")[-1]
            assert error[1].startswith("bad frame: ") and len(error[1]) < 400
            assert status_json(sock)["state"]["vram_used"] == 0  # it goes on
        assert proc.poll() is None
    _clean(sock)


def test_connections_past_the_limit_are_refused_and_the_others_go_on(tmp_path: Path) -> None:
    sock = sock_path(tmp_path)
    limit = DaemonConfig(socket=sock).max_connections
    with daemon(sock, "--ttl", "5"):
        with _connections(sock, limit) as idle:  # each may buffer up to a frame
            with _connect(sock) as extra:
                refused = _messages(extra, "Refused")[-1]
                assert refused["reason"] == "busy" and str(limit) in refused["message"]
            idle[0].sendall(frame(_encode(Hello(PROTOCOL_VERSION))))
            assert _messages(idle[0], "Welcome")  # those it took are served
        # Once they close, there is room again.
        deadline = time.monotonic() + 10
        while True:
            try:
                assert status_json(sock)["holders"] == []
                break
            except Exception:
                assert time.monotonic() < deadline, "no room came back"
                time.sleep(0.05)
    _clean(sock)


def test_running_out_of_file_descriptors_ends_no_session(tmp_path: Path) -> None:
    sock = sock_path(tmp_path)
    # Far fewer descriptors than connections allowed: accept() fails with EMFILE.
    with daemon(sock, "--ttl", "5", open_files=40) as proc:
        with _connect(sock) as holder:
            hold = Request(1, "llm_inference", 1, GiB, None, 30.0, False, None, True, None, "h")
            holder.sendall(frame(_encode(Hello(PROTOCOL_VERSION))) + frame(_encode(hold)))
            assert _messages(holder, "Granted")
            with _connections(sock, 60):  # more than the daemon has descriptors for
                time.sleep(0.5)  # generous: the daemon tries to accept them meanwhile
                assert proc.poll() is None, "the daemon died"
            # They are gone: it accepts again, and the holder's session lived on.
            state = status_json(sock)["state"]
            assert state["vram_used"] == GiB
        assert proc.poll() is None
    log = daemon_log(sock).read_text()
    assert "cannot accept connections" in log
    _clean(sock)


def test_a_status_too_long_for_one_frame_lists_what_fits(tmp_path: Path) -> None:
    sock = sock_path(tmp_path)
    with daemon(sock, "--ttl", "10", vram_gb=1) as proc:
        with _connect(sock) as raw:
            raw.sendall(_hello_and_waiters(5_000))
            _until_waiting(sock, 4_999)  # one is granted
            done = subprocess.run(
                [sys.executable, "-m", "arbiter", "status", "--socket", str(sock), "--json"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            shown = json.loads(done.stdout)
            listed = len(shown["holders"]) + len(shown["waiters"])
            assert shown["holders"][0]["label"] == "x" * 200
            assert 1_000 < listed < 5_000
            assert f"{5_000 - listed} more holders and waiters not listed" in done.stderr
        assert proc.poll() is None
    _clean(sock)


def test_a_flood_of_status_queries_from_a_client_that_never_reads_stalls_no_one(
    tmp_path: Path,
) -> None:
    sock = sock_path(tmp_path)
    with daemon(sock, "--ttl", "30", vram_gb=1) as proc:
        with _connect(sock) as waiters, _connect(sock) as flooder:
            waiters.sendall(_hello_and_waiters(5_000))
            _until_waiting(sock, 4_999)
            flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            with contextlib.suppress(OSError):  # cut off while it still sends: so be it
                flooder.sendall(
                    frame(_encode(Hello(PROTOCOL_VERSION)))
                    + b"".join(frame(_encode(Status(key))) for key in range(1, 20_001))
                )
            # Each read of those costs one status, and its replies cut the flooder off
            # once they pile up: another client is answered (within status_json's 10 s).
            assert status_json(sock)["state"]["waiting"] >= 4_999
            flooder.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while flooder.recv(1 << 20):  # what was sent before the cut, then the end
                    pass
        assert proc.poll() is None
    _clean(sock)
