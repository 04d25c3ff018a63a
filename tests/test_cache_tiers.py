"""RAM tier, pins, bypass, prefetch, stats and the cache's lifecycle."""

from __future__ import annotations

import anyio
import pytest
from cache_helpers import make_config, make_fragments, origin
from origin_server import OriginServer
from structlog.testing import capture_logs

from arbiter import FragmentUnavailable, MiB
from arbiter.cache import CacheStats, CacheTier, FragmentCache

__all__ = ["origin"]

pytestmark = pytest.mark.anyio


async def test_ram_never_holds_more_than_its_capacity(tmp_path, origin: OriginServer) -> None:
    fragments = {f"f/{i}": bytes([i]) * (100_000 + 37_000 * (i % 5)) for i in range(20)}
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url, ram_capacity=450_000)
    async with FragmentCache(config) as cache:
        for round_ in range(3):
            for i, (fragment_id, data) in enumerate(fragments.items()):
                if (i + round_) % 3 == 0:
                    continue
                assert bytes(await cache.get(fragment_id)) == data
                assert cache.stats().bytes_held[CacheTier.RAM] <= 450_000
        stats = cache.stats()
    assert stats.evictions > 0
    assert stats.hits[CacheTier.NVME] > 0  # evicted from RAM, still on disk


async def test_pinned_fragments_are_never_evicted(tmp_path, origin) -> None:
    fragments = make_fragments(10, 100_000)
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url, ram_capacity=300_000)
    async with FragmentCache(config) as cache:
        async with cache.pin("frag/00") as pinned, cache.pin("frag/01"):
            assert bytes(pinned) == fragments["frag/00"]
            for fragment_id in list(fragments)[2:]:
                await cache.get(fragment_id)
                await cache.get(fragment_id)
            hits_before = cache.stats().hits[CacheTier.RAM]
            await cache.get("frag/00")
            await cache.get("frag/01")
            assert cache.stats().hits[CacheTier.RAM] == hits_before + 2
            assert cache.stats().bytes_held[CacheTier.RAM] <= 300_000
        # Unpinned: they compete again, and a stream of others pushes them out.
        for _ in range(2):
            for fragment_id in list(fragments)[2:]:
                await cache.get(fragment_id)
        nvme_before = cache.stats().hits[CacheTier.NVME]
        await cache.get("frag/00")
        assert cache.stats().hits[CacheTier.NVME] == nvme_before + 1


async def test_fragment_larger_than_ram_bypasses_it(tmp_path, origin) -> None:
    fragments = {"big": b"B" * 2 * MiB, "small": b"s" * 1000}
    origin.files.update(fragments)
    config = make_config(tmp_path, fragments, cdn_url=origin.url, ram_capacity=1 * MiB)
    async with FragmentCache(config) as cache:
        await cache.get("small")
        assert bytes(await cache.get("big")) == fragments["big"]
        stats = cache.stats()
        assert stats.bytes_held[CacheTier.RAM] == 1000  # "small" was not evicted for it
        assert stats.bytes_held[CacheTier.NVME] == 2 * MiB + 1000
        async with cache.pin("big") as data:  # yielded all the same
            assert bytes(data) == fragments["big"]
        assert bytes(await cache.get("big")) == fragments["big"]
        assert cache.stats().hits[CacheTier.NVME] == 2


async def test_fragment_larger_than_every_tier_is_still_served(tmp_path, origin) -> None:
    fragments = {"big": b"B" * 3 * MiB}
    origin.files.update(fragments)
    config = make_config(
        tmp_path, fragments, cdn_url=origin.url, ram_capacity=MiB, disk_capacity=MiB
    )
    async with FragmentCache(config) as cache:
        assert bytes(await cache.get("big")) == fragments["big"]
        assert bytes(await cache.get("big")) == fragments["big"]
        stats = cache.stats()
    assert stats.misses == 2
    assert stats.bytes_held == dict.fromkeys(CacheTier, 0)
    assert list((tmp_path / "cache" / "fragments").iterdir()) == []


async def test_get_with_tier_nvme_leaves_ram_alone(tmp_path, origin) -> None:
    fragments = make_fragments(1, 10_000)
    origin.files.update(fragments)
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
        assert bytes(await cache.get("frag/00", CacheTier.NVME)) == fragments["frag/00"]
        assert cache.stats().bytes_held[CacheTier.RAM] == 0
        assert bytes(await cache.get("frag/00", CacheTier.NVME)) == fragments["frag/00"]
        assert cache.stats().hits[CacheTier.NVME] == 1


async def test_prefetch_fills_the_tier_without_counting_gets(tmp_path, origin) -> None:
    fragments = make_fragments(4, 1 * MiB + 3)
    origin.files.update(fragments)
    seen: list[tuple[int, int]] = []
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
        await cache.prefetch(fragments, progress=lambda d, t: seen.append((d, t)))
        stats = cache.stats()
        assert stats.bytes_held[CacheTier.RAM] == 4 * (MiB + 3)
        assert stats.misses == 0 and sum(stats.hits.values()) == 0
        for fragment_id, data in fragments.items():
            assert bytes(await cache.get(fragment_id)) == data
        assert cache.stats().hits[CacheTier.RAM] == 4
    total = 4 * (MiB + 3)
    assert seen[-1] == (total, total)
    assert all(t == total for _, t in seen)


async def test_prefetch_checks_every_id_first(tmp_path, origin) -> None:
    fragments = make_fragments(2, 100)
    origin.files.update(fragments)
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
        with pytest.raises(KeyError, match="nope"):
            await cache.prefetch(["frag/00", "nope"])
        assert origin.requests == []
        with pytest.raises(TypeError):
            await cache.prefetch("frag/00")


async def test_prefetch_brings_the_others_and_raises_the_failure(tmp_path, origin) -> None:
    fragments = make_fragments(3, 100)
    origin.files.update({k: v for k, v in fragments.items() if k != "frag/01"})
    config = make_config(tmp_path, fragments, cdn_url=origin.url)
    async with FragmentCache(config) as cache:
        with pytest.raises(FragmentUnavailable, match="frag/01"):
            await cache.prefetch(fragments)
        assert cache.stats().bytes_held[CacheTier.RAM] == 200


async def test_unknown_id_raises_key_error(tmp_path) -> None:
    async with FragmentCache(make_config(tmp_path, make_fragments(1, 10))) as cache:
        with pytest.raises(KeyError, match="frag/99"):
            await cache.get("frag/99")
        with pytest.raises(KeyError):
            async with cache.pin("frag/99"):
                pass
        with pytest.raises(KeyError):
            cache.device_fragment("frag/99")


async def test_bad_tier_arguments(tmp_path) -> None:
    async with FragmentCache(make_config(tmp_path, make_fragments(1, 10))) as cache:
        with pytest.raises(ValueError, match="tier"):
            await cache.get("frag/00", CacheTier.CDN)
        with pytest.raises(TypeError, match="tier"):
            await cache.get("frag/00", 1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="tier must be one of vram, ram, nvme, cdn"):
            await cache.get("frag/00", "disk")
        with pytest.raises(TypeError, match="fragment_id must be a str"):
            await cache.get(123)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="fragment_ids must be an iterable"):
            await cache.prefetch(None)  # type: ignore[arg-type]


async def test_a_tier_may_be_named_in_lower_case(tmp_path, origin) -> None:
    fragments = make_fragments(1, 10)
    origin.files.update(fragments)
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
        await cache.get("frag/00", "nvme")  # the disk tier only
        assert cache.stats().hits[CacheTier.RAM] == 0
        await cache.get("frag/00", "ram")
        assert cache.stats().hits[CacheTier.NVME] == 1


async def test_stats_shape(tmp_path, origin) -> None:
    fragments = make_fragments(1, 100)
    origin.files.update(fragments)
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
        empty = cache.stats()
        await cache.get("frag/00")
        await cache.get("frag/00")
        stats = cache.stats()
    assert isinstance(stats, CacheStats)
    for snapshot in (empty, stats):
        for field in (snapshot.hits, snapshot.bytes_read, snapshot.bytes_held):
            assert set(field) == set(CacheTier)
            assert all(isinstance(v, int) for v in field.values())
    assert empty.fetch_latency_p50 is None and empty.hit_ratio == 0.0
    assert stats.fetch_latency_p50 is not None
    assert 0 <= stats.fetch_latency_p50 <= stats.fetch_latency_p90 <= stats.fetch_latency_p99  # type: ignore[operator]
    assert stats.hit_ratio == 0.5
    assert stats.hits[CacheTier.CDN] == 0 and stats.bytes_held[CacheTier.CDN] == 0
    with pytest.raises(AttributeError):
        stats.misses = 3  # type: ignore[misc]


async def test_a_cache_must_be_open_and_opens_once(tmp_path) -> None:
    cache = FragmentCache(make_config(tmp_path, make_fragments(1, 10)))
    with pytest.raises(RuntimeError, match="not open"):
        await cache.get("frag/00")
    async with cache:
        pass
    with pytest.raises(RuntimeError, match="not open"):
        await cache.get("frag/00")
    with pytest.raises(RuntimeError):
        async with cache:
            pass


async def test_gets_waiting_on_a_closing_cache_raise_fragment_unavailable(tmp_path, origin) -> None:
    import threading

    fragments = make_fragments(1, 1000)
    origin.files.update(fragments)
    origin.stall = threading.Event()
    errors: list[BaseException] = []
    cache = FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url))

    async def waiter() -> None:
        try:
            await cache.get("frag/00")
        except FragmentUnavailable as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        async with cache:
            tg.start_soon(waiter)
            await anyio.to_thread.run_sync(origin.requested.wait, 10)
    origin.stall.set()
    assert len(errors) == 1 and "closed" in str(errors[0])


async def test_a_raising_progress_callback_does_not_break_the_get(tmp_path, origin) -> None:
    fragments = make_fragments(1, 2 * MiB)
    origin.files.update(fragments)

    def broken(done: int, total: int) -> None:
        raise RuntimeError("progress bar exploded")

    # Captured, the error event is checked here (and not rendered: structlog's default
    # renderer draws its traceback with rich, about 0.1 s of CPU).
    with capture_logs() as logs:
        async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
            assert bytes(await cache.get("frag/00", progress=broken)) == fragments["frag/00"]
    [event] = [e for e in logs if e["event"].startswith("progress callback failed")]
    assert event["log_level"] == "error" and event["exc_info"] is True


def test_an_arbiter_that_is_none_of_ours_is_a_type_error(tmp_path) -> None:
    config = make_config(tmp_path, make_fragments(1, 10))
    with pytest.raises(TypeError, match="arbiter must be"):
        FragmentCache(config, arbiter="x")
