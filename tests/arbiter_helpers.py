"""Helpers shared by the preemption, degrade and resize tests."""

from __future__ import annotations

import anyio
import anyio.abc
import anyio.lowlevel

from arbiter import Allocation, Arbiter, ArbiterConfig, GiB, Priority, WorkloadType


def make_arbiter(reclaim_grace: float = 0.0, **overrides: object) -> Arbiter:
    """A 24 GiB arbiter with no probe; the reclaim grace is 0 unless a test times it."""
    config = ArbiterConfig.for_vram_gb(24, reclaim_grace=reclaim_grace, **overrides)  # type: ignore[arg-type]
    return Arbiter(config, probe=None)


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
    await settle()
    return got


async def settle() -> None:
    """Wait until every other task is blocked.

    A task just started is usually a few yields short of its park (a grant at once
    yields before its body runs). anyio's ``wait_all_tasks_blocked`` on asyncio polls
    every 0.1 s of real time when it finds a task runnable; a few plain yields first
    let the others reach their park, so the poll finds them there.
    """
    for _ in range(8):
        await anyio.lowlevel.checkpoint()
    await anyio.wait_all_tasks_blocked()
