"""The arguments of a memory request, checked once at the call."""

from __future__ import annotations

from typing import TypeAlias

from ._checks import MAX_BYTES, check_fraction
from ._types import (
    Priority,
    WorkloadType,
    check_memory,
    check_timeout,
    coerce_priority,
    coerce_workload,
)

__all__ = ["DEFAULT", "Default", "RequestArgs", "check_request"]


class Default:
    """Marks an argument left out, where ``None`` already means something."""

    def __repr__(self) -> str:
        return "<default>"


DEFAULT = Default()


# A label names an allocation in logs and `arbiter status`, one line each.
MAX_LABEL = 200

# A request's arguments, checked and normalised: workload, priority, memory,
# min_memory, timeout, min_quality, preemptible, keep_alive, label. A plain tuple:
# it is built on every request, and a NamedTuple costs several times as much.
RequestArgs: TypeAlias = tuple[
    WorkloadType,
    Priority,
    int,
    int | None,
    float | Default | None,
    float | None,
    bool,
    float | None,
    str | None,
]


def check_request(
    workload: object,
    priority: object,
    memory: object,
    min_memory: object,
    timeout: object,
    min_quality: object,
    preemptible: object,
    keep_alive: object,
    label: object,
) -> RequestArgs:
    """``TypeError``/``ValueError`` naming the first bad argument, else the normalised ones."""
    # The exact-type tests are fast paths; the coercions raise the errors.
    if type(workload) is not WorkloadType:
        workload = coerce_workload(workload)
    if type(priority) is not Priority:
        priority = coerce_priority(priority)
    size = (
        memory
        if type(memory) is int and 0 < memory <= MAX_BYTES
        else check_memory(memory, "memory")
    )
    floor = None
    if min_memory is not None:
        floor = check_memory(min_memory, "min_memory")
        if floor > size:
            raise ValueError(f"min_memory must be <= memory ({size}), got {floor}")
    if timeout is not DEFAULT:
        timeout = check_timeout(timeout)
    quality = None if min_quality is None else check_fraction("min_quality", min_quality)
    if preemptible is not True and preemptible is not False:
        raise TypeError(f"preemptible must be a bool, got {preemptible!r}")
    alive = None if keep_alive is None else check_timeout(keep_alive, "keep_alive")
    if label is not None:
        if not isinstance(label, str):
            raise TypeError(f"label must be None or a str, got {label!r}")
        if len(label) > MAX_LABEL:
            raise ValueError(f"label must be at most {MAX_LABEL} characters, got {len(label)}")
    return (workload, priority, size, floor, timeout, quality, preemptible, alive, label)
