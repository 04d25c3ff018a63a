"""DESIGN.md "Units and enums" and "Errors"."""

from __future__ import annotations

import enum
import pickle

import pytest

import arbiter
from arbiter import (
    AllocationTimeout,
    ArbiterError,
    ArbiterUnavailable,
    FragmentUnavailable,
    GiB,
    InsufficientMemory,
    InsufficientQuality,
    IntegrityError,
    KiB,
    MemoryPressure,
    MiB,
    Preempted,
    Priority,
    SessionLost,
    ShuttingDown,
    WorkloadType,
)

# -- units ---------------------------------------------------------------------


def test_units_are_int_bytes() -> None:
    assert (KiB, MiB, GiB) == (1024, 1024**2, 1024**3)
    assert all(type(unit) is int for unit in (KiB, MiB, GiB))


# -- enums ---------------------------------------------------------------------


def test_workload_type_is_a_str_enum_with_its_values() -> None:
    assert issubclass(WorkloadType, enum.StrEnum)
    assert {w.name: w.value for w in WorkloadType} == {
        "LLM_INFERENCE": "llm_inference",
        "IMAGE_GENERATION": "image_generation",
        "VIDEO_GENERATION": "video_generation",
    }
    assert WorkloadType("llm_inference") is WorkloadType.LLM_INFERENCE
    assert str(WorkloadType.IMAGE_GENERATION) == "image_generation"
    assert isinstance(WorkloadType.IMAGE_GENERATION, str)


def test_image_and_video_generation_are_the_diffusion_family() -> None:
    assert WorkloadType.IMAGE_GENERATION.is_diffusion
    assert WorkloadType.VIDEO_GENERATION.is_diffusion
    assert not WorkloadType.LLM_INFERENCE.is_diffusion


def test_priority_is_an_ordered_int_enum() -> None:
    assert issubclass(Priority, enum.IntEnum)
    assert [p.name for p in Priority] == ["BACKGROUND", "NORMAL", "HIGH", "USER_FACING"]
    assert Priority.BACKGROUND < Priority.NORMAL < Priority.HIGH < Priority.USER_FACING
    assert max(Priority) is Priority.USER_FACING
    assert sorted([Priority.HIGH, Priority.BACKGROUND, Priority.USER_FACING]) == [
        Priority.BACKGROUND,
        Priority.HIGH,
        Priority.USER_FACING,
    ]


def test_memory_pressure_names_its_levels_in_order() -> None:
    assert [m.name for m in MemoryPressure] == ["LOW", "MODERATE", "HIGH", "CRITICAL"]
    levels = [MemoryPressure.from_ratio(r / 100) for r in range(0, 151)]
    ranks = [list(MemoryPressure).index(level) for level in levels]
    assert ranks == sorted(ranks)  # more pressure never names a lower level
    assert levels[0] is MemoryPressure.LOW
    assert levels[-1] is MemoryPressure.CRITICAL
    assert MemoryPressure.from_ratio(1.0) is MemoryPressure.CRITICAL


# -- errors --------------------------------------------------------------------

ARBITER_ERRORS = [
    InsufficientMemory,
    InsufficientQuality,
    AllocationTimeout,
    Preempted,
    ShuttingDown,
    ArbiterUnavailable,
    SessionLost,
    IntegrityError,
    FragmentUnavailable,
]


@pytest.mark.parametrize("error", ARBITER_ERRORS)
def test_every_error_derives_from_arbiter_error(error: type[Exception]) -> None:
    assert issubclass(error, ArbiterError)
    assert issubclass(ArbiterError, Exception)
    assert error.__name__ in arbiter.__all__
    assert error.__doc__


def test_allocation_timeout_is_also_a_timeout_error() -> None:
    exc = AllocationTimeout(2.5)
    assert isinstance(exc, TimeoutError)
    assert isinstance(exc, ArbiterError)
    assert exc.timeout == 2.5
    assert "2.5" in str(exc)
    with pytest.raises(TimeoutError):
        raise exc


def test_argument_errors_are_not_arbiter_errors() -> None:
    assert not issubclass(TypeError, ArbiterError)
    assert not issubclass(ValueError, ArbiterError)
    assert not issubclass(ArbiterError, TypeError | ValueError)


@pytest.mark.parametrize(
    ("requested", "available", "message"),
    [
        (100 * GiB, 24 * GiB, "requested 100.0 GiB, budget 24.0 GiB"),
        (1536 * MiB, 512 * MiB, "requested 1.5 GiB, budget 512.0 MiB"),
        (20 * GiB + 1, 20 * GiB, "requested 20.0 GiB, budget 20.0 GiB"),
    ],
)
def test_insufficient_memory_speaks_human_units(
    requested: int, available: int, message: str
) -> None:
    exc = InsufficientMemory(requested, available)
    assert (exc.requested, exc.available) == (requested, available)
    assert str(exc) == message


def test_insufficient_quality_names_both_qualities() -> None:
    exc = InsufficientQuality(0.9, 0.55)
    assert (exc.minimum, exc.available) == (0.9, 0.55)
    assert "0.9" in str(exc) and "0.55" in str(exc)


@pytest.mark.parametrize(
    "exc",
    [
        InsufficientMemory(100 * GiB, 24 * GiB),
        InsufficientQuality(0.9, 0.5),
        AllocationTimeout(30.0),
        Preempted("alloc-1 was preempted"),
        ShuttingDown("closed"),
        ArbiterUnavailable("no arbiter daemon answers on /run/gpu0.sock"),
        SessionLost("the daemon ended this session"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_errors_survive_pickling(exc: ArbiterError) -> None:
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    assert vars(copy) == vars(exc)


@pytest.mark.parametrize(
    ("ratio", "error"),
    [(float("nan"), ValueError), (-0.1, ValueError), (True, TypeError), ("1", TypeError)],
)
def test_a_pressure_ratio_is_a_number_at_least_zero(ratio: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="ratio"):
        MemoryPressure.from_ratio(ratio)  # type: ignore[arg-type]


def test_an_empty_socket_path_is_a_bad_value() -> None:
    from arbiter import RemoteArbiter

    with pytest.raises(ValueError, match="socket"):
        RemoteArbiter(socket="")


@pytest.mark.parametrize(("pid", "error"), [(-1, ValueError), (0, ValueError), (True, TypeError)])
def test_a_fake_process_needs_a_pid(pid: object, error: type[Exception]) -> None:
    from arbiter.testing import FakeGpu

    with pytest.raises(error, match="pid"):
        FakeGpu(total=GiB).set_process_memory(pid, 1)  # type: ignore[arg-type]
