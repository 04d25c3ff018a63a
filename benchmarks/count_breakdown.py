"""Where an uncontended ``allocate()`` spends its instructions, part by part: a
breakdown of `count_instructions.py`'s ``allocate`` figure (``valgrind`` counts).

    python benchmarks/count_breakdown.py [--backend asyncio|trio]

Each part runs alone, in a loop, inside a running event loop, counted as
`count_instructions.py` counts (two runs, the difference per iteration). The parts
are the steps one uncontended grant and release take, each measured apart: the sum
comes near the whole, but not exactly (each part pays its own loop, and what a part
leaves behind differs from what the whole leaves). Last, the parts that DESIGN asks
of any implementation (`REQUIRED`) are added up and set against the semaphore pair and
issue 10's target for ``allocate()``: what the target leaves for the handle and the
accounting.
"""

from __future__ import annotations

import anyio

from arbiter import Arbiter, ArbiterConfig, GiB, Priority, WorkloadType
from arbiter._allocation import Allocation
from arbiter._backend import current_backend
from arbiter._log import configured
from arbiter._records import Holding

# name: what it is (the floor and the whole come from `count_instructions.py`'s cases)
PARTS = {
    "semaphore": "the baseline: async with anyio.Semaphore(...): pass",
    "floor": "check, yield, body scope, two clock readings (DESIGN's floor)",
    "allocate": "the whole: async with arbiter.allocate(...): pass",
    "arguments": "arbiter.allocate(...) without entering: argument checks, context",
    "records": "a Holding and its Allocation handle, made and freed",
    "lock": "the ledger's lock taken twice (grant, release)",
    "ledger": "Ledger.grant_now + Ledger.release (accounting, stats, targets)",
    "refresh": "two Ledger._refresh (the time-weighted averages, one step each)",
    "observe": "two StatsRecorder.observe (the averages' arithmetic alone)",
    "wait record": "one StatsRecorder.record_grant (the wait-time percentiles' sample)",
    "target": "one quality target of a holder alone on the card (read at release)",
    "log checks": "two configured() (whether structlog would log the grant/release)",
}


async def _run(part: str, rounds: int) -> None:
    from bench_allocation import _Floor

    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10, allocation_timeout=None), probe=None)
    ledger, lock = arbiter._ledger, arbiter._lock
    llm, normal = WorkloadType.LLM_INFERENCE, Priority.NORMAL
    loop = current_backend().loop()
    holding = Holding(llm, normal, GiB, None, True, None, arbiter)
    tallies, stats = ledger.tallies, ledger.stats
    family = tallies.families[holding.family]
    now = 1.0
    # One loop per part, picked once: a test inside the loop would be counted in.
    if part == "semaphore":
        semaphore = anyio.Semaphore(10)
        for _ in range(rounds):
            async with semaphore:
                pass
    elif part == "floor":
        for _ in range(rounds):
            async with _Floor():
                pass
    elif part == "allocate":
        for _ in range(rounds):
            async with arbiter.allocate(llm, normal, memory=GiB):
                pass
    elif part == "arguments":
        for _ in range(rounds):
            arbiter.allocate(llm, normal, memory=GiB)
    elif part == "records":
        for _ in range(rounds):
            made = Holding(llm, normal, GiB, None, True, None, arbiter)
            made.ticket = Allocation(arbiter, made, loop, 1, None, 0.0)
    elif part == "lock":
        for _ in range(rounds):
            lock.acquire()
            lock.release()
            lock.acquire()
            lock.release()
    elif part == "ledger":
        for _ in range(rounds):
            holding.released = False  # the same record, granted again
            now += 1.0
            ledger.grant_now(holding, GiB, GiB, now)
            now += 1.0
            ledger.release(holding, now)
    elif part == "refresh":
        for _ in range(rounds):
            tallies.granted, family.count = GiB, 1
            now += 1.0
            ledger._refresh(now)
            tallies.granted, family.count = 0, 0
            now += 1.0
            ledger._refresh(now)
    elif part == "observe":
        for _ in range(rounds):
            now += 1.0
            stats.observe(now, 0.1, 1.0, None)
            now += 1.0
            stats.observe(now, 0.0, None, None)
    elif part == "wait record":
        for _ in range(rounds):
            stats.record_grant(normal, 0.0)
    elif part == "target":
        tallies.holders = 1  # alone on the card, as at an uncontended release
        for _ in range(rounds):
            ledger.targets.target(holding)
    else:
        for _ in range(rounds):
            configured()
            configured()


# What DESIGN asks of every allocate(), whatever does the accounting: the floor (the
# check before the decision and the yield after it, the body's cancel scope, the
# clock), argument errors raised at the call (and the context ``allocate()`` returns),
# the lock that threads share, and the stats (a wait-time sample, the time-weighted
# averages stepped at the grant and at the release).
REQUIRED = ("floor", "arguments", "lock", "observe", "wait record")
# Issue 10's allocate() target, as a ratio to the semaphore pair.
TARGET = {"asyncio": 1.5, "trio": 2.5}


def main() -> None:
    from count_instructions import backend_unless_run, per_operation

    backend = backend_unless_run(__doc__.splitlines()[0], _run)
    print(f"instructions per uncontended allocate() ({backend}), by part")
    counts: dict[str, float] = {}
    for part, what in PARTS.items():
        counts[part] = count = per_operation(__file__, part, 2_000, 6_000, 1, backend)
        print(f"{part:<11} {count:>9,.0f}  {what}", flush=True)
    semaphore = counts["semaphore"]
    required = sum(counts[part] for part in REQUIRED)
    print(
        f"required   {required:>9,.0f}  {' + '.join(REQUIRED)}: "
        f"{required / semaphore:.2f}x the semaphore"
    )
    print(
        f"allocate   {counts['allocate']:>9,.0f}  {counts['allocate'] / semaphore:.2f}x; "
        f"the target, {TARGET[backend]}x, leaves "
        f"{TARGET[backend] * semaphore - required:,.0f} beyond what is required"
    )


if __name__ == "__main__":
    main()
