"""A trio program where a chat server and a video renderer share one GPU.

One nursery serves a stream of chats (``USER_FACING`` LLM jobs that come and go); another
runs background video renders. A render is elastic: it follows its quality target with
``alloc.quality_changes()`` and gives memory back with ``resize()`` when chats need it,
and when it is preempted all the same it goes back to the queue and later resumes from
its last finished frame. After ``--seconds`` the program stops and prints what happened::

    python examples/trio_app.py --seconds 5

No GPU is needed: the models are simulated with ``trio.sleep``.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from itertools import count

import trio

from arbiter import (
    Allocation,
    AllocationTimeout,
    Arbiter,
    ArbiterConfig,
    GiB,
    Preempted,
    Priority,
    WorkloadType,
)

CHATS_PER_SECOND = 8.0
CHAT_SIZES_GB = (2, 4, 6)
CHAT_TIMEOUT_S = 5.0
SECONDS_PER_TOKEN = 0.002
RENDERERS = 2
RENDER_MEMORY_GB, RENDER_MIN_MEMORY_GB = 10, 4
FRAMES_PER_RENDER = 20
SECONDS_PER_FRAME = 0.03


@dataclass
class RenderJob:
    name: str
    frames_done: int = 0


@dataclass
class Tally:
    chats_served: int = 0
    chats_timed_out: int = 0
    renders_finished: int = 0
    renders_requeued: int = 0


async def main(seconds: float, vram_gb: float, seed: int) -> None:
    config = ArbiterConfig.for_vram_gb(vram_gb, reclaim_grace=0.25)
    tally = Tally()
    async with Arbiter(config) as arbiter:
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_chats, arbiter, tally, random.Random(seed))
                nursery.start_soon(run_renders, arbiter, tally)
        stats = arbiter.stats()
    waits = stats.wait_percentiles[Priority.USER_FACING]
    print(f"ran {seconds:g} s on a {vram_gb:g} GiB budget")
    print(
        f"chats: {tally.chats_served} served, {tally.chats_timed_out} timed out, "
        f"wait p99 {waits.p99:.3f} s"
    )
    print(f"renders: {tally.renders_finished} finished, {tally.renders_requeued} re-queued")
    print(
        f"arbiter: {stats.quality_reductions} quality reductions, {stats.preemptions} "
        f"preemptions, mean video quality {stats.avg_diffusion_quality:.2f}"
    )


async def serve_chats(arbiter: Arbiter, tally: Tally, rng: random.Random) -> None:
    """Accept chats as they arrive (a Poisson stream), each in its own task."""
    async with trio.open_nursery() as chats:
        for number in count(1):
            await trio.sleep(rng.expovariate(CHATS_PER_SECOND))
            memory = rng.choice(CHAT_SIZES_GB) * GiB
            tokens = rng.randint(20, 150)
            chats.start_soon(chat, arbiter, tally, memory, tokens, name=f"chat {number}")


async def chat(arbiter: Arbiter, tally: Tally, memory: int, tokens: int) -> None:
    try:
        async with arbiter.allocate(
            WorkloadType.LLM_INFERENCE, Priority.USER_FACING, memory=memory, timeout=CHAT_TIMEOUT_S
        ):
            await trio.sleep(tokens * SECONDS_PER_TOKEN)
    except AllocationTimeout:
        tally.chats_timed_out += 1
    else:
        tally.chats_served += 1


async def run_renders(arbiter: Arbiter, tally: Tally) -> None:
    """Keep ``RENDERERS`` renders going from a queue; a preempted one is queued again."""
    send, receive = trio.open_memory_channel[RenderJob](math.inf)
    for number in range(1, 1000):
        send.send_nowait(RenderJob(f"render {number}"))
    async with trio.open_nursery() as renders:
        for _ in range(RENDERERS):
            renders.start_soon(renderer, arbiter, tally, send, receive)


async def renderer(
    arbiter: Arbiter,
    tally: Tally,
    queue: trio.MemorySendChannel[RenderJob],
    jobs: trio.MemoryReceiveChannel[RenderJob],
) -> None:
    async for job in jobs:
        try:
            async with arbiter.allocate(
                WorkloadType.VIDEO_GENERATION,
                Priority.BACKGROUND,
                memory=RENDER_MEMORY_GB * GiB,
                min_memory=RENDER_MIN_MEMORY_GB * GiB,
                timeout=None,
                label=job.name,
            ) as alloc:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(follow_quality, alloc)
                    while job.frames_done < FRAMES_PER_RENDER:
                        await trio.sleep(SECONDS_PER_FRAME)
                        job.frames_done += 1
                    nursery.cancel_scope.cancel()
        except Preempted:
            tally.renders_requeued += 1
            queue.send_nowait(job)  # resumes from job.frames_done
        else:
            tally.renders_finished += 1


async def follow_quality(alloc: Allocation) -> None:
    """Hold only what the quality target needs: shrink at once, grow back if it fits."""
    async for quality in alloc.quality_changes():
        want = alloc.memory_for_quality(quality)
        if want < alloc.memory:
            await alloc.resize(want)
        elif want > alloc.memory:
            try:
                await alloc.resize(want, timeout=0)
            except AllocationTimeout:
                pass  # the next change of target will try again


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to run (5)")
    parser.add_argument("--vram-gb", type=float, default=24.0, help="the budget in GiB (24)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the chat arrivals (0)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    trio.run(main, args.seconds, args.vram_gb, args.seed)
