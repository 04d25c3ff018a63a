"""A real HTTP origin on 127.0.0.1 for the fragment cache's tests and benchmarks.

`OriginServer` runs the stdlib ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive) in a
thread and serves fragments from a dict of bytes or from a folder (with ``sendfile``).
It understands ``Range: bytes=N-`` / ``bytes=N-M`` and has switches to misbehave:

* ``corrupt``: flip one byte of every body;
* ``truncate_after`` / ``truncate_times``: the next ``truncate_times`` bodies stop after
  ``truncate_after`` bytes although ``Content-Length`` announced more (then the
  connection closes);
* ``ignore_range``: answer ``200`` with the whole body to a ``Range`` request;
* ``status``: answer every request with this status and no body (``500``, ``404`` ...);
* ``extra_bytes``: append bytes to every body (longer than the manifest says);
* ``stall``: a `threading.Event` the handler waits on before sending a body, or after
  its first ``stall_after`` bytes when that is set;
* `down`: stop listening (connections are refused).

Every request is recorded in ``requests`` as ``(path, range header or None, status)``,
and ``requested`` (a `threading.Event`) is set at the first.

Run as a script (``python tests/origin_server.py FOLDER``) it serves FOLDER and prints
its port on one line, for benchmarks that want the server in another process.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["OriginServer"]

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        origin = self.server.origin
        path = unquote(urlsplit(self.path).path).lstrip("/")
        range_header = self.headers.get("Range")
        if origin.status is not None:
            self._empty(origin.status, path, range_header)
            return
        source = origin.lookup(path)
        if source is None:
            self._empty(404, path, range_header)
            return
        size = source[1]
        start, end = 0, size
        status = 200
        match = _RANGE.fullmatch(range_header or "")
        if match is not None and not origin.ignore_range:
            start = int(match[1])
            end = min(size, int(match[2]) + 1) if match[2] else size
            if start >= size:
                self._empty(416, path, range_header)
                return
            status = 206
        body_length = end - start + (origin.extra_bytes if end == size else 0)
        origin.record(path, range_header, status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(body_length))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if origin.stall is not None and origin.stall_after is None:
            origin.stall.wait()
        cut = origin.take_truncation()
        limit = end if cut is None else min(end, start + cut)
        if origin.stall is not None and origin.stall_after is not None:
            pause = min(limit, start + origin.stall_after)
            self._send_body(source[0], start, pause, corrupt=origin.corrupt)
            origin.stall.wait()
            start = pause
        self._send_body(source[0], start, limit, corrupt=origin.corrupt)
        if cut is not None and limit < end:
            self.close_connection = True
            return
        if origin.extra_bytes and end == size:
            self.wfile.write(b"\xee" * origin.extra_bytes)

    def _send_body(self, data: bytes | Path, start: int, end: int, *, corrupt: bool) -> None:
        if isinstance(data, bytes):
            body = bytearray(data[start:end])
            if corrupt and body:
                body[len(body) // 2] ^= 0xFF
            self.wfile.write(body)
            return
        with open(data, "rb") as file:
            if corrupt:
                body = bytearray(os.pread(file.fileno(), end - start, start))
                if body:
                    body[len(body) // 2] ^= 0xFF
                self.wfile.write(body)
            elif end > start:
                self.connection.sendfile(file, start, end - start)

    def _empty(self, status: int, path: str, range_header: str | None) -> None:
        self.server.origin.record(path, range_header, status)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    origin: OriginServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-body (a cancelled or refused download) is expected.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class OriginServer:
    """A misbehaving-on-demand HTTP origin; use as a context manager.

    Args:
        files: path -> bytes to serve.
        directory: a folder to serve (paths relative to it), read per request.
    """

    def __init__(
        self, files: Mapping[str, bytes] | None = None, *, directory: Path | None = None
    ) -> None:
        self.files = dict(files or {})
        self.directory = directory
        self.corrupt = False
        self.truncate_after: int | None = None
        self.truncate_times = 0
        self.ignore_range = False
        self.status: int | None = None
        self.extra_bytes = 0
        self.stall: threading.Event | None = None
        self.stall_after: int | None = None
        self.requests: list[tuple[str, str | None, int]] = []
        self.requested = threading.Event()  # set at the first request
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.origin = self
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL, ending in ``/``."""
        return f"http://127.0.0.1:{self.port}/"

    def lookup(self, path: str) -> tuple[bytes | Path, int] | None:
        """What ``path`` serves (bytes or a file) and its size, or ``None``."""
        if path in self.files:
            return self.files[path], len(self.files[path])
        if self.directory is not None:
            candidate = (self.directory / path).resolve()
            if candidate.is_relative_to(self.directory.resolve()) and candidate.is_file():
                return candidate, candidate.stat().st_size
        return None

    def record(self, path: str, range_header: str | None, status: int) -> None:
        """Note one request."""
        with self._lock:
            self.requests.append((path, range_header, status))
        self.requested.set()

    def take_truncation(self) -> int | None:
        """The cut for this body, if one of the truncated bodies is still due."""
        with self._lock:
            if self.truncate_after is None or self.truncate_times <= 0:
                return None
            self.truncate_times -= 1
            return self.truncate_after

    def requests_for(self, path: str) -> list[tuple[str, str | None, int]]:
        """The recorded requests of one path."""
        with self._lock:
            return [r for r in self.requests if r[0] == path]

    def start(self) -> OriginServer:
        """Start serving in a daemon thread."""
        # `down` waits for the serving loop to notice, up to one poll interval: about 200
        # origins stop in the cache tests, and an idle poll costs microseconds.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.005,), daemon=True
        )
        self._thread.start()
        return self

    def down(self) -> None:
        """Stop serving and close the socket: later connections are refused."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> OriginServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.stall is not None:
            self.stall.set()
        self.down()


if __name__ == "__main__":
    server = OriginServer(directory=Path(sys.argv[1]))
    print(server.port, flush=True)
    server._server.serve_forever()
