"""CPU cost of the memory poller, against an idle event loop measured in the same run.

    python benchmarks/bench_poller.py [--seconds 3] [--hz 10]

For each backend, runs an event loop that only sleeps for ``--seconds`` (the baseline),
one that wakes at ``--hz`` and does nothing (the timer's own price), then one that runs a
`MemoryPoller` reading a `FakeGpu` at ``--hz`` for as long, and prints the CPU seconds
each used (``time.process_time``), the poller's overhead in percent of one core,
(poller CPU - idle CPU) / wall seconds (target: < 1 %), and the poller's own cost per
read beyond the timer wake-ups.
"""

from __future__ import annotations

import argparse
import time

import anyio

from arbiter import GiB
from arbiter._gpu import GpuReading
from arbiter._poller import MemoryPoller
from arbiter.testing import FakeGpu

BACKENDS = ("asyncio", "trio")


def _measure(main: object, backend: str) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of ``anyio.run(main)``."""
    cpu, wall = time.process_time(), time.perf_counter()
    anyio.run(main, backend=backend)  # type: ignore[arg-type]
    return time.process_time() - cpu, time.perf_counter() - wall


def run(backend: str, seconds: float, hz: float) -> dict[str, float]:
    async def idle() -> None:
        await anyio.sleep(seconds)

    async def ticking() -> None:
        # Wakes as often as the poller but does nothing: the price of the timer alone.
        with anyio.move_on_after(seconds):
            while True:  # noqa: ASYNC110 - the periodic wake-up is what is measured
                await anyio.sleep(1 / hz)

    reads = 0

    async def polled() -> None:
        nonlocal reads
        fake = FakeGpu(24 * GiB, external_used=3 * GiB)
        latest: list[GpuReading] = []

        def on_reading(reading: GpuReading) -> None:
            # What the arbiter does with a reading is its own cost; keep this one trivial.
            latest[:] = [reading]

        poller = MemoryPoller(fake, interval=1 / hz, max_backoff=8 / hz, on_reading=on_reading)
        with anyio.move_on_after(seconds):
            await poller.run()
        reads = poller.statistics().reads

    async def warm() -> None:
        await anyio.sleep(0.01)

    # The first loop start pays for imports; keep it out of the measurement.
    _measure(warm, backend)
    idle_cpu, idle_wall = _measure(idle, backend)
    tick_cpu, _ = _measure(ticking, backend)
    poll_cpu, poll_wall = _measure(polled, backend)
    return {
        "idle_cpu": idle_cpu,
        "idle_wall": idle_wall,
        "tick_cpu": tick_cpu,
        "poll_cpu": poll_cpu,
        "poll_wall": poll_wall,
        "reads": reads,
        "overhead_pct": 100 * max(poll_cpu - idle_cpu, 0.0) / poll_wall,
        "us_per_read": 1e6 * max(poll_cpu - tick_cpu, 0.0) / max(reads, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--hz", type=float, default=10.0)
    args = parser.parse_args()
    print(f"poller at {args.hz:g} Hz over {args.seconds:g} s wall, FakeGpu probe")
    header = (
        f"{'backend':8} {'reads':>6} {'idle CPU s':>11} {'timer CPU s':>12} "
        f"{'poller CPU s':>13} {'own us/read':>12} {'overhead':>10}"
    )
    print(header)
    print("-" * len(header))
    for backend in BACKENDS:
        r = run(backend, args.seconds, args.hz)
        print(
            f"{backend:8} {int(r['reads']):>6} {r['idle_cpu']:>11.4f} {r['tick_cpu']:>12.4f} "
            f"{r['poll_cpu']:>13.4f} {r['us_per_read']:>12.1f} {r['overhead_pct']:>8.3f} %"
        )
    print("overhead = (poller CPU - idle CPU) / wall, in % of one core; target < 1 %")
    print("timer = a loop that only sleeps at that rate; own us/read = (poller - timer) / reads")


if __name__ == "__main__":
    main()
