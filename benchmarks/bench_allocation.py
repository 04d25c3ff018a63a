"""Cost of the allocation queue next to the semaphores it replaces, on both backends.

    python benchmarks/bench_allocation.py [--quick]

Prints ns per uncontended ``allocate`` context and per ``request_allocation`` +
``release``, beside ``anyio.Semaphore`` (and ``asyncio.Semaphore`` on asyncio)
measured in the same run; the floor under ``allocate`` (see `_Floor`); a contended
run (200 tasks, capacity for 10); the per-grant cost of draining 10, 1,000 and
10,000 queued waiters; and the latency of a handover across threads (a release in
one event loop, the waiter in another loop's thread running), p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import anyio
import anyio.lowlevel

from arbiter import Arbiter, ArbiterConfig, GiB, Priority, WorkloadType
from arbiter._backend import current_backend

LLM = WorkloadType.LLM_INFERENCE
NORMAL = Priority.NORMAL


def _arbiter(gib: int = 24) -> Arbiter:
    return Arbiter(ArbiterConfig.for_vram_gb(gib, allocation_timeout=None), probe=None)


async def _best_per_op(
    bodies: Mapping[str, Callable[[int], Awaitable[None]]], n: int, repeats: int = 7
) -> dict[str, float]:
    """Best-of-``repeats`` nanoseconds per iteration of each ``body(n)``. The bodies take
    turns within each repeat, so that a slow spell of the machine hits them all alike."""
    best = dict.fromkeys(bodies, float("inf"))
    for _ in range(repeats):
        for name, body in bodies.items():
            start = time.perf_counter_ns()
            await body(n)
            best[name] = min(best[name], (time.perf_counter_ns() - start) / n)
    return best


class _Floor:
    """What any ``allocate()`` with DESIGN's guarantees pays before its accounting: a
    checkpoint taken as anyio's ``Semaphore`` takes it (a cancellation check before the
    decision, so that requests are decided in the order they are made and one already
    cancelled changes nothing; a yield after it), a cancel scope around the body, and a
    clock reading at the grant and at the release, through the arbiter's primitives."""

    __slots__ = ("_backend", "_scope")

    async def __aenter__(self) -> None:
        backend = self._backend = current_backend()
        await backend.checkpoint_if_cancelled()
        backend.current_time()
        await backend.checkpoint()
        self._scope = backend.cancel_scope()
        self._scope.__enter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        self._scope.__exit__(*exc_info)
        self._backend.current_time()


async def uncontended(backend: str, n: int) -> dict[str, float]:
    arbiter = _arbiter()
    semaphore = anyio.Semaphore(10)

    async def allocate_ctx(k: int) -> None:
        for _ in range(k):
            async with arbiter.allocate(LLM, NORMAL, memory=GiB):
                pass

    async def request_release(k: int) -> None:
        for _ in range(k):
            alloc = await arbiter.request_allocation(LLM, NORMAL, GiB)
            alloc.release()

    async def anyio_semaphore(k: int) -> None:
        for _ in range(k):
            async with semaphore:
                pass

    async def floor(k: int) -> None:
        for _ in range(k):
            async with _Floor():
                pass

    bodies = {
        "anyio.Semaphore pair": anyio_semaphore,
        "allocate() context": allocate_ctx,
        "request_allocation + release": request_release,
        "floor: check + yield + scope + clock": floor,
    }
    if backend == "asyncio":
        native = asyncio.Semaphore(10)

        async def asyncio_semaphore(k: int) -> None:
            for _ in range(k):
                async with native:
                    pass

        bodies["asyncio.Semaphore pair"] = asyncio_semaphore
    return await _best_per_op(bodies, n)


async def contended(tasks: int = 200, rounds: int = 20) -> tuple[float, float]:
    """ns per grant with ``tasks`` tasks cycling through room for 10, and the same
    with an ``anyio.Semaphore(10)``: the best of five runs of each, taking turns."""
    arbiter = _arbiter(10)
    semaphore = anyio.Semaphore(10)

    async def via_arbiter() -> None:
        for _ in range(rounds):
            async with arbiter.allocate(LLM, NORMAL, memory=GiB):
                await anyio.lowlevel.checkpoint()

    async def via_semaphore() -> None:
        for _ in range(rounds):
            async with semaphore:
                await anyio.lowlevel.checkpoint()

    def run_with(
        worker: Callable[[], Coroutine[Any, Any, None]],
    ) -> Callable[[int], Awaitable[None]]:
        async def run(_: int) -> None:
            async with anyio.create_task_group() as tg:
                for _ in range(tasks):
                    tg.start_soon(worker)

        return run

    best = await _best_per_op(
        {"arbiter": run_with(via_arbiter), "semaphore": run_with(via_semaphore)},
        tasks * rounds,
        repeats=5,
    )
    return best["arbiter"], best["semaphore"]


async def drain(waiters: int) -> float:
    """ns per grant while ``waiters`` queued requests are handed memory one at a time."""
    arbiter = _arbiter(1)
    blocker = await arbiter.request_allocation(LLM, NORMAL, GiB)
    granted = anyio.Event()
    done = 0

    async def waiter() -> None:
        nonlocal done
        alloc = await arbiter.request_allocation(LLM, NORMAL, GiB)
        done += 1
        alloc.release()
        if done == waiters:
            granted.set()

    async with anyio.create_task_group() as tg:
        for _ in range(waiters):
            tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        start = time.perf_counter_ns()
        blocker.release()
        await granted.wait()
        elapsed = time.perf_counter_ns() - start
    return elapsed / waiters


def handover_across_threads(first: str, second: str, rounds: int) -> tuple[float, float]:
    """p50 and p99 ns from ``release()`` in a loop of thread A to the waiter in a loop of
    thread B running, over ``rounds`` handovers (they take turns holding 1 GiB of 1)."""
    arbiter = _arbiter(1)
    released_at: list[int] = []
    latencies: list[int] = []
    turn = [threading.Event(), threading.Event()]

    async def player(me: int) -> None:
        for round_ in range(rounds):
            if round_ % 2 != me:
                # Wait in the queue for the other thread's release.
                await anyio.to_thread.run_sync(turn[me].wait)
                turn[me].clear()
                alloc = await arbiter.request_allocation(LLM, NORMAL, GiB)
                latencies.append(time.perf_counter_ns() - released_at[-1])
                alloc.release()
            else:
                alloc = await arbiter.request_allocation(LLM, NORMAL, GiB)
                turn[1 - me].set()
                while True:  # until the other thread's request is queued
                    if arbiter.state().waiting:
                        break
                    await anyio.lowlevel.checkpoint()
                released_at.append(time.perf_counter_ns())
                alloc.release()

    threads = [
        threading.Thread(target=anyio.run, args=(player, me), kwargs={"backend": name})
        for me, name in enumerate((first, second))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    ordered = sorted(latencies)
    return ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)]


async def run_backend(backend: str, quick: bool) -> list[tuple[str, str, str]]:
    n = 2_000 if quick else 20_000
    rows: list[tuple[str, str, str]] = []
    single = await uncontended(backend, n)
    base = single["anyio.Semaphore pair"]
    for name, ns in single.items():
        rows.append((name, f"{ns:,.0f}", f"{ns / base:.2f}x"))
    arb, sem = await contended(rounds=5 if quick else 20)
    rows.append(("contended 200 tasks / room for 10", f"{arb:,.0f}", f"{arb / sem:.2f}x"))
    sizes = (10, 1_000, 10_000) if not quick else (10, 1_000)
    drains = {size: await drain(size) for size in sizes}
    for size, ns in drains.items():
        rows.append((f"drain {size:,} waiters, per grant", f"{ns:,.0f}", f"{ns / drains[10]:.2f}x"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    print("ratio: against anyio.Semaphore (contended: same run with a semaphore;")
    print("       drains: against draining 10)")
    for backend in ("asyncio", "trio"):
        rows = anyio.run(run_backend, backend, args.quick, backend=backend)
        print(f"\n{backend}")
        print(f"{'case':<40} {'ns':>10} {'ratio':>8}")
        for name, ns, ratio in rows:
            print(f"{name:<40} {ns:>10} {ratio:>8}")
    print("\nhandover across threads: release in loop A -> waiter in loop B running")
    print(f"{'loops (A -> B)':<40} {'p50 us':>10} {'p99 us':>8}")
    for first, second in (("asyncio", "asyncio"), ("asyncio", "trio"), ("trio", "trio")):
        p50, p99 = handover_across_threads(first, second, 200 if args.quick else 1_000)
        print(f"{first + ' -> ' + second:<40} {p50 / 1000:>10,.0f} {p99 / 1000:>8,.0f}")


if __name__ == "__main__":
    main()
