"""Argument checks shared by every constructor: TypeError for a wrong type, ValueError
for a bad value, each naming the argument and the value it got.

A huge number is a bad value like any other: ``10**400`` gets a ``ValueError`` that
names the argument, never an ``OverflowError`` from a float conversion further in.
"""

from __future__ import annotations

import math

__all__ = [
    "MAX_BYTES",
    "MAX_DEVICE",
    "as_float",
    "check_bytes",
    "check_count",
    "check_device",
    "check_fraction",
    "check_pids",
    "check_ratio",
    "check_seconds",
    "shown",
]

# The largest byte count accepted: what a signed 64-bit field (NVML, the daemon's wire
# format) holds, 8 EiB; far past any device or host, and exact enough as a float ratio.
MAX_BYTES = 2**63 - 1
# The largest device index: what the C int of CUDA's and NVML's device ordinals holds.
MAX_DEVICE = 2**31 - 1
# Ints longer than this are shown by their magnitude: their repr is long, and past
# 4300 digits Python refuses to build it at all.
_SHOWN_DIGITS = 30


def shown(value: object) -> str:
    """``repr(value)``, except an int too long to read is shown as ``~10**N``."""
    if isinstance(value, int) and not isinstance(value, bool):
        magnitude = abs(value)
        if magnitude >= 10**_SHOWN_DIGITS:
            sign = "-" if value < 0 else ""
            return f"{sign}~10**{int((magnitude.bit_length() - 1) * math.log10(2))}"
    return repr(value)


def as_float(value: int | float) -> float:
    """``float(value)``, with an int beyond the float range as an infinity of its sign."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_bytes(name: str, value: object, *, allow_zero: bool = True) -> int:
    """A byte count: an ``int`` (not ``bool``), >= 0 (> 0 unless ``allow_zero``), at most
    `MAX_BYTES`."""
    if isinstance(value, bool) or not isinstance(value, int):
        hint = ""
        if isinstance(value, float) and math.isfinite(value):
            hint = "; convert it with int(...), e.g. int(1.5 * GiB)"
        raise TypeError(
            f"{name} must be an int number of bytes, got {type(value).__name__} {value!r}{hint}"
        )
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound} bytes, got {shown(value)}")
    if value > MAX_BYTES:
        raise ValueError(f"{name} must be at most {MAX_BYTES} bytes (8 EiB), got {shown(value)}")
    return value


def check_count(name: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    """An ``int`` (not ``bool``) >= ``minimum`` (and <= ``maximum`` when given)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {shown(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {shown(value)}")
    return value


def check_seconds(
    name: str,
    value: object,
    *,
    positive: bool = True,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """A finite number of seconds, > 0 (or >= 0 when not ``positive``; or >= ``minimum``
    when given), and at most ``maximum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    seconds = as_float(value)
    if minimum is not None:
        if not minimum <= seconds < math.inf:
            raise ValueError(
                f"{name} must be a finite number >= {minimum:g} seconds, got {shown(value)}"
            )
    elif not 0.0 <= seconds < math.inf or (positive and seconds == 0.0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound} seconds, got {shown(value)}")
    if maximum is not None and seconds > maximum:
        raise ValueError(f"{name} must be at most {maximum:g} seconds, got {shown(value)}")
    return seconds


def check_ratio(name: str, value: object, *, zero: bool = False, one: bool = True) -> float:
    """A number between 0 and 1; ``zero`` / ``one`` say whether each end is allowed."""
    interval = f"{'[' if zero else '('}0, 1{']' if one else ')'}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number in {interval}, got {value!r}")
    # Comparisons are false for nan, and exact for an int of any size.
    low_ok = value >= 0 if zero else value > 0
    high_ok = value <= 1 if one else value < 1
    if not (low_ok and high_ok):
        raise ValueError(f"{name} must be in {interval}, got {shown(value)}")
    return float(value)


def check_fraction(name: str, value: object) -> float:
    """A number in (0, 1]: a quality floor, a threshold, ``min_quality``."""
    return check_ratio(name, value)


def check_device(device: object) -> int | str:
    """A device: an index >= 0 or a non-empty uuid string."""
    if isinstance(device, bool) or not isinstance(device, int | str):
        raise TypeError(f"device must be an index or a uuid string, got {device!r}")
    if isinstance(device, int) and not 0 <= device <= MAX_DEVICE:
        raise ValueError(
            f"device must be an index in [0, {MAX_DEVICE}] or a uuid, got {shown(device)}"
        )
    if isinstance(device, str) and not device.strip():
        raise ValueError(f"device uuid must not be empty, got {device!r}")
    return device


def check_pids(name: str, value: object) -> frozenset[int]:
    """A set of process ids."""
    if not isinstance(value, frozenset | set) or not all(
        isinstance(pid, int) and not isinstance(pid, bool) for pid in value
    ):
        raise TypeError(f"{name} must be a set of pids, got {value!r}")
    return frozenset(value)
