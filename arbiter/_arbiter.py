"""The async shell: argument checks, parking waiters, lifecycle, the background tasks.

Decisions are the ledger's; this module only turns them into events, cancel
scopes and log lines. A waiter parks on an event that the releaser sets after
the ledger has already handed it the memory.
"""

from __future__ import annotations

import math
from itertools import count
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
import anyio.lowlevel
import structlog

from ._allocation import Allocation, AllocationContext
from ._arguments import DEFAULT, Default, RequestArgs, check_request
from ._backend import Backend, current_backend, current_time
from ._config import ArbiterConfig
from ._errors import (
    AllocationTimeout,
    InsufficientMemory,
    InsufficientQuality,
    ShuttingDown,
)
from ._gpu import MemoryProbe
from ._ledger import Ledger
from ._log import debug, log
from ._records import FAILED, GRANTED, Holding, Request
from ._stats import ArbiterState, ArbiterStats
from ._types import (
    MemoryPressure,
    Priority,
    WorkloadType,
    coerce_priority,
    coerce_workload,
)

__all__ = ["Arbiter"]


class _Waiter(Request):
    __slots__ = ("event",)
    event: anyio.Event | None


class Arbiter:
    """Hands out the memory of one GPU to awaiting tasks, by priority, then arrival.

    Build it anywhere (no event loop needed). Used without ``async with`` it is pure
    accounting; ``async with arbiter`` runs the memory-pressure poller (when a probe
    is there) and the keep_alive timer in its own task group until ``aclose()``.

    Args:
        config: the policy numbers; ``None`` detects the GPU (`ArbiterConfig.auto_detect`).
        probe: where the poller reads device memory; ``None`` uses NVML for
            ``config.device`` when NVML works, else no poller.
    """

    def __init__(
        self, config: ArbiterConfig | None = None, *, probe: MemoryProbe | None = None
    ) -> None:
        if config is None:
            config = ArbiterConfig.auto_detect()
        elif not isinstance(config, ArbiterConfig):
            raise TypeError(f"config must be an ArbiterConfig or None, got {config!r}")
        self._config = config
        self._default_timeout = config.allocation_timeout
        self._ledger = Ledger(
            config,
            wake=self._wake,
            preempt=self._preempt,
            quality_changed=self._quality_changed,
        )
        if probe is not None and not callable(getattr(probe, "read", None)):
            raise TypeError(f"probe must be a MemoryProbe (with async read()), got {probe!r}")
        self._probe = probe
        self._owns_probe = False
        self._poller: Any = None
        self._ids = count(1)
        self._closed = False
        self._task_group: anyio.abc.TaskGroup | None = None
        self._services: anyio.CancelScope | None = None
        self._keep_alive_changed: anyio.Event | None = None

    @property
    def config(self) -> ArbiterConfig:
        """The configuration this arbiter was built with."""
        return self._config

    def __repr__(self) -> str:
        ledger = self._ledger
        return (
            f"<Arbiter budget={ledger.budget} granted={ledger.granted} "
            f"external={ledger.external} waiting={ledger.waiting}>"
        )

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._closed:
            raise ShuttingDown("this arbiter is closed")
        if self._task_group is not None:
            raise RuntimeError("this arbiter is already running")
        self._ledger.observe(anyio.current_time())
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        try:
            await task_group.start(self._serve, name="arbiter services")
        except BaseException:
            self._close()
            self._task_group = None
            await task_group.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()
        task_group, self._task_group = self._task_group, None
        if task_group is not None:
            # The body's own exception (or cancellation) passes through untouched:
            # the task group only ever holds our services, which are cancelled now.
            await task_group.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Close: every waiting and every later request raises `ShuttingDown`, the
        background tasks stop. Granted allocations stay valid until released. Idempotent."""
        self._close()
        await anyio.lowlevel.checkpoint()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._ledger.fail_waiting(self._now())
        if self._services is not None:
            self._services.cancel()

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Run the poller and the keep_alive timer until the arbiter closes."""
        from ._services import start_services

        try:
            with anyio.CancelScope() as self._services:
                async with anyio.create_task_group() as services:
                    await start_services(self, services)
                    task_status.started()
        finally:
            self._services = None
            if self._owns_probe and self._probe is not None:
                self._owns_probe = False
                with anyio.CancelScope(shield=True):
                    await self._probe.aclose()

    # -- requesting memory -----------------------------------------------------

    async def request_allocation(
        self,
        workload: WorkloadType | str,
        priority: Priority | str,
        memory: int,
        *,
        min_memory: int | None = None,
        timeout: float | Default | None = DEFAULT,
        min_quality: float | None = None,
        preemptible: bool = True,
        keep_alive: float | None = None,
        label: str | None = None,
    ) -> Allocation:
        """Wait for ``memory`` bytes (or, with ``min_memory``, the largest size that fits).

        Grants go by priority, then arrival; nothing jumps the queue. The memory is
        held until `Allocation.release`.

        Raises:
            TypeError, ValueError: a bad argument (nothing is queued or counted).
            InsufficientMemory: the smallest acceptable size exceeds the budget.
            AllocationTimeout: ``timeout`` seconds passed (default: the config's).
            InsufficientQuality: the timeout passed while only a quality below
                ``min_quality`` could have been granted.
            ShuttingDown: the arbiter is closing or closed.
        """
        args = check_request(
            workload, priority, memory, min_memory, timeout, min_quality, preemptible,
            keep_alive, label,
        )  # fmt: skip
        return await self._request(args, current_backend())

    async def _request(self, args: RequestArgs, backend: Backend) -> Allocation:
        """Admit checked arguments: fail at once, grant at once, or wait in the queue."""
        (workload, priority, memory, min_memory, timeout, min_quality, preemptible, keep_alive,
         label) = args  # fmt: skip
        ledger = self._ledger
        stats = ledger.stats
        smallest = memory if min_memory is None else min_memory
        if smallest > ledger.budget:
            stats.failed += 1
            raise InsufficientMemory(smallest, ledger.budget)
        if self._closed:
            stats.failed += 1
            raise ShuttingDown("the arbiter is closed")
        clock = backend.clock()
        now = clock()
        alloc = Allocation(
            self, clock, next(self._ids), workload, priority, memory, min_memory, preemptible,
            keep_alive, label, now,
        )  # fmt: skip
        try:
            # Like anyio's Semaphore(fast_acquire=True): a cancellation point, but no
            # schedule point when the memory is there; a wait is a full checkpoint.
            await backend.checkpoint_if_cancelled()
        except BaseException:
            stats.cancelled += 1
            raise
        if min_quality is not None or not ledger.grant_now(alloc, smallest, memory, now):
            limit = self._default_timeout if isinstance(timeout, Default) else timeout
            request = _Waiter(alloc, smallest, memory, min_quality=min_quality)
            request.event = None
            request.may_reclaim = limit != 0
            if not ledger.submit(request, now):
                try:
                    await self._park(request, now, limit)
                except BaseException as exc:
                    if isinstance(exc, ShuttingDown | AllocationTimeout | InsufficientQuality):
                        stats.failed += 1
                    else:
                        stats.cancelled += 1
                    raise
        stats.successful += 1
        if keep_alive is not None:
            self._keep_alive_touched(alloc)
        if structlog.is_configured():
            log.debug(
                "allocation granted",
                id=alloc.id,
                workload=workload.value,
                priority=priority.name.lower(),
                memory=alloc.memory,
                waited=clock() - now,
            )
        return alloc

    async def _park(self, request: _Waiter, now: float, limit: float | None) -> None:
        """Wait until the ledger grants ``request``, taking it back on timeout or cancel."""
        ledger = self._ledger
        deadline = math.inf if limit is None else now + limit
        try:
            while True:
                wake_at = min(deadline, request.reclaim_deadline)
                if wake_at > anyio.current_time():
                    event = request.event = anyio.Event()
                    if wake_at == math.inf:
                        await event.wait()
                    else:
                        with anyio.CancelScope(deadline=wake_at):
                            await event.wait()
                if request.state is GRANTED:
                    return
                if request.state is FAILED:
                    if request.grow and request.holding.released:
                        raise RuntimeError("the allocation was released while it waited to grow")
                    raise ShuttingDown("the arbiter closed while the request waited")
                now = anyio.current_time()
                if now >= deadline:
                    break
                if now >= request.reclaim_deadline:
                    ledger.escalate(request, now)
                    if request.state is GRANTED:
                        return
        except BaseException:
            ledger.withdraw(request, anyio.current_time())
            raise
        ledger.withdraw(request, now)
        holding = request.holding
        assert limit is not None and isinstance(holding, Allocation)
        debug(
            "allocation timed out",
            id=holding.id,
            memory=request.max_size,
            min_memory=request.min_size,
            priority=holding.priority.name.lower(),
            waited=now - request.enqueued_at,
            grow=request.grow,
        )
        if request.best_quality is not None and request.min_quality is not None:
            raise InsufficientQuality(request.min_quality, request.best_quality)
        if not request.grow:  # a grow is no allocation: stats count requests only
            ledger.stats.timeouts += 1
        raise AllocationTimeout(limit)

    def allocate(
        self,
        workload: WorkloadType | str,
        priority: Priority | str,
        *,
        memory: int,
        min_memory: int | None = None,
        timeout: float | Default | None = DEFAULT,
        min_quality: float | None = None,
        preemptible: bool = True,
        keep_alive: float | None = None,
        label: str | None = None,
    ) -> AllocationContext:
        """``async with arbiter.allocate(...) as alloc:`` the body holds the memory.

        The body runs in a cancel scope owned by the allocation: preemption cancels it,
        the memory returns once the body has unwound, and the ``async with`` raises
        `Preempted` if the body was cut short. Same arguments as `request_allocation`.
        """
        args = check_request(
            workload, priority, memory, min_memory, timeout, min_quality, preemptible,
            keep_alive, label,
        )  # fmt: skip
        return AllocationContext(self, args)

    def release_allocation(self, alloc: Allocation) -> None:
        """Return ``alloc``'s memory at once; the same as ``alloc.release()``."""
        if not isinstance(alloc, Allocation) or alloc._arbiter is not self:
            raise TypeError(f"alloc must be an Allocation of this arbiter, got {alloc!r}")
        self._release(alloc, alloc._clock())

    def _release(self, alloc: Allocation, now: float) -> None:
        if alloc.released:
            return
        memory = alloc.memory
        self._ledger.release(alloc, now)
        if alloc._preempt_event is not None or alloc._quality_event is not None:
            alloc._signal_preempt()
            alloc._signal_quality()
        if alloc.keep_alive is not None:
            self._keep_alive_touched(alloc)
        if structlog.is_configured():
            log.debug(
                "allocation released",
                id=alloc.id,
                priority=alloc.priority.name.lower(),
                memory=memory,
                preempted=alloc.preempt_requested,
            )

    async def _resize(self, alloc: Allocation, memory: int, timeout: float | None) -> None:
        if alloc.released:
            raise RuntimeError(f"cannot resize {alloc.id}: it is released")
        ledger = self._ledger
        if memory <= alloc.memory:
            if alloc.min_memory is not None and memory < alloc.min_memory:
                raise ValueError(f"memory must be >= min_memory ({alloc.min_memory}), got {memory}")
            ledger.shrink(alloc, memory, self._now())
            await anyio.lowlevel.checkpoint()
            return
        if memory > ledger.budget:
            raise InsufficientMemory(memory, ledger.budget)
        if self._closed:
            raise ShuttingDown("the arbiter is closed")
        delta = memory - alloc.memory
        request = _Waiter(alloc, delta, delta, grow=True)
        request.event = None
        request.may_reclaim = timeout != 0
        await anyio.lowlevel.checkpoint_if_cancelled()
        if alloc.released:
            raise RuntimeError(f"cannot resize {alloc.id}: it was released")
        now = anyio.current_time()
        if not ledger.submit(request, now):
            await self._park(request, now, timeout)

    # -- hooks called by the ledger --------------------------------------------

    @staticmethod
    def _wake(request: Request) -> None:
        event = request.event  # type: ignore[attr-defined]
        if event is not None:
            event.set()

    @staticmethod
    def _preempt(holding: Holding) -> None:
        assert isinstance(holding, Allocation)
        debug("allocation preempted", id=holding.id, memory=holding.memory)
        holding._on_preempt()

    @staticmethod
    def _quality_changed(holding: Holding) -> None:
        assert isinstance(holding, Allocation)
        holding._signal_quality()

    def _set_busy(self, alloc: Allocation, busy: bool) -> None:
        self._ledger.set_busy(alloc, busy, self._now())
        self._keep_alive_touched(alloc)

    def _keep_alive_touched(self, alloc: Allocation) -> None:
        if alloc.keep_alive is not None and self._keep_alive_changed is not None:
            self._keep_alive_changed.set()

    # -- snapshots -------------------------------------------------------------

    def _now(self) -> float:
        try:
            return current_time()
        except RuntimeError:  # no event loop: pure accounting from sync code
            return self._ledger.stats.last_time

    def recommended_quality(
        self, workload: WorkloadType | str, priority: Priority | str = Priority.NORMAL
    ) -> float:
        """The quality target a new request of this workload and priority would get now."""
        return self._ledger.recommended(coerce_workload(workload), coerce_priority(priority))

    def state(self) -> ArbiterState:
        """A snapshot of what is held, used and waiting now."""
        ledger = self._ledger
        pressure = ledger.pressure
        return ArbiterState(
            active_llm_workloads=ledger.active(False),
            active_diffusion_workloads=ledger.active(True),
            llm_quality=ledger.recommended(WorkloadType.LLM_INFERENCE, Priority.NORMAL),
            diffusion_quality=ledger.recommended(WorkloadType.IMAGE_GENERATION, Priority.NORMAL),
            memory_pressure=pressure,
            pressure_level=MemoryPressure.from_ratio(pressure),
            vram_used=ledger.granted,
            external_used=ledger.external,
            vram_available=ledger.available,
            waiting=ledger.waiting,
        )

    def stats(self) -> ArbiterStats:
        """Counters, time-weighted averages and wait percentiles since construction."""
        return self._ledger.stats.snapshot(self._now())
