"""Degrade before preempt: victim choice (pure functions over the holders' registry)
and the `Reclaimer`, which asks elastic holders to shrink and preempts for the head
of the queue.

The registry maps each priority to its holders in grant order. Victims come
lowest priority first; within one priority idle before busy, then the most
recently granted first. Only preemptible holders not already asked to give
everything back are candidates, and only those strictly below the requester.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

from ._config import ArbiterConfig
from ._quality import elastic_share_quality, size_for_quality
from ._records import Holding, ReclaimPhase, Request, Tallies
from ._stats import StatsRecorder
from ._targets import QualityCalculator
from ._types import Priority

__all__ = ["Reclaimer", "choose_victims", "plan_shrinks", "victims"]

Registry = Mapping[Priority, dict[Holding, None]]

_PRIORITIES_LOW_FIRST = sorted(Priority)


def victims(registry: Registry, below: Priority, *, shrinking: bool = False) -> Iterator[Holding]:
    """The candidates under ``below``, in the order they are to be preempted.

    ``shrinking``: candidates to be asked to shrink rather than preempted, so holders
    requested with ``preemptible=False`` count too: they keep their memory, but an
    elastic one can run on less of it (its target says how much).
    """
    for priority in _PRIORITIES_LOW_FIRST:
        if priority >= below:
            return
        busy = []
        for holding in reversed(registry[priority]):
            if holding.preempt_requested or not (shrinking or holding.preemptible):
                continue
            if holding.busy_spans:
                busy.append(holding)
            else:
                yield holding
        yield from busy


def plan_shrinks(
    elastic: Registry,
    below: Priority,
    shortfall: int,
    promised_size: Callable[[Holding], int] | None = None,
) -> list[tuple[Holding, int, int]]:
    """The elastic candidates to shrink, each with the size to shrink to and the bytes
    that newly promises, in victim order, until ``shortfall`` is covered or no candidate
    has more to give; holders that may not be preempted are asked too. What a holder
    was already asked to give (by other waiters, or by its target: ``promised_size``)
    is promised already: this asks on top."""
    plan = []
    remaining = shortfall
    for holding in victims(elastic, below, shrinking=True):
        assert holding.min_memory is not None
        asks = holding.shrink_asks
        start = min(holding.memory, min(asks.values())) if asks else holding.memory
        if promised_size is not None:
            start = min(start, promised_size(holding))
        give = min(start - holding.min_memory, remaining)
        if give > 0:
            plan.append((holding, start - give, give))
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


class Reclaimer:
    """Degrade-before-preempt for the head of the queue. It owns the shrink requests it
    made (each holder's ``shrink_asks`` and the set of holders asked); the registries
    and tallies it reads are the core's, and it acts through two callbacks: ``preempt``
    (ask a holder for everything back) and ``retime`` (a request's reclaim deadline
    moved: its waiter and the core's timer must look again)."""

    __slots__ = ("_asked", "_elastic", "_grace", "_holders", "_preempt", "_retime", "_stats",
                 "_tallies", "_targets")  # fmt: skip

    def __init__(
        self,
        config: ArbiterConfig,
        tallies: Tallies,
        targets: QualityCalculator,
        holders: Registry,
        elastic: Registry,
        stats: StatsRecorder,
        preempt: Callable[[Holding], None],
        retime: Callable[[Request], None],
    ) -> None:
        self._grace = config.reclaim_grace
        self._tallies = tallies
        self._targets = targets
        self._holders = holders
        self._elastic = elastic
        self._stats = stats
        self._preempt = preempt
        self._retime = retime
        self._asked: dict[Holding, None] = {}  # holders with shrink requests pending

    def reclaim_for(self, request: Request, now: float) -> None:
        """Degrade before preempt, for the head of the queue that does not fit.

        Whenever the situation changes (a first look, a holder leaving, more external
        use) it starts over in DESIGN's order: when preempting every candidate and
        shrinking the elastic holders that may not be preempted to their minimum could
        not cover the shortfall, it harms no one; else it first asks elastic victims
        (those that may not be preempted included) to shrink, on top of what their
        targets and other waiters asked (whatever they free goes to the head), and each
        new ask starts a fresh grace; only once the grace has passed, or when no elastic
        holder has anything to give, does it preempt victims until enough will be
        freed, counting no promised shrink (none, when preempting could not cover it).
        """
        tallies = self._tallies
        shortfall = request.min_size - (tallies.budget - tallies.granted - tallies.external)
        shortfall -= tallies.on_the_way
        if shortfall <= 0 or not request.may_reclaim or shortfall > request.reclaimable:
            return
        chosen, total = choose_victims(self._holders, request.priority, shortfall)
        if chosen is None:
            total += self._spare_unpreemptible(request.priority)
            if total < shortfall:
                # While it is head no victim can appear or grow, so a shortfall above
                # this needs no new scan.
                request.reclaimable = total
                return  # even taking all that is allowed would not be enough: harm no one
        promised = self.promised()
        if promised < shortfall:
            asked = self._ask_to_shrink(request, shortfall - promised)
            if asked > 0:
                promised += asked
                self._start_grace(request, now)  # a new ask: a fresh grace
        if promised > 0 and request.reclaim_phase is ReclaimPhase.NONE:
            # Others' promised shrinks may cover it: wait for them, up to the grace.
            self._start_grace(request, now)
        if (
            promised > 0
            and request.reclaim_phase is ReclaimPhase.ASKED
            and now < request.reclaim_deadline
        ):
            return  # wait for the shrinks, up to the grace
        request.reclaim_phase = ReclaimPhase.PREEMPTING
        request.reclaim_deadline = math.inf  # nothing more to wait for
        if chosen is None:
            return  # only shrinking can cover it, and the shrinks were asked for
        for holding in chosen:
            self._stats.preemptions += 1
            self._preempt(holding)

    def _spare_unpreemptible(self, below: Priority) -> int:
        """What elastic holders under ``below`` that may not be preempted could give by
        shrinking to their minimum (what they already promised included)."""
        spare = 0
        for priority, elastic in self._elastic.items():
            if priority >= below:
                continue
            for holding in elastic:
                if not holding.preemptible and not holding.preempt_requested:
                    assert holding.min_memory is not None
                    spare += holding.memory - holding.min_memory
        return spare

    def _start_grace(self, request: Request, now: float) -> None:
        request.reclaim_phase = ReclaimPhase.ASKED
        request.reclaim_deadline = now + self._grace
        if self._grace > 0:
            self._retime(request)

    def promised(self) -> int:
        """Bytes that elastic holders were asked to give back and still hold: asked by a
        waiter (a shrink request) or by their own target (the policy's pressure fell on
        them), preemptible or not."""
        promised = 0
        targets = self._targets
        still = targets.still(True)  # only targets are read below
        try:
            for elastic in self._elastic.values():
                for holding in elastic:
                    if not holding.preempt_requested:  # else all it holds is on its way
                        promised += holding.memory - self._target_size(holding)
        finally:
            if still:
                targets.still(False)
        return promised

    def _target_size(self, holding: Holding) -> int:
        """The size ``holding``'s current target asks it to shrink to (or its size)."""
        assert holding.min_memory is not None
        targets = self._targets
        size = size_for_quality(
            targets.target(holding),
            holding.min_memory,
            holding.max_memory,
            targets.floor(holding.family),
        )
        return min(size, holding.memory)

    def _ask_to_shrink(self, request: Request, shortfall: int) -> int:
        """Cap the targets of elastic victims so that their shrinking covers ``shortfall``
        (or as much of it as they can); the bytes newly promised."""
        asked = 0
        plan = plan_shrinks(self._elastic, request.priority, shortfall, self._target_size)
        for holding, size, give in plan:
            asked += give
            asks = holding.shrink_asks
            if asks is None:
                asks = holding.shrink_asks = {}
            previous = asks.get(request)
            asks[request] = size if previous is None else min(size, previous)
            self._asked[holding] = None
            self._cap(holding)
            if previous is None:
                if request.shrunk is None:
                    request.shrunk = [holding]
                else:
                    request.shrunk.append(holding)
            # The drop it causes is counted where targets are recomputed.
        return asked

    def _cap(self, holding: Holding) -> None:
        """Cap ``holding``'s target at the share of the least size it is asked to shrink to."""
        asks = holding.shrink_asks
        if not asks:
            holding.shrink_cap = None
            return
        assert holding.min_memory is not None
        holding.shrink_cap = elastic_share_quality(
            min(asks.values()),
            holding.min_memory,
            holding.max_memory,
            self._targets.floor(holding.family),
        )

    def end(self, request: Request) -> None:
        """The pressure that caused ``request``'s shrink requests has passed."""
        request.reclaim_deadline = math.inf
        shrunk, request.shrunk = request.shrunk, None
        for holding in shrunk or ():
            assert holding.shrink_asks is not None  # it was asked by this request
            del holding.shrink_asks[request]
            if not holding.shrink_asks:
                self._asked.pop(holding, None)
            self._cap(holding)

    def forget(self, holding: Holding) -> None:
        """``holding`` is released: it is asked for nothing any more."""
        if holding.shrink_asks:
            self._asked.pop(holding, None)
