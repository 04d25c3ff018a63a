"""Cost of a preemption round and of recomputing quality targets, by number of holders.

    python benchmarks/bench_preemption.py [--quick]

A preemption round: the budget is filled by BACKGROUND holders that give their
memory back as soon as they are asked; a USER_FACING request that needs one
holder's share is timed from the call to its grant. The baseline is the same
request on an arbiter where the memory is free (no round at all).

Recomputing quality targets: one poller reading past the pressure threshold
with N holders whose targets are watched (each has a ``quality_changes()``
reader), timed on the sync ledger; the ratio is per holder against 10 holders.
"""

from __future__ import annotations

import argparse
import time

import anyio

from arbiter import Arbiter, ArbiterConfig, GiB, MiB, Priority, WorkloadType

LLM = WorkloadType.LLM_INFERENCE


async def preemption_round(holders: int, rounds: int) -> tuple[float, float]:
    """(ns per preemption round, ns per uncontended grant of the same size)."""
    share = 64 * MiB
    arbiter = Arbiter(ArbiterConfig(vram_budget=holders * share, reclaim_grace=0), probe=None)
    free = Arbiter(ArbiterConfig(vram_budget=holders * share), probe=None)

    async def victim(task_status: anyio.abc.TaskStatus[None]) -> None:
        alloc = await arbiter.request_allocation(LLM, Priority.BACKGROUND, share)
        task_status.started()
        await alloc.wait_preempted()
        alloc.release()

    total = baseline = 0
    async with anyio.create_task_group() as tg:
        for _ in range(holders):
            await tg.start(victim)
        for _ in range(rounds):
            start = time.perf_counter_ns()
            alloc = await arbiter.request_allocation(LLM, Priority.USER_FACING, share)
            total += time.perf_counter_ns() - start
            alloc.release()
            await tg.start(victim)  # refill the victim's place
            start = time.perf_counter_ns()
            other = await free.request_allocation(LLM, Priority.USER_FACING, share)
            baseline += time.perf_counter_ns() - start
            other.release()
        tg.cancel_scope.cancel()  # the victims left wait to be preempted forever
    return total / rounds, baseline / rounds


async def recompute_targets(holders: int, rounds: int) -> float:
    """ns for one pressure reading to recompute the targets of ``holders`` watched holders."""
    arbiter = Arbiter(ArbiterConfig(vram_budget=holders * 2 * GiB), probe=None)
    ledger = arbiter._ledger
    allocs = [
        await arbiter.request_allocation(
            LLM, Priority.BACKGROUND, 2 * GiB, min_memory=GiB, timeout=None
        )
        for _ in range(holders)
    ]
    readers = [alloc.quality_changes() for alloc in allocs]
    for reader in readers:
        await reader.__anext__()
    start = time.perf_counter_ns()
    for i in range(rounds):
        # Alternate between two pressures past the threshold: every target moves.
        ledger.set_external(GiB * (1 + i % 2), float(i))
    elapsed = (time.perf_counter_ns() - start) / rounds
    for alloc in allocs:
        alloc.release()
    return elapsed


async def run(quick: bool) -> list[tuple[str, str, str]]:
    rounds = 50 if quick else 300
    rows = []
    for holders in (10, 1_000):
        ns, base = await preemption_round(holders, rounds)
        rows.append((f"preemption round, {holders:,} holders", f"{ns:,.0f}", f"{ns / base:.2f}x"))
    small = await recompute_targets(10, rounds * 10)
    large = await recompute_targets(1_000, rounds)
    rows.append(("recompute targets, 10 holders", f"{small:,.0f}", "1.00x"))
    per_holder = (large / 1_000) / (small / 10)
    rows.append(("recompute targets, 1,000 holders", f"{large:,.0f}", f"{per_holder:.2f}x"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    print("ratio: preemption against an uncontended grant of the same size;")
    print("       recompute per holder against 10 holders")
    for backend in ("asyncio", "trio"):
        rows = anyio.run(run, args.quick, backend=backend)
        print(f"\n{backend}")
        print(f"{'case':<36} {'ns':>12} {'ratio':>8}")
        for name, ns, ratio in rows:
            print(f"{name:<36} {ns:>12} {ratio:>8}")


if __name__ == "__main__":
    main()
