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

import functools
import math
from collections.abc import Callable
from enum import StrEnum

from ._types import Priority

__all__ = [
    "RISE_HYSTERESIS",
    "QualityPolicy",
    "elastic_share_quality",
    "fixed_point_quality",
    "policy_target",
    "size_for_quality",
]


class QualityPolicy(StrEnum):
    """How quality targets respond to memory pressure.

    ``ADAPTIVE``: past the pressure threshold, targets fall toward their floors as
    pressure rises toward 1.0, lower priorities first and faster, ``USER_FACING`` last:
    at a full card BACKGROUND sits 12 %, NORMAL 9 %, HIGH 6 % and USER_FACING 3 % of the
    way down to the floor, and stays there when more is wanted than the card holds.
    Headroom is all this policy keeps for arrivals, and it costs quality: a degraded job
    delivers less work per byte it holds than a full one. What waits is admitted by
    shrink requests instead (degrade-before-preempt), which take from the holders
    below it only as much as it needs; if every holder that sees a waiter fell to its
    floor, each would give the whole shortfall and they would give it many times over.
    Only an elastic holder over a card that is overcommitted (other processes took
    memory the arbiter had granted) falls further, to the size that ends it.
    ``PROPORTIONAL``: past the threshold, each family's targets fall in proportion to
    the share of granted memory the *other* family holds, so at full pressure a family
    holding a fraction ``s`` of the memory sits at ``floor + (1 - floor) * s``.
    ``FIXED``: always 1.0.
    """

    ADAPTIVE = "adaptive"
    PROPORTIONAL = "proportional"
    FIXED = "fixed"


# How each priority's target falls once past the threshold: the drop toward the
# floor is reach * excess ** exponent. A larger exponent stays near 1.0 longer and
# a smaller reach stops short of the floor, so a full card (which is the normal
# state under contention) leaves every priority near full quality: the linear share
# maps half the memory to the floor, so a shrunk job delivers less work per byte it
# holds, and the memory it frees is only worth that loss to a request that waits
# (which a shrink request serves, by exactly what it needs).
_FALL = {
    Priority.BACKGROUND: (1.0, 0.12),
    Priority.NORMAL: (1.0, 0.09),
    Priority.HIGH: (2.0, 0.06),
    Priority.USER_FACING: (4.0, 0.03),
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
    exponent, reach = _FALL[priority]
    drop: float = reach * excess**exponent
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


# Qualities computed from byte shares carry float error of about 1e-16: a quality this
# close to a request's ``min_quality`` meets it (``0.68`` must not be refused for
# ``0.6799999999999999``).
QUALITY_TOLERANCE = 1e-9


def size_for_quality(quality: float, min_memory: int, max_memory: int, floor: float) -> int:
    """The smallest size in ``[min_memory, max_memory]`` whose share reaches ``quality``.

    The inverse of `elastic_share_quality`: a size's own share maps back to that size
    (float rounding is absorbed, or a holder obeying a shrink request would keep a byte
    too many and leave the waiter it shrank for short).
    """
    if quality >= 1.0 or max_memory <= min_memory or floor >= 1.0:
        return max_memory
    span = max_memory - min_memory
    exact = max(0.0, (quality - floor) / (1.0 - floor)) * span
    # Float error in the round trip is ~1e-16 of the span per step: far below a byte.
    size = min_memory + math.ceil(exact - max(1e-6, span * 1e-13))
    return max(min_memory, min(max_memory, size))


# The crossing of an elastic holder's share and its policy value is found to this many
# bytes: far below any size a server would resize by.
_CROSSING_RESOLUTION = 1 << 20
# Elastic targets move in steps of this much quality, and rise only by this much or
# more (so that two holders answering each other's resizes settle).
_QUALITY_STEP = 1 / 32
RISE_HYSTERESIS = 2 * _QUALITY_STEP


@functools.lru_cache(maxsize=4096)  # the same inputs recur at every refresh of the ledger
def fixed_point_quality(
    policy: QualityPolicy,
    priority: Priority,
    threshold: float,
    floor: float,
    budget: int,
    others: int,
    low: int,
    high: int,
    max_memory: int,
    mine: int = 0,
    other_family: int = 0,
    waiting: int = 0,
) -> float:
    """The best quality an elastic holder of ``[low, max_memory]`` bytes can run at when
    ``others`` bytes count in its pressure besides its own and it can hold at most
    ``high``: the largest ``min(share(m), policy((others + m) / budget))`` over ``m`` in
    ``[low, high]``, where its share rises with m and its policy value falls.

    ``mine`` and ``other_family`` are the bytes of its own family (besides its own) and
    of the other family that its ``PROPORTIONAL`` share counts; ``waiting`` is the part
    of ``others`` that waits rather than being held (for ``ADAPTIVE``, only memory held
    beyond the card takes a holder to its floor). The answer depends on
    neither its current size nor anything it changes by resizing: a holder that follows
    it gets there in one step and stays.
    """
    smallest = low

    def share(size: int) -> float:
        return elastic_share_quality(size, smallest, max_memory, floor)

    def allowed(size: int) -> float:
        family = 1.0
        if other_family:
            family = (mine + size) / (mine + size + other_family)
        return policy_target(
            policy,
            priority,
            (others + size) / budget,
            threshold=threshold,
            floor=floor,
            family_share=family,
        )

    if policy is QualityPolicy.ADAPTIVE:
        # The same as `policy_target`, inlined: this loop is the ledger's hottest code.
        exponent, reach = _FALL[priority]
        start, width = threshold * budget, (1.0 - threshold) * budget
        full = float(budget + waiting)  # past it, what is held overcommits the card
        fall = (1.0 - floor) * reach

        def allowed(size: int) -> float:
            used = others + size
            if used / budget < threshold:
                return 1.0
            if used > full:
                return floor
            excess = 1.0 if width <= 0 else min(1.0, (used - start) / width)
            drop: float = fall * excess**exponent
            return max(floor, 1.0 - drop)

    if share(high) <= allowed(high):
        return share(high)  # capped by the share it can reach
    if allowed(low) <= share(low):
        return max(floor, allowed(low))  # the policy's value even at its smallest
    return _crossing(share, allowed, low, high, threshold, budget, others, floor)


def _quantized(quality: float, floor: float) -> float:
    """``quality`` rounded down to a step of `_QUALITY_STEP` (not below ``floor``): a
    crossing moves with every byte anyone else is granted, and a holder should not be
    told to resize for a thousandth of quality."""
    return max(floor, math.floor(quality / _QUALITY_STEP) * _QUALITY_STEP)


def _crossing(
    share: Callable[[int], float],
    allowed: Callable[[int], float],
    low: int,
    high: int,
    threshold: float,
    budget: int,
    others: int,
    floor: float,
) -> float:
    """Where the rising ``share`` meets the falling ``allowed`` in ``[low, high]``,
    rounded down to a step (`_quantized`), given that ``share(low) < allowed(low)`` and
    ``share(high) > allowed(high)``."""
    smallest = low
    # Below the threshold every policy allows 1.0: start the search there.
    low = max(low, min(high, math.floor(threshold * budget) - others))
    if share(low) > allowed(low):
        low = smallest
    # The answer is share(low) where the search ends, rounded down to a step; share
    # rises with the size, so once both ends round to the same step the rest of the
    # search cannot change it.
    low_step = math.floor(share(low) / _QUALITY_STEP)
    high_step = math.floor(share(high) / _QUALITY_STEP)
    while high - low > _CROSSING_RESOLUTION and low_step != high_step:
        middle = (low + high) // 2
        reached = share(middle)
        if reached <= allowed(middle):
            low, low_step = middle, math.floor(reached / _QUALITY_STEP)
        else:
            high, high_step = middle, math.floor(reached / _QUALITY_STEP)
    return _quantized(share(low), floor)
