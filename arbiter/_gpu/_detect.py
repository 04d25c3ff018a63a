"""GpuDetector: NVML, then nvidia-smi, then rocm-smi, then nothing; bounded in time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .._checks import check_seconds
from .._types import check_memory
from ._info import DetectionMethod, GpuDetectionResult, GpuInfo, GpuVendor
from ._nvml import list_gpus
from ._smi import tool_gpus

__all__ = ["DEFAULT_TOOL_TIMEOUT", "DETECTION_TIMEOUT", "GpuDetector"]

# The longest any one method may take (NVML or one tool).
DEFAULT_TOOL_TIMEOUT = 5.0
# The longest a whole detection may take; less than three full steps so that killing and
# reaping a hung tool still fits inside the 15 s the contract promises.
DETECTION_TIMEOUT = 13.0


def _in_thread(find: Callable[[], list[GpuInfo]], timeout: float) -> list[GpuInfo]:
    # NVML runs in-process and cannot be interrupted; a daemon thread lets detection give
    # up on a driver that hangs and move on (the thread finishes, or dies with the process).
    found: list[list[GpuInfo]] = []

    def work() -> None:
        try:
            found.append(find())
        except Exception:
            pass  # any failure here only means: try the next method

    thread = threading.Thread(target=work, name="arbiter-nvml-detect", daemon=True)
    thread.start()
    thread.join(timeout)
    return found[0] if found else []


class GpuDetector:
    """Finds the GPUs of this machine: NVML (``pynvml``), then ``nvidia-smi``, then
    ``rocm-smi``; method ``NONE`` when none works.

    A method that is missing, fails, hangs or prints garbage falls through to the next;
    detection never raises and returns within ``3 * timeout`` seconds (at most 13 s).

    Args:
        timeout: the longest one method may take, in seconds, in (0, 5].

    Raises:
        TypeError, ValueError: ``timeout`` is not a number in (0, 5].
    """

    __slots__ = ("_timeout",)

    def __init__(self, *, timeout: float = DEFAULT_TOOL_TIMEOUT) -> None:
        self._timeout = check_seconds("timeout", timeout, maximum=DEFAULT_TOOL_TIMEOUT)

    def __repr__(self) -> str:
        return f"GpuDetector(timeout={self._timeout:g})"

    @property
    def timeout(self) -> float:
        """The longest one method may take, in seconds."""
        return self._timeout

    def detect(self) -> GpuDetectionResult:
        """Every GPU the first working method sees; method ``NONE`` and no GPUs otherwise.

        Blocks (up to ``3 * timeout`` seconds); never raises.
        """
        # Real subprocesses and threads bound this, and it runs before any event loop
        # exists, so the bound is wall-clock time, not the loop's clock.
        deadline = time.monotonic() + min(3 * self._timeout, DETECTION_TIMEOUT)
        methods: tuple[tuple[DetectionMethod, Callable[[float], list[GpuInfo]]], ...] = (
            (DetectionMethod.NVML, lambda t: _in_thread(list_gpus, t)),
            (DetectionMethod.NVIDIA_SMI, lambda t: tool_gpus("nvidia-smi", t)),
            (DetectionMethod.ROCM_SMI, lambda t: tool_gpus("rocm-smi", t)),
        )
        for method, find in methods:
            left = min(self._timeout, deadline - time.monotonic())
            if left <= 0:
                break
            try:
                gpus = find(left)
            except Exception:
                continue
            if gpus:
                return GpuDetectionResult.of(method, gpus)
        return GpuDetectionResult.of(DetectionMethod.NONE, [])

    def detect_or_default(self, default_bytes: int) -> GpuDetectionResult:
        """`detect`, or, when nothing is found, method ``NONE`` with one assumed GPU
        (index 0, vendor ``UNKNOWN``, ``default_bytes`` of VRAM, free and uuid unknown).

        Never raises for a detection failure.

        Raises:
            TypeError, ValueError: ``default_bytes`` is not an int > 0.
        """
        check_memory(default_bytes, "default_bytes")
        result = self.detect()
        if result.gpus:
            return result
        assumed = GpuInfo(
            index=0,
            name="assumed GPU",
            vendor=GpuVendor.UNKNOWN,
            total_vram_bytes=default_bytes,
            free_vram_bytes=None,
            uuid=None,
        )
        return GpuDetectionResult.of(DetectionMethod.NONE, [assumed])
