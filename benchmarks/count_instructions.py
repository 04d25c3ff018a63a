"""Instructions per allocation, against ``anyio.Semaphore``: figures that do not move
with the machine's load (``valgrind --tool=callgrind`` counts instructions).

    python benchmarks/count_instructions.py [--backend asyncio|trio]

Each case runs twice in a fresh interpreter under callgrind, with ``small`` and
``large`` iterations; the difference divided by the difference in iterations is the
cost of one operation, without the interpreter's start-up. Cases: an uncontended
``allocate()`` context and an ``anyio.Semaphore`` pair; the floor under ``allocate()``
(a cancellation check, a yield, a body cancel scope, two clock readings: what DESIGN
asks of any implementation); and a contended run (200 tasks through room for 10), per grant, with
its floor (the semaphore's handover plus the cancel scope DESIGN puts around the body),
and the same grant without a body (``request_allocation`` then ``release``: what a
semaphore's ``async with`` does, no cancel scope).
Needs valgrind (Debian's package); slow (a few minutes).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel

from arbiter import Arbiter, ArbiterConfig, GiB, Priority, WorkloadType

CASES = {
    # name: (iterations small, large, operations per iteration)
    "allocate": (2_000, 6_000, 1),
    "semaphore": (2_000, 6_000, 1),
    "floor": (2_000, 6_000, 1),
    "contended allocate": (2, 6, 200),
    "contended semaphore": (2, 6, 200),
    "contended floor": (2, 6, 200),
    "contended request": (2, 6, 200),
}


async def _run(case: str, rounds: int) -> None:
    from bench_allocation import _Floor  # the same floor the timing benchmark prints

    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10, allocation_timeout=None), probe=None)
    semaphore = anyio.Semaphore(10)
    llm, normal = WorkloadType.LLM_INFERENCE, Priority.NORMAL

    async def worker() -> None:
        for _ in range(rounds):
            if case == "allocate":
                async with arbiter.allocate(llm, normal, memory=GiB):
                    pass
            elif case == "semaphore":
                async with semaphore:
                    pass
            elif case == "floor":
                async with _Floor():
                    pass
            elif case == "contended allocate":
                async with arbiter.allocate(llm, normal, memory=GiB):
                    await anyio.lowlevel.checkpoint()
            elif case == "contended request":
                alloc = await arbiter.request_allocation(llm, normal, GiB)
                await anyio.lowlevel.checkpoint()
                alloc.release()
            elif case == "contended floor":
                async with semaphore:
                    with anyio.CancelScope():  # the body's scope, as allocate() has
                        await anyio.lowlevel.checkpoint()
            else:
                async with semaphore:
                    await anyio.lowlevel.checkpoint()

    if case.startswith("contended"):
        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(worker)
    else:
        await worker()


def _instructions(script: str, case: str, rounds: int, backend: str) -> int:
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, script, "--run", case, str(rounds), "--backend", backend],
        capture_output=True, text=True, timeout=900, check=True,
    )  # fmt: skip
    match = re.search(r"Collected : (\d+)", done.stderr)
    assert match, done.stderr[-500:]
    return int(match.group(1))


def per_operation(script: str, case: str, small: int, large: int, ops: int, backend: str) -> float:
    """Instructions per operation of ``script --run case``: two runs, ``small`` and
    ``large`` iterations of ``ops`` operations each, and the difference between them."""
    if shutil.which("valgrind") is None:
        sys.exit("counting instructions needs valgrind (apt-get install valgrind)")
    low = _instructions(script, case, small, backend)
    high = _instructions(script, case, large, backend)
    return (high - low) / ((large - small) * ops)


def backend_unless_run(description: str, run: Callable[[str, int], Awaitable[None]]) -> str:
    """The ``--backend`` to count on; as a counted child (``--run CASE ROUNDS``, what
    `per_operation` starts), run ``run(case, rounds)`` on it and exit."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--run", nargs=2, metavar=("CASE", "ROUNDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        anyio.run(run, args.run[0], int(args.run[1]), backend=args.backend)
        sys.exit()
    backend: str = args.backend
    return backend


def main() -> None:
    backend = backend_unless_run(__doc__.splitlines()[0], _run)
    per_op = {
        case: per_operation(__file__, case, small, large, ops, backend)
        for case, (small, large, ops) in CASES.items()
    }
    print(f"instructions per operation ({backend}); ratio against anyio.Semaphore")
    print(f"{'case':<24} {'instructions':>13} {'ratio':>7}")
    for case, count in per_op.items():
        base = per_op["contended semaphore" if case.startswith("contended") else "semaphore"]
        print(f"{case:<24} {count:>13,.0f} {count / base:>6.2f}x")


if __name__ == "__main__":
    main()
