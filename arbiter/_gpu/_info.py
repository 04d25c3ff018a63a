"""What detection reports: the method that worked and the GPUs it saw."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .._checks import MAX_BYTES, MAX_DEVICE, check_count
from .._errors import GpuProbeError

__all__ = [
    "DetectionMethod",
    "GpuDetectionResult",
    "GpuInfo",
    "GpuProbeError",
    "GpuVendor",
]


class DetectionMethod(StrEnum):
    """How the GPUs were found, in the order detection tries them."""

    NVML = "nvml"
    NVIDIA_SMI = "nvidia_smi"
    ROCM_SMI = "rocm_smi"
    NONE = "none"


class GpuVendor(StrEnum):
    """Who made a GPU."""

    NVIDIA = "nvidia"
    AMD = "amd"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One detected GPU.

    Args:
        index: the device index as NVML / nvidia-smi / rocm-smi number it (PCI order,
            not ``CUDA_VISIBLE_DEVICES`` order).
        name: the product name (``"NVIDIA H100 80GB HBM3"``).
        vendor: who made it.
        total_vram_bytes: the device's memory, > 0.
        free_vram_bytes: what was free when detected, or ``None`` when the tool did not say.
        uuid: the device's stable id (``"GPU-…"`` for NVIDIA), or ``None``.

    Raises:
        TypeError, ValueError: a field of the wrong type or out of range.
    """

    index: int
    name: str
    vendor: GpuVendor
    total_vram_bytes: int
    free_vram_bytes: int | None = None
    uuid: str | None = None

    def __post_init__(self) -> None:
        check_count("index", self.index, minimum=0, maximum=MAX_DEVICE)
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {self.name!r}")
        if not isinstance(self.vendor, GpuVendor):
            if not isinstance(self.vendor, str):
                raise TypeError(f"vendor must be a GpuVendor, got {self.vendor!r}")
            try:
                object.__setattr__(self, "vendor", GpuVendor(self.vendor))
            except ValueError:
                choices = ", ".join(v.value for v in GpuVendor)
                raise ValueError(f"vendor must be one of {choices}, got {self.vendor!r}") from None
        check_count("total_vram_bytes", self.total_vram_bytes, minimum=1, maximum=MAX_BYTES)
        if self.free_vram_bytes is not None:
            check_count("free_vram_bytes", self.free_vram_bytes, minimum=0)
            if self.free_vram_bytes > self.total_vram_bytes:
                raise ValueError(
                    f"free_vram_bytes {self.free_vram_bytes} exceeds "
                    f"total_vram_bytes {self.total_vram_bytes}"
                )
        if self.uuid is not None and not isinstance(self.uuid, str):
            raise TypeError(f"uuid must be a str or None, got {self.uuid!r}")

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-ready values."""
        return {
            "index": self.index,
            "name": self.name,
            "vendor": self.vendor.value,
            "total_vram_bytes": self.total_vram_bytes,
            "free_vram_bytes": self.free_vram_bytes,
            "uuid": self.uuid,
        }


@dataclass(frozen=True, slots=True)
class GpuDetectionResult:
    """What `GpuDetector.detect` found.

    Args:
        method: the method that found the GPUs (``NONE`` when none worked).
        gpus: every GPU found, in index order.
        total_vram_bytes: the sum of ``total_vram_bytes`` over ``gpus``.

    Raises:
        TypeError: a field of the wrong type.
        ValueError: ``total_vram_bytes`` is not the sum over ``gpus``.
    """

    method: DetectionMethod
    gpus: list[GpuInfo]
    total_vram_bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.method, DetectionMethod):
            raise TypeError(f"method must be a DetectionMethod, got {self.method!r}")
        if not isinstance(self.gpus, list) or not all(isinstance(g, GpuInfo) for g in self.gpus):
            raise TypeError(f"gpus must be a list of GpuInfo, got {self.gpus!r}")
        check_count("total_vram_bytes", self.total_vram_bytes, minimum=0)
        expected = sum(g.total_vram_bytes for g in self.gpus)
        if self.total_vram_bytes != expected:
            raise ValueError(
                f"total_vram_bytes must be the sum over gpus ({expected}), "
                f"got {self.total_vram_bytes}"
            )

    @classmethod
    def of(cls, method: DetectionMethod, gpus: list[GpuInfo]) -> GpuDetectionResult:
        """A result whose total is computed from ``gpus``."""
        return cls(method, gpus, sum(g.total_vram_bytes for g in gpus))

    def as_dict(self) -> dict[str, Any]:
        """``{"method", "gpus": [...], "total_vram_bytes"}`` as plain JSON-ready values."""
        return {
            "method": self.method.value,
            "gpus": [g.as_dict() for g in self.gpus],
            "total_vram_bytes": self.total_vram_bytes,
        }
