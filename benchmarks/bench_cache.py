"""Fragment cache benchmarks: each figure is a ratio to a baseline measured in the same run.

    python benchmarks/bench_cache.py [--quick] [--backend asyncio|trio]

1. Disk tier: `get` of fragments not in RAM, cold (``posix_fadvise(DONTNEED)`` first)
   and warm, verified as every disk read is (disk-tier files against their xxh3-128
   record, ``source_dir`` files against their sha256), against a plain synchronous
   ``readinto`` of the same files into a fresh buffer, and against ``readinto`` + that
   hash (the same work done serially).
2. CDN tier: `get` of a fragment from a local origin (another process), which hashes,
   writes, fsyncs and commits it, against a plain single-stream httpx download to a file
   and against ``curl -o`` (skipped when curl is missing); and the CPU time the event
   loop's thread spends on each, and the whole process (the cache's hashing and writing
   run in a thread: on a machine whose cores are all busy they compete with the loop all
   the same, and there the process CPU per GiB, which the load disturbs far less than
   the time, tells which is faster).
3. Hit ratio: a two-tenant trace (LLM fragments by Zipf(1.0), diffusion scans of whole
   models chosen by Zipf) replayed by size only through the cache's S3-FIFO policy and
   through an LRU of the same byte capacity; the figure is missed bytes.
4. Event-loop lag: the worst lateness of a 1 ms ticker while a 1 GiB fragment (256 MiB
   with --quick) streams in from the local origin, beside the same ticker idle and
   during a plain httpx download.

Ratios are medians of runs measured back to back (baseline time / cache time, so > 1
means the cache is faster), which keeps them meaningful on a machine shared with other
work; the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import xxhash

from arbiter import GiB, MiB
from arbiter.cache import CacheConfig, CacheTier, FragmentCache
from arbiter.cache._manifest import disk_name
from arbiter.cache._s3fifo import S3FifoPolicy

ROOT = Path(__file__).resolve().parent.parent


# -- helpers ---------------------------------------------------------------------------


def write_fragment(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` (fsynced); return their sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    block = os.urandom(4 * MiB)
    with open(path, "wb") as file:
        left = size
        while left:
            piece = block[: min(left, len(block))]
            file.write(piece)
            digest.update(piece)
            left -= len(piece)
        file.flush()
        os.fsync(file.fileno())
    return digest.hexdigest()


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_readinto(path: Path, size: int, verify: str | None) -> None:
    """The same work done serially: one ``readinto`` into a fresh buffer, then the hash."""
    buffer = bytearray(size)
    with open(path, "rb", buffering=0) as file:
        view = memoryview(buffer)
        done = 0
        while done < size:
            done += file.readinto(view[done:])
    if verify == "sha256":
        hashlib.sha256(buffer).hexdigest()
    elif verify == "xxh3":
        xxhash.xxh3_128(buffer).hexdigest()


def gbps(size: int, seconds: float) -> float:
    return size / seconds / 1e9


def paired_ratio(baseline: list[float], ours: list[float]) -> float:
    """Median over runs measured back to back of baseline time / our time (>1: we are faster)."""
    return statistics.median(b / o for b, o in zip(baseline, ours, strict=True))


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, name: str, ours: str, baseline: str, ratio: str) -> None:
        self.rows.append((name, ours, baseline, ratio))
        print(f"  {name}: {ours} vs {baseline} -> {ratio}", flush=True)

    def show(self) -> None:
        header = ("benchmark", "cache", "baseline", "ratio / result")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(4)]
        line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
        print("\n" + line + "\n" + "-" * len(line))
        for row in self.rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


# -- 1. disk tier ----------------------------------------------------------------------


async def bench_disk(table: Table, work: Path, size: int, count: int, rounds: int) -> None:
    """Disk-tier gets (checked against the xxh3-128 record written on entry) and
    ``source_dir`` gets (checked against the sha256), each beside the same work done
    serially and beside a plain ``readinto``."""
    disk, source = work / "disk", work / "source"
    manifest: dict[str, Any] = {"fragments": {}}
    paths: dict[str, list[tuple[str, Path]]] = {"disk": [], "source": []}
    for i in range(count):
        for kind, root in (("disk", disk / "fragments"), ("source", source)):
            fragment_id = f"{kind}/{i}"
            path = root / (disk_name(fragment_id) if kind == "disk" else fragment_id)
            entry = {"size": size, "sha256": write_fragment(path, size)}
            manifest["fragments"][fragment_id] = entry
            paths[kind].append((fragment_id, path))
    config = CacheConfig(
        manifest,
        disk_path=disk,
        source_dir=source,
        ram_capacity=0,
        disk_capacity=count * size,
    )
    async with FragmentCache(config) as cache:
        for fragment_id, _ in paths["disk"]:
            await cache.get(fragment_id, CacheTier.NVME)  # found without records: recorded
        cases = (("disk", "xxh3", "disk get"), ("source", "sha256", "source_dir get"))
        for kind, check, what in cases:
            for temperature in ("cold", "warm"):
                timings: dict[str, list[float]] = {"cache": [], "readinto": [], "same work": []}
                for _ in range(rounds):
                    for fragment_id, path in paths[kind]:
                        # Back to back on the same file, so that load on the machine hits all.
                        for name in ("readinto", "cache", "same work"):
                            if temperature == "cold":
                                await anyio.to_thread.run_sync(drop_page_cache, path)
                            else:
                                plain_readinto(path, size, None)
                            start = time.perf_counter()
                            if name == "cache":
                                await cache.get(fragment_id, CacheTier.NVME)
                            else:
                                plain_readinto(path, size, check if name == "same work" else None)
                            timings[name].append(time.perf_counter() - start)
                label = f"{what} {size // MiB} MiB {temperature} ({check})"
                ours = f"{gbps(size, statistics.median(timings['cache'])):.2f} GB/s"
                baselines = [("same work", f"readinto+{check}", " (target >= 0.9)")]
                warm_target = " (target >= 0.5)" if kind == "disk" and temperature == "warm" else ""
                baselines.append(("readinto", "readinto", warm_target))
                for baseline, shown, target in baselines:
                    table.add(
                        label,
                        ours,
                        f"{gbps(size, statistics.median(timings[baseline])):.2f} GB/s {shown}",
                        f"{paired_ratio(timings[baseline], timings['cache']):.2f}x{target}",
                    )
        assert cache.stats().integrity_failures == 0


# -- 2. CDN tier -----------------------------------------------------------------------


def start_origin(directory: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "origin_server.py"), str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    port = int(process.stdout.readline())
    return process, f"http://127.0.0.1:{port}/"


async def plain_httpx(client: httpx.AsyncClient, url: str, target: Path) -> None:
    """The naive download: one stream, written to a file as it comes."""
    async with client.stream("GET", url) as response:
        response.raise_for_status()
        with open(target, "wb") as file:  # noqa: ASYNC230 - the naive baseline, on purpose
            async for chunk in response.aiter_bytes():
                file.write(chunk)


async def plain_httpx_same_work(
    client: httpx.AsyncClient, url: str, target: Path, digest: str
) -> None:
    """The naive download doing what the cache must: hash, write, fsync, replace."""
    hasher = hashlib.sha256()
    partial = target.with_suffix(".part")
    async with client.stream("GET", url) as response:
        response.raise_for_status()
        with open(partial, "wb") as file:  # noqa: ASYNC230 - the naive baseline, on purpose
            async for chunk in response.aiter_bytes():
                hasher.update(chunk)
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
    assert hasher.hexdigest() == digest
    os.replace(partial, target)


async def bench_cdn(
    table: Table, work: Path, url: str, served: Path, size: int, rounds: int
) -> None:
    digest = write_fragment(served / "cdn.bin", size)
    manifest = {"fragments": {"cdn": {"size": size, "sha256": digest, "path": "cdn.bin"}}}
    timings: dict[str, list[float]] = {"cache": [], "httpx": [], "httpx same work": [], "curl": []}
    # CPU time of the event loop's thread: what a download costs the rest of the program.
    loop_cpu: dict[str, list[float]] = {"cache": [], "httpx": []}
    process_cpu: dict[str, list[float]] = {"cache": [], "httpx": []}
    curl = shutil.which("curl")
    target = work / "plain.bin"
    async with httpx.AsyncClient(timeout=60) as client:
        for round_ in range(rounds):
            start, cpu, process = time.perf_counter(), time.thread_time(), time.process_time()
            await plain_httpx(client, url + "cdn.bin", target)
            timings["httpx"].append(time.perf_counter() - start)
            loop_cpu["httpx"].append(time.thread_time() - cpu)
            process_cpu["httpx"].append(time.process_time() - process)
            target.unlink()
            cache_dir = work / f"cdn-cache-{round_}"
            config = CacheConfig(manifest, disk_path=cache_dir, cdn_url=url, ram_capacity=4 * GiB)
            async with FragmentCache(config) as cache:
                start, cpu, process = time.perf_counter(), time.thread_time(), time.process_time()
                await cache.get("cdn")
                timings["cache"].append(time.perf_counter() - start)
                loop_cpu["cache"].append(time.thread_time() - cpu)
                process_cpu["cache"].append(time.process_time() - process)
            shutil.rmtree(cache_dir)
            start = time.perf_counter()
            await plain_httpx_same_work(client, url + "cdn.bin", target, digest)
            timings["httpx same work"].append(time.perf_counter() - start)
            target.unlink()
            if curl:
                start = time.perf_counter()
                await anyio.run_process([curl, "-sSf", "-o", str(target), url + "cdn.bin"])
                timings["curl"].append(time.perf_counter() - start)
                target.unlink()
    ours = statistics.median(timings["cache"])
    for baseline, target_note in (
        ("httpx", " (target >= 1.0)"),
        ("httpx same work", ""),
        ("curl", ""),
    ):
        if not timings[baseline]:
            table.add(f"cdn get {size // MiB} MiB", "-", "curl not found", "skipped")
            continue
        table.add(
            f"cdn get {size // MiB} MiB",
            f"{gbps(size, ours):.2f} GB/s",
            f"{gbps(size, statistics.median(timings[baseline])):.2f} GB/s {baseline}",
            f"{paired_ratio(timings[baseline], timings['cache']):.2f}x{target_note}",
        )
    per_gib = GiB / size * 1e3
    table.add(
        f"cdn get {size // MiB} MiB, loop-thread CPU",
        f"{statistics.median(loop_cpu['cache']) * per_gib:.0f} ms/GiB",
        f"{statistics.median(loop_cpu['httpx']) * per_gib:.0f} ms/GiB httpx",
        f"{paired_ratio(loop_cpu['httpx'], loop_cpu['cache']):.2f}x",
    )
    table.add(
        f"cdn get {size // MiB} MiB, process CPU",
        f"{statistics.median(process_cpu['cache']) * per_gib:.0f} ms/GiB",
        f"{statistics.median(process_cpu['httpx']) * per_gib:.0f} ms/GiB httpx",
        f"{paired_ratio(process_cpu['httpx'], process_cpu['cache']):.2f}x",
    )


# -- 3. hit ratio ----------------------------------------------------------------------


def zipf_weights(n: int, alpha: float) -> list[float]:
    return [1.0 / (rank**alpha) for rank in range(1, n + 1)]


def two_tenant_trace(seed: int, requests: int) -> tuple[list[tuple[str, int]], int]:
    """Fragment sizes 1 MiB .. 512 MiB (log-uniform). LLM: 3 checkpoints, requests pick a
    fragment by Zipf(1.0); diffusion: 8 models, a request picks a model by Zipf(1.0)
    and reads every fragment of it in order. Returns the trace and its unique bytes."""
    rng = random.Random(seed)

    def size() -> int:
        return int(2 ** rng.uniform(0, 9) * MiB)

    llm = [(f"llm{m}/{f}", size()) for m in range(3) for f in range(40)]
    rng.shuffle(llm)
    diffusion = [[(f"diff{m}/{f}", size()) for f in range(rng.randint(6, 16))] for m in range(8)]
    llm_weights = zipf_weights(len(llm), 1.0)
    model_weights = zipf_weights(len(diffusion), 1.0)
    trace: list[tuple[str, int]] = []
    while len(trace) < requests:
        if rng.random() < 0.8:
            trace.append(rng.choices(llm, llm_weights)[0])
        else:
            trace.extend(rng.choices(diffusion, model_weights)[0])
    unique = sum(s for _, s in llm) + sum(s for model in diffusion for _, s in model)
    return trace, unique


def missed_bytes_s3fifo(trace: list[tuple[str, int]], capacity: int) -> int:
    policy = S3FifoPolicy(capacity)  # CacheConfig's defaults
    missed = 0
    for key, size in trace:
        if not policy.touch(key):
            missed += size
            policy.admit(key, size)
    return missed


def missed_bytes_lru(trace: list[tuple[str, int]], capacity: int) -> int:
    held: OrderedDict[str, int] = OrderedDict()
    total = missed = 0
    for key, size in trace:
        if key in held:
            held.move_to_end(key)
            continue
        missed += size
        if size > capacity:
            continue
        held[key] = size
        total += size
        while total > capacity:
            total -= held.popitem(last=False)[1]
    return missed


def bench_hit_ratio(table: Table, requests: int) -> None:
    results = []
    for seed in range(3):
        trace, unique = two_tenant_trace(seed, requests)
        for share in (0.1, 0.2, 0.3):
            capacity = int(unique * share)
            ours = missed_bytes_s3fifo(trace, capacity)
            lru = missed_bytes_lru(trace, capacity)
            results.append((share, 1 - ours / lru))
    for share in (0.1, 0.2, 0.3):
        savings = [s for c, s in results if c == share]
        table.add(
            f"hit ratio, capacity {share:.0%} of bytes",
            "S3-FIFO",
            "LRU",
            f"{statistics.mean(savings):.1%} fewer missed bytes "
            f"(min {min(savings):.1%} over 3 traces; target >= 10%)",
        )


# -- 4. event-loop lag -----------------------------------------------------------------


class Ticker:
    """A task that sleeps 1 ms over and over and records how late it wakes up, and how
    much CPU time the loop's thread spent meanwhile: lateness with little CPU spent is
    the machine (other processes, or the GIL held by another thread) rather than a step
    that held the loop."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.held: list[float] = []
        self.stop = anyio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            start, cpu = time.perf_counter(), time.thread_time()
            await anyio.sleep(0.001)
            self.lags.append(time.perf_counter() - start - 0.001)
            self.held.append(time.thread_time() - cpu)

    def summary(self) -> str:
        lags = sorted(self.lags)
        p99 = lags[int(len(lags) * 0.99)]
        return f"max {lags[-1] * 1e3:.1f} ms, p99 {p99 * 1e3:.2f} ms"

    def held_summary(self) -> str:
        return f"max {max(self.held) * 1e3:.1f} ms of loop CPU between ticks"


async def while_ticking(work: Callable[[], Awaitable[object]]) -> Ticker:
    ticker = Ticker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await work()
        ticker.stop.set()
    return ticker


async def bench_lag(table: Table, work: Path, url: str, served: Path, size: int) -> None:
    digest = write_fragment(served / "lag.bin", size)
    manifest = {"fragments": {"lag": {"size": size, "sha256": digest, "path": "lag.bin"}}}
    config = CacheConfig(manifest, disk_path=work / "lag-cache", cdn_url=url, ram_capacity=2 * size)
    idle = await while_ticking(lambda: anyio.sleep(1.0))
    async with httpx.AsyncClient(timeout=60) as client:
        plain = await while_ticking(lambda: plain_httpx(client, url + "lag.bin", work / "lag.bin"))
    (work / "lag.bin").unlink()
    async with FragmentCache(config) as cache:
        ours = await while_ticking(lambda: cache.get("lag"))
    table.add(
        f"loop lag, {size // MiB} MiB streaming in",
        ours.summary(),
        f"{plain.summary()} plain httpx; {idle.summary()} idle",
        "target max < 10 ms",
    )
    table.add(
        f"loop held, {size // MiB} MiB streaming in",
        ours.held_summary(),
        f"{plain.held_summary()} plain httpx",
        "the loop's own share of the lag",
    )


# -- main --------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    quick = args.quick
    table = Table()
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-cache-", dir=args.dir) as tmp:
        work = Path(tmp)
        served = work / "served"
        served.mkdir()
        print("disk tier ...", flush=True)
        await bench_disk(
            table,
            work,
            size=(16 if quick else 64) * MiB,
            count=2 if quick else 4,
            rounds=3,
        )
        process, url = start_origin(served)
        try:
            print("cdn tier ...", flush=True)
            await bench_cdn(
                table, work, url, served, (64 if quick else 256) * MiB, 1 if quick else 3
            )
            print("event-loop lag ...", flush=True)
            await bench_lag(table, work, url, served, (256 if quick else 1024) * MiB)
        finally:
            process.terminate()
            process.wait()
    print("hit ratio ...", flush=True)
    bench_hit_ratio(table, 3_000 if quick else 20_000)
    table.show()
    print(f"load average at the end {os.getloadavg()}")


def run(entry: Callable[[argparse.Namespace], Awaitable[None]]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="much smaller sizes and rounds")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--dir", default=None, help="where to put the files (default: /tmp)")
    args = parser.parse_args()
    started = time.perf_counter()
    anyio.run(entry, args, backend=args.backend)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run(main)
