"""The NVML poller against a real NVIDIA card, with real CUDA memory taken by torch.

What this process uses is not external use, what another process uses is, the memory that
process gives back wakes a waiter, and a daemon does not count its clients' memory as
external. Skipped unless torch is installed and NVML finds a GPU; on a GPU machine:
``python -m pytest -q tests/test_real_gpu.py``. The tests take the card one at a time
(a file lock shared by the xdist workers): each one reads what the others allocate.
"""

from __future__ import annotations

import fcntl
import importlib.util
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from remote_helpers import Client, status_json, stop, wait_connectable, wait_for

from arbiter import Arbiter, ArbiterConfig, DetectionMethod, GiB, GpuDetector


def _cuda_card() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False  # checked first: no detection, nor a torch import, on most machines
    if GpuDetector().detect().method is not DetectionMethod.NVML:
        return False
    import torch

    return bool(torch.cuda.is_available())


pytestmark = [
    pytest.mark.skipif(not _cuda_card(), reason="needs torch, CUDA and NVML"),
    pytest.mark.real_gpu_probe,
]

HOLD = """
import sys, torch
memory = torch.ones(int(sys.argv[1]), dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def the_card_alone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    lock = tmp_path_factory.getbasetemp().parent / "real-gpu.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield


def arbiter_of_the_card() -> Arbiter:
    """The default arbiter (budget from detection, the NVML probe), polling every 20 ms."""
    detected = ArbiterConfig.auto_detect()
    return Arbiter(ArbiterConfig(vram_budget=detected.vram_budget, poll_interval=0.02))


async def until(condition: Callable[[], bool], limit: float = 30.0) -> None:
    with anyio.fail_after(limit):
        while True:  # what the poller reads has no event to wait for
            if condition():
                return
            await anyio.sleep(0.02)


class OtherProcess:
    """A process that is no client of ours and holds ``memory`` bytes of the card."""

    def __init__(self, memory: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(memory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    async def holding(self) -> None:
        assert self.proc.stdout is not None
        with anyio.fail_after(60):
            said = await anyio.to_thread.run_sync(self.proc.stdout.readline)
        assert said.strip() == "held"

    def close(self) -> None:
        stop(self.proc, signal.SIGKILL)


def share_of_the_card() -> int:
    """What each process holds: large beside a CUDA context (about 0.6 GiB, which other
    xdist workers' tests may open or close meanwhile), small beside the card."""
    return min(16 * GiB, ArbiterConfig.auto_detect().vram_budget // 4)


@pytest.mark.anyio
async def test_ours_is_not_external_anothers_is_and_what_it_gives_back_wakes_a_waiter() -> None:
    import torch

    size = share_of_the_card()
    async with arbiter_of_the_card() as arbiter:
        await anyio.sleep(0.2)  # ten readings
        before = arbiter.state().external_used
        mine = torch.ones(size, dtype=torch.uint8, device="cuda")
        try:
            torch.cuda.synchronize()
            await anyio.sleep(0.2)
            assert arbiter.state().external_used < before + size // 2
            await _another_process_counts_and_its_exit_wakes_a_waiter(arbiter, before, size)
        finally:
            del mine
            torch.cuda.empty_cache()


async def _another_process_counts_and_its_exit_wakes_a_waiter(
    arbiter: Arbiter, before: int, size: int
) -> None:
    other = OtherProcess(size)
    try:
        await other.holding()
        await until(lambda: arbiter.state().external_used >= before + size // 2)
        # More than is left beside the other process, less than is left without it.
        memory = arbiter.state().vram_available + size // 2
        granted = anyio.Event()

        async def waiter() -> None:
            async with arbiter.allocate("image_generation", "normal", memory=memory):
                granted.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await until(lambda: arbiter.state().waiting == 1)
            await anyio.sleep(0.2)
            assert not granted.is_set()
            other.close()
            with anyio.fail_after(10):
                await granted.wait()
    finally:
        other.close()


HOLD_AS_CLIENT = """
import torch
async def main():
    async with RemoteArbiter(socket=SOCK) as arbiter:
        size = int(sys.argv[2])
        async with arbiter.allocate("image_generation", "normal", memory=size):
            memory = torch.ones(size, dtype=torch.uint8, device="cuda")
            torch.cuda.synchronize()
            say("held")
            await line()
anyio.run(main)
"""


def test_a_daemon_counts_its_clients_memory_as_granted_not_external(tmp_path: Path) -> None:
    sock = tmp_path / "gpu.sock"
    # The real NVML probe, and no --vram-gb: the budget comes from detection too.
    daemon = subprocess.Popen(
        [sys.executable, "-m", "arbiter", "serve", "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = other = None
    try:
        wait_connectable(sock, daemon)
        before = status_json(sock)["state"]["external_used"]
        size = share_of_the_card()
        client = Client(sock, HOLD_AS_CLIENT, str(size))
        client.expect("held", timeout=60)
        time.sleep(1.5)  # three of the daemon's readings
        state = status_json(sock)["state"]
        assert state["vram_used"] == size
        assert state["external_used"] < before + size // 2
        other = OtherProcess(size)
        anyio.run(other.holding)
        wait_for(lambda: status_json(sock)["state"]["external_used"] >= before + size // 2)
    finally:
        for process in (client, other):
            if process is not None:
                process.close()
        stop(daemon)
