"""``--plot``: per scheduler, memory in use stacked by workload, quality as run, preemptions.

matplotlib is imported here, lazily, with the Agg backend: no display is needed.
"""

from __future__ import annotations

import itertools
import math
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


# The plot averages over this many bins across the whole run: fine enough to show
# each render and grab, coarse enough that a second-long chat does not flicker.
_BINS = 240


def _binned(steps: Sequence[tuple[float, float | None]], edges: Sequence[float]) -> list[float]:
    """The time-weighted mean of a step function over each bin; NaN where it is ``None``
    throughout."""
    means = []
    index = 0
    for low, high in itertools.pairwise(edges):
        while index + 1 < len(steps) and steps[index + 1][0] <= low:
            index += 1
        area = weight = 0.0
        j = index
        while j < len(steps) and steps[j][0] < high:
            start = max(low, steps[j][0])
            stop = min(high, steps[j + 1][0]) if j + 1 < len(steps) else high
            value = steps[j][1]
            if value is not None and stop > start:
                area += value * (stop - start)
                weight += stop - start
            j += 1
        means.append(area / weight if weight > 0 else math.nan)
    return means


def _edges(end: float) -> list[float]:
    width = max(end, 1.0) / _BINS
    return [i * width for i in range(_BINS + 1)]


def _draw_memory(
    ax: Any, result: SchedulerResult, trace: Trace, budget_gib: float, edges: list[float]
) -> None:
    minutes = [(a + b) / 120 for a, b in itertools.pairwise(edges)]
    layers: list[tuple[str, str, list[float]]] = []
    for workload, steps in result.timeline.memory.items():
        gib = [(t, v / GiB) for t, v in steps]
        layers.append((workload.value, _COLOURS[workload], _binned(gib, edges)))
    if trace.external:
        gib = [(0.0, 0.0)] + [(s.at, s.used / GiB) for s in trace.external]
        layers.append(("external process", _EXTERNAL_COLOUR, _binned(gib, edges)))
    if layers:  # an empty trace has no workload to stack
        ax.stackplot(
            minutes,
            *[[0.0 if math.isnan(v) else v for v in values] for _, _, values in layers],
            labels=[label for label, _, _ in layers],
            colors=[colour for _, colour, _ in layers],
            alpha=0.85,
        )
    ax.axhline(budget_gib, color="black", linestyle="--", linewidth=1, label="budget")
    marks = result.timeline.preemptions
    if marks:
        ax.plot(
            [t / 60 for t, _ in marks],
            [budget_gib * 1.05] * len(marks),
            linestyle="none",
            marker="v",
            color="#C44E52",
            markersize=5,
            alpha=0.6,
            label="preemption",
        )
    ax.set_ylim(0, budget_gib * 1.12)
    ax.set_ylabel("memory in use (GiB)")
    ax.set_title(
        f"{result.name}: memory by workload (utilisation {result.utilization:.0%}, "
        f"goodput {result.goodput:.0%}, {result.preemptions} preemptions)",
        loc="left",
        fontsize=10,
    )


def _draw_quality(ax: Any, result: SchedulerResult, edges: list[float]) -> None:
    minutes = [(a + b) / 120 for a, b in itertools.pairwise(edges)]
    for workload, steps in result.timeline.quality.items():
        mean = result.mean_quality[workload]
        label = workload.value + ("" if mean is None else f" (mean {mean:.2f})")
        ax.plot(minutes, _binned(steps, edges), color=_COLOURS[workload], label=label)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("quality run at")
    ax.set_title(f"{result.name}: mean quality that holders run at", loc="left", fontsize=10)


def write_plot(
    path: str | Path,
    trace: Trace,
    budget: int,
    results: Sequence[SchedulerResult],
    *,
    format: str = "png",
) -> None:
    """Draw one row per scheduler (memory left, quality right) and save it at ``path``
    in ``format`` (``png``, ``svg``, ``pdf``, ``jpg``).

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
        edges = _edges(max((r.last_completion for r in results), default=0.0))
        for row, result in enumerate(results):
            _draw_memory(axes[row][0], result, trace, budget_gib, edges)
            _draw_quality(axes[row][1], result, edges)
            if result.timeline.quality:
                axes[row][1].legend(loc="lower right", fontsize=8, framealpha=0.9)
        width = (edges[1] - edges[0]) / 60
        for ax in axes[-1]:
            ax.set_xlabel(f"time (min of virtual time; means over {width:.2g} min)")
        legend: dict[str, Any] = {}
        for row in axes:
            handles, labels = row[0].get_legend_handles_labels()
            legend.update(zip(labels, handles, strict=True))
        fig.legend(
            legend.values(),
            legend.keys(),
            loc="upper center",
            ncol=len(legend),
            bbox_to_anchor=(0.5, 0.975),
            fontsize=9,
            frameon=False,
        )
        fig.suptitle(
            f"{trace.source} on a {budget_gib:g} GiB budget: {len(trace.rows)} requests",
            fontsize=12,
        )
        fig.tight_layout(rect=(0, 0, 1, 0.96))
        fig.savefig(Path(path), dpi=100, format=format)
    finally:
        plt.close(fig)
