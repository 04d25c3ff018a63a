"""Units, workload and priority enums, and the argument coercions they share."""

from __future__ import annotations

import math
from enum import IntEnum, StrEnum

from ._checks import check_bytes, shown

__all__ = [
    "GiB",
    "KiB",
    "MiB",
    "MemoryPressure",
    "Priority",
    "WorkloadType",
    "check_memory",
    "check_timeout",
    "coerce_priority",
    "coerce_workload",
    "format_bytes",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class WorkloadType(StrEnum):
    """What an allocation is for. Image and video generation form the diffusion family."""

    LLM_INFERENCE = "llm_inference"
    IMAGE_GENERATION = "image_generation"
    VIDEO_GENERATION = "video_generation"

    @property
    def is_diffusion(self) -> bool:
        """True for the diffusion family (image and video generation)."""
        return self is not WorkloadType.LLM_INFERENCE


class Priority(IntEnum):
    """How urgent a request is; higher values are served first and may preempt lower ones."""

    BACKGROUND = 0
    NORMAL = 1
    HIGH = 2
    USER_FACING = 3


class MemoryPressure(StrEnum):
    """A named level of the pressure ratio ``(granted + external) / budget``.

    Cut points: below 0.5 ``LOW``; below 0.75 ``MODERATE``; below 0.9 ``HIGH``;
    from 0.9 on ``CRITICAL``.
    """

    LOW = "low"
    MODERATE = "moderate"
    HIGH = "high"
    CRITICAL = "critical"

    @classmethod
    def from_ratio(cls, ratio: float) -> MemoryPressure:
        """The level that a pressure ratio (a number >= 0) falls into."""
        if isinstance(ratio, bool) or not isinstance(ratio, int | float):
            raise TypeError(f"ratio must be a number, got {ratio!r}")
        if not ratio >= 0:  # nan too
            raise ValueError(f"ratio must be a number >= 0, got {ratio!r}")
        if ratio < 0.5:
            return cls.LOW
        if ratio < 0.75:
            return cls.MODERATE
        if ratio < 0.9:
            return cls.HIGH
        return cls.CRITICAL


def coerce_workload(value: object, name: str = "workload") -> WorkloadType:
    """A ``WorkloadType`` from itself or its string value."""
    if isinstance(value, WorkloadType):
        return value
    if isinstance(value, str):
        try:
            return WorkloadType(value)
        except ValueError:
            choices = ", ".join(w.value for w in WorkloadType)
            raise ValueError(f"{name} must be one of {choices}, got {value!r}") from None
    raise TypeError(f"{name} must be a WorkloadType or its string value, got {value!r}")


def coerce_priority(value: object, name: str = "priority") -> Priority:
    """A ``Priority`` from itself or its lower-case name."""
    if isinstance(value, Priority):
        return value
    if isinstance(value, str):
        try:
            if value != value.lower():
                raise KeyError(value)
            return Priority[value.upper()]
        except KeyError:
            choices = ", ".join(p.name.lower() for p in Priority)
            raise ValueError(f"{name} must be one of {choices}, got {value!r}") from None
    raise TypeError(f"{name} must be a Priority or its lower-case name, got {value!r}")


def check_memory(value: object, name: str) -> int:
    """A byte count: an ``int`` (not ``bool``) greater than zero, at most ``MAX_BYTES``."""
    return check_bytes(name, value, allow_zero=False)


def check_timeout(value: object, name: str = "timeout") -> float | None:
    """A timeout in seconds: ``None`` (forever) or a number >= 0, infinite or an int too
    large for a float also meaning forever."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be None or a number of seconds, got {value!r}")
    if not value >= 0:  # also true for nan
        raise ValueError(f"{name} must be None or >= 0 seconds, got {shown(value)}")
    try:
        return float(value)
    except OverflowError:  # an int past the float range: as long as forever
        return math.inf


def format_bytes(n: float) -> str:
    """Bytes in the largest unit that keeps the figure >= 1 (``24.0 GiB``)."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
