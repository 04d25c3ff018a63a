"""VramTier: fragments on the GPU, charged to the arbiter as one BACKGROUND elastic allocation.

The tier holds no allocation while it is empty. Its first fragment requests one
(``memory`` = the bytes the tier then needs, ``min_memory`` = one byte, ``BACKGROUND``,
preemptible); later fragments grow it with ``resize`` when the arbiter has the memory
free at once (or within ``vram_grow_timeout``), else they evict colder VRAM fragments
within the current charge, else they simply are not placed. The charge never runs
ahead of what the tier needs, so an idle cache does not raise the GPU's pressure.

The tier obeys the arbiter: when its quality target drops (pressure, or a higher
priority waiting for memory), it evicts down to ``alloc.memory_for_quality(target)``
and hands the memory back with ``resize``; at its floor, or when preempted, it evicts
everything and releases the allocation. It grows again only as far as its target allows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread

from .._errors import ArbiterError
from .._log import log, note
from .._types import Priority
from ._buffer import Buffer, Reaper
from ._config import CacheConfig
from ._device import DeviceStore, open_device_store
from ._s3fifo import S3FifoPolicy
from ._stats import CacheStatsRecorder

if TYPE_CHECKING:
    from .._allocation import Allocation
    from .._arbiter import Arbiter

__all__ = ["VramTier"]


# The smallest charge the allocation may shrink to (the arbiter needs min_memory > 0).
MIN_CHARGE = 1


class VramTier:
    """The VRAM tier of a `FragmentCache` bound to ``arbiter``.

    Args:
        arbiter: the arbiter that charges the tier's memory.
        config: ``vram_capacity``, ``vram_workload``, ``vram_grow_timeout`` and S3-FIFO policy.
        stats: where evictions are counted.
        reaper: where evicted device copies are dropped (off the event loop).
    """

    __slots__ = (
        "_alloc",
        "_arbiter",
        "_capacity",
        "_charge_lock",
        "_config",
        "_floor",
        "_handles",
        "_policy",
        "_reaper",
        "_stats",
        "_store",
        "_tg",
    )

    def __init__(
        self, arbiter: Arbiter, config: CacheConfig, stats: CacheStatsRecorder, reaper: Reaper
    ) -> None:
        self._arbiter = arbiter
        self._reaper = reaper
        self._config = config
        self._stats = stats
        budget = arbiter.config.vram_budget
        wanted = config.vram_capacity if config.vram_capacity is not None else budget // 2
        self._capacity = min(wanted, budget)
        workload = config.vram_workload
        arbiter_config = arbiter.config
        self._floor = (
            arbiter_config.diffusion_min_quality
            if workload.is_diffusion
            else arbiter_config.llm_min_quality
        )
        # Invariant: _policy.capacity == _alloc.memory while _alloc is held, else 0.
        self._policy = S3FifoPolicy(
            0,
            small_share=config.small_queue_share,
            ghost_share=config.ghost_share,
            max_frequency=config.max_frequency,
        )
        self._handles: dict[str, Any] = {}
        self._alloc: Allocation | None = None
        self._charge_lock = anyio.Lock()
        self._store: DeviceStore | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def bytes_held(self) -> int:
        """Bytes of fragments on the device now."""
        return self._policy.bytes_held

    @property
    def charged(self) -> int:
        """Bytes the arbiter charges the tier now."""
        return self._alloc.memory if self._alloc is not None else 0

    async def open(self, tg: anyio.abc.TaskGroup) -> None:
        """Pick the device store (importing torch if it is there) and attach to ``tg``."""
        self._store = await anyio.to_thread.run_sync(open_device_store, self._arbiter.config.device)
        self._tg = tg
        note("vram tier ready", store=self._store.name, capacity=self._capacity)

    def holds(self, fragment_id: str, *, touch: bool = True) -> bool:
        """Whether ``fragment_id`` is on the device (``touch``: count it as a hit)."""
        if fragment_id not in self._handles:
            return False
        if touch:
            self._policy.touch(fragment_id)
        return True

    def handle(self, fragment_id: str) -> Any:
        """The device copy of ``fragment_id``, or ``None``."""
        return self._handles.get(fragment_id)

    async def read_back(self, fragment_id: str) -> Buffer | None:
        """The bytes of the device copy, copied to the host (``None`` if it is gone)."""
        handle = self._handles.get(fragment_id)
        if handle is None or self._store is None:
            return None
        return await anyio.to_thread.run_sync(self._store.read_back, handle)

    async def place(self, fragment_id: str, data: Buffer) -> bool:
        """Put ``data`` on the device if the tier can be charged for it; returns whether it is."""
        if fragment_id in self._policy:
            self._policy.touch(fragment_id)
            return True
        store = self._store
        if store is None:
            return False
        size = store.charge(len(data))
        if size > self._capacity:
            return False
        async with self._charge_lock:
            if fragment_id in self._policy:
                return True
            await self._make_room(size)
            evicted = self._policy.admit(fragment_id, size)
            if evicted is None:
                return False
            self._drop(evicted)
        try:
            handle = await anyio.to_thread.run_sync(store.place, data)
        except Exception as exc:  # e.g. a CUDA out-of-memory the arbiter could not see
            log.warning("vram placement failed", fragment=fragment_id, error=repr(exc))
            self._policy.remove(fragment_id)
            await self._give_back_unused()
            return False
        if fragment_id in self._policy:
            self._handles[fragment_id] = handle
            return True
        self._reaper.bury([handle])  # shrunk away while it was copied
        return False

    async def _make_room(self, size: int) -> None:
        """Grow the charge toward ``held + size`` as far as the arbiter and the target allow."""
        alloc = self._alloc
        needed = self._policy.bytes_held + size
        charged = alloc.memory if alloc is not None else 0
        if needed <= charged or (alloc is not None and alloc.preempted):
            return
        allowed = self._capacity
        if alloc is not None and alloc.quality < 1.0:
            allowed = min(allowed, alloc.memory_for_quality(alloc.quality))
        target = min(needed, allowed)
        arbiter = self._arbiter
        if target <= charged or arbiter.state().vram_available < target - charged:
            return
        timeout = self._config.vram_grow_timeout
        try:
            if alloc is None:
                workload = self._config.vram_workload
                if arbiter.recommended_quality(workload, Priority.BACKGROUND) <= self._floor:
                    return  # it would be told to give everything back at once
                alloc = await arbiter.request_allocation(
                    workload,
                    Priority.BACKGROUND,
                    target,
                    min_memory=min(MIN_CHARGE, target),
                    timeout=timeout,
                    preemptible=True,
                    label="fragment-cache",
                )
                self._alloc = alloc
                assert self._tg is not None, "VramTier.place() before open()"
                self._tg.start_soon(self._obey, alloc)
            else:
                await alloc.resize(target, timeout=timeout)
        except (ArbiterError, RuntimeError) as exc:
            # Not granted now (or released meanwhile): the fragment stays out of VRAM.
            note("vram charge not granted", wanted=target, error=repr(exc))
        self._drop(self._policy.resize(self.charged))

    async def _give_back_unused(self) -> None:
        """Shrink the charge to what the tier holds (release it when that is nothing)."""
        async with self._charge_lock:
            alloc = self._alloc
            if alloc is None:
                return
            held = self._policy.bytes_held
            if held == 0:
                self._release()
            elif held < alloc.memory:
                await alloc.resize(held)
                if alloc is self._alloc:
                    self._drop(self._policy.resize(alloc.memory))

    async def _obey(self, alloc: Allocation) -> None:
        """Follow ``alloc``'s quality target and preemption until it is released."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow_quality, alloc)
            await alloc.wait_preempted()
            tg.cancel_scope.cancel()
        if alloc.preempted and alloc is self._alloc:
            note("vram tier preempted; dropping every fragment", charged=alloc.memory)
            self._release()

    async def _follow_quality(self, alloc: Allocation) -> None:
        async for quality in alloc.quality_changes():
            async with self._charge_lock:
                if alloc is not self._alloc or alloc.released:
                    return
                target = alloc.memory_for_quality(quality)
                if target >= alloc.memory:
                    continue  # growing back happens lazily, when fragments want room
                if quality <= self._floor or target <= MIN_CHARGE:
                    self._release()
                    return
                self._drop(self._policy.resize(target))
                await alloc.resize(max(self._policy.bytes_held, MIN_CHARGE))
                if alloc is self._alloc:
                    self._drop(self._policy.resize(alloc.memory))

    def _drop(self, evicted: list[str], *, to_make_room: bool = True) -> None:
        if to_make_room:
            self._stats.evictions += len(evicted)
        # Dropping the last reference frees the device memory (torch's allocator).
        self._reaper.bury([self._handles.pop(i, None) for i in evicted])

    def _release(self, *, closing: bool = False) -> None:
        """Evict everything and give the whole charge back (sync: release never blocks)."""
        # Nothing is pinned in VRAM: all of it goes.
        self._drop(self._policy.resize(0), to_make_room=not closing)
        alloc, self._alloc = self._alloc, None
        if alloc is not None:
            alloc.release()

    def close(self) -> None:
        """Drop every device copy and release the allocation (idempotent)."""
        self._release(closing=True)
        self._handles.clear()
