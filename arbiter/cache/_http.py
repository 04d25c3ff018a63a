"""CdnFetcher: download one fragment from the CDN with retries, resumption and checks.

A try streams the body with the shared ``httpx.AsyncClient`` (see `new_client`: it
reads the socket 256 KiB at a time); the bytes are handed in batches to one writer thread
that stores them and hashes them (sha256 and the fast checksum) while they are in its
core's cache, so the event loop only moves references and reading the next batch
overlaps storing the last. A broken try is retried after an exponential backoff with
jitter, resuming with a ``Range`` request from the last byte stored; a server that
answers ``200`` to a ``Range`` request is followed from byte 0. A body longer than
the manifest's size is cut off and refused, and so is a body whose sha256 differs:
such a body counts as an integrity failure and is fetched afresh at most
``integrity_retries`` times before `IntegrityError`.
"""

from __future__ import annotations

import queue
import random
import re
import threading

import anyio
import anyio.to_thread
import httpx

from .._errors import FragmentUnavailable, IntegrityError
from .._log import log, note
from .._types import format_bytes
from ._config import CacheConfig
from ._flight import BytesProgress
from ._sink import DownloadSink
from ._stats import CacheStatsRecorder, CacheTier

__all__ = ["CdnFetcher"]


# Batches queued between the network reader and the writer thread: enough to keep both
# busy, few enough that a slow disk holds the network back instead of filling memory.
WRITE_QUEUE_DEPTH = 4

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_RETRYABLE_STATUS = frozenset({408, 425, 429})


class _Retryable(Exception):
    """A try failed in a way another try may not (the network, a 5xx)."""


class _Permanent(Exception):
    """The server refuses the fragment (a 4xx): retrying would not help."""


class _Corrupt(Exception):
    """The server's bytes do not match the manifest."""


class CdnFetcher:
    """Downloads fragments into `DownloadSink`s through one shared client.

    Args:
        client: the shared ``httpx.AsyncClient``.
        config: retry, backoff and batching policy.
        stats: where bytes received, retries and integrity failures are counted.
    """

    __slots__ = ("_client", "_config", "_random", "_stats")

    def __init__(
        self, client: httpx.AsyncClient, config: CacheConfig, stats: CacheStatsRecorder
    ) -> None:
        self._client = client
        self._config = config
        self._stats = stats
        self._random = random.Random()

    async def fetch(
        self, url: str, sink: DownloadSink, progress: BytesProgress | None = None
    ) -> None:
        """Fill ``sink`` with the fragment at ``url``, verified (not yet committed).

        Raises:
            FragmentUnavailable: the server refused it, or every try broke.
            IntegrityError: every body the server sent failed verification.
        """
        info = sink.info
        failures = 0
        corrupt = 0
        while True:
            start = sink.offset
            try:
                await self._try_once(url, sink, progress)
                return
            except _Corrupt as exc:
                self._stats.integrity_failures += 1
                corrupt += 1
                log.warning(
                    "cdn body failed verification", fragment=info.id, url=url, error=str(exc)
                )
                await self._restart(sink, progress)
                if corrupt > self._config.integrity_retries:
                    raise IntegrityError(
                        f"fragment {info.id!r} from {url} does not match its manifest entry: {exc}"
                    ) from None
            except _Permanent as exc:
                raise FragmentUnavailable(f"fragment {info.id!r}: {url} answered {exc}") from None
            except (_Retryable, httpx.TransportError, httpx.InvalidURL) as exc:
                # A try that stored bytes does not use up the budget: it is resumed.
                failures = 1 if sink.offset > start else failures + 1
                if failures > self._config.fetch_retries:
                    raise FragmentUnavailable(
                        f"fragment {info.id!r}: {url} failed {failures} times in a row, "
                        f"last: {exc!r}"
                    ) from None
                self._stats.fetch_retries += 1
                delay = self._backoff(failures)
                note(
                    "cdn fetch retry",
                    fragment=info.id,
                    resume_at=sink.offset,
                    delay=round(delay, 3),
                    error=repr(exc),
                )
                await anyio.sleep(delay)

    def _backoff(self, failures: int) -> float:
        config = self._config
        delay = min(config.retry_backoff_cap, config.retry_backoff_base * 2.0 ** (failures - 1))
        return delay * (1.0 - config.retry_jitter * self._random.random())

    async def _restart(self, sink: DownloadSink, progress: BytesProgress | None) -> None:
        if sink.offset and progress is not None:
            progress(-sink.offset)
        await anyio.to_thread.run_sync(sink.restart)

    async def _try_once(self, url: str, sink: DownloadSink, progress: BytesProgress | None) -> None:
        size = sink.info.size
        headers = {"Accept-Encoding": "identity"}
        if sink.offset:
            headers["Range"] = f"bytes={sink.offset}-"
        async with self._client.stream("GET", url, headers=headers) as response:
            await self._check_response(response, sink, progress)
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise _Permanent(f"a body encoded as {encoding!r} although identity was asked")
            length = response.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > size - sink.offset:
                raise _Corrupt(
                    f"Content-Length {length} exceeds the {size - sink.offset} bytes still due"
                )
            await self._pump(response, sink, progress)
        if sink.offset < size:
            raise _Retryable(f"body ended at {format_bytes(sink.offset)} of {format_bytes(size)}")
        if not sink.matches():
            raise _Corrupt("sha256 differs")

    async def _check_response(
        self, response: httpx.Response, sink: DownloadSink, progress: BytesProgress | None
    ) -> None:
        status = response.status_code
        if status == 200:
            if sink.offset:
                # The server ignored the Range header: what comes is the whole body.
                note("server ignored range; restarting", url=str(response.url))
                await self._restart(sink, progress)
            return
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
            if match is None or int(match[1]) != sink.offset:
                await self._restart(sink, progress)
                got = response.headers.get("content-range")
                raise _Retryable(f"206 with Content-Range {got!r} for offset {sink.offset}")
            if match[3] != "*" and int(match[3]) != sink.info.size:
                raise _Corrupt(f"the server's copy has {match[3]} bytes")
            return
        if status == 416:
            raise _Corrupt("416: the server's copy is shorter than the manifest says")
        if status >= 500 or status in _RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {status}")
        raise _Permanent(f"HTTP {status}")

    async def _pump(
        self, response: httpx.Response, sink: DownloadSink, progress: BytesProgress | None
    ) -> None:
        """Stream the body into ``sink``: the loop only gathers references into batches,
        one writer thread (fed through a bounded queue, so a slow disk holds the network
        back) stores and hashes them."""
        due = sink.info.size - sink.offset
        batch_size = self._config.write_chunk_size
        received = self._stats.bytes_read
        batches: queue.Queue[list[bytes] | None] = queue.Queue(WRITE_QUEUE_DEPTH)
        writer_failed = threading.Event()
        read_error: Exception | None = None
        write_error: Exception | None = None

        async def put(batch: list[bytes] | None) -> None:
            try:
                batches.put_nowait(batch)
            except queue.Full:  # the writer is behind: wait for room off the loop
                await anyio.to_thread.run_sync(batches.put, batch, limiter=anyio.CapacityLimiter(1))

        async def writer() -> None:
            nonlocal write_error
            try:
                await anyio.to_thread.run_sync(
                    _write_batches, sink, batches, writer_failed, limiter=anyio.CapacityLimiter(1)
                )
            except Exception as exc:
                write_error = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            batch: list[bytes] = []
            pending = 0
            try:
                async for chunk in response.aiter_raw():
                    received[CacheTier.CDN] += len(chunk)
                    if len(chunk) > due:
                        raise _Corrupt(f"body runs past the manifest's {sink.info.size} bytes")
                    due -= len(chunk)
                    batch.append(chunk)
                    pending += len(chunk)
                    if pending >= batch_size:
                        if writer_failed.is_set():
                            break
                        await put(batch)
                        if progress is not None:
                            progress(pending)
                        batch, pending = [], 0
            except Exception as exc:
                # Stored bytes stay stored: the next try resumes after them.
                read_error = exc
            finally:
                with anyio.CancelScope(shield=True):
                    if batch and not isinstance(read_error, _Corrupt):
                        await put(batch)
                        if progress is not None:
                            progress(pending)
                    await put(None)  # ends the writer thread, whatever happened
        if write_error is not None:
            raise write_error
        if read_error is not None:
            raise read_error


def _write_batches(
    sink: DownloadSink, batches: queue.Queue[list[bytes] | None], failed: threading.Event
) -> None:
    """The writer thread: store each batch until ``None``; after a failure, only drain."""
    error: Exception | None = None
    while (batch := batches.get()) is not None:
        if error is None:
            try:
                sink.write(batch)
            except Exception as exc:
                error = exc
                failed.set()
    if error is not None:
        raise error
