"""Victim choice for degrade-before-preempt: pure functions over the holders' registry.

The registry maps each priority to its holders in grant order. Victims come
lowest priority first; within one priority idle before busy, then the most
recently granted first. Only preemptible holders not already asked to give
everything back are candidates, and only those strictly below the requester.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from ._records import Holding
from ._types import Priority

__all__ = ["choose_victims", "plan_shrinks", "victims"]

Registry = Mapping[Priority, dict[Holding, None]]

_PRIORITIES_LOW_FIRST = sorted(Priority)


def victims(registry: Registry, below: Priority) -> Iterator[Holding]:
    """The candidates under ``below``, in the order they are to be preempted."""
    for priority in _PRIORITIES_LOW_FIRST:
        if priority >= below:
            return
        busy = []
        for holding in reversed(registry[priority]):
            if not holding.preemptible or holding.preempt_requested:
                continue
            if holding.busy_spans:
                busy.append(holding)
            else:
                yield holding
        yield from busy


def plan_shrinks(elastic: Registry, below: Priority, shortfall: int) -> list[tuple[Holding, int]]:
    """The elastic candidates to shrink and the size each is to shrink to, in victim
    order, until ``shortfall`` is covered or no candidate has more to give. What a
    holder was already asked to give is promised to other waiters: this asks on top."""
    plan = []
    remaining = shortfall
    for holding in victims(elastic, below):
        assert holding.min_memory is not None
        start = min(holding.memory, min(holding.shrink_asks.values(), default=holding.memory))
        give = min(start - holding.min_memory, remaining)
        if give > 0:
            plan.append((holding, start - give))
            remaining -= give
            if remaining <= 0:
                break
    return plan


def choose_victims(
    holders: Registry, below: Priority, shortfall: int
) -> tuple[list[Holding] | None, int]:
    """The holders to preempt, in order, until ``shortfall`` will be freed, and what
    they hold; ``(None, total)`` when all candidates together hold only ``total``."""
    chosen = []
    total = 0
    for holding in victims(holders, below):
        chosen.append(holding)
        total += holding.memory
        if total >= shortfall:
            return chosen, total
    return None, total
