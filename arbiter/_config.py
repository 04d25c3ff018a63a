"""ArbiterConfig: every number that is a policy, validated once, frozen."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ._checks import check_bytes, check_fraction, check_seconds
from ._quality import QualityPolicy
from ._types import GiB, check_timeout

if TYPE_CHECKING:
    from ._gpu import GpuDetectionResult

__all__ = ["ArbiterConfig"]

# When detection finds no GPU the device is assumed to have this much VRAM.
ASSUMED_VRAM = 8 * GiB
# The share of the managed device's VRAM that auto_detect() budgets.
BUDGET_SHARE = 0.9
# Host RAM budget for the fragment cache, as a multiple of the device's VRAM.
RAM_PER_VRAM = 4


@dataclass(frozen=True, slots=True)
class ArbiterConfig:
    """How an `Arbiter` shares its GPU. Validated on construction (``TypeError``/``ValueError``).

    Every policy number lives here: budgets in bytes, quality floors and the pressure
    threshold in (0, 1], times in seconds of the event loop's clock.
    """

    vram_budget: int = 20 * GiB
    ram_budget: int = 64 * GiB
    llm_min_quality: float = 0.4
    diffusion_min_quality: float = 0.3
    adaptive_quality: bool = True
    pressure_threshold: float = 0.85
    allocation_timeout: float | None = 30.0
    poll_interval: float = 0.5
    reclaim_grace: float = 2.0
    quality_policy: QualityPolicy = QualityPolicy.ADAPTIVE
    device: int | str = field(default=0)
    # Longest pause between probe retries while the GPU cannot be read.
    poll_backoff_max: float = 5.0

    def __post_init__(self) -> None:
        check_bytes("vram_budget", self.vram_budget, allow_zero=False)
        check_bytes("ram_budget", self.ram_budget, allow_zero=True)
        check_fraction("llm_min_quality", self.llm_min_quality)
        check_fraction("diffusion_min_quality", self.diffusion_min_quality)
        check_fraction("pressure_threshold", self.pressure_threshold)
        if not isinstance(self.adaptive_quality, bool):
            raise TypeError(f"adaptive_quality must be a bool, got {self.adaptive_quality!r}")
        check_timeout(self.allocation_timeout, "allocation_timeout")
        check_seconds("poll_interval", self.poll_interval, positive=True)
        check_seconds("reclaim_grace", self.reclaim_grace, positive=False)
        check_seconds("poll_backoff_max", self.poll_backoff_max, positive=True)
        if isinstance(self.quality_policy, str) and not isinstance(
            self.quality_policy, QualityPolicy
        ):
            try:
                object.__setattr__(self, "quality_policy", QualityPolicy(self.quality_policy))
            except ValueError:
                choices = ", ".join(p.value for p in QualityPolicy)
                raise ValueError(
                    f"quality_policy must be one of {choices}, got {self.quality_policy!r}"
                ) from None
        if not isinstance(self.quality_policy, QualityPolicy):
            raise TypeError(f"quality_policy must be a QualityPolicy, got {self.quality_policy!r}")
        if isinstance(self.device, bool) or not isinstance(self.device, int | str):
            raise TypeError(f"device must be an index or a uuid string, got {self.device!r}")
        if isinstance(self.device, int) and self.device < 0:
            raise ValueError(f"device must be an index >= 0 or a uuid, got {self.device!r}")

    @property
    def effective_policy(self) -> QualityPolicy:
        """The policy in force: ``FIXED`` whenever ``adaptive_quality`` is off."""
        return self.quality_policy if self.adaptive_quality else QualityPolicy.FIXED

    @classmethod
    def for_vram_gb(cls, gb: float, **overrides: Any) -> ArbiterConfig:
        """A config whose VRAM budget is ``gb`` GiB (the whole of it; no share is held back)."""
        if isinstance(gb, bool) or not isinstance(gb, int | float):
            raise TypeError(f"gb must be a number of GiB, got {gb!r}")
        if math.isnan(gb) or math.isinf(gb) or gb <= 0:
            raise ValueError(f"gb must be a finite number > 0, got {gb!r}")
        return cls(vram_budget=int(gb * GiB), **overrides)

    @classmethod
    def auto_detect(cls, *, device: int | str = 0, **overrides: Any) -> ArbiterConfig:
        """Detect the GPUs and budget 90 % of ``device``'s VRAM (8 GiB assumed if none is found).

        Detection never raises; it returns within its time bound.
        """
        from ._gpu import GpuDetector

        return cls.from_detection(GpuDetector().detect(), device=device, **overrides)

    @classmethod
    def from_detection(
        cls, result: GpuDetectionResult, *, device: int | str = 0, **overrides: Any
    ) -> ArbiterConfig:
        """The config `auto_detect` would build from ``result``.

        The budget is 90 % of the managed device's VRAM and the RAM budget four times
        that VRAM. With no GPU in ``result`` the device is assumed to have 8 GiB. A
        ``device`` that names none of the detected GPUs raises ``ValueError``.
        """
        vram = ASSUMED_VRAM
        if result.gpus:
            for gpu in result.gpus:
                if device == gpu.index or (isinstance(device, str) and device == gpu.uuid):
                    vram = gpu.total_vram_bytes
                    break
            else:
                found = ", ".join(str(g.index) for g in result.gpus)
                raise ValueError(f"device {device!r} is not among the detected GPUs ({found})")
        return cls(
            vram_budget=max(1, int(vram * BUDGET_SHARE)),
            ram_budget=vram * RAM_PER_VRAM,
            device=device,
            **overrides,
        )

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-ready values."""
        data = asdict(self)
        data["quality_policy"] = self.quality_policy.value
        return data
