"""The arbiter's background tasks: the memory-pressure poller and the keep_alive timer."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import anyio
import anyio.abc

if TYPE_CHECKING:
    from ._arbiter import Arbiter
    from ._gpu import GpuReading

__all__ = ["start_services"]


async def start_services(arbiter: Arbiter, task_group: anyio.abc.TaskGroup) -> None:
    """Start the keep_alive timer and, when a probe is there, the poller."""
    arbiter._keep_alive_changed = anyio.Event()
    task_group.start_soon(_reclaim_idle_holders, arbiter, name="arbiter keep_alive")
    probe = arbiter._probe
    if probe is None:
        from ._gpu import open_default_probe

        probe = await open_default_probe(arbiter.config.device)
        if probe is None:
            return
        arbiter._probe = probe
        arbiter._owns_probe = True
    from ._poller import MemoryPoller

    ledger = arbiter._ledger

    def on_reading(reading: GpuReading) -> None:
        with arbiter._lock:
            if reading.external is not None:
                external = reading.external
            else:
                # No per-process figures: whatever is used beyond our grants is someone
                # else's (Ollama's estimate), so we never count on memory we cannot see.
                external = max(0, reading.used - ledger.granted)
            ledger.set_external(external, arbiter._now())

    poller = MemoryPoller(
        probe,
        interval=arbiter.config.poll_interval,
        max_backoff=max(arbiter.config.poll_interval, arbiter.config.poll_backoff_max),
        on_reading=on_reading,
    )
    task_group.start_soon(poller.run, name="arbiter poller")


async def _reclaim_idle_holders(arbiter: Arbiter) -> None:
    """Ask holders idle past their keep_alive to give their memory back."""
    ledger = arbiter._ledger
    while True:
        changed = arbiter._keep_alive_changed = anyio.Event()
        with arbiter._lock:
            due = ledger.reclaim_idle(arbiter._now())
        with anyio.CancelScope(deadline=math.inf if due is None else due):
            await changed.wait()
