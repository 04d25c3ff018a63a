"""ArbiterConfig: every number that is a policy, validated once, frozen."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ._checks import MAX_BYTES, check_bytes, check_device, check_fraction, check_seconds, shown
from ._log import log
from ._quality import QualityPolicy
from ._types import GiB, check_timeout

if TYPE_CHECKING:
    from ._gpu import GpuDetectionResult

__all__ = ["ArbiterConfig"]

# When detection finds no GPU the device is assumed to have this much VRAM.
ASSUMED_VRAM = 8 * GiB
# Below this the poller would read the probe in a busy loop (1 ms).
MIN_POLL_INTERVAL = 0.001
# The share of the managed device's VRAM that auto_detect() budgets.
BUDGET_SHARE = 0.9
# Host RAM budget for the fragment cache, as a multiple of the device's VRAM.
RAM_PER_VRAM = 4


@dataclass(frozen=True, slots=True)
class ArbiterConfig:
    """How an `Arbiter` shares its GPU. Validated on construction (``TypeError``/``ValueError``).

    Every policy number lives here: budgets in bytes (an ``int``), quality floors and the
    pressure threshold in (0, 1], times in seconds of the event loop's clock.

    Attributes:
        vram_budget: bytes of VRAM the arbiter hands out (20 GiB), at most 8 EiB.
        ram_budget: bytes of host RAM for the fragment cache when its own
            ``ram_capacity`` is not given (64 GiB).
        llm_min_quality: the floor LLM quality targets fall to under pressure (0.4).
        diffusion_min_quality: the same floor for image and video generation (0.3).
        adaptive_quality: ``False`` turns every policy into ``FIXED`` (True).
        pressure_threshold: the pressure, ``(granted + external) / budget``, past which
            ``ADAPTIVE`` targets fall below 1.0 (0.85).
        allocation_timeout: seconds a request waits when it gives no ``timeout``
            (30.0; ``None`` or ``math.inf``: forever).
        poll_interval: seconds between reads of the GPU's memory (0.5); at least
            0.001 (1 ms), below which the poller would spin on the probe.
        reclaim_grace: seconds elastic holders get to shrink before anyone is
            preempted (2.0; not waited when no elastic holder could shrink).
        quality_policy: ``ADAPTIVE``, ``PROPORTIONAL`` or ``FIXED``, or its lower-case
            string value (``ADAPTIVE``).
        device: index or uuid of the one GPU this arbiter manages (0).
        poll_backoff_max: longest pause, in seconds, between probe retries while the
            GPU cannot be read (5.0).
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
        # Stored checked: an int too large for a float is kept as math.inf (forever).
        timeout = check_timeout(self.allocation_timeout, "allocation_timeout")
        object.__setattr__(self, "allocation_timeout", timeout)
        check_seconds("poll_interval", self.poll_interval, minimum=MIN_POLL_INTERVAL)
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
        check_device(self.device)

    @property
    def effective_policy(self) -> QualityPolicy:
        """The policy in force: ``FIXED`` whenever ``adaptive_quality`` is off."""
        return self.quality_policy if self.adaptive_quality else QualityPolicy.FIXED

    @classmethod
    def for_vram_gb(cls, gb: float, **overrides: Any) -> ArbiterConfig:
        """A config whose VRAM budget is ``gb`` GiB (the whole of it; no share is held back)."""
        if isinstance(gb, bool) or not isinstance(gb, int | float):
            raise TypeError(f"gb must be a number of GiB, got {gb!r}")
        # Exact comparisons, for an int of any size too; false for nan.
        if not 0 < gb <= MAX_BYTES // GiB:
            raise ValueError(
                f"gb must be a finite number > 0 and <= {MAX_BYTES // GiB}, got {shown(gb)}"
            )
        budget = int(gb * GiB)
        if budget < 1:
            raise ValueError(f"gb must come to at least one byte, got {gb!r}")
        return cls(vram_budget=budget, **overrides)

    @classmethod
    def auto_detect(cls, *, device: int | str = 0, **overrides: Any) -> ArbiterConfig:
        """Detect the GPUs and budget 90 % of ``device``'s VRAM (8 GiB assumed if none is found).

        Detection never raises; it returns within its time bound. When it finds no GPU,
        one warning says that an 8 GiB card was assumed.
        """
        from ._gpu import GpuDetector

        result = GpuDetector().detect()
        config = cls.from_detection(result, device=device, **overrides)
        if not result.gpus:
            log.warning(
                "no GPU detected; assuming an 8 GiB card",
                assumed_vram=ASSUMED_VRAM,
                vram_budget=config.vram_budget,
                hint="pass ArbiterConfig.for_vram_gb(...) to set the budget",
            )
        return config

    @classmethod
    def from_detection(
        cls, result: GpuDetectionResult, *, device: int | str = 0, **overrides: Any
    ) -> ArbiterConfig:
        """The config `auto_detect` would build from ``result``.

        The budget is 90 % of the managed device's VRAM and the RAM budget four times
        that VRAM. With no GPU in ``result`` the device is assumed to have 8 GiB. A
        ``device`` that names none of the detected GPUs raises ``ValueError``.
        """
        from ._gpu import GpuDetectionResult  # here: _gpu imports this module

        if not isinstance(result, GpuDetectionResult):
            raise TypeError(f"result must be a GpuDetectionResult, got {result!r}")
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
            ram_budget=min(MAX_BYTES, vram * RAM_PER_VRAM),
            device=device,
            **overrides,
        )

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-ready values."""
        data = asdict(self)
        data["quality_policy"] = self.quality_policy.value
        return data
