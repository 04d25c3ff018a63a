"""FragmentBuffer: storage for one fragment, filled once in place, then handed out as ``bytes``.

Callers of the cache get ``bytes``, so that no caller can corrupt the copy the RAM tier
keeps. A fragment is filled in place (``os.preadv`` from disk, chunk by chunk from the
network) and must not be copied afterwards: a copy of a large fragment costs a second
pass over memory and, done with the GIL held, stalls the event loop.

So the buffer is a ``bytes`` object created without content (C's
``PyBytes_FromStringAndSize(NULL, size)``, the documented way to build a ``bytes``
in place) and written through a view of its storage, before anyone else sees it. Its
memory comes from ``malloc`` like a ``bytearray``'s (a large one reuses what was freed
rather than faulting in fresh pages), and `freeze` hands the object itself out. Where
the C API is not reachable through ``ctypes`` (not CPython), a ``bytearray`` is filled
and copied into ``bytes`` instead.

Why this is sound (CPython 3.11 to 3.13, checked by tests/test_cache_buffer.py): the
object is new and referenced by this buffer alone until `freeze` (no cached hash yet,
nothing else can see it); ctypes takes over the new reference that
``PyBytes_FromStringAndSize`` returns (a ``py_object`` result is not increfed again), so
nothing leaks; the writable view does not own the memory, so it and every slice of it
are released (slices by ``with``, in threads that end before `freeze`) before the bytes
are handed out or dropped. The alternative, a ``bytearray`` copied into ``bytes``, is one
more pass over every fragment with the GIL held.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

__all__ = ["Buffer", "FragmentBuffer", "Reaper"]

# What the cache hands out: bytes (a VRAM stand-in may hand back a read-only memoryview).
Buffer = bytes | memoryview

_PYBUF_WRITE = 0x200


def _c_api() -> tuple[Any, Any, Any] | None:
    api = getattr(ctypes, "pythonapi", None)
    if api is None:
        return None
    new_bytes = api.PyBytes_FromStringAndSize
    new_bytes.restype = ctypes.py_object
    new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    address = api.PyBytes_AsString
    address.restype = ctypes.c_void_p
    address.argtypes = [ctypes.py_object]
    view = api.PyMemoryView_FromMemory
    view.restype = ctypes.py_object
    view.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
    return new_bytes, address, view


_C_API = _c_api()

# madvise(MADV_POPULATE_WRITE) faults a range of pages in at once (Linux >= 5.14).
_MADV_POPULATE_WRITE = 23
_PAGE = mmap.PAGESIZE


def _madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


# A foreign call through ctypes.CDLL lets go of the GIL while it runs.
_MADVISE = _madvise()


class FragmentBuffer:
    """``size`` bytes to fill once through `view`, then `freeze` into ``bytes``.

    Creating one takes microseconds at any size (the memory is touched only when it is
    filled), so it may be done on the event loop; filling runs in worker threads, which
    never write the same range. The writable view is the buffer's own: it must not
    outlive `freeze` or `close`.
    """

    __slots__ = ("_address", "_array", "_bytes", "_view", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._bytes: bytes | None = None
        self._array: bytearray | None = None
        self._address = 0
        if _C_API is not None and size > 0:
            new_bytes, address, view = _C_API
            self._bytes = new_bytes(None, size)
            self._address = address(self._bytes)
            # The view does not keep the bytes alive: this buffer does, until freeze.
            self._view: memoryview = view(self._address, size, _PYBUF_WRITE)
        else:
            self._array = bytearray(size)
            self._view = memoryview(self._array)

    def view(self) -> memoryview:
        """The writable view of the whole buffer."""
        return self._view

    def write(self, chunks: Sequence[bytes], offset: int) -> None:
        """Copy ``chunks`` in, one after the other, from ``offset``."""
        self.populate(offset, sum(len(chunk) for chunk in chunks))
        view = self._view
        for chunk in chunks:
            end = offset + len(chunk)
            view[offset:end] = chunk
            offset = end

    def populate(self, offset: int, length: int) -> None:
        """Fault the pages of a range in without holding the GIL (where the OS can), so
        that copying into them with the GIL held (a slice assignment) takes no page faults:
        a fault costs microseconds, a MiB has 256 of them, and the event loop waits."""
        if _MADVISE is None or self._bytes is None:
            return
        start = -(-(self._address + offset) // _PAGE) * _PAGE
        end = (self._address + offset + length) // _PAGE * _PAGE
        if end > start:
            _MADVISE(start, end - start, _MADV_POPULATE_WRITE)  # a failure only costs faults

    def freeze(self) -> bytes:
        """The content as ``bytes`` (no copy where the C API is there); the buffer is spent."""
        self._view.release()
        if self._bytes is not None:
            data, self._bytes = self._bytes, None
            return data
        assert self._array is not None, "buffer already frozen or closed"
        data = bytes(self._array)
        self._array = None
        return data

    def close(self) -> None:
        """Let go of the storage (idempotent); what `freeze` returned stays valid."""
        self._view.release()
        self._bytes = None
        self._array = None


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
