"""Workload traces: the JSON-lines format of DESIGN.md and the built-in shared-card trace.

A trace row asks for memory at ``at`` seconds, holds it for ``duration`` seconds and
may be elastic (``min_memory_gb``), give up after ``timeout`` seconds, refuse to be
preempted (``preemptible: false``, the weights the chats run on) or keep its progress
when it is (``resumable: true``). The format
has no row for memory used by other processes, so the built-in trace carries an
external-use schedule beside its rows.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from .._checks import as_float, shown
from .._types import GiB, Priority, WorkloadType, coerce_priority, coerce_workload

__all__ = [
    "BUILTIN_MINUTES",
    "BUILTIN_NAME",
    "MAX_ROWS",
    "ExternalStep",
    "Trace",
    "TraceError",
    "TraceRow",
    "builtin_trace",
    "load_trace",
    "parse_trace",
]

# The built-in trace's length when none is asked for: an hour of a shared card.
BUILTIN_MINUTES = 60.0
BUILTIN_NAME = "built-in"
# More rows than this is bad input: days of simulation, not a trace of one card.
MAX_ROWS = 2_000_000

_REQUIRED = ("at", "workload", "priority", "memory_gb", "duration")
_OPTIONAL = ("min_memory_gb", "timeout", "preemptible", "resumable")


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One request of a trace: sizes in bytes, times in seconds."""

    line: int
    at: float
    workload: WorkloadType
    priority: Priority
    memory: int
    duration: float
    min_memory: int | None = None
    timeout: float | None = None
    preemptible: bool = True
    resumable: bool = False

    @property
    def elastic(self) -> bool:
        """True when the row accepts less than ``memory`` (it gave ``min_memory_gb``)."""
        return self.min_memory is not None and self.min_memory < self.memory


@dataclass(frozen=True, slots=True)
class ExternalStep:
    """From ``at`` on, other processes use ``used`` bytes of the GPU."""

    at: float
    used: int


@dataclass(frozen=True, slots=True)
class Trace:
    """Rows sorted by arrival, the external-use schedule and where they came from."""

    rows: tuple[TraceRow, ...]
    external: tuple[ExternalStep, ...] = ()
    source: str = "trace"
    name: str = "trace"  # what ``--json`` calls it: the file as given, ``-`` or ``built-in``

    @property
    def first_arrival(self) -> float:
        """When the first row arrives (0.0 for an empty trace)."""
        return self.rows[0].at if self.rows else 0.0


# Sanity bounds of a trace: beyond them a number is a typo, and a simulation in
# virtual time still pays for every poll of its virtual GPU.
MAX_GIB = 1 << 20  # 1 PiB
MAX_SECONDS = 7 * 24 * 3600.0  # a week


def _number(value: object, key: str) -> float:
    if not isinstance(value, bool) and isinstance(value, int | float):
        number = as_float(value)
        if math.isfinite(number):
            return number
    raise ValueError(f"{key} must be a finite number, got {shown(value)}")


def _gib(value: object, key: str) -> int:
    gb = _number(value, key)
    if gb <= 0:
        raise ValueError(f"{key} must be > 0, got {shown(value)}")
    if gb > MAX_GIB:
        raise ValueError(f"{key} must be at most {MAX_GIB} GiB, got {shown(value)}")
    size = round(gb * GiB)
    if size <= 0:
        raise ValueError(f"{key} is smaller than one byte: {shown(value)}")
    return size


def _seconds(value: object, key: str) -> float:
    seconds = _number(value, key)
    if seconds < 0:
        raise ValueError(f"{key} must be >= 0 seconds, got {shown(value)}")
    if seconds > MAX_SECONDS:
        raise ValueError(
            f"{key} must be at most {MAX_SECONDS:.0f} seconds (a week), got {shown(value)}"
        )
    return seconds


def _row(data: object, line: int) -> TraceRow:
    if not isinstance(data, dict):
        raise ValueError(f"a row must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ValueError(f"missing key {missing[0]!r}")
    memory = _gib(data["memory_gb"], "memory_gb")
    min_memory = None
    if data.get("min_memory_gb") is not None:
        min_memory = _gib(data["min_memory_gb"], "min_memory_gb")
        if min_memory > memory:
            raise ValueError(
                f"min_memory_gb {data['min_memory_gb']!r} exceeds memory_gb {data['memory_gb']!r}"
            )
    timeout = None
    if data.get("timeout") is not None:
        timeout = _seconds(data["timeout"], "timeout")
    flags = {}
    for key, default in (("preemptible", True), ("resumable", False)):
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        flags[key] = value
    workload, priority = data["workload"], data["priority"]
    if not isinstance(workload, str):
        raise ValueError(f"workload must be a string, got {workload!r}")
    if not isinstance(priority, str):
        raise ValueError(f"priority must be a string, got {priority!r}")
    return TraceRow(
        line=line,
        at=_seconds(data["at"], "at"),
        workload=coerce_workload(workload),
        priority=coerce_priority(priority),
        memory=memory,
        duration=_seconds(data["duration"], "duration"),
        min_memory=min_memory,
        timeout=timeout,
        **flags,
    )


def parse_trace(lines: Iterable[str], source: str = "trace", name: str | None = None) -> Trace:
    """Parse JSON-lines trace text; blank lines are skipped.

    Raises:
        TraceError: naming ``source`` and ``line N`` for malformed JSON, an unknown or
            missing key, an unknown workload or priority, or a bad number; or a trace
            with no rows, or with more than `MAX_ROWS`.
    """
    rows: list[TraceRow] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        if len(rows) == MAX_ROWS:
            raise TraceError(f"{source} line {number}: more than {MAX_ROWS:,} rows")
        try:
            rows.append(_row(json.loads(text), number))
        except json.JSONDecodeError as exc:
            raise TraceError(f"{source} line {number}: malformed JSON ({exc.msg})") from None
        except RecursionError:
            raise TraceError(f"{source} line {number}: JSON nested too deeply") from None
        except ValueError as exc:
            raise TraceError(f"{source} line {number}: {exc}") from None
    if not rows:
        raise TraceError(f"{source} has no rows")
    rows.sort(key=lambda row: row.at)
    return Trace(rows=tuple(rows), source=source, name=source if name is None else name)


def load_trace(path: str | Path) -> Trace:
    """Read and parse the trace file at ``path`` (``-``: standard input).

    Raises:
        TraceError: the file is missing or unreadable, or a line is bad (see `parse_trace`).
    """
    if str(path) == "-":
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError:
            raise TraceError("standard input is not UTF-8 text") from None
        return parse_trace(text.splitlines(), source="standard input", name="-")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"trace file not found: {path}") from None
    except UnicodeDecodeError:
        raise TraceError(f"trace file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise TraceError(f"cannot read trace file {path}: {exc.strerror or exc}") from None
    return parse_trace(text.splitlines(), source=str(path), name=str(path))


def _gb(rng: random.Random, low: float, high: float) -> int:
    """A size in [low, high] GiB, in steps of half a GiB (what a real config would say)."""
    return round(rng.uniform(low, high) * 2) * GiB // 2


def _poisson(rng: random.Random, mean_gap: float, start: float, end: float) -> list[float]:
    times: list[float] = []
    now = start
    while True:
        now += rng.expovariate(1.0 / mean_gap)
        if now >= end:
            return times
        times.append(round(now, 3))


def builtin_trace(*, seed: int = 0, minutes: float = BUILTIN_MINUTES) -> Trace:
    """A shared 24 GiB card for ``minutes``, generated deterministically from ``seed``.

    * a resident LLM of 14 GiB (elastic down to 8 GiB, ``HIGH``) for the whole trace:
      the weights and KV cache the chats run on, so not preemptible (and resumable);
    * user-facing chat requests, a Poisson process (one every 6 s on average), holding
      1-4 GiB of KV cache for 2-20 s, giving up after 30 s;
    * image generations (one every 45 s on average) of 6-10 GiB for 5-30 s at
      ``NORMAL``, giving up after 5 min;
    * background video renders (one every 4 min on average, a render queue that keeps
      the card busy) of 12-20 GiB, elastic down to half, for 2-6 min, never giving up;
    * another process that grabs 3-6 GiB for 1-4 min, about every 12 min.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if isinstance(minutes, bool) or not isinstance(minutes, int | float):
        raise TypeError(f"minutes must be a number, got {minutes!r}")
    if not math.isfinite(minutes) or minutes <= 0:
        raise ValueError(f"minutes must be a finite number > 0, got {minutes!r}")
    rng = random.Random(seed)
    end = minutes * 60.0
    llm, image, video = (
        WorkloadType.LLM_INFERENCE,
        WorkloadType.IMAGE_GENERATION,
        WorkloadType.VIDEO_GENERATION,
    )
    rows = [
        TraceRow(
            0,
            0.0,
            llm,
            Priority.HIGH,
            14 * GiB,
            end,
            min_memory=8 * GiB,
            preemptible=False,
            resumable=True,
        )
    ]
    for at in _poisson(rng, 6.0, 1.0, end):
        duration = round(rng.uniform(2.0, 20.0), 2)
        rows.append(
            TraceRow(0, at, llm, Priority.USER_FACING, _gb(rng, 1, 4), duration, timeout=30.0)
        )
    for at in _poisson(rng, 45.0, 5.0, end):
        duration = round(rng.uniform(5.0, 30.0), 2)
        rows.append(
            TraceRow(0, at, image, Priority.NORMAL, _gb(rng, 6, 10), duration, timeout=300.0)
        )
    for at in _poisson(rng, 240.0, 30.0, end):
        memory = _gb(rng, 12, 20)
        duration = round(rng.uniform(120.0, 360.0), 1)
        rows.append(
            TraceRow(0, at, video, Priority.BACKGROUND, memory, duration, min_memory=memory // 2)
        )
    external: list[ExternalStep] = []
    for at in _poisson(rng, 720.0, 60.0, end):
        if external and at < external[-1].at:
            continue  # the previous grab still holds; one external process at a time
        external.append(ExternalStep(at, _gb(rng, 3, 6)))
        external.append(ExternalStep(round(at + rng.uniform(60.0, 240.0), 3), 0))
    rows.sort(key=lambda row: row.at)
    numbered = tuple(replace(r, line=i) for i, r in enumerate(rows, start=1))
    return Trace(
        rows=numbered,
        external=tuple(external),
        source=f"built-in trace (seed {seed})",
        name=BUILTIN_NAME,
    )
