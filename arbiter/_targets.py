"""Quality targets: what each holder should run at, from the ledger's tallies.

The policy functions in `_quality` know nothing of holders; this mixin applies them
to one: its family, its priority, the real pressure, and (for an elastic holder)
the share of memory it holds or could grow into.
"""

from __future__ import annotations

from ._quality import QualityPolicy, elastic_share_quality, policy_target
from ._records import FamilyTally, Holding
from ._types import Priority, WorkloadType

__all__ = ["QualityTargets"]


class QualityTargets:
    """Quality targets for the `Ledger` (a mixin: the attributes below are the ledger's)."""

    budget: int
    granted: int
    external: int
    _policy: QualityPolicy
    _threshold: float
    _floors: tuple[float, float]
    _families: tuple[FamilyTally, FamilyTally]

    def floor(self, holding: Holding) -> float:
        """The lowest quality target of ``holding``'s family."""
        return self._floors[holding.diffusion]

    def recommended(self, workload: WorkloadType, priority: Priority) -> float:
        """The policy's target for a new request of this kind at the current pressure."""
        pressure = (self.granted + self.external) / self.budget
        return self._policy_for(workload.is_diffusion, priority, pressure)

    def target(self, holding: Holding) -> float:
        """A holding's current quality target (after release: the last one it had)."""
        if holding.released:
            return holding.notified_quality
        used = self.granted + self.external
        if holding.min_memory is None and used / self.budget < self._threshold:
            return 1.0  # the common case, without the policy's arithmetic
        quality = self._target_at(holding, holding.memory, self.granted)
        if holding.shrink_cap is not None:
            quality = max(self._floors[holding.diffusion], min(quality, holding.shrink_cap))
        return quality

    def _target_at(self, holding: Holding, memory: int, granted: int) -> float:
        """The target ``holding`` has holding ``memory`` bytes when ``granted`` bytes are
        granted in all: its policy value, capped for an elastic one by its share."""
        used = granted + self.external
        quality = self._policy_for(holding.diffusion, holding.priority, used / self.budget)
        if not holding.elastic:
            return quality
        assert holding.min_memory is not None
        # The share counts the memory it could grow into without pushing pressure past
        # the point where its own policy value starts to fall: a holder that follows its
        # target then settles there, instead of shrinking and regrowing forever.
        limit = self.budget
        if self._policy_for(holding.diffusion, holding.priority, 1.0) < 1.0:
            limit = int(self._threshold * self.budget)
        reachable = min(holding.max_memory, memory + max(0, limit - used))
        floor = self._floors[holding.diffusion]
        share = elastic_share_quality(reachable, holding.min_memory, holding.max_memory, floor)
        return max(floor, min(quality, share))

    def _policy_for(self, diffusion: bool, priority: Priority, pressure: float) -> float:
        if pressure < self._threshold:
            return 1.0  # every policy's answer below the threshold
        mine, other = self._families[diffusion].granted, self._families[not diffusion].granted
        share = mine / (mine + other) if other else 1.0
        return policy_target(
            self._policy,
            priority,
            pressure,
            threshold=self._threshold,
            floor=self._floors[diffusion],
            family_share=share,
        )
