"""Quality targets: what each holder should run at, from the ledger's tallies.

The policy functions in `_quality` know nothing of holders; `QualityCalculator`
applies them to one, reading only the core's `Tallies`: its family, its priority, the
pressure it sees, and (for an elastic holder) the share of memory it holds or could
grow into. Three rules shape what it sees:

* no priority inversion: a holder of priority p sees external use, memory granted
  at priorities >= p and memory waited for at priorities >= p, never what lower
  priorities hold;
* work-conserving: a holding alone on the card (no other holder, nothing waiting)
  has target 1.0, whatever its size and whatever external use is;
* a fixed point: an elastic holder's target does not depend on its own size, only
  on what the others hold and on the most it could hold (its size plus free memory,
  which its own resizing leaves unchanged). A holder that follows its target reaches
  it in one resize and stays there until somebody else moves.
"""

from __future__ import annotations

from ._config import ArbiterConfig
from ._quality import QualityPolicy, fixed_point_quality, policy_target
from ._records import Family, Holding, Tallies
from ._types import Priority, WorkloadType

__all__ = ["QualityCalculator"]


class QualityCalculator:
    """Quality targets from a policy and the core's tallies; it keeps no state of its own."""

    __slots__ = ("_floors", "_policy", "_tallies", "_threshold", "budget")

    def __init__(self, config: ArbiterConfig, tallies: Tallies) -> None:
        self._policy = config.effective_policy
        self._threshold = config.pressure_threshold
        self._floors = (config.llm_min_quality, config.diffusion_min_quality)
        self._tallies = tallies
        self.budget = tallies.budget

    def floor(self, family: Family) -> float:
        """The lowest quality target of ``family``."""
        return self._floors[family]

    def seen(self, priority: Priority) -> int:
        """Bytes that count in the pressure a holder of ``priority`` sees: external use,
        memory granted and memory waited for at ``priority`` and above."""
        tallies = self._tallies
        llm, diffusion = tallies.families[0].at, tallies.families[1].at
        waiting_at = tallies.waiting_at
        total = tallies.external
        for value in range(priority, len(llm)):
            total += llm[value] + diffusion[value] + waiting_at[value]
        return total

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
        tallies = self._tallies
        if holding.shrink_cap is None and not tallies.waiting and tallies.holders == 1:
            return 1.0  # alone on the card
        seen = self.seen(holding.priority)
        if holding.min_memory is None:
            if seen < self._threshold * self.budget:
                return 1.0  # the common case, without the policy's arithmetic
            quality = self._policy_at(holding.family, holding.priority, seen, 0)
        else:
            quality = self._elastic_target(holding, seen - holding.memory)
        if holding.shrink_cap is not None:
            quality = max(self._floors[holding.family], min(quality, holding.shrink_cap))
        return quality

    def target_at(self, holding: Holding, memory: int, granted: int) -> float:
        """The target ``holding`` would have holding ``memory`` bytes once ``granted``
        bytes are granted in all (asked before a grant with ``min_quality``)."""
        tallies = self._tallies
        extra = granted - tallies.granted
        new = holding.granted_seq < 0
        if tallies.waiting <= 1 and tallies.holders == (0 if new else 1):
            return 1.0  # it will be alone on the card
        seen = self.seen(holding.priority) + extra
        if new:  # it leaves the queue: what it waits for no longer counts
            seen -= holding.max_memory if holding.min_memory is None else holding.min_memory
        if holding.min_memory is None:
            return self._policy_at(holding.family, holding.priority, seen, extra)
        return self._elastic_target(holding, seen - memory)

    def policy_for(self, family: Family, priority: Priority, pressure: float) -> float:
        """The policy value at a given ``pressure`` ratio (the arbiter-wide averages)."""
        return self._policy_at(family, priority, round(pressure * self.budget), 0)

    def _elastic_target(self, holding: Holding, others: int) -> float:
        """The best quality an elastic holder can run at, given that ``others`` bytes
        count in its pressure besides its own (see `fixed_point_quality`): where its
        share and its policy value cross, over the sizes it could hold (what it holds
        plus free memory, which its own resizing leaves unchanged)."""
        assert holding.min_memory is not None
        tallies = self._tallies
        low = holding.min_memory
        free = self.budget - tallies.granted - tallies.external
        high = max(low, min(holding.max_memory, holding.memory + free))
        family, priority = holding.family, holding.priority
        mine = other_family = 0
        if self._policy is QualityPolicy.PROPORTIONAL:
            mine = sum(tallies.families[family].at[priority:]) - holding.memory
            other_family = sum(tallies.families[1 - family].at[priority:])
        return fixed_point_quality(
            self._policy,
            priority,
            threshold=self._threshold,
            floor=self._floors[family],
            budget=self.budget,
            others=others,
            low=low,
            high=high,
            max_memory=holding.max_memory,
            mine=mine,
            other_family=other_family,
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
        return policy_target(
            self._policy,
            priority,
            pressure,
            threshold=self._threshold,
            floor=self._floors[family],
            family_share=share,
        )
