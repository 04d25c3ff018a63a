"""What the quality calculator remembers between reads (the head's demand) never
outlives the queue it was computed from, and what it remembers while the core
retargets its holders (each priority's pressure) never outlives that: seeded random
histories of the core, each target read compared with one computed from scratch."""

from __future__ import annotations

import random

import pytest

from arbiter import ArbiterConfig, Priority, QualityPolicy, WorkloadType
from arbiter._ledger import Ledger, Outcome
from arbiter._records import GRANTED, Holding, NewAllocation

pytestmark = pytest.mark.cpu_heavy


def _history(seed: int) -> int:
    """Run one history; the number of reads that differed from a fresh computation."""
    rng = random.Random(seed)
    config = ArbiterConfig(
        vram_budget=100,
        reclaim_grace=rng.choice([0.0, 2.0]),
        quality_policy=rng.choice(list(QualityPolicy)),
    )
    ledger = Ledger(config)
    targets = ledger.targets
    held: list[Holding] = []
    waiting: list[NewAllocation] = []
    stale = 0
    now = 0.0
    for _ in range(200):
        now += rng.random()
        choice = rng.random()
        if choice < 0.45:
            memory = rng.randint(5, 60)
            min_memory = rng.choice([None, None, None, rng.randint(1, memory)])
            holding = Holding(
                rng.choice(list(WorkloadType)), rng.choice(list(Priority)), memory, min_memory
            )
            smallest = min_memory or memory
            if ledger.grant_now(holding, smallest, memory, now):
                held.append(holding)
            else:
                request = NewAllocation(holding, smallest, memory, None, None)
                ledger.submit(request, now)
                if request.state is GRANTED:
                    held.append(holding)
                else:
                    waiting.append(request)
        elif choice < 0.75 and held:
            holding = held.pop(rng.randrange(len(held)))
            remembered = targets.target(holding)
            targets._head_demand_for = None
            stale += targets.target(holding) != remembered
            ledger.release(holding, now)
        elif choice < 0.85 and waiting:
            ledger.withdraw(waiting.pop(rng.randrange(len(waiting))), now, Outcome.CANCELLED)
        elif choice < 0.92:
            ledger.set_external(rng.choice([0, 0, 10, 30]), now)
        else:
            ledger.advance(now)
        for request in [r for r in waiting if r.state is GRANTED]:
            waiting.remove(request)
            held.append(request.holding)
        # A still spell (what each priority sees, remembered while the core retargets)
        # ends with the operation that began it, and gives the targets a fresh read gives.
        stale += targets._levels is not None
        fresh = [targets.target(h) for h in held]
        assert targets.still(True)
        stale += [targets.target(h) for h in held] != fresh
        stale += [targets.target(h) for h in reversed(held)] != fresh[::-1]
        assert targets.still(False)
    return stale


@pytest.mark.parametrize("seeds", [range(0, 100), range(100, 200)])
def test_a_remembered_head_demand_never_outlives_its_queue(seeds: range) -> None:
    assert sum(_history(seed) for seed in seeds) == 0
