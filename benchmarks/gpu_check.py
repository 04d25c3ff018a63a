"""End-to-end check on a machine with a real NVIDIA GPU (not run in CI).

    python benchmarks/gpu_check.py [--gib 4] [--interval 0.5]

1. Detection reports the real card and its VRAM (checked against what PyTorch sees).
2. An ``Arbiter(ArbiterConfig.auto_detect())`` runs its poller on device 0.
3. A child process creates its CUDA context, then allocates ``--gib`` GiB with PyTorch:
   within two poll intervals ``arbiter.state().external_used`` rises by that much (±5 %).
4. The child exits: within two poll intervals ``external_used`` falls back (±5 %).

Prints a table and exits 0 when every check passed, 1 otherwise (2: no torch).
Needs ``torch`` with CUDA in this environment (only the child process imports it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

import arbiter
from arbiter import GiB, MiB
from arbiter._gpu import DetectionMethod, GpuDetector, GpuProbeError, NvmlProbe

TOLERANCE = 0.05

# The CUDA context (hundreds of MiB) is created before anything is measured, so the
# only change the parent sees on "alloc" is the block itself.
CHILD = r"""
import sys, torch
size = int(sys.argv[1])
torch.cuda.init()
warm = torch.empty(2 * 1024 * 1024, dtype=torch.uint8, device="cuda")
warm.fill_(1)
torch.cuda.synchronize()
props = torch.cuda.get_device_properties(0)
print("ready", props.total_memory, props.name.replace(" ", "_"), flush=True)
sys.stdin.readline()
block = torch.empty(size, dtype=torch.uint8, device="cuda")
block.fill_(1)  # touched, so the memory is really there
torch.cuda.synchronize()
print("allocated", torch.cuda.memory_reserved(), flush=True)
sys.stdin.readline()
"""


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def _gib(n: float) -> str:
    return f"{n / GiB:.3f} GiB"


async def _line(stream: BufferedByteReceiveStream) -> list[str]:
    return (await stream.receive_until(b"\n", 4096)).decode().split()


async def _wait_for(condition: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``condition()`` held, checking every 10 ms; ``None`` past ``timeout``."""
    start = anyio.current_time()
    with anyio.move_on_after(timeout):
        # The arbiter's state has no change event to wait on; sampling it is the point.
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)
        return anyio.current_time() - start
    return None


async def run_checks(size: int, interval: float | None) -> list[Check]:
    checks: list[Check] = []
    with anyio.fail_after(300):
        await _run_checks(checks, size, interval)
    return checks


async def _run_checks(checks: list[Check], size: int, interval: float | None) -> list[Check]:
    detection = GpuDetector().detect()
    print(f"detection: method={detection.method.value}")
    for gpu in detection.gpus:
        print(f"  GPU {gpu.index}: {gpu.name}, {_gib(gpu.total_vram_bytes)}, uuid={gpu.uuid}")
    found = detection.method in (DetectionMethod.NVML, DetectionMethod.NVIDIA_SMI)
    checks.append(
        Check("NVIDIA GPU detected", found and bool(detection.gpus), detection.method.value)
    )
    if not detection.gpus:
        return checks

    try:
        async with NvmlProbe(0) as probe:
            reading = await probe.read()
    except GpuProbeError as exc:
        checks.append(Check("NVML reads device 0", False, str(exc)))
        return checks
    per_process = reading.external is not None
    print(
        f"NVML reading: total={_gib(reading.total)} used={_gib(reading.used)} "
        f"ours={reading.ours} external={reading.external} "
        f"({'per-process figures' if per_process else 'no per-process figures: used - granted'})"
    )

    config = arbiter.ArbiterConfig.auto_detect()
    if interval is not None:
        config = dataclasses.replace(config, poll_interval=interval)
    poll = config.poll_interval
    print(f"config: budget={_gib(config.vram_budget)} poll_interval={poll:g} s")
    gpu0 = next(g for g in detection.gpus if g.index == config.device)
    within = 2 * poll

    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0"}
    async with arbiter.Arbiter(config) as arb:
        await anyio.sleep(within)
        before_child = arb.state().external_used
        print(f"external_used before the child: {_gib(before_child)}")
        command = [sys.executable, "-c", CHILD, str(size)]
        async with await anyio.open_process(command, env=env) as child:
            assert child.stdin is not None and child.stdout is not None
            out = BufferedByteReceiveStream(child.stdout)
            try:
                ready = await _line(out)
            except anyio.IncompleteRead:
                checks.append(Check("child allocates with torch", False, "the child died"))
                return checks
            torch_total, torch_name = int(ready[1]), ready[2].replace("_", " ")
            # NVML and CUDA count the card's memory slightly differently; 3 % covers it.
            error = abs(gpu0.total_vram_bytes - torch_total) / torch_total
            checks.append(
                Check(
                    "detected VRAM matches the card",
                    error <= 0.03,
                    f"detected {gpu0.name} {_gib(gpu0.total_vram_bytes)}, torch {torch_name} "
                    f"{_gib(torch_total)} ({100 * error:.1f} % apart)",
                )
            )
            await anyio.sleep(within)  # let the poller see the child's CUDA context
            with_context = arb.state().external_used
            print(f"external_used with the child's CUDA context: {_gib(with_context)}")

            await child.stdin.send(b"alloc\n")
            await _line(out)

            def risen() -> bool:
                delta = arb.state().external_used - with_context
                return abs(delta - size) <= TOLERANCE * size

            took = await _wait_for(risen, within)
            delta = arb.state().external_used - with_context
            checks.append(
                Check(
                    f"external_used rises by {_gib(size)} within {within:g} s",
                    took is not None,
                    f"rose by {_gib(delta)}"
                    + (f" after {took:.2f} s" if took is not None else " (not in time)"),
                )
            )

            await child.stdin.send(b"exit\n")
            await child.wait()

        def fallen() -> bool:
            return abs(arb.state().external_used - before_child) <= TOLERANCE * size

        took = await _wait_for(fallen, within)
        checks.append(
            Check(
                f"external_used falls back within {within:g} s of the child's exit",
                took is not None,
                f"now {_gib(arb.state().external_used)}, before the child {_gib(before_child)}"
                + (f", after {took:.2f} s" if took is not None else " (not in time)"),
            )
        )
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0, help="size the child allocates")
    parser.add_argument("--interval", type=float, default=None, help="poll interval, s")
    args = parser.parse_args()
    # torch is only imported by the child: the parent (the arbiter) holds no CUDA context.
    if importlib.util.find_spec("torch") is None:
        print("gpu_check: needs torch with CUDA", file=sys.stderr)
        return 2
    size = int(args.gib * GiB) // (2 * MiB) * (2 * MiB)
    checks = anyio.run(run_checks, size, args.interval)
    width = max(len(c.name) for c in checks)
    print()
    for check in checks:
        print(f"{'PASS' if check.passed else 'FAIL'}  {check.name:<{width}}  {check.detail}")
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
