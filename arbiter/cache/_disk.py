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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
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
    ``parallelism`` threads reading chunks ahead while another hashes them in order.

    Raises:
        CorruptFragment: the size or the sha256 differs.
        OSError: the file cannot be read (``FileNotFoundError`` when it is gone).
    """
    if size <= 2 * chunk_size:
        data = await anyio.to_thread.run_sync(_read_small, path, size, sha256)
        if progress is not None:
            progress(size)
        return data
    fd = await anyio.to_thread.run_sync(_open_checked, path, size)
    buffer: FragmentBuffer | None = None
    try:
        buffer = await anyio.to_thread.run_sync(FragmentBuffer, size)
        with buffer.view() as view:
            digest = await _read_chunks(fd, view, chunk_size, parallelism, progress)
        if digest != sha256:
            raise CorruptFragment(f"{path} does not match its sha256")
        return buffer.freeze()
    finally:
        if buffer is not None:
            buffer.close()
        os.close(fd)


async def _read_chunks(
    fd: int, view: memoryview, chunk_size: int, parallelism: int, progress: Progress | None
) -> str:
    offsets = range(0, len(view), chunk_size)
    ready = [anyio.Event() for _ in offsets]
    failures: list[Exception] = []
    next_chunk = 0

    async def reader() -> None:
        nonlocal next_chunk
        while next_chunk < len(offsets) and not failures:
            index = next_chunk
            next_chunk += 1
            start = offsets[index]
            try:
                with view[start : start + chunk_size] as part:
                    await anyio.to_thread.run_sync(_pread_into, fd, part, start)
            except Exception as exc:
                # Stop every reader and wake the hasher, wherever it waits.
                failures.append(exc)
                for event in ready:
                    event.set()
                return
            ready[index].set()

    hasher = hashlib.sha256()
    async with anyio.create_task_group() as tg:
        for _ in range(min(parallelism, len(offsets))):
            tg.start_soon(reader)
        for index, start in enumerate(offsets):
            await ready[index].wait()
            if failures:
                break
            with view[start : start + chunk_size] as part:
                # hashlib lets go of the GIL for large updates: the readers keep going.
                await anyio.to_thread.run_sync(hasher.update, part)
                done = len(part)
            if progress is not None:
                progress(done)
    if failures:
        raise failures[0]
    return hasher.hexdigest()
