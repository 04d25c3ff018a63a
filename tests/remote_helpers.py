"""Daemons and client processes for the cross-process tests: real subprocesses, each
bounded by a timeout and ended by its own pid."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The daemon needs peer credentials on Unix sockets.
LINUX_ONLY = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="arbiter serve needs Linux"
)
START_TIMEOUT = 20.0
NO_NVML = Path(__file__).resolve().parent / "no_nvml"


def no_nvml_env() -> dict[str, str]:
    """The environment for a daemon that must not open the real NVML probe."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(NO_NVML), path]))}


def serve_command(sock: Path, *args: str, vram_gb: float = 10) -> list[str]:
    return [
        sys.executable, "-m", "arbiter", "serve", "--socket", str(sock),
        "--vram-gb", str(vram_gb), *args,
    ]  # fmt: skip


def wait_connectable(sock: Path, proc: subprocess.Popen[Any] | None = None) -> None:
    """Wait until something accepts connections on ``sock``."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode}")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
                return
            except OSError:
                time.sleep(0.02)
    raise TimeoutError(f"nothing serves {sock}")


def daemon_log(sock: Path) -> Path:
    """Where `start_daemon` writes the daemon's stderr (its structlog events)."""
    return sock.with_name(sock.name + ".log")


def start_daemon(
    sock: Path, *args: str, vram_gb: float = 10, open_files: int | None = None
) -> subprocess.Popen[str]:
    """``open_files``: the daemon's limit of file descriptors (RLIMIT_NOFILE)."""

    def limit_open_files() -> None:
        import resource

        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    # stderr to a file, not a pipe: nobody reads a pipe, and a full one would stall it.
    with open(daemon_log(sock), "a") as log:
        proc = subprocess.Popen(
            serve_command(sock, *args, vram_gb=vram_gb),
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
            cwd=ROOT,
            env=no_nvml_env(),
            preexec_fn=limit_open_files if open_files is not None else None,
        )
    try:
        wait_connectable(sock, proc)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    """End ``proc`` (by its pid) and reap it; SIGKILL if it does not go in time."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    return proc.returncode


@contextlib.contextmanager
def daemon(
    sock: Path, *args: str, vram_gb: float = 10, open_files: int | None = None
) -> Iterator[subprocess.Popen[str]]:
    proc = start_daemon(sock, *args, vram_gb=vram_gb, open_files=open_files)
    try:
        yield proc
    finally:
        stop(proc)


# Named imports: `import *` would load every lazily imported part of the package (the
# cache and its HTTP client), doubling each client process's start.
CLIENT_PRELUDE = """
import sys, anyio
from arbiter import (
    ArbiterError, ArbiterUnavailable, GiB, Preempted, RemoteArbiter, SessionLost,
)
SOCK = sys.argv[1]
def say(*words):
    print(*words, flush=True)
async def line():
    return (await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)).strip()
"""


class Client:
    """A Python client process running ``body`` (after `CLIENT_PRELUDE`), spoken to
    through its stdin and stdout lines."""

    def __init__(self, sock: Path, body: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT_PRELUDE + body, str(sock), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, word: str, timeout: float = 15.0) -> str:
        """The next stdout line, which must start with ``word``."""
        try:
            text = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"client said nothing for {timeout} s (wanted {word!r})") from None
        if text is None or not text.startswith(word):
            err = ""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                err = self.proc.stderr.read()
            raise AssertionError(f"wanted {word!r}, got {text!r} {err}")
        return text

    def _read_lines(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            self._lines.put(text.strip())
        self._lines.put(None)

    def tell(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 15.0) -> tuple[int, str]:
        """Wait for the process to exit (its stdin closed: a thread reading it returns)."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(self.proc, signal.SIGKILL)
            raise
        err = self.proc.stderr.read() if self.proc.stderr else ""
        stop(self.proc)
        return self.proc.returncode, err

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.proc.pid, sig)

    def close(self) -> None:
        stop(self.proc, signal.SIGKILL)


def status_json(sock: Path) -> dict[str, Any]:
    """What ``arbiter status --json`` prints, asked from this process (a process start
    per observation would dominate the tests' time)."""
    import anyio

    from arbiter.cli._status import _fetch
    from arbiter.cli._status import status_json as as_json

    return as_json(*anyio.run(_fetch, sock))


def status_json_command(sock: Path) -> dict[str, Any]:
    """``arbiter status --json`` run as a command."""
    done = subprocess.run(
        [sys.executable, "-m", "arbiter", "status", "--socket", str(sock), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` until true. Most ask the daemon for its status, a new session per
    call (polled every 20 ms, a restart test's wait opened a hundred of them)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)
