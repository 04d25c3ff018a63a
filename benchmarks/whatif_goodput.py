"""What adaptive's goodput costs, rule by rule, where it misses 0.95 x ``priority``'s.

    python benchmarks/whatif_goodput.py [--raw DIR] [--cases built-in/48,azure-conv/24]

Each variant below changes ONE thing, in this process only, by patching the library or
the simulated client, to measure what that thing costs; none is a scheduler the library
offers, and several break DESIGN (said on each). ``priority`` is run once, unpatched.

* ``as built``: `arbiter simulate`'s ``adaptive``, as in ``bench_simulate.py``;
* ``refuse degraded grants``: a client change (DESIGN allows it): elastic rows that
  give up after a timeout ask ``min_quality=0.9``, so they are not granted a small share
  of their memory (DESIGN "Requesting memory" rule 4 grants the largest size that fits);
  they stay elastic, so a user-facing request can still borrow from them. A request
  that times out at a lower available quality counts as a timeout;
* ``chats wait (no reclaim for user_facing)``: breaks DESIGN "Preemption and
  degrade-before-preempt" for ``USER_FACING`` requests: they neither ask holders to
  shrink nor count in holders' pressure while they wait, as under ``priority``;
* ``no reclaim at all``: the same for every priority: adaptive's elastic grants and
  pressure targets alone.

The work model is the simulator's (an elastic job runs at the quality of the memory it
holds: ``min_memory`` gives the floor, 0.3 for diffusion, so half of a job's memory
delivers 0.3 of its work): each GiB-second taken from an elastic holder costs 1.4
GiB-seconds of goodput, more than the GiB-second the borrower does with it (which,
unless it would have timed out, it would have done later anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from arbiter import AllocationTimeout, Arbiter, GiB, InsufficientQuality, Priority
from arbiter._preemption import Reclaimer
from arbiter._targets import QualityCalculator
from arbiter.cli._record import SchedulerResult
from arbiter.cli._simulate import SCHEDULERS, simulate
from arbiter.cli._trace import Trace, builtin_trace, parse_trace

sys.path.insert(0, str(Path(__file__).parent))
from convert_traces import build_traces

DEFAULT_CASES = "built-in/48,azure-conv/24,azure-code/24"
REFUSED_BELOW = 0.9


@contextlib.contextmanager
def patched(owner: Any, name: str, replace: Callable[[Any], Any]) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, replace(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def refusing_degraded_grants(original: Any) -> Any:
    async def request_allocation(self: Arbiter, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("min_memory") is not None and kwargs.get("timeout") is not None:
            kwargs["min_quality"] = REFUSED_BELOW
            try:
                return await original(self, *args, **kwargs)
            except InsufficientQuality:
                raise AllocationTimeout(kwargs["timeout"]) from None
        return await original(self, *args, **kwargs)

    return request_allocation


def no_reclaim(below: Priority | None) -> Callable[[], contextlib.ExitStack]:
    """Requests at ``below`` and above (None: every request) do not reclaim."""

    def skip(request_priority: int) -> bool:
        return below is None or request_priority >= below

    def reclaim_for(original: Any) -> Any:
        def patched_reclaim(self: Reclaimer, request: Any, now: float) -> None:
            if not skip(request.priority):
                original(self, request, now)

        return patched_reclaim

    def head_demand(original: Any) -> Any:
        def patched_demand(self: QualityCalculator) -> tuple[int, int]:
            priority, demand = original(self)
            return (-1, 0) if priority >= 0 and skip(priority) else (priority, demand)

        return patched_demand

    def stack() -> contextlib.ExitStack:
        exits = contextlib.ExitStack()
        exits.enter_context(patched(Reclaimer, "reclaim_for", reclaim_for))
        exits.enter_context(patched(QualityCalculator, "_head_demand", head_demand))
        return exits

    return stack


VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    "as built": contextlib.nullcontext,
    "refuse degraded grants": lambda: patched(
        Arbiter, "request_allocation", refusing_degraded_grants
    ),
    "chats wait (no reclaim for user_facing)": no_reclaim(Priority.USER_FACING),
    "no reclaim at all": no_reclaim(None),
}


def row(result: SchedulerResult, base: SchedulerResult) -> str:
    top = Priority.USER_FACING
    quality = ", ".join(
        f"{w.value.split('_')[0]} {q:.2f}" for w, q in result.mean_quality.items() if q is not None
    )
    return (
        f"{result.goodput / base.goodput:6.3f}x  p99 {result.wait_p99.get(top) or 0.0:6.2f} s  "
        f"timeouts {result.timeouts:4d}  degraded {result.degraded:5.1%} "
        f"({result.degraded_at_grant:5.1%} at grant)  quality {quality}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, help="folder of the public traces")
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"(default: {DEFAULT_CASES})")
    args = parser.parse_args()
    traces: dict[str, Trace] = {"built-in": builtin_trace(seed=0)}
    if args.raw is not None:
        for name, rows in build_traces(args.raw).items():
            lines = [json.dumps(r) for r in rows]
            traces[name] = parse_trace(lines, source=f"{name} (public traces)", name=name)
    for case in args.cases.split(","):
        name, budget_gb = case.rsplit("/", 1)
        if name not in traces:
            print(f"{case}: give --raw for the public traces")
            continue
        trace, budget = traces[name], int(budget_gb) * GiB
        [base] = simulate(trace, [SCHEDULERS["priority"]], budget)
        top = Priority.USER_FACING
        print(
            f"{case}: priority goodput {base.goodput:.1%}, user_facing p99 "
            f"{base.wait_p99.get(top) or 0.0:.2f} s, timeouts {base.timeouts}"
        )
        for label, variant in VARIANTS.items():
            with variant():
                [result] = simulate(trace, [SCHEDULERS["adaptive"]], budget)
            print(f"  {label:40} {row(result, base)}")


if __name__ == "__main__":
    main()
