"""FragmentBuffer: preallocated storage for one fragment, filled once, then frozen read-only.

Callers of the cache get bytes-like objects they cannot write to, so that no caller can
corrupt the copy the RAM tier keeps. A fragment is filled in place (``os.preadv`` from
disk, ``os.pwritev`` from the network), so its storage must be writable while it fills
and immutable afterwards, without a copy (a copy of a large fragment would hold the GIL
and stall the event loop). On Linux the storage is a ``memfd``: it is filled through a
writable shared mapping or the descriptor, and frozen by mapping it again read-only (a
read-only ``mmap`` refuses writes through any view of it, ``memoryview.obj`` included).
Each frozen large fragment keeps one file descriptor until it is dropped (Python < 3.13
duplicates the descriptor for every ``mmap``). Small fragments, and every fragment where
``memfd_create`` is missing, are filled in a ``bytearray`` and frozen into ``bytes`` by a
copy, which is cheap at their size.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from .._types import MiB

__all__ = ["Buffer", "FragmentBuffer", "Reaper"]

# What the cache hands out: bytes, or a read-only memoryview of an immutable mapping.
Buffer = bytes | memoryview

# Below this size a bytearray and a copy cost less than a memfd and two mappings.
MEMFD_MIN_SIZE = 1 * MiB


def _readonly_map(fd: int, size: int) -> mmap.mmap:
    if sys.version_info >= (3, 13):
        # Keeps no duplicate descriptor: the mapping alone holds the memory.
        kwargs: dict[str, Any] = {"trackfd": False}
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ, **kwargs)
    return mmap.mmap(fd, size, access=mmap.ACCESS_READ)


class FragmentBuffer:
    """``size`` bytes to fill once through `view` or `pwritev`, then `freeze`.

    Every method blocks (copying, mapping or unmapping memory takes milliseconds per
    hundred MiB) and runs in a worker thread; threads never write the same range.
    The writable mapping exists only once `view` asks for it (disk reads ``preadv``
    into it); downloads write through the descriptor and read through the read-only
    mapping that `freeze` hands out, so their freeze has nothing to unmap.
    """

    __slots__ = ("_array", "_fd", "_readonly", "_writable", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._fd = -1
        self._writable: mmap.mmap | None = None
        self._readonly: mmap.mmap | None = None
        self._array: bytearray | None = None
        if size >= MEMFD_MIN_SIZE and hasattr(os, "memfd_create"):
            fd = os.memfd_create("arbiter-fragment", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        else:
            self._array = bytearray(size)

    def view(self) -> memoryview:
        """A writable view of the whole buffer (release it before `freeze`)."""
        if self._fd >= 0:
            if self._writable is None:
                self._writable = mmap.mmap(self._fd, self.size)
            return memoryview(self._writable)
        assert self._array is not None, "buffer already frozen or closed"
        return memoryview(self._array)

    def pwritev(self, chunks: Sequence[bytes], offset: int) -> None:
        """Copy ``chunks`` in at ``offset`` (without the GIL where the storage is a memfd)."""
        if self._fd >= 0:
            expected = sum(len(c) for c in chunks)
            written = os.pwritev(self._fd, chunks, offset)
            if written != expected:  # shmem writes are never short but by a failure
                joined = b"".join(chunks)[written:]
                while joined:
                    n = os.pwrite(self._fd, joined, offset + written)
                    written += n
                    joined = joined[n:]
            return
        assert self._array is not None, "buffer already frozen or closed"
        for chunk in chunks:
            self._array[offset : offset + len(chunk)] = chunk
            offset += len(chunk)

    def digest_into(self, hasher: Any, offset: int, length: int) -> None:
        """Feed ``length`` bytes from ``offset`` to ``hasher`` in one call (one GIL release)."""
        if self._fd >= 0:
            if self._readonly is None:
                self._readonly = _readonly_map(self._fd, self.size)
            with memoryview(self._readonly) as view, view[offset : offset + length] as part:
                hasher.update(part)
            return
        with self.view() as view, view[offset : offset + length] as part:
            hasher.update(part)

    def freeze(self) -> Buffer:
        """The content as an immutable bytes-like object; the buffer is spent afterwards."""
        if self._array is not None:
            data = bytes(self._array)
            self._array = None
            return data
        assert self._fd >= 0, "buffer already frozen or closed"
        frozen = (
            self._readonly if self._readonly is not None else _readonly_map(self._fd, self.size)
        )
        self._readonly = None
        self.close()
        return memoryview(frozen)

    def close(self) -> None:
        """Let go of the storage (idempotent); frozen views stay valid."""
        self._array = None
        for mapping in (self._writable, self._readonly):
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:
                    pass  # a view is still exported; the mapping goes with that view
        self._writable = self._readonly = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Reaper:
    """Drops large buffers in a worker thread.

    Unmapping or freeing a large buffer takes milliseconds per hundred MiB (tens for a
    GiB); the tiers hand what they evict here instead of dropping it on the event loop.
    Before `attach`, and after the task group is gone, buffers are dropped at once.
    """

    __slots__ = ("_tg",)

    def __init__(self) -> None:
        self._tg: anyio.abc.TaskGroup | None = None

    def attach(self, tg: anyio.abc.TaskGroup | None) -> None:
        """Drop buried buffers in tasks of ``tg`` (``None``: drop them at once)."""
        self._tg = tg

    def bury(self, victims: list[Any]) -> None:
        """Take over the references in ``victims`` and drop them off the event loop."""
        if victims and self._tg is not None:
            self._tg.start_soon(self._drop, victims)
        else:
            victims.clear()

    @staticmethod
    async def _drop(victims: list[Any]) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(victims.clear)
