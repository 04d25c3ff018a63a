"""``arbiter status``: what the daemon holds, who waits, its state and stats."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import anyio

from .._stats import ArbiterState, ArbiterStats
from .._types import format_bytes
from ._args import UsageError

__all__ = ["run_status", "status_json"]


def status_json(state: ArbiterState, stats: ArbiterStats, reply: Any) -> dict[str, Any]:
    """The ``--json`` object: bytes, seconds and lower-case names."""
    state_out = {name: getattr(state, name) for name in ArbiterState.__dataclass_fields__}
    state_out["pressure_level"] = state.pressure_level.value
    stats_out: dict[str, Any] = {
        name: getattr(stats, name) for name in ArbiterStats.__dataclass_fields__
    }
    stats_out["wait_percentiles"] = {
        priority.name.lower(): {
            "count": w.count, "p50": w.p50, "p90": w.p90, "p99": w.p99, "max": w.max
        }
        for priority, w in stats.wait_percentiles.items()
    }  # fmt: skip
    holders = [
        {
            "id": h.id, "pid": h.pid, "label": h.label, "workload": h.workload,
            "priority": h.priority, "memory": h.memory, "quality": h.quality,
            "busy": h.busy, "age_s": h.age_s,
        }
        for h in reply.holders
    ]  # fmt: skip
    waiters = [
        {
            "id": w.id, "pid": w.pid, "label": w.label, "workload": w.workload,
            "priority": w.priority, "memory": w.memory, "waited_s": w.waited_s,
        }
        for w in reply.waiters
    ]  # fmt: skip
    return {"state": state_out, "stats": stats_out, "holders": holders, "waiters": waiters}


# How long `arbiter status` waits for the daemon's answer once connected.
STATUS_TIMEOUT = 10.0


async def _fetch(path: Path) -> tuple[ArbiterState, ArbiterStats, Any]:
    from ..remote import RemoteArbiter

    async with RemoteArbiter(path) as remote:
        with anyio.fail_after(STATUS_TIMEOUT):
            reply = await remote._status()
        return remote.state(), remote.stats(), reply


def run_status(args: argparse.Namespace) -> int:
    """Print the daemon's status; no daemon is one line and exit status 2."""
    from .._errors import ArbiterUnavailable
    from ..remote._wire import default_socket_path

    path = Path(args.socket) if args.socket else default_socket_path()
    try:
        state, stats, reply = anyio.run(_fetch, path, backend="asyncio")
    except ArbiterUnavailable as exc:
        raise UsageError(str(exc)) from None
    except TimeoutError:
        raise UsageError(
            f"the daemon on {path} did not answer within {STATUS_TIMEOUT:g} s"
        ) from None
    # The daemon's reply fits in one frame: it leaves out the last of a very long list.
    omitted = (
        f"{reply.omitted} more holders and waiters not listed (the reply is at most 1 MiB)"
        if reply.omitted
        else None
    )
    if args.json:
        print(json.dumps(status_json(state, stats, reply)))
        if omitted:
            print(omitted, file=sys.stderr)
        return 0
    print(
        f"{path}: {format_bytes(state.vram_used)} granted, "
        f"{format_bytes(state.external_used)} external, "
        f"{format_bytes(state.vram_available)} available, pressure "
        f"{state.memory_pressure:.2f} ({state.pressure_level.value}), {state.waiting} waiting"
    )
    print(
        f"allocations {stats.total_allocations} (ok {stats.successful_allocations}, "
        f"failed {stats.failed_allocations}, cancelled {stats.cancelled}), "
        f"preemptions {stats.preemptions}, quality reductions {stats.quality_reductions}"
    )
    for h in reply.holders:
        print(
            f"holder {h.id} pid {h.pid} {h.label or '-'} {h.workload} {h.priority} "
            f"{format_bytes(h.memory)} quality {h.quality:.2f} "
            f"{'busy' if h.busy else 'idle'} {h.age_s:.1f}s"
        )
    for w in reply.waiters:
        print(
            f"waiter {w.id} pid {w.pid} {w.label or '-'} {w.workload} {w.priority} "
            f"{format_bytes(w.memory)} waited {w.waited_s:.1f}s"
        )
    if omitted:
        print(omitted)
    return 0
