"""DESIGN.md "ArbiterConfig": defaults, validation, the constructors, frozenness."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from arbiter import (
    Arbiter,
    ArbiterConfig,
    DetectionMethod,
    GiB,
    GpuDetectionResult,
    GpuDetector,
    GpuInfo,
    GpuVendor,
    MiB,
    Priority,
    QualityPolicy,
    WorkloadType,
)

NAN = float("nan")


def test_defaults_are_the_design_table() -> None:
    config = ArbiterConfig()
    assert config.vram_budget == 20 * GiB
    assert config.ram_budget == 64 * GiB
    assert config.llm_min_quality == 0.4
    assert config.diffusion_min_quality == 0.3
    assert config.adaptive_quality is True
    assert config.pressure_threshold == 0.85
    assert config.allocation_timeout == 30.0
    assert config.poll_interval == 0.5
    assert config.reclaim_grace == 2.0
    assert config.quality_policy is QualityPolicy.ADAPTIVE
    assert config.device == 0
    assert isinstance(config.vram_budget, int) and isinstance(config.ram_budget, int)


def test_config_is_frozen() -> None:
    config = ArbiterConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.vram_budget = GiB  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.allocation_timeout = None  # type: ignore[misc]
    assert config.vram_budget == 20 * GiB
    assert hash(config) == hash(ArbiterConfig())  # frozen dataclasses hash by value
    assert config == ArbiterConfig()


def test_replace_validates_too() -> None:
    config = ArbiterConfig()
    assert dataclasses.replace(config, allocation_timeout=None).allocation_timeout is None
    with pytest.raises(ValueError, match="pressure_threshold"):
        dataclasses.replace(config, pressure_threshold=1.5)


GOOD_VALUES: list[tuple[str, Any]] = [
    ("vram_budget", 1),
    ("ram_budget", 0),
    ("llm_min_quality", 1.0),
    ("llm_min_quality", 0.01),
    ("diffusion_min_quality", 1),
    ("pressure_threshold", 1.0),
    ("allocation_timeout", None),
    ("allocation_timeout", 0),
    ("allocation_timeout", 0.5),
    ("reclaim_grace", 0.0),
    ("poll_interval", 0.01),
    ("quality_policy", QualityPolicy.FIXED),
    ("adaptive_quality", False),
    ("device", 3),
    ("device", "GPU-8f6b7e2a-0000-0000-0000-000000000000"),
]


@pytest.mark.parametrize(("name", "value"), GOOD_VALUES)
def test_good_values_are_kept(name: str, value: Any) -> None:
    config = ArbiterConfig(**{name: value})
    assert getattr(config, name) == value


@pytest.mark.parametrize(
    ("value", "policy"),
    [("adaptive", QualityPolicy.ADAPTIVE), ("proportional", QualityPolicy.PROPORTIONAL)],
)
def test_quality_policy_accepts_its_string_value(value: str, policy: QualityPolicy) -> None:
    assert ArbiterConfig(quality_policy=value).quality_policy is policy  # type: ignore[arg-type]


BAD_VALUES: list[tuple[str, Any, type[Exception]]] = [
    ("vram_budget", -1, ValueError),
    ("vram_budget", -GiB, ValueError),
    ("vram_budget", 0, ValueError),
    ("vram_budget", 1.5, TypeError),
    ("vram_budget", "20", TypeError),
    ("vram_budget", True, TypeError),
    ("vram_budget", None, TypeError),
    ("ram_budget", -1, ValueError),
    ("ram_budget", 2.0, TypeError),
    ("llm_min_quality", 0, ValueError),
    ("llm_min_quality", -0.1, ValueError),
    ("llm_min_quality", 1.5, ValueError),
    ("llm_min_quality", NAN, ValueError),
    ("llm_min_quality", "0.4", TypeError),
    ("diffusion_min_quality", 0.0, ValueError),
    ("diffusion_min_quality", 1.01, ValueError),
    ("diffusion_min_quality", NAN, ValueError),
    ("pressure_threshold", 0, ValueError),
    ("pressure_threshold", 1.2, ValueError),
    ("pressure_threshold", -0.85, ValueError),
    ("pressure_threshold", NAN, ValueError),
    ("allocation_timeout", -1, ValueError),
    ("allocation_timeout", -0.5, ValueError),
    ("allocation_timeout", NAN, ValueError),
    ("allocation_timeout", "30", TypeError),
    ("poll_interval", 0, ValueError),
    ("poll_interval", -0.5, ValueError),
    ("poll_interval", NAN, ValueError),
    ("reclaim_grace", -2.0, ValueError),
    ("reclaim_grace", NAN, ValueError),
    ("adaptive_quality", "yes", TypeError),
    ("adaptive_quality", 1, TypeError),
    ("quality_policy", "bogus", ValueError),
    ("quality_policy", 1, TypeError),
    ("device", -1, ValueError),
    ("device", 1.5, TypeError),
    ("device", None, TypeError),
]


@pytest.mark.parametrize(("name", "value", "error"), BAD_VALUES)
def test_bad_values_raise_naming_the_field(name: str, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        ArbiterConfig(**{name: value})
    assert type(info.value) is error
    assert name in str(info.value)


def test_adaptive_quality_false_turns_every_policy_into_fixed() -> None:
    for policy in QualityPolicy:
        config = ArbiterConfig(vram_budget=100, adaptive_quality=False, quality_policy=policy)
        assert config.effective_policy is QualityPolicy.FIXED
    assert ArbiterConfig(quality_policy="proportional").effective_policy is (  # type: ignore[arg-type]
        QualityPolicy.PROPORTIONAL
    )


@pytest.mark.anyio
async def test_adaptive_quality_false_keeps_quality_under_pressure() -> None:
    fixed = Arbiter(ArbiterConfig.for_vram_gb(10, adaptive_quality=False), probe=None)
    adaptive = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    for arbiter in (fixed, adaptive):
        await arbiter.request_allocation(WorkloadType.IMAGE_GENERATION, "high", 10 * GiB)
    assert fixed.recommended_quality(WorkloadType.LLM_INFERENCE, Priority.BACKGROUND) == 1.0
    assert adaptive.recommended_quality(WorkloadType.LLM_INFERENCE, Priority.BACKGROUND) < 1.0


# -- for_vram_gb ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("gb", "budget"), [(24, 24 * GiB), (1, GiB), (0.5, 512 * MiB), (80.0, 80 * GiB)]
)
def test_for_vram_gb_budgets_that_many_gib(gb: float, budget: int) -> None:
    config = ArbiterConfig.for_vram_gb(gb)
    assert config.vram_budget == budget
    assert isinstance(config.vram_budget, int)
    defaults = dataclasses.replace(ArbiterConfig(), vram_budget=budget)
    assert config == defaults  # everything else is the default


def test_for_vram_gb_takes_overrides() -> None:
    config = ArbiterConfig.for_vram_gb(24, allocation_timeout=None, reclaim_grace=0)
    assert config.vram_budget == 24 * GiB
    assert config.allocation_timeout is None and config.reclaim_grace == 0
    with pytest.raises(ValueError, match="llm_min_quality"):
        ArbiterConfig.for_vram_gb(24, llm_min_quality=2)


@pytest.mark.parametrize(
    ("gb", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (NAN, ValueError),
        (math.inf, ValueError),
        ("24", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_for_vram_gb_rejects_bad_sizes(gb: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="gb"):
        ArbiterConfig.for_vram_gb(gb)


# -- from_detection and auto_detect ----------------------------------------------


def _result(*totals: int) -> GpuDetectionResult:
    """A detection result built by hand: one NVIDIA GPU per total, in index order."""
    gpus = [
        GpuInfo(
            index=i,
            name=f"NVIDIA Test {i}",
            vendor=GpuVendor.NVIDIA,
            total_vram_bytes=total,
            free_vram_bytes=total // 2,
            uuid=f"GPU-{i:08x}",
        )
        for i, total in enumerate(totals)
    ]
    method = DetectionMethod.NVML if gpus else DetectionMethod.NONE
    return GpuDetectionResult(method, gpus, sum(totals))


def test_from_detection_budgets_90_percent_of_the_device() -> None:
    config = ArbiterConfig.from_detection(_result(24 * GiB))
    assert abs(config.vram_budget - 0.9 * 24 * GiB) <= 1
    assert config.ram_budget == 4 * 24 * GiB
    assert config.device == 0
    assert config.allocation_timeout == 30.0  # the rest is the default


def test_from_detection_uses_the_managed_device_only() -> None:
    result = _result(24 * GiB, 80 * GiB)
    second = ArbiterConfig.from_detection(result, device=1)
    assert abs(second.vram_budget - 0.9 * 80 * GiB) <= 1
    assert second.ram_budget == 4 * 80 * GiB
    assert second.device == 1
    by_uuid = ArbiterConfig.from_detection(result, device="GPU-00000001")
    assert by_uuid.vram_budget == second.vram_budget
    assert by_uuid.device == "GPU-00000001"
    with pytest.raises(ValueError, match="device"):
        ArbiterConfig.from_detection(result, device=5)


def test_from_detection_with_nothing_found_assumes_8_gib() -> None:
    config = ArbiterConfig.from_detection(_result())
    assert abs(config.vram_budget - 0.9 * 8 * GiB) <= 1
    assert config.ram_budget == 4 * 8 * GiB


def test_from_detection_takes_overrides() -> None:
    config = ArbiterConfig.from_detection(_result(16 * GiB), allocation_timeout=5.0)
    assert config.allocation_timeout == 5.0
    assert abs(config.vram_budget - 0.9 * 16 * GiB) <= 1


def test_auto_detect_and_arbiter_without_config_agree_with_detection() -> None:
    expected = ArbiterConfig.from_detection(GpuDetector().detect())
    assert ArbiterConfig.auto_detect() == expected
    assert Arbiter(probe=None).config == expected


# -- the 8 GiB assumption is said once --------------------------------------------


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    was_configured = structlog.is_configured()
    with capture_logs() as entries:
        yield entries
    if not was_configured:
        structlog.reset_defaults()  # capture_logs() leaves structlog marked configured


def _detect_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    nothing = GpuDetectionResult(DetectionMethod.NONE, [], 0)
    monkeypatch.setattr(GpuDetector, "detect", lambda self: nothing)


def _warnings(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["log_level"] == "warning"]


def test_auto_detect_with_nothing_found_warns_once_that_it_assumed_8_gib(
    monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]
) -> None:
    _detect_nothing(monkeypatch)
    config = ArbiterConfig.auto_detect()
    assert config.vram_budget == int(8 * GiB * 0.9)
    [warning] = _warnings(logs)
    assert "8 GiB" in warning["event"]
    assert warning["vram_budget"] == config.vram_budget


@pytest.mark.anyio
async def test_arbiter_without_config_and_without_gpu_warns_once(
    monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]
) -> None:
    _detect_nothing(monkeypatch)
    async with Arbiter() as arbiter:  # also the default probe: NVML, when it works
        assert arbiter.config.vram_budget == int(8 * GiB * 0.9)
    [warning] = _warnings(logs)
    assert "assum" in warning["event"] and "8 GiB" in warning["event"]


def test_auto_detect_that_finds_a_gpu_does_not_warn(
    monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]
) -> None:
    monkeypatch.setattr(GpuDetector, "detect", lambda self: _result(24 * GiB))
    assert abs(ArbiterConfig.auto_detect().vram_budget - 0.9 * 24 * GiB) <= 1
    assert ArbiterConfig.from_detection(_result()).vram_budget == int(8 * GiB * 0.9)
    assert _warnings(logs) == []  # from_detection is quiet: `arbiter detect` says it itself


# -- huge numbers, and the poll_interval floor ----------------------------------

HUGE = 10**400


def _short(value: object) -> str | None:
    """A test id: huge ints by their size, the rest as pytest shows them."""
    if isinstance(value, int) and abs(value) > 2**64:
        return "-huge" if value < 0 else "huge"
    return None


HUGE_VALUES: list[tuple[str, Any]] = [
    ("vram_budget", HUGE),
    ("vram_budget", 2**63),
    ("ram_budget", HUGE),
    ("llm_min_quality", HUGE),
    ("diffusion_min_quality", HUGE),
    ("pressure_threshold", HUGE),
    ("poll_interval", HUGE),
    ("poll_interval", 1e300 * 1e10),  # inf
    ("reclaim_grace", HUGE),
    ("poll_backoff_max", HUGE),
    ("device", HUGE),
    ("allocation_timeout", -HUGE),
]


@pytest.mark.parametrize(("name", "value"), HUGE_VALUES, ids=_short)
def test_huge_numbers_are_value_errors_naming_the_field(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name) as info:
        ArbiterConfig(**{name: value})
    assert type(info.value) is ValueError
    assert len(str(info.value)) < 200  # the number is shown by its size, not 400 digits


def test_a_huge_allocation_timeout_means_forever() -> None:
    assert ArbiterConfig(allocation_timeout=HUGE).allocation_timeout == math.inf
    assert ArbiterConfig(allocation_timeout=math.inf).allocation_timeout == math.inf


def test_the_largest_budget_is_8_eib() -> None:
    assert ArbiterConfig(vram_budget=2**63 - 1).vram_budget == 2**63 - 1
    assert ArbiterConfig.for_vram_gb(2**33 - 1).vram_budget == (2**33 - 1) * GiB


@pytest.mark.parametrize("gb", [HUGE, 1e300, 2**33, 1e-12, -HUGE], ids=_short)
def test_for_vram_gb_rejects_sizes_beyond_the_bounds(gb: Any) -> None:
    with pytest.raises(ValueError, match="gb") as info:
        ArbiterConfig.for_vram_gb(gb)
    assert type(info.value) is ValueError


@pytest.mark.parametrize("interval", [1e-300, 5e-324, 0.0009])
def test_poll_interval_has_a_floor_of_1_ms(interval: float) -> None:
    with pytest.raises(ValueError, match=r"poll_interval must be .*>= 0\.001") as info:
        ArbiterConfig(poll_interval=interval)
    assert repr(interval) in str(info.value)
    assert ArbiterConfig(poll_interval=0.001).poll_interval == 0.001
    assert "0.001" in (ArbiterConfig.__doc__ or "")  # the floor is documented


def test_a_float_budget_is_told_to_use_an_int_of_bytes() -> None:
    with pytest.raises(TypeError, match=r"vram_budget must be an int .*bytes.*int\(") as info:
        ArbiterConfig(vram_budget=1.5 * GiB)  # type: ignore[arg-type]
    assert "1610612736.0" in str(info.value)
