"""The disk tier's checksum records, and a damaged or full disk under the cache."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import xxhash
from cache_helpers import make_config, make_fragments, origin
from origin_server import OriginServer
from structlog.testing import capture_logs

from arbiter import MiB
from arbiter.cache import CacheTier, FragmentCache, _disk, _sink
from arbiter.cache._manifest import disk_name
from arbiter.cache._record import ChecksumRecord

__all__ = ["origin"]

pytestmark = pytest.mark.anyio


def fragment_file(tmp_path: Path, fragment_id: str) -> Path:
    return tmp_path / "cache" / "fragments" / disk_name(fragment_id)


def record_file(tmp_path: Path, fragment_id: str) -> Path:
    return tmp_path / "cache" / "checksums" / disk_name(fragment_id)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        value = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([value ^ 0xFF]))


class Sha256Counter:
    """Counts the sha256 hashes the disk reads start (the fast check starts none)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = 0
        real = _disk.sha256

        def counted(*args: Any) -> Any:
            self.started += 1
            return real(*args)

        monkeypatch.setattr(_disk, "sha256", counted)


async def prefetched(tmp_path: Path, origin: OriginServer, fragments: dict[str, bytes], **kw: Any):
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url, **kw)
    async with FragmentCache(config) as cache:
        await cache.prefetch(fragments, tier=CacheTier.NVME)
    return config


# -- checksum records ------------------------------------------------------------------


async def test_a_download_records_the_fast_checksum_beside_the_fragment(tmp_path, origin) -> None:
    fragments = make_fragments(1, 300_000)
    await prefetched(tmp_path, origin, fragments)
    data = fragments["frag/00"]
    record = ChecksumRecord.decode(record_file(tmp_path, "frag/00").read_bytes())
    assert record == ChecksumRecord(
        xxhash.xxh3_128(data).hexdigest(), len(data), hashlib.sha256(data).hexdigest()
    )
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


@pytest.mark.parametrize("size", [300_000, 9 * MiB + 3])  # one chunk; several
async def test_disk_reads_are_checked_with_the_record_not_sha256(
    tmp_path, origin, monkeypatch, size
) -> None:
    fragments = make_fragments(1, size)
    config = await prefetched(tmp_path, origin, fragments, read_chunk_size=1 * MiB)
    sha256 = Sha256Counter(monkeypatch)
    async with FragmentCache(config) as cache:
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
        stats = cache.stats()
    assert sha256.started == 0
    assert stats.hits[CacheTier.NVME] == 1 and stats.integrity_failures == 0
    assert len(origin.requests) == 1


@pytest.mark.parametrize("size", [300_000, 9 * MiB + 3])
async def test_a_fragment_without_record_is_checked_with_sha256_then_recorded(
    tmp_path, origin, monkeypatch, size
) -> None:
    fragments = make_fragments(1, size)
    config = await prefetched(tmp_path, origin, fragments, read_chunk_size=1 * MiB)
    record = record_file(tmp_path, "frag/00")
    kept = record.read_bytes()
    record.unlink()  # a cache from before records, or a crash before the record landed
    sha256 = Sha256Counter(monkeypatch)
    async with FragmentCache(config) as cache:
        assert bytes(await cache.get("frag/00", CacheTier.NVME)) == fragments["frag/00"]
        assert sha256.started == 1
        assert record.read_bytes() == kept  # recorded again once verified
        assert bytes(await cache.get("frag/00", CacheTier.NVME)) == fragments["frag/00"]
        assert sha256.started == 1  # the next read takes the record
        stats = cache.stats()
    assert stats.integrity_failures == 0 and stats.misses == 0
    assert len(origin.requests) == 1


async def test_an_empty_record_is_a_missing_one(tmp_path, origin, monkeypatch) -> None:
    # Records are not fsynced: what a crash leaves of one is nothing, or an empty file.
    fragments = make_fragments(1, 200_000)
    config = await prefetched(tmp_path, origin, fragments)
    record = record_file(tmp_path, "frag/00")
    kept = record.read_bytes()
    record.write_bytes(b"")
    sha256 = Sha256Counter(monkeypatch)
    async with FragmentCache(config) as cache:
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
        stats = cache.stats()
    assert sha256.started == 1
    assert stats.integrity_failures == 0 and stats.misses == 0
    assert record.read_bytes() == kept


async def test_a_corrupt_fragment_without_record_fails_sha256(tmp_path, origin) -> None:
    fragments = make_fragments(1, 5 * MiB)
    config = await prefetched(tmp_path, origin, fragments, read_chunk_size=1 * MiB)
    record_file(tmp_path, "frag/00").unlink()
    flip_byte(fragment_file(tmp_path, "frag/00"), 3 * MiB + 7)
    async with FragmentCache(config) as cache:
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
        stats = cache.stats()
    assert stats.integrity_failures == 1 and stats.misses == 1
    assert fragment_file(tmp_path, "frag/00").read_bytes() == fragments["frag/00"]
    assert record_file(tmp_path, "frag/00").exists()


@pytest.mark.parametrize("size", [300_000, 6 * MiB + 1])
async def test_corruption_under_a_record_is_found_on_the_next_read(tmp_path, origin, size) -> None:
    fragments = make_fragments(1, size)
    config = await prefetched(tmp_path, origin, fragments, read_chunk_size=1 * MiB)
    async with FragmentCache(config) as cache:
        assert bytes(await cache.get("frag/00", CacheTier.NVME)) == fragments["frag/00"]
        flip_byte(fragment_file(tmp_path, "frag/00"), size - 2)  # while the cache runs
        assert bytes(await cache.get("frag/00", CacheTier.NVME)) == fragments["frag/00"]
        stats = cache.stats()
    assert stats.integrity_failures == 1
    assert stats.misses == 1 and stats.hits[CacheTier.NVME] == 1
    assert len(origin.requests) == 2
    assert fragment_file(tmp_path, "frag/00").read_bytes() == fragments["frag/00"]


def _damage_digit(raw: bytes) -> bytes:
    at = raw.index(b" ") + 1  # the first hex digit of the xxh3
    return raw[:at] + (b"0" if raw[at : at + 1] != b"0" else b"1") + raw[at + 1 :]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_damage_digit, id="one-digit"),
        pytest.param(lambda raw: raw[:20], id="cut-short"),
        pytest.param(lambda raw: b"\xff" * len(raw), id="garbage"),
        pytest.param(lambda raw: raw * 3, id="too-long"),
        pytest.param(
            lambda raw: raw.replace(raw.split(b" ")[5][:8], b"00000000"), id="other-sha256"
        ),
    ],
)
async def test_a_damaged_record_counts_as_a_corrupt_fragment(tmp_path, origin, damage) -> None:
    fragments = make_fragments(1, 200_000)
    config = await prefetched(tmp_path, origin, fragments)
    record = record_file(tmp_path, "frag/00")
    record.write_bytes(damage(record.read_bytes()))
    async with FragmentCache(config) as cache:
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
        stats = cache.stats()
    assert stats.integrity_failures == 1
    assert stats.misses == 1
    assert len(origin.requests) == 2
    data = fragments["frag/00"]
    assert ChecksumRecord.decode(record.read_bytes()) == ChecksumRecord(
        xxhash.xxh3_128(data).hexdigest(), len(data), hashlib.sha256(data).hexdigest()
    )


async def test_a_record_left_without_its_fragment_is_removed_at_start(tmp_path, origin) -> None:
    fragments = make_fragments(1, 1000)
    config = await prefetched(tmp_path, origin, fragments)
    fragment_file(tmp_path, "frag/00").unlink()
    async with FragmentCache(config) as cache:
        assert cache.stats().bytes_held[CacheTier.NVME] == 0
    assert not record_file(tmp_path, "frag/00").exists()


async def test_an_evicted_fragment_takes_its_record_along(tmp_path, origin) -> None:
    fragments = make_fragments(4, 100_000)
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url, disk_capacity=250_000)
    async with FragmentCache(config) as cache:
        for fragment_id in fragments:
            await cache.get(fragment_id, tier=CacheTier.NVME)
    kept = sorted(p.name for p in (tmp_path / "cache" / "fragments").iterdir())
    assert len(kept) == 2
    assert sorted(p.name for p in (tmp_path / "cache" / "checksums").iterdir()) == kept


# -- non-files where a fragment should be ----------------------------------------------


async def test_a_folder_at_a_fragment_path_is_removed_and_fetched_anew(tmp_path, origin) -> None:
    fragments = make_fragments(2, 100_000)
    origin.files.update(fragments)
    for fragment_id in fragments:
        folder = fragment_file(tmp_path, fragment_id)
        (folder / "inside").mkdir(parents=True)
        (folder / "inside" / "file").write_bytes(b"x")
    config = make_config(tmp_path, fragments, cdn_url=origin.url)
    for _ in range(2):  # and again on the next run: nothing is left in the way
        async with FragmentCache(config) as cache:
            for fragment_id, data in fragments.items():
                assert bytes(await cache.get(fragment_id)) == data
    for fragment_id, data in fragments.items():
        assert fragment_file(tmp_path, fragment_id).read_bytes() == data
    assert len(origin.requests) == 2


async def test_a_folder_that_replaces_a_fragment_while_running_is_replaced(
    tmp_path, origin
) -> None:
    fragments = make_fragments(1, 100_000)
    config = await prefetched(tmp_path, origin, fragments, ram_capacity=0)
    async with FragmentCache(config) as cache:
        path = fragment_file(tmp_path, "frag/00")
        path.unlink()
        path.mkdir()
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
        stats = cache.stats()
    assert path.read_bytes() == fragments["frag/00"]
    assert stats.misses == 1 and stats.hits[CacheTier.NVME] == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
async def test_a_fifo_at_a_fragment_path_does_not_hang_the_read(tmp_path, origin) -> None:
    fragments = make_fragments(1, 100_000)
    config = await prefetched(tmp_path, origin, fragments, ram_capacity=0)
    async with FragmentCache(config) as cache:
        path = fragment_file(tmp_path, "frag/00")
        path.unlink()
        os.mkfifo(path)
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
    assert path.read_bytes() == fragments["frag/00"]


async def test_a_symlink_at_a_fragment_path_is_not_followed(tmp_path, origin) -> None:
    fragments = make_fragments(1, 1000)
    config = await prefetched(tmp_path, origin, fragments, ram_capacity=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(fragments["frag/00"])
    async with FragmentCache(config) as cache:
        path = fragment_file(tmp_path, "frag/00")
        path.unlink()
        path.symlink_to(elsewhere)
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
    assert not path.is_symlink() and path.read_bytes() == fragments["frag/00"]
    assert elsewhere.exists()


# -- a full disk -------------------------------------------------------------------------


def disk_full(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Make the disk tier's writes (``write``), its commit (``commit``) or its free space
    (``statvfs``) say that the file system is full."""

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "write":
        monkeypatch.setattr(_sink, "_pwrite_all", no_space)
    elif where == "commit":
        monkeypatch.setattr(_disk.os, "fsync", no_space)
    else:
        monkeypatch.setattr(_disk.DiskLayout, "free_bytes", lambda self: 4096)


def warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["log_level"] == "warning"]


@pytest.mark.parametrize("where", ["write", "commit", "statvfs"])
async def test_a_full_disk_serves_from_the_origin_through_ram(
    tmp_path, origin, monkeypatch, where
) -> None:
    fragments = make_fragments(3, 2 * MiB)
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url, disk_capacity=1 << 40)
    disk_full(monkeypatch, where)
    with capture_logs() as logs:
        async with FragmentCache(config) as cache:
            for _ in range(2):
                for fragment_id, data in fragments.items():
                    assert bytes(await cache.get(fragment_id)) == data
            stats = cache.stats()
    assert len(warnings(logs)) == 1
    assert "disk tier cannot write" in warnings(logs)[0]["event"]
    assert stats.misses == 3 and stats.hits[CacheTier.RAM] == 3
    assert stats.bytes_held[CacheTier.RAM] == 6 * MiB
    # A failed commit (in the background) takes its fragment out of the disk tier.
    assert cache.stats().bytes_held[CacheTier.NVME] == 0
    assert list((tmp_path / "cache" / "fragments").iterdir()) == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert len(origin.requests) == 3


async def test_a_disk_tier_larger_than_its_file_system_evicts_to_fit_it(
    tmp_path, origin, monkeypatch
) -> None:
    fragments = make_fragments(5, 100_000)
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url, disk_capacity=1 << 40)
    folder = tmp_path / "cache" / "fragments"
    room = 250_000  # a file system of 250 kB, whatever disk_capacity says

    def used(layout: _disk.DiskLayout) -> int:
        total = 0
        for where in (folder, layout.tmp):  # downloads take room too
            with os.scandir(where) as entries:
                for entry in entries:
                    try:
                        total += entry.stat().st_size
                    except FileNotFoundError:
                        pass  # renamed or removed meanwhile: the next look agrees
        return total

    def free_bytes(self: _disk.DiskLayout) -> int:
        # Two looks that agree: a commit renaming a file between them is not missed.
        while (first := used(self)) != used(self):
            pass
        return max(0, room - first)

    monkeypatch.setattr(_disk.DiskLayout, "free_bytes", free_bytes)
    with capture_logs() as logs:
        async with FragmentCache(config) as cache:
            for fragment_id, data in fragments.items():
                assert bytes(await cache.get(fragment_id, CacheTier.NVME)) == data
                assert cache.stats().bytes_held[CacheTier.NVME] <= room
            stats = cache.stats()
    assert warnings(logs) == []  # eviction made room: nothing bypassed the disk
    # Three evictions at least (a file whose unlink is still pending when the next
    # download looks at the free space may cost one more).
    assert stats.evictions >= 3 and stats.bytes_held[CacheTier.NVME] in (100_000, 200_000)
    assert sum(p.stat().st_size for p in folder.iterdir()) == stats.bytes_held[CacheTier.NVME]


async def test_the_disk_tier_is_used_again_once_it_has_room(tmp_path, origin, monkeypatch) -> None:
    fragments = make_fragments(2, 100_000)
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url)
    with capture_logs() as logs:
        async with FragmentCache(config) as cache:
            with monkeypatch.context() as patch:
                disk_full(patch, "write")
                await cache.get("frag/00")
            await cache.get("frag/01")
            held = cache.stats().bytes_held[CacheTier.NVME]
    assert held == 100_000
    assert fragment_file(tmp_path, "frag/01").exists()
    assert not fragment_file(tmp_path, "frag/00").exists()
    assert len(warnings(logs)) == 1


async def test_a_disk_only_prefetch_on_a_full_disk_brings_nothing_and_warns(
    tmp_path, origin, monkeypatch
) -> None:
    fragments = make_fragments(2, 3 * MiB)
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url)
    disk_full(monkeypatch, "write")
    with capture_logs() as logs:
        async with FragmentCache(config) as cache:
            await cache.prefetch(fragments, tier=CacheTier.NVME)
            assert cache.stats().bytes_held[CacheTier.NVME] == 0
            monkeypatch.undo()
            assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
    assert len(warnings(logs)) == 1
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


async def test_a_disk_that_cannot_create_files_is_bypassed(tmp_path, origin, monkeypatch) -> None:
    fragments = make_fragments(1, 100_000)
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url)

    def read_only(self: object, name: str) -> tuple[int, str]:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(_disk.DiskLayout, "new_temp", read_only)
    async with FragmentCache(config) as cache:
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
        assert cache.stats().bytes_held[CacheTier.NVME] == 0


# -- commits in the background -----------------------------------------------------------


class HeldCommits:
    """Makes every commit of a download wait until `release` (from a worker thread)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import threading

        self.released = threading.Event()
        self.started = threading.Semaphore(0)
        real = _disk.DiskLayout.commit

        def held(layout: _disk.DiskLayout, *args: Any) -> None:
            self.started.release()
            assert self.released.wait(20)
            real(layout, *args)

        monkeypatch.setattr(_disk.DiskLayout, "commit", held)


async def test_a_get_returns_before_the_commit_and_a_read_waits_for_it(
    tmp_path, origin, monkeypatch
) -> None:
    import anyio

    fragments = make_fragments(1, 1 * MiB)
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url, ram_capacity=0)
    commits = HeldCommits(monkeypatch)
    async with FragmentCache(config) as cache:
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
        assert cache.stats().bytes_held[CacheTier.NVME] == 1 * MiB  # accounted already
        await anyio.to_thread.run_sync(commits.started.acquire)
        assert not fragment_file(tmp_path, "frag/00").exists()
        got: list[bytes] = []

        async def read_again() -> None:
            got.append(bytes(await cache.get("frag/00")))

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_again)
            await anyio.wait_all_tasks_blocked()
            assert got == []  # waiting for the commit, not downloading again
            commits.released.set()
        stats = cache.stats()
    assert got == [fragments["frag/00"]]
    assert stats.hits[CacheTier.NVME] == 1 and stats.misses == 1
    assert len(origin.requests) == 1


async def test_a_fragment_evicted_before_its_commit_leaves_no_file(
    tmp_path, origin, monkeypatch
) -> None:
    import anyio

    fragments = make_fragments(2, 100_000)
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url, disk_capacity=150_000)
    commits = HeldCommits(monkeypatch)
    async with FragmentCache(config) as cache:
        await cache.get("frag/00", CacheTier.NVME)
        await cache.get("frag/01", CacheTier.NVME)  # evicts frag/00 while it commits
        await anyio.to_thread.run_sync(commits.started.acquire)
        commits.released.set()
        stats = cache.stats()
    assert stats.evictions == 1 and stats.bytes_held[CacheTier.NVME] == 100_000
    names = [p.name for p in (tmp_path / "cache" / "fragments").iterdir()]
    assert names == [disk_name("frag/01")]
    assert [p.name for p in (tmp_path / "cache" / "checksums").iterdir()] == names
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


async def test_closing_the_cache_waits_for_pending_commits(tmp_path, origin, monkeypatch) -> None:
    import anyio

    fragments = make_fragments(1, 100_000)
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url)
    commits = HeldCommits(monkeypatch)
    async with anyio.create_task_group() as tg:
        async with FragmentCache(config) as cache:
            await cache.get("frag/00")
            await anyio.to_thread.run_sync(commits.started.acquire)
            tg.start_soon(anyio.to_thread.run_sync, commits.released.set)
    assert fragment_file(tmp_path, "frag/00").read_bytes() == fragments["frag/00"]
    assert record_file(tmp_path, "frag/00").exists()
