"""``--plot``: per scheduler, memory in use stacked by workload, quality targets, preemptions.

matplotlib is imported here, lazily, with the Agg backend: no display is needed.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._types import GiB, WorkloadType

if TYPE_CHECKING:
    from ._record import SchedulerResult
    from ._trace import Trace

__all__ = ["write_plot"]

_COLOURS = {
    WorkloadType.LLM_INFERENCE: "#4C72B0",
    WorkloadType.IMAGE_GENERATION: "#DD8452",
    WorkloadType.VIDEO_GENERATION: "#55A868",
}
_EXTERNAL_COLOUR = "#8C8C8C"


def _value_at(steps: Sequence[tuple[float, Any]], times: list[float], t: float) -> Any:
    index = bisect.bisect_right(times, t) - 1
    return steps[index][1] if index >= 0 else None


def _grid(result: SchedulerResult, trace: Trace) -> list[float]:
    times = {t for steps in result.timeline.memory.values() for t, _ in steps}
    times.update(step.at for step in trace.external)
    times.add(result.last_completion)
    return sorted(times)


def _layers(
    result: SchedulerResult, trace: Trace, grid: list[float]
) -> list[tuple[str, str, list[float]]]:
    """Each layer of the stack as (label, colour, GiB at each grid time)."""
    layers = []
    for workload, steps in result.timeline.memory.items():
        times = [t for t, _ in steps]
        values = [(_value_at(steps, times, t) or 0) / GiB for t in grid]
        layers.append((workload.value, _COLOURS[workload], values))
    if trace.external:
        steps = [(s.at, s.used) for s in trace.external]
        times = [t for t, _ in steps]
        values = [(_value_at(steps, times, t) or 0) / GiB for t in grid]
        layers.append(("external process", _EXTERNAL_COLOUR, values))
    return layers


def _draw_memory(ax: Any, result: SchedulerResult, trace: Trace, budget_gib: float) -> None:
    grid = _grid(result, trace)
    minutes = [t / 60 for t in grid]
    base = [0.0] * len(grid)
    for label, colour, values in _layers(result, trace, grid):
        top = [b + v for b, v in zip(base, values, strict=True)]
        ax.fill_between(minutes, base, top, step="post", color=colour, alpha=0.85, label=label)
        base = top
    ax.axhline(budget_gib, color="black", linestyle="--", linewidth=1, label="budget")
    marks = result.timeline.preemptions
    if marks:
        ax.plot(
            [t / 60 for t, _ in marks],
            [budget_gib * 1.04] * len(marks),
            linestyle="none",
            marker="v",
            color="#C44E52",
            markersize=6,
            label=f"preemption ({len(marks)})",
        )
    ax.set_ylim(0, budget_gib * 1.12)
    ax.set_ylabel("memory in use (GiB)")
    ax.set_title(
        f"{result.name}: memory by workload (utilisation {result.utilization:.0%}, "
        f"{result.preemptions} preemptions)",
        loc="left",
        fontsize=10,
    )


def _draw_quality(ax: Any, result: SchedulerResult) -> None:
    for workload, steps in result.timeline.quality.items():
        minutes = [t / 60 for t, _ in steps] + [result.last_completion / 60]
        values = [float("nan") if q is None else q for _, q in steps]
        values.append(values[-1] if values else float("nan"))
        ax.step(
            minutes,
            values,
            where="post",
            color=_COLOURS[workload],
            label=workload.value,
            linewidth=1.2,
        )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("quality target (mean of holders)")
    ax.set_title(f"{result.name}: quality targets", loc="left", fontsize=10)


def write_plot(
    path: str | Path, trace: Trace, budget: int, results: Sequence[SchedulerResult]
) -> None:
    """Draw one row per scheduler (memory left, quality right) and save a PNG at ``path``.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
        OSError: the file cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(results))
    fig, axes = plt.subplots(
        rows,
        2,
        figsize=(15, 3.4 * rows),
        sharex=True,
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 2]},
    )
    budget_gib = budget / GiB
    try:
        for row, result in enumerate(results):
            _draw_memory(axes[row][0], result, trace, budget_gib)
            _draw_quality(axes[row][1], result)
        for ax in axes[-1]:
            ax.set_xlabel("time (min, virtual)")
        for ax in axes[0]:
            ax.legend(loc="lower left", fontsize=8, ncol=3, framealpha=0.9)
        fig.suptitle(
            f"{trace.source} on a {budget_gib:g} GiB budget: {len(trace.rows)} requests",
            fontsize=12,
        )
        fig.tight_layout()
        fig.savefig(Path(path), dpi=100, format="png")
    finally:
        plt.close(fig)
