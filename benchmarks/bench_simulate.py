"""Wall time of ``arbiter simulate`` on an hour of the built-in trace, and the comparison.

    python benchmarks/bench_simulate.py [--seed N] [--minutes M]

Prints, per scheduler, the wall time to replay the trace and the speed-up over real
time, beside a baseline measured in the same run: the same span of virtual time with
the arbiter and its poller running and no requests (what the clock machinery alone
costs). Then the scheduler table of ``arbiter simulate`` and the targets the
``adaptive`` scheduler is held to, each marked met or missed.
"""

from __future__ import annotations

import argparse
import time

import anyio
from rich.console import Console
from rich.table import Table
from trio.testing import MockClock

from arbiter import Arbiter, ArbiterConfig, GiB, Priority
from arbiter.cli._record import SchedulerResult
from arbiter.cli._report import print_report
from arbiter.cli._simulate import SCHEDULERS, simulate
from arbiter.cli._trace import builtin_trace
from arbiter.testing import FakeGpu

BUDGET_GB = 24


def idle_hour(seconds: float) -> float:
    """Wall seconds to let ``seconds`` of virtual time pass with an idle arbiter running."""

    async def idle() -> None:
        async with Arbiter(ArbiterConfig.for_vram_gb(BUDGET_GB), probe=FakeGpu(BUDGET_GB * GiB)):
            await anyio.sleep(seconds)

    start = time.perf_counter()
    anyio.run(idle, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})
    return time.perf_counter() - start


def targets(results: dict[str, SchedulerResult]) -> list[tuple[str, bool, str]]:
    """The issue's targets for ``adaptive`` on the built-in trace: (what, met, figures)."""
    fifo, priority, adaptive = results["fifo"], results["priority"], results["adaptive"]
    top = Priority.USER_FACING
    p99 = {name: r.wait_p99[top] or 0.0 for name, r in results.items()}
    better_util = max(fifo.utilization, priority.utilization)
    return [
        (
            "user_facing p99 <= 0.1 x fifo",
            p99["adaptive"] <= 0.1 * p99["fifo"],
            f"{p99['adaptive']:.2f} s vs {p99['fifo']:.2f} s "
            f"({p99['adaptive'] / p99['fifo']:.3f}x)",
        ),
        (
            "user_facing p99 <= priority",
            p99["adaptive"] <= p99["priority"],
            f"{p99['adaptive']:.2f} s vs {p99['priority']:.2f} s",
        ),
        (
            "timeouts <= priority",
            adaptive.timeouts <= priority.timeouts,
            f"{adaptive.timeouts} vs {priority.timeouts}",
        ),
        (
            "completed >= 0.9 x fifo",
            adaptive.completed >= 0.9 * fifo.completed,
            f"{adaptive.completed} vs {fifo.completed}",
        ),
        (
            "utilisation >= 0.95 x best of fifo, priority",
            adaptive.utilization >= 0.95 * better_util,
            f"{adaptive.utilization:.1%} vs {better_util:.1%} "
            f"({adaptive.utilization / better_util:.2f}x)",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=60.0)
    args = parser.parse_args()
    console = Console()
    trace = builtin_trace(seed=args.seed, minutes=args.minutes)
    span = args.minutes * 60

    baseline = idle_hour(span)
    timing = Table(
        title=f"Wall time for {args.minutes:g} min of the built-in trace", title_justify="left"
    )
    for column in ("run", "wall s", "virtual min", "x real time", "x idle baseline"):
        timing.add_column(column, justify="right" if column != "run" else "left")
    timing.add_row(
        "idle arbiter (baseline)",
        f"{baseline:.2f}",
        f"{span / 60:.0f}",
        f"{span / baseline:,.0f}",
        "1.0",
    )
    results: dict[str, SchedulerResult] = {}
    total = 0.0
    for name, scheduler in SCHEDULERS.items():
        start = time.perf_counter()
        (result,) = simulate(trace, [scheduler], BUDGET_GB * GiB)
        wall = time.perf_counter() - start
        total += wall
        results[name] = result
        virtual = result.last_completion
        timing.add_row(
            name,
            f"{wall:.2f}",
            f"{virtual / 60:.0f}",
            f"{virtual / wall:,.0f}",
            f"{wall / baseline:.1f}",
        )
    timing.add_row("all three", f"{total:.2f}", "", "", f"{total / baseline:.1f}")
    console.print(timing)
    console.print(
        f"target: all three under 10 s -> {'met' if total < 10 else 'MISSED'} ({total:.2f} s)\n"
    )

    print_report(console, trace, BUDGET_GB, list(results.values()))
    check = Table(title="Targets for adaptive", title_justify="left")
    for column in ("target", "met", "figures"):
        check.add_column(column)
    for what, met, figures in targets(results):
        check.add_row(what, "met" if met else "MISSED", figures)
    console.print(check)


if __name__ == "__main__":
    main()
