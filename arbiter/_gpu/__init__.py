"""GPU detection (NVML, nvidia-smi, rocm-smi) and memory probes.

Nothing here imports ``pynvml`` at import time: NVML is loaded at the first detection or
probe read, so the package works on machines without a GPU.
"""

from __future__ import annotations

from ._detect import GpuDetector
from ._info import DetectionMethod, GpuDetectionResult, GpuInfo, GpuProbeError, GpuVendor
from ._probe import GpuReading, MemoryProbe, NvmlProbe, open_default_probe

__all__ = [
    "DetectionMethod",
    "GpuDetectionResult",
    "GpuDetector",
    "GpuInfo",
    "GpuProbeError",
    "GpuReading",
    "GpuVendor",
    "MemoryProbe",
    "NvmlProbe",
    "open_default_probe",
]
