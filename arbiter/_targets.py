"""Quality targets: what each holder should run at, from the ledger's tallies.

The policy functions in `_quality` know nothing of holders; `QualityCalculator`
applies them to one, reading only the core's `Tallies`: its family, its priority, the
pressure it sees, and (for an elastic holder) the share of memory it holds or could
grow into. Three rules shape what it sees:

* no priority inversion: a holder of priority p sees external use, memory granted
  at priorities >= p and what the head of the queue waits for when it is at p or
  above (it alone can be admitted next, and it counts only when shrinking could
  admit it), never what lower priorities hold;
* work-conserving: a holding alone on the card (no other holder, nothing waiting)
  has target 1.0, whatever its size and whatever external use is;
* a fixed point: an elastic holder's target does not depend on its own size, only
  on what the others hold and on the most it could hold (its size plus free memory,
  which its own resizing leaves unchanged). A holder that follows its target reaches
  it in one resize and stays there until somebody else moves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

from ._config import ArbiterConfig
from ._quality import (
    RISE_HYSTERESIS,
    QualityPolicy,
    elastic_share_quality,
    fixed_point_quality,
    policy_target,
    size_for_quality,
)
from ._records import Family, Holding, Request, Tallies
from ._types import Priority, WorkloadType

__all__ = ["QualityCalculator"]


# Under contention every grant and release asks the same few values again (the card
# stays full): remember them. Positional arguments hash fastest.
@functools.lru_cache(maxsize=1024)
def _policy_value(
    policy: QualityPolicy,
    priority: Priority,
    pressure: float,
    threshold: float,
    floor: float,
    family_share: float,
) -> float:
    return policy_target(
        policy, priority, pressure, threshold=threshold, floor=floor, family_share=family_share
    )


class QualityCalculator:
    """Quality targets from a policy and the core's tallies, queue head and elastic
    holders (all read, never written); its only state is a cache of the head's demand
    and, while the core retargets its holders (`still`), the pressure each priority sees."""

    __slots__ = (
        "_elastic",
        "_floors",
        "_head",
        "_head_demand_for",
        "_levels",
        "_policy",
        "_tallies",
        "_threshold",
        "budget",
    )

    def __init__(
        self,
        config: ArbiterConfig,
        tallies: Tallies,
        head: Callable[[], Request | None],
        elastic: Mapping[Priority, dict[Holding, None]],
    ) -> None:
        self._policy = config.effective_policy
        self._threshold = config.pressure_threshold
        self._floors = (config.llm_min_quality, config.diffusion_min_quality)
        self._tallies = tallies
        self._head = head
        self._elastic = elastic
        self.budget = tallies.budget
        # (tallies it was computed at, the head's priority, the bytes it counts for).
        self._head_demand_for: tuple[tuple[int, int, int, int, int], int, int] | None = None
        # Per priority, (bytes seen, of them waiting) while the tallies stand still.
        self._levels: dict[Priority, tuple[int, int]] | None = None

    def still(self, still: bool) -> bool:
        """The core's tallies stand still from now on (``True``: it is about to read the
        targets of many holders and changes nothing meanwhile) or may move again
        (``False``). While still, what each priority sees is computed once: every holder
        of a priority sees the same bytes. True when this call changed it (a caller
        inside another's still spell leaves it to that one to end)."""
        if (self._levels is not None) == still:
            return False
        self._levels = {} if still else None
        return True

    def floor(self, family: Family) -> float:
        """The lowest quality target of ``family``."""
        return self._floors[family]

    def seen(self, priority: Priority) -> int:
        """Bytes that count in the pressure a holder of ``priority`` sees: external use,
        memory granted at ``priority`` and above, and what waits there to be admitted."""
        total = self._seen_granted(priority)
        if self._tallies.waiting:
            total += self._admissible_head(priority)
        return total

    def _seen_granted(self, priority: Priority) -> int:
        tallies = self._tallies
        llm, diffusion = tallies.families
        return tallies.external + sum(llm.at[priority:]) + sum(diffusion.at[priority:])

    def _admissible_head(self, priority: Priority) -> int:
        """What the head of the queue waits for, when it counts for ``priority``.

        Only the head can be admitted next (no barging), so only it counts; and only when
        it is at ``priority`` or above and the memory that shrinking could free would
        admit it: degrading holders for a request they cannot admit anyway takes their
        quality for nothing (they would sit at their floors beside idle memory).
        """
        # Every target of one refresh asks this: remember it while nothing moved (any
        # grant, release, resize, preemption or queue change moves one of these).
        tallies = self._tallies
        key = (
            tallies.granted,
            tallies.external,
            tallies.on_the_way,
            tallies.waiting,
            tallies.dequeued,
        )
        cached = self._head_demand_for
        if cached is None or cached[0] != key:
            cached = self._head_demand_for = (key, *self._head_demand())
        _, head_priority, demand = cached
        return demand if head_priority >= priority else 0

    def _head_demand(self) -> tuple[int, int]:
        """The head's priority and the bytes it waits for; 0 bytes when the memory that
        shrinking could free would not admit it."""
        head = self._head()
        if head is None:
            return -1, 0
        need = self.admitting_size(head)
        tallies = self._tallies
        room = self.budget - tallies.granted - tallies.external + tallies.on_the_way
        if need > room:
            for level, elastic in self._elastic.items():
                if level > head.priority:
                    continue
                for holding in elastic:
                    if not holding.preempt_requested:
                        assert holding.min_memory is not None
                        room += holding.memory - holding.min_memory
            if need > room:
                return head.priority, 0
        return head.priority, need

    def admitting_size(self, request: Request) -> int:
        """The fewest bytes that admit ``request``: its smallest acceptable size, or for
        an elastic request with ``min_quality`` the size whose share reaches it (given
        less it is not granted, so shrinking others only to its smallest size would take
        their quality for nothing)."""
        if request.min_quality is None or request.min_size >= request.max_size:
            return request.min_size
        floor = self._floors[request.holding.family]
        return size_for_quality(request.min_quality, request.min_size, request.max_size, floor)

    def recommended(self, workload: WorkloadType, priority: Priority) -> float:
        """The policy's target for a new request of this kind at the pressure it would see."""
        tallies = self._tallies
        if not tallies.waiting and not tallies.holders:
            return 1.0  # it would be alone on the card
        return self._policy_at(Family.of(workload), priority, self.seen(priority), 0)

    def target(self, holding: Holding) -> float:
        """A holding's current quality target (after release: the last one it had)."""
        if holding.released:
            return holding.notified_quality
        if holding.preempt_requested:
            # Asked for everything back (preempted, or reclaimed for keep_alive): a
            # holder that reads its target before it unwinds sees that it should give
            # all it can, not the share a shrink request alone would have left it.
            return self._floors[holding.family]
        tallies = self._tallies
        if holding.shrink_cap is None and not tallies.waiting and tallies.holders == 1:
            return 1.0  # alone on the card
        priority = holding.priority
        levels = self._levels
        if levels is None:
            waiting = self._admissible_head(priority) if tallies.waiting else 0
            seen = self._seen_granted(priority) + waiting
        else:
            level = levels.get(priority)
            if level is None:
                waiting = self._admissible_head(priority) if tallies.waiting else 0
                level = levels[priority] = (self._seen_granted(priority) + waiting, waiting)
            seen, waiting = level
        if holding.min_memory is None:
            if seen < self._threshold * self.budget:
                return 1.0  # the common case, without the policy's arithmetic
            quality = self._policy_at(holding.family, priority, seen, 0)
        else:
            quality = self._elastic_target(holding, seen - holding.memory, waiting)
            previous = holding.notified_quality
            if previous < quality < 1.0 and quality - previous < RISE_HYSTERESIS:
                # Holders of one priority answer each other's resizes; rising only by a
                # clear step keeps them from trading the same bytes forever.
                quality = previous
        if holding.shrink_cap is not None:
            quality = max(self._floors[holding.family], min(quality, holding.shrink_cap))
        return quality

    def target_at(self, holding: Holding, memory: int, granted: int) -> float:
        """The target ``holding`` would have holding ``memory`` bytes once ``granted``
        bytes are granted in all (asked before a grant with ``min_quality``)."""
        tallies = self._tallies
        extra = granted - tallies.granted
        if tallies.waiting <= 1 and tallies.holders == (0 if holding.granted_seq < 0 else 1):
            return 1.0  # it will be alone on the card
        # Right after the grant it no longer waits, and who heads the queue next is not
        # known yet: count what is granted.
        seen = self._seen_granted(holding.priority) + extra
        if holding.min_memory is None:
            return self._policy_at(holding.family, holding.priority, seen, extra)
        return self._elastic_target(holding, seen - memory)

    def policy_for(self, family: Family, priority: Priority, pressure: float) -> float:
        """The policy value at a given ``pressure`` ratio (the arbiter-wide averages)."""
        return self._policy_at(family, priority, round(pressure * self.budget), 0)

    def _elastic_target(self, holding: Holding, others: int, waiting: int = 0) -> float:
        """The best quality an elastic holder can run at, given that ``others`` bytes
        count in its pressure besides its own, ``waiting`` of them waiting rather than
        held (see `fixed_point_quality`): where its share and its policy value cross,
        over the sizes it could hold (what it holds plus free memory, which its own
        resizing leaves unchanged)."""
        assert holding.min_memory is not None
        tallies = self._tallies
        low, top = holding.min_memory, holding.max_memory
        high = holding.memory + self.budget - tallies.granted - tallies.external
        if high > top:
            high = top
        if high < low:
            high = low
        family, priority = holding.family, holding.priority
        if (others + high) / self.budget < self._threshold:
            # Below the threshold even at its largest: every policy allows 1.0, so its
            # share is the answer (what `fixed_point_quality` finds first, uncached).
            return elastic_share_quality(high, low, holding.max_memory, self._floors[family])
        mine = other_family = 0
        if self._policy is QualityPolicy.PROPORTIONAL:
            mine = sum(tallies.families[family].at[priority:]) - holding.memory
            other_family = sum(tallies.families[1 - family].at[priority:])
        # Positional: the cache hashes them faster than keywords.
        return fixed_point_quality(
            self._policy,
            priority,
            self._threshold,
            self._floors[family],
            self.budget,
            others,
            low,
            high,
            holding.max_memory,
            mine,
            other_family,
            waiting,
        )

    def _policy_at(self, family: Family, priority: Priority, seen: int, extra: int) -> float:
        """The policy value at ``seen`` bytes of pressure for a holder of ``priority``;
        ``extra`` bytes more (or fewer) in its own family for ``PROPORTIONAL``'s share."""
        pressure = seen / self.budget
        if pressure < self._threshold:
            return 1.0  # every policy's answer below the threshold
        share = 1.0
        if self._policy is QualityPolicy.PROPORTIONAL:
            families = self._tallies.families
            mine = sum(families[family].at[priority:]) + extra
            other = sum(families[1 - family].at[priority:])
            share = mine / (mine + other) if other and mine + other > 0 else 1.0
        return _policy_value(
            self._policy, priority, pressure, self._threshold, self._floors[family], share
        )
