"""DownloadSink: where one download's bytes go, hashed as they arrive.

The bytes go to a `FragmentBuffer` (when the caller wants them), to a temp file inside
the disk tier (when the disk tier takes the fragment), or to both. With a buffer, each
batch is copied in once and everything else (sha256, the xxh3-128 of the checksum
record, the write to the temp file) reads that same memory, in the same thread, right
after it was written: a batch (1 MiB) is still in the core's cache then, and sha256
over cached bytes costs 0.6 s/GiB of CPU on the dev box against 1.0 s/GiB over bytes
that have gone out to memory, which is what a sha256 thread of its own trailing the
writes read (measured). The thread that writes keeps up with the network all the same
(each byte costs the event loop more to receive than the writer to store and hash). The
temp file becomes the fragment only through `DiskLayout.commit`, after `matches`.

A disk tier that cannot take the bytes (no room, a quota, a file system remounted
read-only, a failing drive) does not fail a download that fills a buffer: the temp
file is dropped and the bytes go on into memory only. The disk tier is a cache. Every method
but `matches` blocks and runs in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from ._buffer import FragmentBuffer
from ._disk import DiskLayout
from ._manifest import FragmentInfo, disk_name
from ._record import ChecksumRecord, Hasher, fast_hasher

__all__ = ["DiskUnwritable", "DownloadSink"]

# pwritev takes at most IOV_MAX (1024 on Linux) pieces; more small pieces are joined first.
IOV_LIMIT = 512


class DiskUnwritable(OSError):
    """The disk tier cannot take a download that has nowhere else to go (internal)."""


class DownloadSink:
    """The receiving end of one fragment's download.

    Args:
        info: the manifest entry being downloaded.
        buffer: where the bytes go in memory, or ``None``.
        layout: the disk tier to download into (through a temp file), or ``None``.
        writeback_step: bytes of the temp file between two starts of writeback (0: none).

    Attributes:
        disk_refused: why the disk tier did not take the fragment after all (no room,
            a write error), or ``None``.
    """

    __slots__ = (
        "_buffer",
        "_committed",
        "_fast",
        "_flushed",
        "_hasher",
        "_layout",
        "_temp_fd",
        "_temp_path",
        "_writeback_step",
        "disk_refused",
        "info",
        "offset",
    )

    def __init__(
        self,
        info: FragmentInfo,
        *,
        buffer: FragmentBuffer | None,
        layout: DiskLayout | None,
        writeback_step: int = 0,
    ) -> None:
        self.info = info
        self.offset = 0
        self._buffer = buffer
        self._layout = layout
        self._hasher = hashlib.sha256()
        self._fast: Hasher | None = fast_hasher() if layout is not None else None
        self._temp_fd = -1
        self._temp_path: str | None = None
        self._committed = False
        self._flushed = 0
        self._writeback_step = writeback_step if hasattr(os, "posix_fadvise") else 0
        self.disk_refused: str | None = None

    @property
    def to_disk(self) -> bool:
        """Whether the download (still) lands in the disk tier."""
        return self._layout is not None

    def open(self) -> int | None:
        """Create the temp file (when downloading to disk); returns the bytes the file
        system has free, or ``None`` (no disk, or it cannot be written)."""
        if self._layout is None or self._temp_fd >= 0:
            return None
        try:
            free = self._layout.free_bytes()
            self._temp_fd, self._temp_path = self._layout.new_temp(disk_name(self.info.id))
        except OSError as exc:
            self.give_up_disk(repr(exc))
            return None
        return free

    def write(self, chunks: Sequence[bytes]) -> None:
        """Hash ``chunks`` and store them at the current offset."""
        length = sum(len(c) for c in chunks)
        if self._buffer is not None and self._temp_fd >= 0 and self._store(chunks):
            # Into the buffer from the temp file just written: a second copy, but one call
            # without the GIL, where a copy here would hold the GIL that the event loop
            # waits for. The pages are faulted in first, in one call (fewer faults).
            self._buffer.populate(self.offset, length)
            with self._buffer.view()[self.offset : self.offset + length] as stored:
                _pread_all(self._temp_fd, stored, self.offset)
                self._hash(stored)
        elif self._buffer is not None:
            self._buffer.write(chunks, self.offset)
            # One large update per hash instead of one per network chunk: each update
            # lets go of the GIL and takes it back, and every take can keep the loop waiting.
            with self._buffer.view()[self.offset : self.offset + length] as stored:
                self._hash(stored)
        else:
            for chunk in chunks:
                self._hash(chunk)
            if self._temp_fd >= 0 and not self._store(chunks):
                raise DiskUnwritable(f"the disk tier cannot take {self.info.id!r}")
        self.offset += length
        self._writeback()

    def _hash(self, data: bytes | memoryview) -> None:
        # hashlib and xxhash let go of the GIL while they hash more than a few KiB.
        self._hasher.update(data)
        if self._fast is not None:
            self._fast.update(data)

    def _writeback(self) -> None:
        step = self._writeback_step
        if step and self._temp_fd >= 0 and self.offset - self._flushed >= step:
            # DONTNEED starts writing the range back without waiting for it (Linux): the
            # fsync before the commit then finds little left to do.
            length = self.offset - self._flushed
            os.posix_fadvise(self._temp_fd, self._flushed, length, os.POSIX_FADV_DONTNEED)
            self._flushed = self.offset

    def _store(self, chunks: Sequence[bytes]) -> bool:
        """Write ``chunks`` to the temp file; False (the disk given up) when that fails."""
        if len(chunks) > IOV_LIMIT:
            chunks = [b"".join(chunks)]
        try:
            _pwrite_all(self._temp_fd, chunks, self.offset)
        except OSError as exc:
            self.give_up_disk(repr(exc))
            return False
        return True

    def give_up_disk(self, reason: str) -> None:
        """Go on without the disk tier: the temp file goes, the bytes go to memory only."""
        self.disk_refused = reason
        self._layout = None
        self._fast = None
        self._close_temp()

    def restart(self) -> None:
        """Forget every byte received: the next byte is byte 0 again."""
        self._hasher = hashlib.sha256()
        if self._fast is not None:
            self._fast = fast_hasher()
        self.offset = 0
        self._flushed = 0
        if self._temp_fd >= 0:
            os.ftruncate(self._temp_fd, 0)

    def matches(self) -> bool:
        """Whether exactly the manifest's size arrived and it hashes to the manifest's sha256."""
        return self.offset == self.info.size and self._hasher.hexdigest() == self.info.sha256

    def commit(self) -> bool:
        """Make the verified temp file the disk tier's copy (fsync, replace, fsync the
        folder), with its checksum record. False when the disk tier could not take it
        after all (the bytes are still in the buffer, if any)."""
        if self._layout is None or self._fast is None or self._temp_path is None:
            return False
        record = ChecksumRecord(self._fast.hexdigest(), self.info.size, self.info.sha256)
        try:
            self._layout.commit(self._temp_fd, self._temp_path, disk_name(self.info.id), record)
        except OSError as exc:
            self.give_up_disk(repr(exc))
            return False
        self._committed = True
        return True

    def result(self) -> bytes | None:
        """The verified bytes (when a buffer was given); the buffer is spent."""
        if self._buffer is None:
            return None
        data = self._buffer.freeze()
        self._buffer = None
        return data

    def discard(self) -> None:
        """Close everything; the temp file goes unless it was committed (idempotent)."""
        self._close_temp()
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None

    def _close_temp(self) -> None:
        if self._temp_fd >= 0:
            os.close(self._temp_fd)
            self._temp_fd = -1
        if self._temp_path is not None and not self._committed:
            try:
                os.unlink(self._temp_path)
            except FileNotFoundError:
                pass
        self._temp_path = None


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(f"the temp file ended at {offset + done} bytes")
        done += n


def _pwrite_all(fd: int, chunks: Sequence[bytes | memoryview], offset: int) -> None:
    expected = sum(len(c) for c in chunks)
    written = os.pwritev(fd, chunks, offset)
    if written < expected:
        rest = memoryview(b"".join(chunks))[written:]
        while rest:
            n = os.pwrite(fd, rest, offset + written)
            written += n
            rest = rest[n:]
