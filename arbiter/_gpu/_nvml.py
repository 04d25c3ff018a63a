"""NVML through NVIDIA's ``pynvml`` module: imported lazily, initialised once per process.

Everything here is synchronous and may block (NVML talks to the driver); callers run it
in a worker thread. NVML's own exceptions never leave this package as themselves: they
become `NvmlUnavailable` (here) or `GpuProbeError` (in the probe), with the cause chained.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Callable, Iterator, Set
from contextlib import contextmanager
from typing import Any

from ._info import GpuInfo, GpuVendor

__all__ = [
    "LIBRARY",
    "NvmlLibrary",
    "NvmlUnavailable",
    "describe_error",
    "list_gpus",
    "nvml_session",
    "open_device",
    "per_process_usage",
    "read_memory",
]

# How long a thread waits for another thread's nvmlInit / nvmlShutdown before giving up:
# a driver that hangs in init must not hang every later caller with it.
LOCK_TIMEOUT = 5.0


class NvmlUnavailable(Exception):
    """NVML cannot be used here: no module, no library, no driver, or a call failed."""


def describe_error(exc: BaseException) -> str:
    """``"NVMLError_GpuIsLost: GPU is lost"``, without letting ``str()`` raise.

    pynvml's ``NVMLError.__str__`` asks the library for the message, which may itself fail.
    """
    try:
        text = str(exc)
    except Exception:
        text = repr(getattr(exc, "value", ""))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class NvmlLibrary:
    """The process-wide NVML session: ``nvmlInit`` for the first user, ``nvmlShutdown``
    when the last one leaves. Thread-safe; every method may block."""

    __slots__ = ("_lock", "_module", "_users")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._module: Any = None
        self._users = 0

    @property
    def users(self) -> int:
        """How many holders of the session there are now."""
        return self._users

    def acquire(self) -> Any:
        """Import ``pynvml`` and initialise NVML if nobody has; return the module.

        Raises:
            NvmlUnavailable: the module is missing or NVML did not initialise.
        """
        if not self._lock.acquire(timeout=LOCK_TIMEOUT):
            raise NvmlUnavailable("NVML is busy: another thread is stuck initialising it")
        try:
            if self._users == 0:
                try:
                    module = importlib.import_module("pynvml")
                except Exception as exc:
                    raise NvmlUnavailable(f"pynvml cannot be imported: {exc}") from exc
                try:
                    module.nvmlInit()
                except Exception as exc:
                    raise NvmlUnavailable(f"nvmlInit failed: {describe_error(exc)}") from exc
                self._module = module
            self._users += 1
            return self._module
        finally:
            self._lock.release()

    def release(self) -> None:
        """Give one hold back; the last one shuts NVML down. Never raises."""
        if not self._lock.acquire(timeout=LOCK_TIMEOUT):
            return  # a stuck init holds the lock; leaking one hold beats hanging the caller
        try:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0:
                module, self._module = self._module, None
                try:
                    module.nvmlShutdown()
                except Exception:
                    pass  # the process is done with NVML either way
        finally:
            self._lock.release()


# NVML keeps per-process state, so its session is per process too.
LIBRARY = NvmlLibrary()


@contextmanager
def nvml_session() -> Iterator[Any]:
    """Hold the NVML session for a ``with`` block; yields the ``pynvml`` module."""
    module = LIBRARY.acquire()
    try:
        yield module
    finally:
        LIBRARY.release()


def _text(value: object) -> str | None:
    # Older pynvml releases return bytes where newer ones return str.
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        value = value.strip().strip("\x00")
        return value or None
    return None


def _optional(call: Callable[[Any], object], handle: Any) -> str | None:
    try:
        return _text(call(handle))
    except Exception:
        return None


def list_gpus() -> list[GpuInfo]:
    """Every GPU NVML can read, in NVML index order.

    A device that cannot be read (lost, in reset) is left out; its name and uuid are
    optional.

    Raises:
        NvmlUnavailable: NVML is not there or cannot count its devices.
    """
    with nvml_session() as nvml:
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            raise NvmlUnavailable(f"nvmlDeviceGetCount failed: {describe_error(exc)}") from exc
        gpus: list[GpuInfo] = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                total, free = int(memory.total), int(memory.free)
            except Exception:
                continue
            if total <= 0:
                continue
            gpus.append(
                GpuInfo(
                    index=index,
                    name=_optional(nvml.nvmlDeviceGetName, handle) or "NVIDIA GPU",
                    vendor=GpuVendor.NVIDIA,
                    total_vram_bytes=total,
                    free_vram_bytes=min(max(free, 0), total),
                    uuid=_optional(nvml.nvmlDeviceGetUUID, handle),
                )
            )
        return gpus


def open_device(nvml: Any, device: int | str) -> Any:
    """The NVML handle of ``device`` (an index, or a uuid such as ``"GPU-…"``).

    Raises:
        NvmlUnavailable: there is no such device, or NVML failed.
    """
    try:
        if isinstance(device, str):
            return nvml.nvmlDeviceGetHandleByUUID(device)
        return nvml.nvmlDeviceGetHandleByIndex(device)
    except Exception as exc:
        raise NvmlUnavailable(f"GPU {device!r} cannot be opened: {describe_error(exc)}") from exc


def _pid_visible(pid: int) -> bool:
    # Linux only: elsewhere there is no cheap, side-effect-free existence check.
    if sys.platform.startswith("linux"):
        return os.path.exists(f"/proc/{pid}")
    return True


def per_process_usage(
    nvml: Any, handle: Any, own_pid: int | Set[int]
) -> tuple[int | None, int | None]:
    """``(ours, external)`` from NVML's process lists, or ``(None, None)`` when unknown.

    ``own_pid`` is our pid, or the set of pids whose memory is ours (a daemon counts
    its clients' processes as its own: their memory is what it granted them).

    Unknown means: a list call failed or is unsupported, a process's memory is not
    reported (``usedGpuMemory`` is ``None``), no process is listed at all, or the pids are
    not of our pid namespace (a container sees the host's pids, so it could not tell its
    own process from others). The caller then falls back to ``used - granted``.
    """
    usage: dict[int, int] = {}
    for list_processes in (
        nvml.nvmlDeviceGetComputeRunningProcesses,
        nvml.nvmlDeviceGetGraphicsRunningProcesses,
    ):
        try:
            processes = list_processes(handle)
        except Exception:
            return None, None
        for process in processes:
            pid = getattr(process, "pid", None)
            used = getattr(process, "usedGpuMemory", None)
            if not isinstance(pid, int) or not isinstance(used, int) or used < 0:
                return None, None
            # A process with both a compute and a graphics context is listed twice with
            # the same memory; counting it once avoids doubling it.
            usage[pid] = max(usage.get(pid, 0), used)
    if not usage:
        return None, None
    own = {own_pid} if isinstance(own_pid, int) else own_pid
    if own.isdisjoint(usage) and not all(_pid_visible(pid) for pid in usage):
        return None, None
    ours = sum(used for pid, used in usage.items() if pid in own)
    return ours, sum(usage.values()) - ours


def read_memory(
    nvml: Any, handle: Any, own_pid: int | Set[int]
) -> tuple[int, int, int | None, int | None]:
    """``(total, used, ours, external)`` in bytes for one device.

    Raises:
        Exception: whatever NVML raised reading the memory totals (callers wrap it).
    """
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    total, used = int(memory.total), int(memory.used)
    ours, external = per_process_usage(nvml, handle, own_pid)
    return total, min(max(used, 0), total), ours, external
