"""The disk (NVME) tier and the source_dir origin: restarts, crashes, corruption."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import anyio
import pytest
from cache_helpers import make_config, make_fragments, origin
from origin_server import OriginServer

from arbiter import FragmentUnavailable, IntegrityError, MiB
from arbiter.cache import CacheTier, FragmentCache
from arbiter.cache._manifest import disk_name

__all__ = ["origin"]

pytestmark = pytest.mark.anyio


def fragment_file(tmp_path: Path, fragment_id: str) -> Path:
    return tmp_path / "cache" / "fragments" / disk_name(fragment_id)


def overwrite(path: Path, offset: int, data: bytes | None = None) -> None:
    """Change bytes in place (the size stays): flip one byte, or write ``data``."""
    with open(path, "r+b") as file:
        file.seek(offset)
        if data is None:
            data = bytes([file.read(1)[0] ^ 0xFF])
            file.seek(offset)
        file.write(data)


async def test_disk_tier_survives_a_restart(tmp_path, origin: OriginServer) -> None:
    fragments = make_fragments(3, 500_000)
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url)
    async with FragmentCache(config) as cache:
        await cache.prefetch(fragments, tier=CacheTier.NVME)
        assert cache.stats().bytes_held[CacheTier.RAM] == 0
    requests_before = len(origin.requests)
    async with FragmentCache(config) as cache:
        assert cache.stats().bytes_held[CacheTier.NVME] == 3 * 500_000
        for fragment_id, data in fragments.items():
            assert bytes(await cache.get(fragment_id)) == data
        stats = cache.stats()
    assert len(origin.requests) == requests_before == 3
    assert stats.hits[CacheTier.NVME] == 3
    assert stats.misses == 0


async def test_ids_never_become_file_names(tmp_path, origin) -> None:
    fragments = {"../../escape": b"a" * 100, "/etc/passwd-like": b"b" * 100}
    paths = {"../../escape": "safe/escape.bin", "/etc/passwd-like": "safe/passwd.bin"}
    origin.files.update({paths[i]: d for i, d in fragments.items()})
    manifest = {
        "fragments": {
            i: {
                "size": 100,
                "sha256": __import__("hashlib").sha256(d).hexdigest(),
                "path": paths[i],
            }
            for i, d in fragments.items()
        }
    }
    config = make_config(tmp_path, fragments, cdn_url=origin.url, manifest=manifest)
    async with FragmentCache(config) as cache:
        for fragment_id, data in fragments.items():
            assert bytes(await cache.get(fragment_id)) == data
    stored = sorted(p.name for p in (tmp_path / "cache" / "fragments").iterdir())
    assert stored == sorted(disk_name(i) for i in fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


async def test_a_kill_mid_write_leaves_nothing_visible_and_start_cleans_it(
    tmp_path, origin
) -> None:
    fragments = make_fragments(1, 400_000)
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url)
    # What a process killed mid-download leaves: a partial temp file, no fragment file.
    tmp = tmp_path / "cache" / "tmp"
    tmp.mkdir(parents=True)
    leftover = tmp / f"{disk_name('frag/00')[:16]}.abcd.part"
    leftover.write_bytes(fragments["frag/00"][:1234])
    async with FragmentCache(config) as cache:
        assert not leftover.exists()
        assert cache.stats().bytes_held[CacheTier.NVME] == 0
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
    assert list(tmp.iterdir()) == []
    assert fragment_file(tmp_path, "frag/00").read_bytes() == fragments["frag/00"]


KILLED_CHILD = """
import sys, anyio
from arbiter.cache import CacheConfig, FragmentCache
manifest, disk, url = sys.argv[1], sys.argv[2], sys.argv[3]
config = CacheConfig(manifest, disk_path=disk, cdn_url=url, write_chunk_size=65536)

async def main():
    async with FragmentCache(config) as cache:
        await cache.get("frag/00")

anyio.run(main)
"""


async def test_a_process_killed_mid_download_leaves_no_fragment(tmp_path, origin) -> None:
    import json
    import signal
    import sys

    fragments = make_fragments(1, 4 * MiB)
    origin.files.update(fragments)
    origin.stall, origin.stall_after = threading.Event(), 1 * MiB + 5
    config = make_config(tmp_path, fragments, cdn_url=origin.url)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(config.manifest))
    tmp = tmp_path / "cache" / "tmp"
    child = await anyio.open_process(
        [sys.executable, "-c", KILLED_CHILD, str(manifest), str(tmp_path / "cache"), origin.url]
    )
    try:
        await anyio.to_thread.run_sync(origin.requested.wait, 20)
        with anyio.fail_after(20):
            # The child writes on its own schedule: nothing to wait on but the file.
            while not any(p.stat().st_size for p in tmp.glob("*.part")):  # noqa: ASYNC110
                await anyio.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    origin.stall.set()
    assert list((tmp_path / "cache" / "fragments").iterdir()) == []  # nothing visible
    async with FragmentCache(config) as cache:
        assert list(tmp.iterdir()) == []  # the remains were cleaned at start
        assert cache.stats().bytes_held[CacheTier.NVME] == 0
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]


async def test_a_download_cancelled_midway_leaves_no_partial_file(tmp_path, origin) -> None:
    fragments = make_fragments(1, 2 * MiB)
    origin.files.update(fragments)
    origin.stall = threading.Event()
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.get, "frag/00")
            await anyio.to_thread.run_sync(origin.requested.wait, 10)
            assert len(list((tmp_path / "cache" / "tmp").iterdir())) == 1
            tg.cancel_scope.cancel()  # the waiter goes; the shared download goes on
        assert len(list((tmp_path / "cache" / "tmp").iterdir())) == 1
    # Closing the cache stopped the download: its temp file went, nothing was committed.
    origin.stall.set()
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert list((tmp_path / "cache" / "fragments").iterdir()) == []


async def test_a_corrupt_disk_copy_is_dropped_and_fetched_anew(tmp_path, origin) -> None:
    fragments = make_fragments(1, 300_000)
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url)
    async with FragmentCache(config) as cache:
        await cache.prefetch(fragments, tier=CacheTier.NVME)
    path = fragment_file(tmp_path, "frag/00")
    overwrite(path, 1000)  # same size, one byte flipped: only the hash can tell
    async with FragmentCache(config) as cache:
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
        stats = cache.stats()
    assert stats.integrity_failures == 1
    assert stats.misses == 1
    assert len(origin.requests) == 2
    assert path.read_bytes() == fragments["frag/00"]


async def test_a_disk_file_of_the_wrong_size_is_dropped_at_start(tmp_path) -> None:
    fragments = make_fragments(1, 1000)
    path = fragment_file(tmp_path, "frag/00")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"short")
    stranger = path.parent / "not-a-fragment"
    stranger.write_bytes(b"left alone")
    async with FragmentCache(make_config(tmp_path, fragments)) as cache:
        assert cache.stats().bytes_held[CacheTier.NVME] == 0
    assert not path.exists()
    assert stranger.exists()


async def test_corrupt_disk_copy_with_no_other_source_raises_integrity_error(tmp_path) -> None:
    fragments = make_fragments(1, 1000)
    path = fragment_file(tmp_path, "frag/00")
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(1000))
    async with FragmentCache(make_config(tmp_path, fragments)) as cache:
        with pytest.raises(IntegrityError):
            await cache.get("frag/00")
        assert cache.stats().bytes_held[CacheTier.NVME] == 0
    assert not path.exists()


async def test_no_origin_at_all_raises_fragment_unavailable(tmp_path) -> None:
    async with FragmentCache(make_config(tmp_path, make_fragments(1, 10))) as cache:
        with pytest.raises(FragmentUnavailable):
            await cache.get("frag/00")


async def test_source_dir_is_read_in_place_as_nvme(tmp_path, origin) -> None:
    fragments = make_fragments(2, 12 * MiB)  # large: read in parallel chunks
    source = tmp_path / "model"
    for fragment_id, data in fragments.items():
        (source / fragment_id).parent.mkdir(parents=True, exist_ok=True)
        (source / fragment_id).write_bytes(data)
    config = make_config(tmp_path, fragments, source_dir=source, cdn_url=origin.url)
    async with FragmentCache(config) as cache:
        for fragment_id, data in fragments.items():
            assert bytes(await cache.get(fragment_id)) == data
        stats = cache.stats()
    assert stats.hits[CacheTier.NVME] == 2
    assert stats.misses == 0
    assert stats.bytes_held[CacheTier.NVME] == 0  # read in place, not copied
    assert origin.requests == []


async def test_corrupt_source_falls_through_to_the_cdn(tmp_path, origin) -> None:
    fragments = make_fragments(1, 3 * MiB)
    origin.files.update(fragments)
    source = tmp_path / "model"
    (source / "frag").mkdir(parents=True)
    (source / "frag" / "00").write_bytes(os.urandom(3 * MiB))
    config = make_config(tmp_path, fragments, source_dir=source, cdn_url=origin.url)
    async with FragmentCache(config) as cache:
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
        stats = cache.stats()
    assert stats.integrity_failures == 1
    assert stats.misses == 1


async def test_large_disk_reads_are_verified_chunk_by_chunk(tmp_path, origin) -> None:
    fragments = make_fragments(1, 9 * MiB + 17)  # several 1 MiB chunks and a ragged tail
    origin.files.update(fragments)
    config = make_config(
        tmp_path, fragments, cdn_url=origin.url, read_chunk_size=1 * MiB, read_parallelism=3
    )
    async with FragmentCache(config) as cache:
        await cache.prefetch(fragments, tier=CacheTier.NVME)
    path = fragment_file(tmp_path, "frag/00")
    async with FragmentCache(config) as cache:
        seen: list[int] = []
        data = await cache.get("frag/00", progress=lambda done, total: seen.append(done))
        assert bytes(data) == fragments["frag/00"]
        assert seen == sorted(seen) and seen[-1] == 9 * MiB + 17 and len(seen) >= 9
    overwrite(path, 7 * MiB + 5, b"\x00\x01\x02")
    async with FragmentCache(config) as cache:
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
        assert cache.stats().integrity_failures == 1


async def test_disk_tier_evicts_files_to_stay_within_capacity(tmp_path, origin) -> None:
    fragments = make_fragments(6, 100_000)
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url, disk_capacity=350_000)
    async with FragmentCache(config) as cache:
        for fragment_id in fragments:
            await cache.get(fragment_id, tier=CacheTier.NVME)
            assert cache.stats().bytes_held[CacheTier.NVME] <= 350_000
        stats = cache.stats()
    files = list((tmp_path / "cache" / "fragments").iterdir())
    assert len(files) == 3
    assert sum(f.stat().st_size for f in files) == stats.bytes_held[CacheTier.NVME]
    assert stats.evictions == 3
