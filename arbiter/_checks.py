"""Argument checks shared by every constructor: TypeError for a wrong type, ValueError
for a bad value, each naming the argument and the value it got."""

from __future__ import annotations

import math

__all__ = ["check_bytes", "check_count", "check_fraction", "check_seconds"]


def check_bytes(name: str, value: object, *, allow_zero: bool = True) -> int:
    """A byte count: an ``int`` (not ``bool``), >= 0 (> 0 unless ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int number of bytes, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} bytes, got {value!r}")
    return value


def check_count(name: str, value: object, *, minimum: int) -> int:
    """An ``int`` (not ``bool``) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_seconds(name: str, value: object, *, positive: bool = True) -> float:
    """A finite number of seconds, > 0 (or >= 0 when not ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound} seconds, got {value!r}")
    return float(value)


def check_fraction(name: str, value: object) -> float:
    """A number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)
