"""The disk tier's files, and verified reads of any local fragment file.

Layout under ``disk_path``: ``fragments/<sha256 of the id>`` holds verified fragments,
``checksums/<same name>`` the checksum record of each (see `ChecksumRecord`), and
``tmp/`` holds downloads in progress. A fragment file appears only by ``os.replace``
of a temp file that was verified and fsynced, followed by an fsync of the directory,
so a reader (or a restart after a crash) never sees a partial or unverified fragment.
Whatever is left in ``tmp/`` at start is the remains of a killed process and is
removed; so is anything at a fragment's path that is not a regular file.

A read fills a `FragmentBuffer` in place: reader threads ``preadv`` large chunks
straight into it while one more thread hashes the same memory, chunk by chunk in
order, behind them (hashlib and xxhash let go of the GIL), so that the read and the
hash overlap and nothing is copied.
"""

from __future__ import annotations

import errno
import itertools
import os
import queue
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.to_thread

from ._buffer import FragmentBuffer
from ._config import MIN_READ_CHUNK
from ._flight import BytesProgress
from ._record import RECORD_MAX_SIZE, ChecksumRecord, Hasher, fast_hasher

__all__ = [
    "CorruptFragment",
    "DiskFile",
    "DiskLayout",
    "NotAFile",
    "read_verified",
]


class CorruptFragment(Exception):
    """A local copy's size or checksum (or its checksum record) does not match (internal)."""


class NotAFile(OSError):
    """Something that is not a regular file lies where a fragment file should be."""


@dataclass(frozen=True, slots=True)
class DiskFile:
    """A file found in ``fragments/`` at start: its name, size and modification time."""

    name: str
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class DiskScan:
    """What `DiskLayout.prepare` found in ``fragments/``."""

    files: list[DiskFile]
    records: set[str]
    others: list[str]


def _clear(path: Path) -> None:
    """Remove whatever is at ``path`` (a folder with all it holds); nothing there is fine."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class DiskLayout:
    """The folders of the disk tier under ``root`` (all methods block: run them in threads)."""

    __slots__ = ("checksums", "fragments", "root", "tmp")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fragments = root / "fragments"
        self.checksums = root / "checksums"
        self.tmp = root / "tmp"

    def prepare(self) -> DiskScan:
        """Create the folders, remove leftovers in ``tmp/``, and list ``fragments/``."""
        for folder in (self.fragments, self.checksums, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        with os.scandir(self.tmp) as leftovers:
            for entry in leftovers:
                _clear(Path(entry.path))
        scan = DiskScan([], set(), [])
        with os.scandir(self.checksums) as records:
            scan.records.update(entry.name for entry in records)
        with os.scandir(self.fragments) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    scan.files.append(DiskFile(entry.name, st.st_size, st.st_mtime))
                else:
                    scan.others.append(entry.name)
        return scan

    def path(self, name: str) -> Path:
        """The path of the fragment file called ``name``."""
        return self.fragments / name

    def record_path(self, name: str) -> Path:
        """The path of the checksum record of the fragment file ``name``."""
        return self.checksums / name

    def free_bytes(self) -> int:
        """Bytes the file system of the disk tier still has for this user."""
        st = os.statvfs(self.tmp)
        return st.f_bavail * st.f_frsize

    def new_temp(self, name: str) -> tuple[int, str]:
        """Open a fresh temp file for a download of ``name``: ``(fd, path)``."""
        return tempfile.mkstemp(prefix=name[:16] + ".", suffix=".part", dir=self.tmp)

    def commit(self, fd: int, temp_path: str, name: str, record: ChecksumRecord) -> None:
        """Make a verified temp file the fragment ``name``, with its checksum record.

        The old record goes first and the new one is put in place last, so that a crash
        in between leaves a fragment without a record (verified with sha256 when read),
        never a record beside bytes it was not made for. Only the fragment is fsynced: a
        record lost in a crash is missing or empty, which reads as missing.
        """
        os.fsync(fd)
        record_temp = self._write_temp_record(name, record)
        try:
            _clear(self.record_path(name))
            _clear(self.path(name))  # a folder (or a stranger) in the way goes
            os.replace(temp_path, self.path(name))
            os.replace(record_temp, self.record_path(name))
        except BaseException:
            _clear(Path(record_temp))
            raise
        self._fsync_folder()

    def write_record(self, name: str, record: ChecksumRecord) -> None:
        """Record the checksum of a fragment file found without one (verified just now)."""
        record_temp = self._write_temp_record(name, record)
        try:
            os.replace(record_temp, self.record_path(name))
        except BaseException:
            _clear(Path(record_temp))
            raise

    def remove(self, name: str) -> None:
        """Delete the fragment ``name`` and its record, whatever lies at their paths."""
        _clear(self.path(name))
        _clear(self.record_path(name))

    def remove_record(self, name: str) -> None:
        """Delete the record ``name`` (one left without its fragment)."""
        _clear(self.record_path(name))

    def _write_temp_record(self, name: str, record: ChecksumRecord) -> str:
        fd, temp = tempfile.mkstemp(prefix=name[:16] + ".", suffix=".record", dir=self.tmp)
        try:
            os.write(fd, record.encode())  # a few bytes: one write never comes out short
        except BaseException:
            os.close(fd)
            _clear(Path(temp))
            raise
        os.close(fd)
        return temp

    def _fsync_folder(self) -> None:
        dir_fd = os.open(self.fragments, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# -- verified reads --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A local fragment file to read and what to check it against.

    Args:
        path: the file.
        size, sha256: the manifest entry.
        record: where its checksum record lies (a disk-tier file), or ``None`` (a file
            of ``source_dir``, always checked with sha256).
        on_recorded: called (in a worker thread) with the xxh3-128 of a disk-tier file
            found without a record once sha256 verified it, to record it.
    """

    path: Path
    size: int
    sha256: str
    record: Path | None = None
    on_recorded: Callable[[str], None] | None = None


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


class _Checks:
    """The hashes a read feeds, and what each must come to (``None``: recorded after)."""

    __slots__ = ("expected", "hashers", "slow")

    def __init__(self, file: LocalFile, fd: int) -> None:
        self.hashers: list[Hasher] = []
        self.expected: list[str | None] = []
        record = _read_record(file.record) if file.record is not None else None
        if record is not None:
            if not record.vouches_for(file.size, file.sha256):
                raise CorruptFragment(f"{file.record} is damaged or made for other bytes")
            self.hashers.append(fast_hasher())
            self.expected.append(record.xxh3)
            self.slow = False
            return
        self.slow = True  # sha256 is slower than the reads: it gets a thread of its own
        self.hashers.append(sha256())
        self.expected.append(file.sha256)
        if file.on_recorded is not None:
            self.hashers.append(fast_hasher())
            self.expected.append(None)

    def update(self, part: memoryview) -> None:
        for hasher in self.hashers:
            hasher.update(part)

    def finish(self, file: LocalFile) -> None:
        """Raise `CorruptFragment` on a mismatch; record what was to be recorded."""
        digests = [hasher.hexdigest() for hasher in self.hashers]
        for digest, expected in zip(digests, self.expected, strict=True):
            if expected is not None and digest != expected:
                what = "its checksum record" if len(digest) == 32 else "its sha256"
                raise CorruptFragment(f"{file.path} does not match {what}")
        if file.on_recorded is not None and None in self.expected:
            file.on_recorded(digests[self.expected.index(None)])


def _read_record(path: Path) -> ChecksumRecord | None:
    """The record at ``path``; ``None`` when there is none, or it is empty (what a crash
    leaves of a record written without fsync). A damaged one raises."""
    try:
        fd = os.open(path, _OPEN_FLAGS | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CorruptFragment(f"{path} cannot be read as a record: {exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptFragment(f"{path} is not a file")
        raw = os.read(fd, RECORD_MAX_SIZE + 1)
    finally:
        os.close(fd)
    if not raw:
        return None
    record = ChecksumRecord.decode(raw)
    if record is None:
        raise CorruptFragment(f"{path} is damaged")
    return record


def _open_checked(file: LocalFile) -> int:
    # The disk tier's own files are never links; a model folder's may be (hub caches).
    flags = _OPEN_FLAGS | (getattr(os, "O_NOFOLLOW", 0) if file.record is not None else 0)
    fd = os.open(file.path, flags)  # O_NONBLOCK: a FIFO in the way must not hang the read
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(errno.EINVAL, "not a regular file", str(file.path))
        if st.st_size != file.size:
            raise CorruptFragment(f"{file.path} holds {st.st_size} bytes, not {file.size}")
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


class _Read:
    """One read of a local file into a buffer, by one thread or by readers and a hasher.

    `start` opens the file and takes its record in a worker thread. When the check is
    the fast hash (or the file is one chunk), that thread reads and hashes each chunk
    in turn, while the chunk is still in its core's cache. A sha256 check, which is
    several times slower than the reads, gets a pipeline instead: reader threads take
    the next chunk from a shared counter and announce it; one hasher thread hashes the
    chunks in order as they come. A thread that fails wakes the others with `_ABORT`,
    so that none waits for a chunk that never comes.
    """

    __slots__ = (
        "_checks",
        "_chunk",
        "_fd",
        "_file",
        "_next_chunk",
        "_progress",
        "_ready",
        "_view",
        "chunks",
    )

    _ABORT = -1

    def __init__(
        self, file: LocalFile, view: memoryview, chunk: int, progress: BytesProgress | None
    ) -> None:
        self._file = file
        self._view = view
        self._chunk = chunk
        self._progress = progress
        self.chunks = -(-file.size // chunk)
        self._next_chunk = itertools.count()  # next() on a count is atomic in CPython
        self._ready: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._fd = -1
        self._checks: _Checks | None = None

    def start(self) -> bool:
        """Open the file and take its record; read it all here when that is best.
        True when the read is done (and checked), False when the pipeline is to run."""
        self._fd = _open_checked(self._file)
        self._checks = checks = _Checks(self._file, self._fd)
        if self.chunks > 1 and checks.slow:
            # The hasher finishes one chunk after the last read: smaller chunks (down to
            # MIN_READ_CHUNK) keep that tail short for fragments of a few chunks.
            self._chunk = max(MIN_READ_CHUNK, min(self._chunk, -(-self._file.size // 8)))
            self.chunks = -(-self._file.size // self._chunk)
            return False
        for index in range(self.chunks):
            with self._read_chunk(index) as part:
                checks.update(part)
                self._report(len(part))
        checks.finish(self._file)
        return True

    def read(self) -> None:
        """A reader thread of the pipeline: take chunks until none is left."""
        try:
            while (index := next(self._next_chunk)) < self.chunks:
                self._read_chunk(index).release()
                self._ready.put(index)
        except BaseException:
            self._next_chunk = itertools.count(self.chunks)  # the other readers stop
            self._ready.put(self._ABORT)
            raise

    def hash(self) -> None:
        """The hasher thread of the pipeline: hash chunks in order as they are read."""
        checks = self._checks
        assert checks is not None
        arrived: set[int] = set()
        for index in range(self.chunks):
            while index not in arrived:
                got = self._ready.get()
                if got == self._ABORT:
                    return
                arrived.add(got)
            arrived.discard(index)
            with self._chunk_view(index) as part:
                checks.update(part)
                self._report(len(part))
        checks.finish(self._file)

    def close(self) -> None:
        """Close the file (once every thread is done)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _chunk_view(self, index: int) -> memoryview:
        start = index * self._chunk
        return self._view[start : min(self._file.size, start + self._chunk)]

    def _read_chunk(self, index: int) -> memoryview:
        """Read chunk ``index`` into the buffer; returns the view of it (release it).

        No ``WILLNEED`` advice for the chunks ahead: measured, it slows cold reads down
        (the kernel's own sequential read-ahead already keeps the drive busy)."""
        part = self._chunk_view(index)
        start = index * self._chunk
        try:
            _pread_into(self._fd, part, start)
        except BaseException:
            part.release()
            raise
        return part

    def _report(self, done: int) -> None:
        if self._progress is not None:
            anyio.from_thread.run_sync(self._progress, done)


async def read_verified(
    file: LocalFile,
    *,
    chunk_size: int,
    parallelism: int,
    progress: BytesProgress | None = None,
) -> bytes:
    """Read a local fragment file and check its size and checksum.

    A disk-tier file (``file.record`` set) is checked against its xxh3-128 record, or,
    without a record, against its sha256 (and then recorded); a ``source_dir`` file
    against its sha256. The fast hash is computed by the reading thread, a sha256 of
    more than one chunk by a thread of its own behind ``parallelism`` reader threads.

    Raises:
        CorruptFragment: the size, the checksum or the record is wrong.
        NotAFile: the path holds a folder or another non-file.
        OSError: the file cannot be read (``FileNotFoundError`` when it is gone).
    """
    buffer = FragmentBuffer(file.size)  # no memory is touched yet: fine on the loop
    read = _Read(file, buffer.view(), chunk_size, progress)
    try:
        try:
            if not await anyio.to_thread.run_sync(read.start):
                # Its own limiter: a read never waits for threads that other reads hold.
                readers = min(parallelism, read.chunks)
                limiter = anyio.CapacityLimiter(readers + 1)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_in_thread, read.hash, limiter)
                    for _ in range(readers):
                        tg.start_soon(_in_thread, read.read, limiter)
        finally:
            read.close()
        return buffer.freeze()
    except BaseExceptionGroup as group:
        # The hasher's verdict, else a reader's error, rather than the group.
        await _drop(buffer)
        raise group.exceptions[0] from None
    except BaseException:
        await _drop(buffer)
        raise


async def _drop(buffer: FragmentBuffer) -> None:
    # Freeing a large filled buffer takes milliseconds: not on the loop.
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(buffer.close)


async def _in_thread(
    function: Callable[..., None], limiter: anyio.CapacityLimiter, *args: object
) -> None:
    await anyio.to_thread.run_sync(function, *args, limiter=limiter)
