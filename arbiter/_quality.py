"""Quality policies: pure functions of (family, priority, pressure) to a target in [floor, 1].

A policy never reads the clock or the ledger; the ledger hands it what it needs.
Whatever the policy, three properties hold (and are tested with hypothesis):

* within one family, at equal pressure, a higher priority never gets a lower target;
* more pressure never raises a target, and pressure below the threshold gives 1.0;
* a family's target depends on the other family only through ``family_share``,
  which is 1.0 when the other family holds nothing, so its targets then return
  to the best the pressure allows.
"""

from __future__ import annotations

from enum import StrEnum

from ._types import Priority

__all__ = ["QualityPolicy", "elastic_share_quality", "policy_target", "size_for_quality"]


class QualityPolicy(StrEnum):
    """How quality targets respond to memory pressure.

    ``ADAPTIVE``: past the pressure threshold, targets fall toward their floors as
    pressure rises toward 1.0, lower priorities first and faster, ``USER_FACING`` last.
    ``PROPORTIONAL``: past the threshold, each family's targets fall in proportion to
    the share of granted memory the *other* family holds, so at full pressure a family
    holding a fraction ``s`` of the memory sits at ``floor + (1 - floor) * s``.
    ``FIXED``: always 1.0.
    """

    ADAPTIVE = "adaptive"
    PROPORTIONAL = "proportional"
    FIXED = "fixed"


# How fast each priority's target falls once past the threshold: the drop is
# excess ** exponent, so a larger exponent stays near 1.0 longer (falls last).
_FALL_EXPONENT = {
    Priority.BACKGROUND: 0.5,
    Priority.NORMAL: 1.0,
    Priority.HIGH: 2.0,
    Priority.USER_FACING: 4.0,
}


def _excess(pressure: float, threshold: float) -> float:
    """How far past the threshold pressure is, scaled to [0, 1]."""
    if pressure < threshold:
        return 0.0
    if threshold >= 1.0:
        return 1.0
    return min(1.0, (pressure - threshold) / (1.0 - threshold))


def policy_target(
    policy: QualityPolicy,
    priority: Priority,
    pressure: float,
    *,
    threshold: float,
    floor: float,
    family_share: float = 1.0,
) -> float:
    """The target ``policy`` gives a holder of ``priority`` in a family whose floor is ``floor``.

    ``family_share`` is the family's share of the memory granted to both families
    (1.0 when the other family holds nothing); only ``PROPORTIONAL`` reads it.
    """
    if policy is QualityPolicy.FIXED:
        return 1.0
    excess = _excess(pressure, threshold)
    if excess == 0.0:
        return 1.0
    drop: float = excess ** _FALL_EXPONENT[priority]
    if policy is QualityPolicy.PROPORTIONAL:
        drop *= 1.0 - min(1.0, max(0.0, family_share))
    return max(floor, 1.0 - (1.0 - floor) * drop)


def elastic_share_quality(memory: int, min_memory: int, max_memory: int, floor: float) -> float:
    """The quality an elastic holder can reach with ``memory``: ``min_memory`` gives the
    floor, ``max_memory`` gives 1.0, linear between."""
    if max_memory <= min_memory:
        return 1.0
    share = (memory - min_memory) / (max_memory - min_memory)
    return floor + (1.0 - floor) * min(1.0, max(0.0, share))


def size_for_quality(quality: float, min_memory: int, max_memory: int, floor: float) -> int:
    """The smallest size in ``[min_memory, max_memory]`` whose share reaches ``quality``."""
    if quality >= 1.0 or max_memory <= min_memory or floor >= 1.0:
        return max_memory
    share = max(0.0, (quality - floor) / (1.0 - floor))
    return min(max_memory, min_memory + int(-(-share * (max_memory - min_memory) // 1)))
