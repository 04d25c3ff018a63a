"""The disk tier's files, and verified reads of any local fragment file.

Layout under ``disk_path``: ``fragments/<sha256 of the id>`` holds verified fragments
and ``tmp/`` holds downloads in progress. A fragment file appears only by
``os.replace`` of a temp file that was verified and fsynced, followed by an fsync of
the directory, so a reader (or a restart after a crash) never sees a partial or
unverified fragment. Whatever is left in ``tmp/`` at start is the remains of a killed
process and is removed.

Reads run in worker threads (``anyio.to_thread``) with ``os.preadv`` into a
preallocated `FragmentBuffer`, in chunks of at least 1 MiB, several in flight at once
for large fragments, while the sha256 follows the chunks in order.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.to_thread

from ._buffer import Buffer, FragmentBuffer

__all__ = ["CorruptFragment", "DiskFile", "DiskLayout", "read_verified"]

Progress = Callable[[int], None]


class CorruptFragment(Exception):
    """A local copy's size or sha256 does not match the manifest (internal signal)."""


@dataclass(frozen=True, slots=True)
class DiskFile:
    """A file found in ``fragments/`` at start: its name, size and modification time."""

    name: str
    size: int
    mtime: float


class DiskLayout:
    """The folders of the disk tier under ``root`` (all methods block: run them in threads)."""

    __slots__ = ("fragments", "root", "tmp")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fragments = root / "fragments"
        self.tmp = root / "tmp"

    def prepare(self) -> list[DiskFile]:
        """Create the folders, remove leftover temp files, and list the fragment files."""
        self.fragments.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        with os.scandir(self.tmp) as leftovers:
            for entry in leftovers:
                if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                    os.unlink(entry.path)
        found = []
        with os.scandir(self.fragments) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    found.append(DiskFile(entry.name, st.st_size, st.st_mtime))
        return found

    def path(self, name: str) -> Path:
        """The path of the fragment file called ``name``."""
        return self.fragments / name

    def new_temp(self, name: str) -> tuple[int, str]:
        """Open a fresh temp file for a download of ``name``: ``(fd, path)``."""
        return tempfile.mkstemp(prefix=name[:16] + ".", suffix=".part", dir=self.tmp)

    def commit(self, fd: int, temp_path: str, name: str) -> None:
        """Make a verified temp file the fragment ``name``: fsync, replace, fsync the folder."""
        os.fsync(fd)
        os.replace(temp_path, self.fragments / name)
        dir_fd = os.open(self.fragments, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def remove(self, name: str) -> None:
        """Delete the fragment file ``name`` if it is there."""
        try:
            os.unlink(self.fragments / name)
        except FileNotFoundError:
            pass


def _open_checked(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise CorruptFragment(f"{path} holds {actual} bytes, the manifest says {size}")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CorruptFragment(f"file ended at {offset + done} bytes while being read")
        done += n


def _read_small(path: Path, size: int, sha256: str) -> bytes:
    """One read straight into ``bytes`` (no copy), then the hash, in one worker thread."""
    fd = _open_checked(path, size)
    try:
        data = os.pread(fd, size, 0)
        while len(data) < size:
            more = os.pread(fd, size - len(data), len(data))
            if not more:
                raise CorruptFragment(f"{path} ended at {len(data)} bytes while being read")
            data += more
    finally:
        os.close(fd)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CorruptFragment(f"{path} does not match its sha256")
    return data


class _OrderedHash:
    """Hashes a buffer's chunks in order while readers fill them out of order.

    Whichever reader thread completes the next chunk in order hashes it, and every
    chunk after it that is already there; the other readers go on reading. No thread
    ever waits for another, so the readers cannot deadlock on a full thread pool.
    """

    __slots__ = ("_busy", "_chunk", "_done", "_hasher", "_lock", "_next", "_report", "_view")

    def __init__(self, view: memoryview, chunk: int, report: Progress | None) -> None:
        self._view = view
        self._chunk = chunk
        self._report = report
        self._hasher = hashlib.sha256()
        self._lock = threading.Lock()
        self._done: set[int] = set()
        self._next = 0
        self._busy = False

    def chunk_read(self, index: int) -> None:
        """Record that chunk ``index`` is in the buffer; hash what is now in order."""
        with self._lock:
            self._done.add(index)
            if self._busy:
                return  # the thread hashing now will find it
            self._busy = True
        while True:
            with self._lock:
                if self._next not in self._done:
                    self._busy = False
                    return
                start = self._next * self._chunk
            # hashlib lets go of the GIL for large updates: the other readers go on.
            with self._view[start : start + self._chunk] as part:
                self._hasher.update(part)
                done = len(part)
            with self._lock:
                self._done.discard(self._next)
                self._next += 1
            if self._report is not None:
                anyio.from_thread.run_sync(self._report, done)

    def hexdigest(self) -> str:
        """The sha256 of the whole buffer (call once every chunk was hashed)."""
        return self._hasher.hexdigest()


def _read_stripe(
    fd: int, view: memoryview, chunk: int, first: int, step: int, hasher: _OrderedHash
) -> None:
    """Read chunks ``first, first + step, ...`` into ``view``, handing each to ``hasher``."""
    for index in range(first, -(-len(view) // chunk), step):
        start = index * chunk
        with view[start : start + chunk] as part:
            _pread_into(fd, part, start)
        hasher.chunk_read(index)


def _open_with_buffer(path: Path, size: int) -> tuple[int, FragmentBuffer]:
    fd = _open_checked(path, size)
    try:
        return fd, FragmentBuffer(size)
    except BaseException:
        os.close(fd)
        raise


async def read_verified(
    path: Path,
    size: int,
    sha256: str,
    *,
    chunk_size: int,
    parallelism: int,
    progress: Progress | None = None,
) -> Buffer:
    """Read a local fragment file and check its size and sha256.

    Fragments of up to two chunks are read by one worker thread; larger ones by up to
    ``parallelism`` threads, each reading every ``parallelism``-th chunk, while the
    sha256 follows the chunks in order.

    Raises:
        CorruptFragment: the size or the sha256 differs.
        OSError: the file cannot be read (``FileNotFoundError`` when it is gone).
    """
    if size <= 2 * chunk_size:
        data = await anyio.to_thread.run_sync(_read_small, path, size, sha256)
        if progress is not None:
            progress(size)
        return data
    fd, buffer = await anyio.to_thread.run_sync(_open_with_buffer, path, size)
    try:
        with buffer.view() as view:
            hasher = _OrderedHash(view, chunk_size, progress)
            stripes = min(parallelism, -(-size // chunk_size))
            # Its own limiter: a read never waits for threads that other reads hold.
            limiter = anyio.CapacityLimiter(stripes)
            async with anyio.create_task_group() as tg:
                for first in range(stripes):
                    tg.start_soon(
                        _run_stripe, fd, view, chunk_size, first, stripes, hasher, limiter
                    )
        if hasher.hexdigest() != sha256:
            raise CorruptFragment(f"{path} does not match its sha256")
        return await anyio.to_thread.run_sync(buffer.freeze)
    except BaseExceptionGroup as group:
        # A task group wraps what a stripe raised; the caller wants the error itself.
        raise group.exceptions[0] from None
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_close_both, buffer, fd)


def _close_both(buffer: FragmentBuffer, fd: int) -> None:
    buffer.close()
    os.close(fd)


async def _run_stripe(
    fd: int,
    view: memoryview,
    chunk: int,
    first: int,
    step: int,
    hasher: _OrderedHash,
    limiter: anyio.CapacityLimiter,
) -> None:
    await anyio.to_thread.run_sync(
        _read_stripe, fd, view, chunk, first, step, hasher, limiter=limiter
    )
