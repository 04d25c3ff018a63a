"""Quality targets: what each holder should run at, from the ledger's tallies.

The policy functions in `_quality` know nothing of holders; this mixin applies them
to one: its family, its priority, the pressure it sees, and (for an elastic holder)
the share of memory it holds or could grow into. Three rules shape what it sees:

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

from collections.abc import Callable

from ._quality import (
    RISE_HYSTERESIS,
    QualityPolicy,
    fixed_point_quality,
    policy_target,
    size_for_quality,
)
from ._records import FamilyTally, Holding, Request
from ._stats import StatsRecorder
from ._types import Priority, WorkloadType

__all__ = ["QualityTargets"]


class QualityTargets:
    """Quality targets for the `Ledger` (a mixin: the attributes below are the ledger's)."""

    budget: int
    granted: int
    external: int
    waiting: int
    on_the_way: int
    head: Callable[[], Request | None]
    _head_cache: tuple[tuple[int, int, int, int], int, int]
    stats: StatsRecorder
    _policy: QualityPolicy
    _threshold: float
    _floors: tuple[float, float]
    _families: tuple[FamilyTally, FamilyTally]
    _watched: dict[Holding, None]
    _elastic: dict[Priority, dict[Holding, None]]
    _quality_changed: Callable[[Holding], None]

    def floor(self, holding: Holding) -> float:
        """The lowest quality target of ``holding``'s family."""
        return self._floors[holding.diffusion]

    def seen(self, priority: Priority) -> int:
        """Bytes that count in the pressure a holder of ``priority`` sees: external use,
        memory granted at ``priority`` and above, and what waits there to be admitted."""
        total = self._seen_granted(priority)
        if self.waiting:
            total += self._admissible_head(priority)
        return total

    def _seen_granted(self, priority: Priority) -> int:
        llm, diffusion = self._families[0].at, self._families[1].at
        total = self.external
        for value in range(priority, len(llm)):
            total += llm[value] + diffusion[value]
        return total

    def _admissible_head(self, priority: Priority) -> int:
        """What the head of the queue waits for, when it counts for ``priority``.

        Only the head can be admitted next (no barging), so only it counts; and only when
        it is at ``priority`` or above and the memory that shrinking could free would
        admit it: degrading holders for a request they cannot admit anyway takes their
        quality for nothing (they would sit at their floors beside idle memory).
        """
        # Every target of one refresh asks this: remember it while nothing moved (any
        # grant, release, resize, preemption or queue change moves one of these).
        key = (self.granted, self.external, self.on_the_way, self.waiting)
        cached: tuple[tuple[int, int, int, int], int, int] | None = getattr(
            self, "_head_cache", None
        )
        if cached is None or cached[0] != key:
            cached = (key, *self._head_demand())
            self._head_cache = cached
        _, head_priority, demand = cached
        return demand if head_priority >= priority else 0

    def _head_demand(self) -> tuple[int, int]:
        """The head's priority and the bytes it waits for; 0 bytes when the memory that
        shrinking could free would not admit it."""
        head = self.head()
        if head is None:
            return -1, 0
        room = self.budget - self.granted - self.external + self.on_the_way
        if head.min_size > room:
            for level, elastic in self._elastic.items():
                if level > head.priority:
                    continue
                for holding in elastic:
                    if not holding.preempt_requested:
                        assert holding.min_memory is not None
                        room += holding.memory - holding.min_memory
            if head.min_size > room:
                return head.priority, 0
        return head.priority, head.min_size

    def recommended(self, workload: WorkloadType, priority: Priority) -> float:
        """The policy's target for a new request of this kind at the pressure it would see."""
        if not self.waiting and not (self._families[0].count or self._families[1].count):
            return 1.0  # it would be alone on the card
        return self._policy_at(workload.is_diffusion, priority, self.seen(priority), 0)

    def target(self, holding: Holding) -> float:
        """A holding's current quality target (after release: the last one it had)."""
        if holding.released:
            return holding.notified_quality
        if holding.shrink_cap is None and self._alone():
            return 1.0
        seen = self.seen(holding.priority)
        if holding.min_memory is None:
            if seen < self._threshold * self.budget:
                return 1.0  # the common case, without the policy's arithmetic
            quality = self._policy_at(holding.diffusion, holding.priority, seen, 0)
        else:
            quality = self._elastic_target(holding, seen - holding.memory)
            previous = holding.notified_quality
            if previous < quality < 1.0 and quality - previous < RISE_HYSTERESIS:
                # Holders of one priority answer each other's resizes; rising only by a
                # clear step keeps them from trading the same bytes forever.
                quality = previous
        if holding.shrink_cap is not None:
            quality = max(self._floors[holding.diffusion], min(quality, holding.shrink_cap))
        return quality

    def _target_at(self, holding: Holding, memory: int, granted: int) -> float:
        """The target ``holding`` would have holding ``memory`` bytes once ``granted``
        bytes are granted in all (``_fit`` asks it before a grant)."""
        extra = granted - self.granted
        holders = self._families[0].count + self._families[1].count
        if self.waiting <= 1 and holders == (0 if holding.granted_seq < 0 else 1):
            return 1.0  # it will be alone on the card
        # Right after the grant it no longer waits, and who heads the queue next is not
        # known yet: count what is granted.
        seen = self._seen_granted(holding.priority) + extra
        if holding.min_memory is None:
            return self._policy_at(holding.diffusion, holding.priority, seen, extra)
        return self._elastic_target(holding, seen - memory)

    def _alone(self) -> bool:
        return not self.waiting and self._families[0].count + self._families[1].count == 1

    def _retarget_all(self) -> None:
        """Tell watchers whose target moved; count every drop that asks an elastic
        holder to shrink, watched or not (an unwatched one reads ``quality``)."""
        for holding in self._watched:
            if self._retarget(holding):
                self._quality_changed(holding)
        for elastic in self._elastic.values():
            for holding in elastic:
                if not holding.watchers:
                    self._retarget(holding)

    def _retarget(self, holding: Holding) -> bool:
        """Recompute a watched holding's target; True when it changed. A drop that asks
        an elastic holder to shrink counts as a quality reduction."""
        quality = self.target(holding)
        previous = holding.notified_quality
        if quality == previous:
            return False
        holding.notified_quality = quality
        if quality < previous and holding.min_memory is not None:
            floor = self._floors[holding.diffusion]
            wanted = size_for_quality(quality, holding.min_memory, holding.max_memory, floor)
            if wanted < holding.memory:
                self.stats.quality_reductions += 1
        return True

    def _elastic_target(self, holding: Holding, others: int) -> float:
        """The best quality an elastic holder can run at, given that ``others`` bytes
        count in its pressure besides its own (see `fixed_point_quality`): where its
        share and its policy value cross, over the sizes it could hold (what it holds
        plus free memory, which its own resizing leaves unchanged)."""
        assert holding.min_memory is not None
        low = holding.min_memory
        free = self.budget - self.granted - self.external
        high = max(low, min(holding.max_memory, holding.memory + free))
        diffusion, priority = holding.diffusion, holding.priority
        mine = other_family = 0
        if self._policy is QualityPolicy.PROPORTIONAL:
            mine = sum(self._families[diffusion].at[priority:]) - holding.memory
            other_family = sum(self._families[not diffusion].at[priority:])
        # Positional: the cache hashes them faster than keywords.
        return fixed_point_quality(
            self._policy,
            priority,
            self._threshold,
            self._floors[diffusion],
            self.budget,
            others,
            low,
            high,
            holding.max_memory,
            mine,
            other_family,
        )

    def _policy_at(self, diffusion: bool, priority: Priority, seen: int, extra: int) -> float:
        """The policy value at ``seen`` bytes of pressure for a holder of ``priority``;
        ``extra`` bytes more (or fewer) in its own family for ``PROPORTIONAL``'s share."""
        pressure = seen / self.budget
        if pressure < self._threshold:
            return 1.0  # every policy's answer below the threshold
        share = 1.0
        if self._policy is QualityPolicy.PROPORTIONAL:
            mine = sum(self._families[diffusion].at[priority:]) + extra
            other = sum(self._families[not diffusion].at[priority:])
            share = mine / (mine + other) if other and mine + other > 0 else 1.0
        return policy_target(
            self._policy,
            priority,
            pressure,
            threshold=self._threshold,
            floor=self._floors[diffusion],
            family_share=share,
        )

    def _policy_for(self, diffusion: bool, priority: Priority, pressure: float) -> float:
        """The policy value at a given ``pressure`` ratio (the arbiter-wide averages)."""
        return self._policy_at(diffusion, priority, round(pressure * self.budget), 0)
