"""``arbiter detect``: what GPU detection found and the config ``auto_detect()`` would build."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .._types import format_bytes

if TYPE_CHECKING:
    from rich.console import Console

    from .._config import ArbiterConfig
    from .._gpu import GpuDetectionResult

__all__ = ["detect_report", "run_detect"]


def detect_report() -> tuple[GpuDetectionResult, ArbiterConfig]:
    """Detect once, and build from that result the config `ArbiterConfig.auto_detect` would."""
    from .._config import ArbiterConfig
    from .._gpu import GpuDetector

    result = GpuDetector().detect()
    return result, ArbiterConfig.from_detection(result)


def as_json(result: GpuDetectionResult, config: ArbiterConfig) -> dict[str, Any]:
    """``{"method", "gpus": [...], "total_vram_bytes", "config": {field: value}}``."""
    return {**result.as_dict(), "config": config.as_dict()}


def _config_value(name: str, value: object) -> str:
    if name.endswith("_budget") and isinstance(value, int):
        return f"{format_bytes(value)} ({value} bytes)"
    if value is None:
        return "none (wait forever)" if name == "allocation_timeout" else "none"
    if name in {"allocation_timeout", "poll_interval", "reclaim_grace"}:
        return f"{value} s"
    return str(value)


def run_detect(console: Console, *, as_json_output: bool) -> int:
    """Print the detection and config, as tables or one JSON object; returns the exit status."""
    from rich.table import Table

    result, config = detect_report()
    if as_json_output:
        console.file.write(json.dumps(as_json(result, config)) + "\n")
        return 0
    gpus = Table(title=f"GPUs found (method: {result.method.value})", title_justify="left")
    for column in ("index", "name", "vendor", "total VRAM", "free VRAM", "uuid"):
        gpus.add_column(column, justify="right" if "VRAM" in column else "left")
    for gpu in result.gpus:
        free = "unknown" if gpu.free_vram_bytes is None else format_bytes(gpu.free_vram_bytes)
        gpus.add_row(
            str(gpu.index),
            gpu.name,
            gpu.vendor.value,
            format_bytes(gpu.total_vram_bytes),
            free,
            gpu.uuid or "unknown",
        )
    if result.gpus:
        console.print(gpus)
        console.print(f"total VRAM: {format_bytes(result.total_vram_bytes)}")
    else:
        console.print(
            f"No GPU found (method: {result.method.value}); "
            "auto_detect() assumes a device of 8 GiB."
        )
    settings = Table(title="ArbiterConfig.auto_detect() would build", title_justify="left")
    settings.add_column("field")
    settings.add_column("value")
    for name, value in config.as_dict().items():
        settings.add_row(name, _config_value(name, value))
    console.print(settings)
    return 0
