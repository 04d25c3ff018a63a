"""Helpers shared by the preemption, degrade and resize tests."""

from __future__ import annotations

import anyio
import anyio.abc

from arbiter import Allocation, Arbiter, GiB, Priority, WorkloadType


async def request_in_background(
    tg: anyio.abc.TaskGroup, arbiter: Arbiter, priority: Priority, gib: int, **kwargs: object
) -> list[Allocation]:
    """Start an LLM request in its own task and wait until everything is blocked; the
    returned list receives the allocation once it is granted."""
    got: list[Allocation] = []

    async def run() -> None:
        alloc = await arbiter.request_allocation(
            WorkloadType.LLM_INFERENCE,
            priority,
            gib * GiB,
            **kwargs,  # type: ignore[arg-type]
        )
        got.append(alloc)

    tg.start_soon(run)
    await anyio.wait_all_tasks_blocked()
    return got
