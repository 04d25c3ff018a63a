"""The core's records: a `Holding` per allocation, a request per queued demand (a
`NewAllocation` or a `Growth`), and the `Tallies` that quality targets are read from.

These are the core's own: the user's `Allocation` handle keeps its `Holding` only as
an opaque ticket to pass back through the port, and never writes to it.
"""

from __future__ import annotations

import math
from enum import Enum, IntEnum
from typing import Final

from ._types import Priority, WorkloadType

__all__ = [
    "FAILED",
    "GRANTED",
    "WAITING",
    "WITHDRAWN",
    "Family",
    "FamilyTally",
    "Growth",
    "Holding",
    "NewAllocation",
    "ReclaimPhase",
    "Request",
    "Tallies",
]

# Enum members are looked up through the metaclass; a grant should not pay for it.
_LLM = WorkloadType.LLM_INFERENCE

# A request's states; it is queued only while WAITING. Plain strings: compared by
# identity on the hot path.
WAITING: Final = "waiting"
GRANTED: Final = "granted"
WITHDRAWN: Final = "withdrawn"
FAILED: Final = "failed"


class Family(IntEnum):
    """The two workload families, whose targets have their own floors."""

    LLM = 0
    DIFFUSION = 1

    @classmethod
    def of(cls, workload: WorkloadType) -> Family:
        return cls.LLM if workload is _LLM else cls.DIFFUSION


class ReclaimPhase(Enum):
    """Where degrade-before-preempt stands for a request at the head of the queue."""

    NONE = "none"  # nothing asked of anyone
    ASKED = "asked"  # elastic holders were asked to shrink; the grace runs
    PREEMPTING = "preempting"  # the grace has passed: victims are preempted


_LLM_FAMILY, _DIFFUSION_FAMILY = Family.LLM, Family.DIFFUSION
_INF = math.inf
_NO_RECLAIM = ReclaimPhase.NONE


class Holding:
    """The core's record of one allocation, from its request until its release."""

    __slots__ = (
        "busy_spans",
        "family",
        "granted_seq",
        "growing",
        "idle_since",
        "keep_alive",
        "max_memory",
        "memory",
        "min_memory",
        "notified_quality",
        "owner",
        "preempt_requested",
        "preemptible",
        "priority",
        "released",
        "released_view",
        "shrink_asks",
        "shrink_cap",
        "ticket",
        "watchers",
        "workload",
    )

    def __init__(
        self,
        workload: WorkloadType,
        priority: Priority,
        max_memory: int,
        min_memory: int | None,
        preemptible: bool = True,
        keep_alive: float | None = None,
        owner: object = None,
        ticket: object = None,
    ) -> None:
        self.workload = workload
        self.family = _LLM_FAMILY if workload is _LLM else _DIFFUSION_FAMILY
        self.priority = priority
        self.max_memory = max_memory
        self.min_memory = min_memory
        self.memory = 0
        self.preemptible = preemptible
        self.keep_alive = keep_alive
        # Whose it is (a session): `Ledger.release_owner` returns all of an owner's.
        self.owner = owner
        # The caller's name for it (its handle): the core hands it back in events only.
        self.ticket = ticket
        self.granted_seq = -1
        # Its queued growths; None until it has one (most never grow: no list for them).
        self.growing: list[Growth] | None = None
        self.busy_spans = 0
        self.idle_since = 0.0
        self.preempt_requested = False
        self.released = False
        # Set while a higher-priority waiter needs this elastic holder to shrink.
        self.shrink_cap: float | None = None
        # The size each waiter that needs it to shrink asked for; the cap follows the least.
        # None until one asks (most are never asked: no dict for them).
        self.shrink_asks: dict[Request, int] | None = None
        self.watchers = 0
        self.notified_quality = 1.0
        # Released: what its target is computed from, if it is ever read (the ledger's).
        self.released_view: tuple[object, ...] | None = None

    @property
    def elastic(self) -> bool:
        return self.min_memory is not None and self.min_memory < self.max_memory


class Request:
    """A queued demand for memory of one holding: see `NewAllocation` and `Growth`."""

    __slots__ = (
        "best_quality",
        "enqueued_at",
        "holding",
        "max_size",
        "may_reclaim",
        "min_quality",
        "min_size",
        "priority",
        "reclaim_deadline",
        "reclaim_phase",
        "reclaimable",
        "shrunk",
        "size",
        "state",
        "ticket",
    )

    def __init__(
        self,
        holding: Holding,
        min_size: int,
        max_size: int,
        min_quality: float | None = None,
        ticket: object = None,
    ) -> None:
        # Positional or keyword: a class called with keywords gets them in a new dict,
        # and the shell builds one request per wait.
        self.holding = holding
        self.ticket = ticket  # the caller's name for it (its parked waiter), for events
        self.priority = holding.priority
        self.min_size = min_size
        self.max_size = max_size
        self.min_quality = min_quality
        self.state: str = WAITING
        self.size = 0
        self.enqueued_at = 0.0
        # The best quality it could have had while blocked only by min_quality.
        self.best_quality: float | None = None
        # False for a request that will not wait (timeout 0): it must not disturb anyone.
        self.may_reclaim = True
        self.reclaim_phase = _NO_RECLAIM
        # When the grace of its shrink requests ends (the core's clock); inf: none runs.
        self.reclaim_deadline = _INF
        # What all its victims held when preempting them could not cover the shortfall.
        self.reclaimable = _INF
        # The holders it asked to shrink; None until it asks (most never do: no list).
        self.shrunk: list[Holding] | None = None


class NewAllocation(Request):
    """A request for a holding that holds nothing yet."""

    __slots__ = ()


class Growth(Request):
    """A request to grow a holding that already holds memory (``resize`` upward)."""

    __slots__ = ("max_before",)

    def __init__(self, holding: Holding, size: int, ticket: object = None) -> None:
        super().__init__(holding, size, size, None, ticket)
        self.max_before = 0  # the holding's max_memory before the grant


class FamilyTally:
    """What one workload family (LLM or diffusion) holds."""

    __slots__ = ("at", "count", "granted")

    def __init__(self) -> None:
        self.granted = 0
        self.count = 0
        # Bytes granted at each priority (indexed by its value): the pressure a holder
        # sees counts only its own priority and above (no priority inversion).
        self.at = [0] * len(Priority)


class Tallies:
    """The sums the core keeps up to date and quality targets are computed from."""

    __slots__ = (
        "budget",
        "dequeued",
        "external",
        "families",
        "granted",
        "holders",
        "on_the_way",
        "waiting",
    )

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.granted = 0
        self.external = 0
        # Memory of holdings asked to give everything back that have not released yet.
        self.on_the_way = 0
        self.families = (FamilyTally(), FamilyTally())  # indexed by `Family`
        # The families' counts together: quality targets ask it on every grant.
        self.holders = 0
        self.waiting = 0  # queued requests
        # Requests that have left the queue: with `waiting`, it moves whenever the queue
        # (and so possibly its head) does.
        self.dequeued = 0
