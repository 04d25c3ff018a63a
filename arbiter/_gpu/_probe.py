"""Memory probes: "read the device now", for the poller.

A probe is anything with ``async read() -> GpuReading`` and ``async aclose()``.
`NvmlProbe` reads a real NVIDIA GPU; ``arbiter.testing.FakeGpu`` is a scriptable one.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import anyio
import anyio.to_thread

from .._checks import check_bytes, check_device, check_pids
from ._info import GpuProbeError
from ._nvml import LIBRARY, LOCK_TIMEOUT, NvmlUnavailable, describe_error, open_device, read_memory

__all__ = ["GpuReading", "MemoryProbe", "NvmlProbe", "open_default_probe"]


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One reading of a GPU's memory, in bytes.

    Args:
        total: memory on the device.
        used: memory used by all processes (and the driver).
        ours: used by this process, or ``None`` when per-process figures are unavailable.
        external: used by other processes, or ``None`` when per-process figures are
            unavailable (the arbiter then takes ``used`` minus what it granted).

    Raises:
        TypeError, ValueError: a figure that is not an int >= 0 (or ``None`` where allowed).
    """

    total: int
    used: int
    ours: int | None = None
    external: int | None = None

    def __post_init__(self) -> None:
        check_bytes("total", self.total)
        check_bytes("used", self.used)
        if self.ours is not None:
            check_bytes("ours", self.ours)
        if self.external is not None:
            check_bytes("external", self.external)

    @property
    def free(self) -> int:
        """``total - used``, never negative."""
        return max(0, self.total - self.used)


@runtime_checkable
class MemoryProbe(Protocol):
    """Where the poller reads GPU memory: ``read()`` the device now, ``aclose()`` when done."""

    async def read(self) -> GpuReading:
        """Read the device now. May raise any ``Exception`` when the device cannot be read."""
        ...

    async def aclose(self) -> None:
        """Release what the probe holds. Idempotent."""
        ...


class NvmlProbe:
    """Reads one NVIDIA GPU through NVML, in a worker thread (never on the event loop).

    NVML is initialised at the first read (once per process, shared by every probe) and
    shut down when the last probe closes. A failed read drops the device handle, so the
    next read opens the device again (recovering after a driver reload or GPU reset).

    Args:
        device: the NVML index of the GPU, or its uuid (``"GPU-…"``).

    Raises:
        TypeError, ValueError: ``device`` is not an index >= 0 or a non-empty string.
    """

    __slots__ = ("_closed", "_device", "_handle", "_lock", "_nvml", "_own_pids")

    def __init__(self, device: int | str = 0) -> None:
        self._device = check_device(device)
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._handle: Any = None
        self._closed = False
        self._own_pids: frozenset[int] = frozenset()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._handle is not None else "idle"
        return f"NvmlProbe(device={self._device!r}, {state})"

    @property
    def device(self) -> int | str:
        """The GPU this probe reads."""
        return self._device

    @property
    def own_pids(self) -> frozenset[int]:
        """Processes besides this one whose GPU memory counts as ours, not external
        (the daemon's clients). Settable.

        Raises:
            TypeError: not a set of ints.
        """
        return self._own_pids

    @own_pids.setter
    def own_pids(self, pids: frozenset[int]) -> None:
        self._own_pids = check_pids("own_pids", pids)

    async def read(self) -> GpuReading:
        """Read the device's memory; per-process figures when NVML gives them.

        A cancelled read returns at once (the NVML call finishes in its thread unseen).

        Raises:
            GpuProbeError: NVML is missing, the device does not exist, or NVML failed.
            anyio.ClosedResourceError: the probe was closed.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        return await anyio.to_thread.run_sync(self._read_blocking, abandon_on_cancel=True)

    async def aclose(self) -> None:
        """Stop using the device; the last probe to close shuts NVML down. Idempotent."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close_blocking)

    async def __aenter__(self) -> NvmlProbe:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _open_locked(self) -> tuple[Any, Any]:
        if self._handle is None:
            try:
                nvml = LIBRARY.acquire()
            except NvmlUnavailable as exc:
                raise GpuProbeError(f"NVML is unavailable: {exc}") from exc.__cause__ or exc
            try:
                self._handle = open_device(nvml, self._device)
            except NvmlUnavailable as exc:
                LIBRARY.release()
                raise GpuProbeError(str(exc)) from exc.__cause__ or exc
            self._nvml = nvml
        return self._nvml, self._handle

    def _drop_locked(self) -> None:
        if self._handle is not None:
            self._handle = self._nvml = None
            LIBRARY.release()

    def _read_blocking(self) -> GpuReading:
        with self._lock:
            if self._closed:
                raise anyio.ClosedResourceError
            nvml, handle = self._open_locked()
        # The NVML call runs outside the lock, so a read stuck in the driver cannot keep
        # aclose() from returning.
        try:
            own = self._own_pids | {os.getpid()}
            total, used, ours, external = read_memory(nvml, handle, own)
        except Exception as exc:
            with self._lock:
                if self._handle is handle:
                    self._drop_locked()
            raise GpuProbeError(
                f"NVML could not read GPU {self._device!r}: {describe_error(exc)}"
            ) from exc
        return GpuReading(total=total, used=used, ours=ours, external=external)

    def _close_blocking(self) -> None:
        if not self._lock.acquire(timeout=LOCK_TIMEOUT):
            self._closed = True  # an open is stuck in the driver; leak its hold, do not hang
            return
        try:
            self._closed = True
            self._drop_locked()
        finally:
            self._lock.release()


async def open_default_probe(device: int | str = 0) -> MemoryProbe | None:
    """An `NvmlProbe` of ``device`` when NVML initialises and the device can be read,
    else ``None``. Failures never raise; only a bad ``device`` argument does.

    Raises:
        TypeError, ValueError: ``device`` is not an index >= 0 or a non-empty string.
    """
    probe = NvmlProbe(device)
    try:
        # Not abandoned on cancel: the thread must finish so that its NVML hold is
        # handed back by aclose() below, not leaked.
        await anyio.to_thread.run_sync(probe._read_blocking)
    except Exception:
        await probe.aclose()
        return None
    except BaseException:
        await probe.aclose()
        raise
    return probe
