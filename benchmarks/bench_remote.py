"""The daemon's costs, measured against baselines in the same run.

    python benchmarks/bench_remote.py [--quick]

- codec: encoding and decoding one request with msgspec (msgpack structs, validated)
  against stdlib json (a dict, not validated).
- round trip: ``request_allocation`` + ``release`` through an ``arbiter serve``
  subprocess, p50, against two length-prefixed echoes served by another process over a
  Unix socket to the same client stack (anyio): a bare one (a blocking loop: the
  fastest a Python peer answers) and one served as the daemon serves (an anyio
  listener on asyncio). Rounds of the three alternate in blocks, so a machine whose
  load changes shifts them alike. Targets: <= 0.5 ms and <= 4x the echo.
- kill -9 of a holder process -> a waiter (here) granted: p50, target <= 50 ms.
- preemption: a USER_FACING request sent on one session -> a BACKGROUND ``allocate()``
  body of another session cancelled: p50, target <= 5 ms (an upper bound of "decided ->
  cancelled": it includes sending the request and the decision).
- churn: 50 client processes requesting and releasing 64 MiB: grants per second and the
  daemon's CPU time per grant.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import anyio.abc
import msgspec

from arbiter import GiB, RemoteArbiter
from arbiter.remote._wire import HEADER, ClientMessage, Request

ROOT = Path(__file__).resolve().parent.parent

ECHO_SERVER = """
import socket, struct, sys, os
path = sys.argv[1]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen()
print("ready", flush=True)
conn, _ = server.accept()
buf = b""
while True:
    data = conn.recv(65536)
    if not data:
        break
    buf += data
    while len(buf) >= 4:
        (n,) = struct.unpack_from("!I", buf)
        if len(buf) < 4 + n:
            break
        conn.sendall(buf[: 4 + n])
        buf = buf[4 + n :]
"""

ANYIO_ECHO_SERVER = """
import sys, anyio

async def echo(stream):
    buf = b""
    async with stream:
        while True:
            try:
                buf += await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                end = 4 + int.from_bytes(buf[:4], "big")
                await stream.send(buf[:end])
                buf = buf[end:]

async def main():
    listener = await anyio.create_unix_listener(sys.argv[1])
    print("ready", flush=True)
    await listener.serve(echo)

anyio.run(main)
"""

HOLDER = """
import sys, anyio
from arbiter import RemoteArbiter, GiB
async def main():
    async with RemoteArbiter(sys.argv[1]) as arbiter:
        await arbiter.request_allocation("llm_inference", "normal", 8 * GiB)
        print("held", flush=True)
        await anyio.sleep_forever()
anyio.run(main)
"""

CHURNER = """
import sys, time, anyio
from arbiter import RemoteArbiter, MiB
async def main():
    start, seconds = float(sys.argv[2]), float(sys.argv[3])
    async with RemoteArbiter(sys.argv[1]) as arbiter:
        await anyio.sleep(max(0.0, start - time.time()))
        grants = 0
        end = time.time() + seconds
        while time.time() < end:
            alloc = await arbiter.request_allocation("llm_inference", "normal", 64 * MiB)
            alloc.release()
            grants += 1
        print(grants, flush=True)
anyio.run(main)
"""


def _p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def codec(rounds: int) -> tuple[float, float]:
    """(µs per msgspec encode+decode, µs per json encode+decode) of one request."""
    message = Request(7, "llm_inference", 3, 6 * GiB, 3 * GiB, 30.0, False, 0.5, True, None, "x")
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ClientMessage)
    as_dict = msgspec.structs.asdict(message) | {"op": "Request"}
    start = time.perf_counter()
    for _ in range(rounds):
        decoder.decode(encoder.encode(message))
    fast = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(rounds):
        json.loads(json.dumps(as_dict))
    slow = time.perf_counter() - start
    return fast / rounds * 1e6, slow / rounds * 1e6


def start_daemon(sock: Path, vram_gb: int = 10) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "arbiter", "serve", "--socket", str(sock), "--vram-gb",
         str(vram_gb)],
        stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
                return proc
            except OSError:
                time.sleep(0.02)
    proc.kill()
    raise TimeoutError("the daemon did not start")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    proc.wait(timeout=20)


def start_echo(server: str, sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", server, str(sock)], stdout=subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


async def round_trips(
    echo_sock: Path, anyio_echo_sock: Path, daemon_sock: Path, rounds: int
) -> tuple[list[float], list[float], list[float]]:
    """Round trips to the bare echo, the anyio echo and the daemon, in alternating blocks."""
    payload = msgspec.msgpack.encode(
        Request(7, "llm_inference", 1, GiB, None, None, True, None, True, None, None)
    )
    frame = HEADER.pack(len(payload)) + payload

    async def echo_once(stream: anyio.abc.SocketStream) -> float:
        start = time.perf_counter()
        await stream.send(frame)
        got = b""
        while len(got) < len(frame):
            got += await stream.receive()
        return time.perf_counter() - start

    async def daemon_once(arbiter: RemoteArbiter) -> float:
        start = time.perf_counter()
        alloc = await arbiter.request_allocation("llm_inference", "normal", GiB)
        alloc.release()
        return time.perf_counter() - start

    bare: list[float] = []
    served: list[float] = []
    daemon: list[float] = []
    async with (
        await anyio.connect_unix(echo_sock) as bare_stream,
        await anyio.connect_unix(anyio_echo_sock) as served_stream,
        RemoteArbiter(daemon_sock) as arbiter,
    ):
        for _ in range(100):  # warm up all three
            await echo_once(bare_stream)
            await echo_once(served_stream)
            await daemon_once(arbiter)
        for _ in range(max(1, rounds // 100)):
            bare += [await echo_once(bare_stream) for _ in range(100)]
            served += [await echo_once(served_stream) for _ in range(100)]
            daemon += [await daemon_once(arbiter) for _ in range(100)]
    return bare, served, daemon


async def kill_to_grant(sock: Path, rounds: int) -> list[float]:
    samples: list[float] = []
    async with RemoteArbiter(sock) as arbiter:
        for _ in range(rounds):
            holder = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-c", HOLDER, str(sock)], stdout=subprocess.PIPE, cwd=ROOT
            )
            assert holder.stdout is not None
            holder.stdout.readline()
            async with anyio.create_task_group() as tg:
                granted = anyio.Event()

                async def wait(granted: anyio.Event) -> None:
                    alloc = await arbiter.request_allocation("llm_inference", "normal", 4 * GiB)
                    granted.set()
                    alloc.release()

                tg.start_soon(wait, granted)
                await arbiter.refresh()  # the waiter is queued
                await anyio.sleep(0.05)
                start = time.perf_counter()
                os.kill(holder.pid, signal.SIGKILL)
                await granted.wait()
                samples.append(time.perf_counter() - start)
            holder.wait(timeout=10)
    return samples


async def preempt_to_cancel(sock: Path, rounds: int) -> list[float]:
    samples: list[float] = []
    async with RemoteArbiter(sock) as victim_side, RemoteArbiter(sock) as urgent_side:
        for _ in range(rounds):
            started = anyio.Event()
            cancelled_at: list[float] = []

            async def body(started: anyio.Event, cancelled_at: list[float]) -> None:
                try:
                    async with victim_side.allocate(
                        "image_generation", "background", memory=8 * GiB
                    ):
                        started.set()
                        try:
                            await anyio.sleep(30)
                        finally:
                            cancelled_at.append(time.perf_counter())
                except Exception:
                    pass

            async with anyio.create_task_group() as tg:
                tg.start_soon(body, started, cancelled_at)
                await started.wait()
                start = time.perf_counter()
                alloc = await urgent_side.request_allocation(
                    "llm_inference", "user_facing", 6 * GiB
                )
            samples.append(cancelled_at[0] - start)
            alloc.release()
    return samples


def churn(sock: Path, clients: int, seconds: float, daemon_pid: int) -> tuple[float, float]:
    """(grants per second, daemon CPU µs per grant)."""
    start_at = time.time() + 3 + clients * 0.15
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHURNER, str(sock), str(start_at), str(seconds)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        for _ in range(clients)
    ]
    time.sleep(max(0.0, start_at - time.time()))
    cpu_before = _cpu_seconds(daemon_pid)
    grants = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        grants += int(out.strip() or 0)
    cpu = _cpu_seconds(daemon_pid) - cpu_before
    return grants / seconds, cpu / max(1, grants) * 1e6


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    rounds = 500 if args.quick else 3000
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as folder:
        fast, slow = codec(20_000)
        print(f"{'case':44} {'figure':>12} {'baseline':>12} {'ratio':>7} target")
        print(f"{'codec encode+decode (µs)':44} {fast:12.2f} {slow:12.2f} {fast / slow:7.2f} "
              "msgspec vs json")  # fmt: skip
        folder_path = Path(folder)
        echoes = [
            start_echo(ECHO_SERVER, folder_path / "echo.sock"),
            start_echo(ANYIO_ECHO_SERVER, folder_path / "anyio-echo.sock"),
        ]
        daemon = start_daemon(folder_path / "gpu.sock")
        try:
            sock = folder_path / "gpu.sock"
            bare, served, trip = anyio.run(
                round_trips, folder_path / "echo.sock", folder_path / "anyio-echo.sock", sock,
                rounds,
            )  # fmt: skip
            for name, echo in (("bare echo", bare), ("anyio echo", served)):
                ratio = _p50_ms(trip) / _p50_ms(echo)
                print(f"{f'request+release round trip p50 (ms) / {name}':44} "
                      f"{_p50_ms(trip):12.3f} {_p50_ms(echo):12.3f} {ratio:7.2f} "
                      "<= 0.5 ms, <= 4x echo")  # fmt: skip
            for echo_proc in echoes:
                echo_proc.kill()
                echo_proc.wait(timeout=10)
            kills = anyio.run(kill_to_grant, sock, 5 if args.quick else 15)
            print(f"{'kill -9 holder -> waiter granted p50 (ms)':44} {_p50_ms(kills):12.2f} "
                  f"{'':12} {'':7} <= 50 ms")  # fmt: skip
            preempts = anyio.run(preempt_to_cancel, sock, 20 if args.quick else 100)
            print(f"{'preemption -> remote body cancelled p50 (ms)':44} {_p50_ms(preempts):12.2f} "
                  f"{'':12} {'':7} <= 5 ms")  # fmt: skip
            clients = 10 if args.quick else 50
            rate, cpu = churn(sock, clients, 3.0, daemon.pid)
            print(f"{f'{clients} churning clients: grants/s':44} {rate:12.0f}")
            print(f"{'  daemon CPU per grant (µs)':44} {cpu:12.1f}")
        finally:
            stop(daemon)
            for echo_proc in echoes:
                echo_proc.kill()


if __name__ == "__main__":
    main()
