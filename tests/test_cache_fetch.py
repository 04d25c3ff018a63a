"""The CDN path of the fragment cache, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import threading

import anyio
import httpcore
import pytest
from cache_helpers import make_config, make_fragments, origin
from origin_server import OriginServer

from arbiter import FragmentUnavailable, IntegrityError, MiB
from arbiter.cache import CacheTier, FragmentCache
from arbiter.cache._client import WIDE_READ, new_client

__all__ = ["origin"]

pytestmark = pytest.mark.anyio


async def test_get_returns_verified_bytes_then_hits_ram(tmp_path, origin: OriginServer) -> None:
    fragments = make_fragments(2, 300_000)
    origin.files.update(fragments)
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
        data = await cache.get("frag/00")
        assert bytes(data) == fragments["frag/00"]
        again = await cache.get("frag/00")
        assert bytes(again) == fragments["frag/00"]
        stats = cache.stats()
    assert len(origin.requests_for("frag/00")) == 1
    assert stats.misses == 1
    assert stats.hits[CacheTier.RAM] == 1
    assert stats.bytes_read[CacheTier.CDN] == 300_000
    assert stats.bytes_held[CacheTier.RAM] == 300_000
    assert stats.bytes_held[CacheTier.NVME] == 300_000
    assert stats.fetches == 1


async def test_returned_bytes_cannot_corrupt_the_cached_copy(tmp_path, origin) -> None:
    fragments = {"small": b"x" * 1000, "large": bytes(range(256)) * 16384}  # 4 MiB
    origin.files.update(fragments)
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
        for fragment_id in fragments:
            data = await cache.get(fragment_id)
            view = memoryview(data)
            assert view.readonly
            with pytest.raises(TypeError):
                view[0] = 1
            if isinstance(data, memoryview):
                with pytest.raises(TypeError):
                    data.obj[0] = 1  # type: ignore[index]
            assert bytes(await cache.get(fragment_id)) == fragments[fragment_id]


async def test_sixteen_concurrent_gets_share_one_origin_request(tmp_path, origin) -> None:
    fragments = make_fragments(1, 2 * MiB)
    origin.files.update(fragments)
    results: list[bytes] = []
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:

        async def get() -> None:
            results.append(bytes(await cache.get("frag/00")))

        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(get)
        stats = cache.stats()
    assert results == [fragments["frag/00"]] * 16
    assert len(origin.requests) == 1
    assert stats.fetches == 1
    assert stats.misses == 16


async def test_a_cancelled_waiter_does_not_stop_the_shared_fetch(tmp_path, origin) -> None:
    fragments = make_fragments(1, 100_000)
    origin.files.update(fragments)
    origin.stall = stall = threading.Event()
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.get, "frag/00")
            await anyio.to_thread.run_sync(origin.requested.wait, 10)
            tg.cancel_scope.cancel()
        stall.set()
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
    assert len(origin.requests) == 1


async def test_corrupt_origin_raises_integrity_error_and_keeps_nothing(tmp_path, origin) -> None:
    fragments = make_fragments(1, 200_000)
    origin.files.update(fragments)
    origin.corrupt = True
    config = make_config(tmp_path, fragments, cdn_url=origin.url, integrity_retries=1)
    async with FragmentCache(config) as cache:
        with pytest.raises(IntegrityError):
            await cache.get("frag/00")
        stats = cache.stats()
    assert stats.integrity_failures == 2  # the first body and its one re-fetch
    assert stats.bytes_held[CacheTier.RAM] == stats.bytes_held[CacheTier.NVME] == 0
    assert list((tmp_path / "cache" / "fragments").iterdir()) == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


async def test_truncated_body_is_resumed_with_a_range_request(tmp_path, origin) -> None:
    fragments = make_fragments(1, 3 * MiB)
    origin.files.update(fragments)
    origin.truncate_after, origin.truncate_times = 1 * MiB + 123, 1
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
        data = await cache.get("frag/00")
        stats = cache.stats()
    assert bytes(data) == fragments["frag/00"]
    ranges = [(r, s) for _, r, s in origin.requests]
    assert ranges[0] == (None, 200)
    assert ranges[1][1] == 206
    assert ranges[1][0] is not None and ranges[1][0].startswith("bytes=")
    resumed_at = int(ranges[1][0].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 1 * MiB + 123
    assert stats.fetch_retries == 1
    assert stats.bytes_read[CacheTier.CDN] < 2 * 3 * MiB


async def test_server_answering_200_to_range_restarts_from_zero(tmp_path, origin) -> None:
    fragments = make_fragments(1, 3 * MiB)
    origin.files.update(fragments)
    origin.truncate_after, origin.truncate_times = 2 * MiB, 1
    origin.ignore_range = True
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
        data = await cache.get("frag/00")
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(fragments["frag/00"]).hexdigest()
    assert [s for _, _, s in origin.requests] == [200, 200]
    assert origin.requests[1][1] is not None  # a Range was asked, a 200 came back


async def test_origin_down_raises_fragment_unavailable(tmp_path, origin) -> None:
    fragments = make_fragments(1, 1000)
    origin.down()
    config = make_config(tmp_path, fragments, cdn_url=origin.url, fetch_retries=3)
    async with FragmentCache(config) as cache:
        with pytest.raises(FragmentUnavailable):
            await cache.get("frag/00")
        assert cache.stats().fetch_retries == 3


async def test_server_errors_are_retried_then_given_up(tmp_path, origin) -> None:
    fragments = make_fragments(1, 1000)
    origin.files.update(fragments)
    origin.status = 500
    config = make_config(tmp_path, fragments, cdn_url=origin.url, fetch_retries=2)
    async with FragmentCache(config) as cache:
        with pytest.raises(FragmentUnavailable):
            await cache.get("frag/00")
        assert len(origin.requests) == 3
        origin.status = None  # the origin recovers: the next get fetches it
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]


async def test_not_found_is_not_retried(tmp_path, origin) -> None:
    fragments = make_fragments(1, 1000)
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
        with pytest.raises(FragmentUnavailable, match="404"):
            await cache.get("frag/00")
    assert len(origin.requests) == 1


async def test_body_longer_than_the_manifest_is_refused(tmp_path, origin) -> None:
    fragments = make_fragments(1, 50_000)
    origin.files.update(fragments)
    origin.extra_bytes = 10
    config = make_config(tmp_path, fragments, cdn_url=origin.url, integrity_retries=0)
    async with FragmentCache(config) as cache:
        with pytest.raises(IntegrityError):
            await cache.get("frag/00")
        assert cache.stats().integrity_failures == 1
    assert list((tmp_path / "cache" / "fragments").iterdir()) == []


async def test_fragment_paths_are_url_quoted(tmp_path, origin) -> None:
    data = b"weights" * 100
    origin.files["models/unet block #3.bin"] = data
    config = make_config(
        tmp_path,
        {"unet/3": data},
        cdn_url=origin.url,
        manifest={
            "fragments": {
                "unet/3": {
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "path": "models/unet block #3.bin",
                }
            }
        },
    )
    async with FragmentCache(config) as cache:
        assert bytes(await cache.get("unet/3")) == data


async def test_progress_reports_bytes_done_up_to_the_total(tmp_path, origin) -> None:
    fragments = make_fragments(1, 5 * MiB)
    origin.files.update(fragments)
    seen: list[tuple[int, int]] = []
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
        await cache.get("frag/00", progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (5 * MiB, 5 * MiB)
    assert len(seen) > 2
    assert all(total == 5 * MiB and 0 <= done <= total for done, total in seen)


async def test_a_failing_disk_write_ends_the_get_cleanly(tmp_path, origin, monkeypatch) -> None:
    import errno

    from arbiter.cache._sink import DownloadSink

    fragments = make_fragments(1, 3 * MiB)
    origin.files.update(fragments)

    def full_disk(self: DownloadSink, chunks: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DownloadSink, "write", full_disk)
    async with FragmentCache(make_config(tmp_path, fragments, cdn_url=origin.url)) as cache:
        with pytest.raises(FragmentUnavailable, match="No space left"):
            await cache.get("frag/00")
        monkeypatch.undo()
        assert bytes(await cache.get("frag/00")) == fragments["frag/00"]
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


class _RecordingBackend(httpcore.AsyncNetworkBackend):
    """anyio's network backend, recording how many bytes each read asks for."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.asked: list[int] = []

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        stream = await self.inner.connect_tcp(host, port, timeout, local_address, socket_options)
        backend = self

        class Recording(httpcore.AsyncNetworkStream):
            async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
                backend.asked.append(max_bytes)
                return await stream.read(max_bytes, timeout)

            async def write(self, buffer: bytes, timeout: float | None = None) -> None:
                await stream.write(buffer, timeout)

            async def aclose(self) -> None:
                await stream.aclose()

        return Recording()


async def test_the_cache_client_reads_plain_http_in_wide_pieces(
    tmp_path, origin: OriginServer
) -> None:
    # httpcore asks for 64 KiB per read; each read costs the event loop a trip through
    # httpcore, h11 and httpx, so the cache's client asks for WIDE_READ.
    fragments = make_fragments(1, 3 * MiB)
    origin.files.update(fragments)
    backend = _RecordingBackend()
    config = make_config(tmp_path, fragments, cdn_url=origin.url)
    async with new_client(config, network_backend=backend) as client:
        response = await client.get(f"{origin.url}frag/00")
    assert response.content == fragments["frag/00"]
    assert backend.asked and set(backend.asked) == {WIDE_READ}
