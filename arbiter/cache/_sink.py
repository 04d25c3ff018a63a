"""DownloadSink: where one download's bytes go, hashed as they arrive.

The bytes go to a temp file inside the disk tier (when the disk tier takes the
fragment), to a `FragmentBuffer` (when the caller wants the bytes), or to both. The
temp file becomes the fragment only through `DiskLayout.commit`, after `matches`.
Every method but `matches` blocks and runs in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from ._buffer import Buffer, FragmentBuffer
from ._disk import DiskLayout
from ._manifest import FragmentInfo, disk_name

__all__ = ["DownloadSink"]

# pwritev takes at most IOV_MAX (1024 on Linux) pieces; more small pieces are joined first.
IOV_LIMIT = 512


class DownloadSink:
    """The receiving end of one fragment's download.

    Args:
        info: the manifest entry being downloaded.
        buffer: where the bytes go in memory, or ``None``.
        layout: the disk tier to download into (through a temp file), or ``None``.
        writeback_step: bytes of the temp file between two starts of writeback (0: none).
    """

    __slots__ = (
        "_buffer",
        "_committed",
        "_flushed",
        "_hasher",
        "_layout",
        "_temp_fd",
        "_temp_path",
        "_writeback_step",
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
        self._temp_fd = -1
        self._temp_path: str | None = None
        self._committed = False
        self._flushed = 0
        self._writeback_step = writeback_step if hasattr(os, "posix_fadvise") else 0

    @property
    def to_disk(self) -> bool:
        """Whether the download lands in the disk tier."""
        return self._layout is not None

    def open(self) -> None:
        """Create the temp file (when downloading to disk)."""
        if self._layout is not None and self._temp_fd < 0:
            self._temp_fd, self._temp_path = self._layout.new_temp(disk_name(self.info.id))

    def write(self, chunks: Sequence[bytes]) -> None:
        """Hash ``chunks`` and store them at the current offset."""
        if len(chunks) > IOV_LIMIT:
            chunks = [b"".join(chunks)]
        length = sum(len(c) for c in chunks)
        if self._buffer is not None:
            self._buffer.pwritev(chunks, self.offset)
            # One large update instead of one per network chunk: each update lets go of
            # the GIL and takes it back, and every take can keep the event loop waiting.
            self._buffer.digest_into(self._hasher, self.offset, length)
        else:
            for chunk in chunks:
                self._hasher.update(chunk)
        if self._temp_fd >= 0:
            _pwrite_all(self._temp_fd, chunks, self.offset)
        self.offset += length
        step = self._writeback_step
        if step and self._temp_fd >= 0 and self.offset - self._flushed >= step:
            # DONTNEED starts writing the range back without waiting for it (Linux): the
            # fsync before the commit then finds little left to do.
            length = self.offset - self._flushed
            os.posix_fadvise(self._temp_fd, self._flushed, length, os.POSIX_FADV_DONTNEED)
            self._flushed = self.offset

    def restart(self) -> None:
        """Forget every byte received: the next byte is byte 0 again."""
        self._hasher = hashlib.sha256()
        self.offset = 0
        self._flushed = 0
        if self._temp_fd >= 0:
            os.ftruncate(self._temp_fd, 0)

    def matches(self) -> bool:
        """Whether exactly the manifest's size arrived and it hashes to the manifest's sha256."""
        return self.offset == self.info.size and self._hasher.hexdigest() == self.info.sha256

    def commit(self) -> None:
        """Make the verified temp file the disk tier's copy (fsync, replace, fsync the folder)."""
        assert self._layout is not None and self._temp_path is not None
        self._layout.commit(self._temp_fd, self._temp_path, disk_name(self.info.id))
        self._committed = True

    def result(self) -> Buffer | None:
        """The verified bytes (when a buffer was given); the buffer is spent."""
        if self._buffer is None:
            return None
        data = self._buffer.freeze()
        self._buffer = None
        return data

    def discard(self) -> None:
        """Close everything; the temp file goes unless it was committed (idempotent)."""
        if self._temp_fd >= 0:
            os.close(self._temp_fd)
            self._temp_fd = -1
        if self._temp_path is not None and not self._committed:
            try:
                os.unlink(self._temp_path)
            except FileNotFoundError:
                pass
        self._temp_path = None
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None


def _pwrite_all(fd: int, chunks: Sequence[bytes], offset: int) -> None:
    expected = sum(len(c) for c in chunks)
    written = os.pwritev(fd, chunks, offset)
    if written < expected:
        rest = memoryview(b"".join(chunks))[written:]
        while rest:
            n = os.pwrite(fd, rest, offset + written)
            written += n
            rest = rest[n:]
