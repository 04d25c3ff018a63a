"""A random fault history (seeded, bounded): client processes churn allocations while
clients are killed with SIGKILL and the daemon is killed and restarted. At no moment may
the memory that clients believe they hold exceed the budget (no double grant), and every
status observation shows granted <= budget.

Each client reports, on the system-wide monotonic clock, when it saw a grant and when it
was about to release: an interval inside the daemon's true grant, so any overlap found
is real.
"""

from __future__ import annotations

import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from remote_helpers import LINUX_ONLY, ROOT, start_daemon, status_json, stop

from arbiter import GiB

pytestmark = [LINUX_ONLY, pytest.mark.real_processes]

BUDGET_GB = 10
CLIENT = """
import random, sys, time, anyio
from arbiter import (
    AllocationTimeout, ArbiterUnavailable, GiB, Preempted, RemoteArbiter, SessionLost,
)
SOCK, SEED = sys.argv[1], int(sys.argv[2])

async def main():
    rng = random.Random(SEED)
    n = 0
    while True:
        try:
            async with RemoteArbiter(SOCK) as arbiter:
                while True:
                    n += 1
                    gib = rng.randint(1, 5)
                    priority = rng.choice(["background", "normal", "high", "user_facing"])
                    try:
                        async with arbiter.allocate("llm_inference", priority,
                                                    memory=gib * GiB, timeout=1.0):
                            print("hold", n, gib, time.monotonic(), flush=True)
                            try:
                                await anyio.sleep(rng.uniform(0.01, 0.2))
                            finally:
                                print("free", n, time.monotonic(), flush=True)
                    except (AllocationTimeout, Preempted, SessionLost, ArbiterUnavailable):
                        pass
        except (ArbiterUnavailable, SessionLost):
            await anyio.sleep(0.05)

anyio.run(main)
"""


class _Churner:
    def __init__(self, sock: Path, seed: int, events: queue.Queue[tuple[str, ...]]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(sock), str(seed)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
        )  # fmt: skip
        self.events = events
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            self.events.put((str(self.proc.pid), *text.split()))

    def kill(self) -> float:
        at = time.monotonic()
        stop(self.proc, signal.SIGKILL)
        return at


def _max_concurrent(events: list[tuple[str, ...]], killed: dict[str, float]) -> float:
    """The most GiB held at once by the clients' own account."""
    opened: dict[tuple[str, str], tuple[float, int]] = {}
    spans: list[tuple[float, float, int]] = []
    for event in events:
        pid, kind, n = event[0], event[1], event[2]
        if kind == "hold":
            opened[pid, n] = (float(event[4]), int(event[3]))
        elif kind == "free" and (pid, n) in opened:
            start, gib = opened.pop((pid, n))
            spans.append((start, float(event[3]), gib))
    for (pid, _n), (start, gib) in opened.items():
        spans.append((start, killed.get(pid, time.monotonic()), gib))
    edges = sorted([(s, 1, g) for s, _e, g in spans] + [(e, 0, g) for _s, e, g in spans])
    held = peak = 0
    for _t, starts, gib in edges:  # at equal times ends (0) come before starts (1)
        held += gib if starts else -gib
        peak = max(peak, held)
    return peak


def test_random_kills_and_restarts_never_double_grant(tmp_path: Path) -> None:
    rng = random.Random(20261130)
    sock = tmp_path / "faults.sock"
    events: queue.Queue[tuple[str, ...]] = queue.Queue()
    daemon = start_daemon(sock, "--ttl", "1", vram_gb=BUDGET_GB)
    churners = [_Churner(sock, rng.randrange(1 << 30), events) for _ in range(4)]
    killed: dict[str, float] = {}
    observations = 0
    try:
        # At least 3 s of faults, and on until enough happened to judge (a loaded
        # machine starts processes slowly), but never past 30 s.
        started = time.monotonic()
        while time.monotonic() - started < 3.0 or (
            events.qsize() < 60 and time.monotonic() - started < 30.0
        ):
            time.sleep(rng.uniform(0.2, 0.5))
            fault = rng.choice(["observe", "observe", "kill client", "restart daemon"])
            if fault == "kill client":
                victim = churners.pop(rng.randrange(len(churners)))
                killed[str(victim.proc.pid)] = victim.kill()
                churners.append(_Churner(sock, rng.randrange(1 << 30), events))
            elif fault == "restart daemon":
                stop(daemon, signal.SIGKILL)
                time.sleep(rng.uniform(0.0, 0.5))
                daemon = start_daemon(sock, "--ttl", "1", vram_gb=BUDGET_GB)
            else:
                status = status_json(sock)
                held = sum(h["memory"] for h in status["holders"])
                assert held == status["state"]["vram_used"] <= BUDGET_GB * GiB
                ids = [h["id"] for h in status["holders"]]
                assert len(ids) == len(set(ids))
                observations += 1
    finally:
        for churner in churners:
            killed[str(churner.proc.pid)] = churner.kill()
        stop(daemon)
    seen: list[tuple[str, ...]] = []
    while not events.empty():
        seen.append(events.get())
    assert sum(1 for e in seen if e[1] == "hold") > 20, "too little happened to judge"
    peak = _max_concurrent(seen, killed)
    print(f"{observations} observations, peak {peak} GiB of {BUDGET_GB}")
    assert peak <= BUDGET_GB
