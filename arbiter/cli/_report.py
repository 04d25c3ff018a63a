"""The simulation report: one JSON object, or a side-by-side table and a verdict line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._simulate import SCHEDULERS

if TYPE_CHECKING:
    from rich.console import Console

    from ._record import SchedulerResult
    from ._trace import Trace

__all__ = ["as_json", "print_report", "verdict"]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def as_json(
    vram_gb: float, trace: Trace, seed: int, results: Sequence[SchedulerResult]
) -> dict[str, Any]:
    """The ``--json`` object of DESIGN.md, with lower-case priority and workload names.

    A priority with no request that waited, or a workload that never held memory, maps
    to ``null``. It holds every figure the table shows.
    """
    return {
        "vram_gb": vram_gb,
        "trace": trace.name,
        "rows": len(trace.rows),
        "seed": seed,
        "policies": {
            r.name: {
                "wait_p50_s": {p.name.lower(): _round(s) for p, s in r.wait_p50.items()},
                "wait_p99_s": {p.name.lower(): _round(s) for p, s in r.wait_p99.items()},
                "completed": r.completed,
                "timeouts": r.timeouts,
                "rejected": r.rejected,
                "preemptions": r.preemptions,
                "mean_quality": {w.value: _round(q) for w, q in r.mean_quality.items()},
                "utilization": _round(r.utilization),
                "goodput": _round(r.goodput),
            }
            for r in results
        },
    }


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _key(value: float | None) -> float:
    return float("inf") if value is None else value


def verdict(results: Sequence[SchedulerResult]) -> str:
    """One line: which scheduler wins on the top priority's p99 wait, and the goodput
    (useful work per budget and time) each delivered for it."""
    if not results:
        return "No scheduler was run."
    priorities = list(results[0].wait_p99)
    if not priorities:
        return "The trace has no rows."
    top = max(priorities)
    winner = min(results, key=lambda r: (_key(r.wait_p99[top]), -r.goodput))
    others = [r for r in results if r is not winner]
    line = f"{winner.name} wins on {top.name.lower()} p99 wait: {_seconds(winner.wait_p99[top])} s"
    if others:
        line += " against " + ", ".join(f"{r.name} {_seconds(r.wait_p99[top])} s" for r in others)
    if not others:
        return line + "."
    best = max(others, key=lambda r: r.goodput)
    ratio = winner.goodput / best.goodput if best.goodput > 0 else float("inf")
    return f"{line}; goodput {winner.goodput:.1%}, {ratio:.2f}x {best.name}'s {best.goodput:.1%}."


def print_report(
    console: Console, trace: Trace, vram_gb: float, results: Sequence[SchedulerResult]
) -> None:
    """Print the header, the side-by-side table and the verdict line."""
    from rich.table import Table

    end = max((r.last_completion for r in results), default=0.0)
    console.print(
        f"Simulated [bold]{trace.source}[/]: {len(trace.rows)} requests on a "
        f"{vram_gb:g} GiB budget, {end / 60:.1f} min of virtual time"
        + (f", {len(trace.external) // 2} external grabs." if trace.external else ".")
    )
    console.print(
        "Schedulers: "
        + "; ".join(f"[bold]{r.name}[/] ({SCHEDULERS[r.name].description})" for r in results)
        + "."
    )
    console.print(
        "Elastic rows (adaptive) run at the quality of the memory they hold; a preempted "
        "job is re-queued, reloads its memory and starts over (a resumable one resumes)."
    )
    table = Table(title="Schedulers compared on the same trace", title_justify="left")
    table.add_column("")
    for result in results:
        table.add_column(result.name, justify="right")
    if not results:
        console.print(table)
        return
    first = results[0]
    for label, attr in (("wait p50", "wait_p50"), ("wait p99", "wait_p99")):
        for priority in getattr(first, attr):
            table.add_row(
                f"{label} {priority.name.lower()} (s)",
                *(_seconds(getattr(r, attr)[priority]) for r in results),
            )
    for label in ("completed", "timeouts", "rejected", "preemptions"):
        table.add_row(label, *(str(getattr(r, label)) for r in results))
    for workload in first.mean_quality:
        table.add_row(
            f"mean quality {workload.value}",
            *("-" if (q := r.mean_quality[workload]) is None else f"{q:.2f}" for r in results),
        )
    table.add_row("memory utilisation", *(f"{r.utilization:.1%}" for r in results))
    table.add_row("goodput", *(f"{r.goodput:.1%}" for r in results))
    console.print(table)
    console.print(verdict(results))
