"""The ledger's records: a `Holding` per allocation and a `Request` per queued demand."""

from __future__ import annotations

from ._types import Priority, WorkloadType

__all__ = ["FAILED", "GRANTED", "WAITING", "WITHDRAWN", "FamilyTally", "Holding", "Request"]

# Enum members are looked up through the metaclass; a grant should not pay for it.
_LLM = WorkloadType.LLM_INFERENCE

# A request's states; it is queued only while WAITING.
WAITING, GRANTED, WITHDRAWN, FAILED = "waiting", "granted", "withdrawn", "failed"


class Holding:
    """The ledger's record of one allocation, waiting or held. `Allocation` extends it."""

    __slots__ = (
        "busy_spans",
        "diffusion",
        "granted_seq",
        "growing",
        "idle_since",
        "keep_alive",
        "max_memory",
        "memory",
        "min_memory",
        "notified_quality",
        "preempt_requested",
        "preemptible",
        "priority",
        "released",
        "shrink_asks",
        "shrink_cap",
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
    ) -> None:
        self.workload = workload
        self.diffusion = workload is not _LLM
        self.priority = priority
        self.max_memory = max_memory
        self.min_memory = min_memory
        self.memory = 0
        self.preemptible = preemptible
        self.keep_alive = keep_alive
        self.granted_seq = -1
        self.growing: list[Request] = []  # its queued grow requests
        self.busy_spans = 0
        self.idle_since = 0.0
        self.preempt_requested = False
        self.released = False
        # Set while a higher-priority waiter needs this elastic holder to shrink.
        self.shrink_cap: float | None = None
        # The size each waiter that needs it to shrink asked for; the cap follows the least.
        self.shrink_asks: dict[Request, int] = {}
        self.watchers = 0
        self.notified_quality = 1.0

    @property
    def elastic(self) -> bool:
        return self.min_memory is not None and self.min_memory < self.max_memory


class Request:
    """A queued demand for memory: a new allocation, or the growth of one (``grow``)."""

    __slots__ = (
        "best_quality",
        "enqueued_at",
        "grow",
        "holding",
        "max_before",
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
    )

    def __init__(
        self,
        holding: Holding,
        min_size: int,
        max_size: int,
        *,
        min_quality: float | None = None,
        grow: bool = False,
    ) -> None:
        self.holding = holding
        self.priority = holding.priority
        self.min_size = min_size
        self.max_size = max_size
        self.min_quality = min_quality
        self.grow = grow
        self.state = WAITING
        self.size = 0
        self.max_before = 0  # a granted grow's holder's max_memory before it
        self.enqueued_at = 0.0
        # The best quality it could have had while blocked only by min_quality.
        self.best_quality: float | None = None
        # False for a request that will not wait (timeout 0): it must not disturb anyone.
        self.may_reclaim = True
        self.reclaim_phase = 0  # 0: none yet, 1: asked elastic holders to shrink, 2: preempting
        self.reclaim_deadline = float("inf")
        # What all its victims held when preempting them could not cover the shortfall.
        # While it is head no victim can appear or grow (only the head is granted), so
        # a shortfall above this needs no new scan.
        self.reclaimable = float("inf")
        self.shrunk: list[Holding] = []


class FamilyTally:
    """What one workload family (LLM or diffusion) holds, kept by the ledger."""

    __slots__ = ("at", "count", "granted")

    def __init__(self) -> None:
        self.granted = 0
        self.count = 0
        # Bytes granted at each priority (indexed by its value): the pressure a holder
        # sees counts only its own priority and above (no priority inversion).
        self.at = [0] * len(Priority)
