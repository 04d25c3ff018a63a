"""Loader: brings one fragment up from below RAM, for a `Flight`.

It tries the disk tier, then ``source_dir`` (a local model folder, read in place and
counted as NVME), then the CDN. A copy that fails verification is counted, dropped if
it is the cache's own, and the next source is tried; only when no source is left does
the load fail, with `IntegrityError` if a copy was found corrupt, else
`FragmentUnavailable`.
"""

from __future__ import annotations

import anyio
import anyio.to_thread

from .._errors import FragmentUnavailable, IntegrityError
from .._log import log, note
from .._types import format_bytes
from ._buffer import Buffer, FragmentBuffer
from ._config import CacheConfig
from ._disk import CorruptFragment, LocalFile, read_verified
from ._flight import Flight
from ._http import CdnFetcher
from ._manifest import FragmentInfo, disk_name
from ._record import ChecksumRecord
from ._sink import DiskUnwritable, DownloadSink
from ._stats import CacheStatsRecorder, CacheTier
from ._tiers import DiskTier

__all__ = ["Loader"]


class Loader:
    """Loads fragments for flights; origin loads (``source_dir``, CDN) share one limit.

    Args:
        config: the cache's config.
        disk: the disk tier (read first, filled by downloads).
        stats: where reads and integrity failures are counted.
        fetcher: the CDN fetcher, or ``None`` without a ``cdn_url``.
    """

    __slots__ = ("_config", "_disk", "_fetcher", "_limiter", "_stats")

    def __init__(
        self,
        config: CacheConfig,
        disk: DiskTier,
        stats: CacheStatsRecorder,
        fetcher: CdnFetcher | None,
    ) -> None:
        self._config = config
        self._disk = disk
        self._stats = stats
        self._fetcher = fetcher
        self._limiter = anyio.CapacityLimiter(config.max_concurrent_fetches)

    async def load(self, flight: Flight) -> tuple[Buffer | None, CacheTier]:
        """The fragment's verified bytes (``None`` when ``flight`` does not want them) and the
        tier they came from: the disk tier, then ``source_dir``, then the CDN.

        Raises:
            IntegrityError: every copy found failed verification.
            FragmentUnavailable: nothing holds it, or the CDN could not deliver it.
        """
        info, config = flight.info, self._config
        corrupt = False
        if self._disk.holds(info.id):
            await self._disk.wait_committed(info.id)
        if self._disk.holds(info.id):
            if not flight.want_data:
                return None, CacheTier.NVME
            try:
                data = await self._read_local(self._disk_file(info), flight)
            except CorruptFragment as exc:
                corrupt = True
                self._stats.integrity_failures += 1
                log.warning(
                    "disk copy failed verification; dropped", fragment=info.id, error=str(exc)
                )
                await self._disk.forget(info.id)
            except OSError as exc:
                log.warning("disk copy unreadable; dropped", fragment=info.id, error=repr(exc))
                await self._disk.forget(info.id)
            else:
                self._disk.policy.touch(info.id)
                return data, CacheTier.NVME
            flight.rewind()
        if config.source_root is not None:
            path = info.source_file(config.source_root)
            if not flight.want_data and await anyio.Path(path).is_file():
                return None, CacheTier.NVME  # a local model folder is the NVME tier already
            try:
                async with self._limiter:
                    data = await self._read_local(LocalFile(path, info.size, info.sha256), flight)
            except CorruptFragment as exc:
                corrupt = True
                self._stats.integrity_failures += 1
                log.warning("source copy failed verification", fragment=info.id, error=str(exc))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("source copy unreadable", fragment=info.id, error=repr(exc))
            else:
                return data, CacheTier.NVME
            flight.rewind()
        if self._fetcher is not None and config.cdn_url is not None:
            async with self._limiter:
                return await self._download(info, flight), CacheTier.CDN
        if corrupt:
            raise IntegrityError(f"fragment {info.id!r}: every copy failed verification")
        raise FragmentUnavailable(f"fragment {info.id!r}: no tier or origin holds it")

    def _disk_file(self, info: FragmentInfo) -> LocalFile:
        layout, name = self._disk.layout, disk_name(info.id)

        def record(xxh3: str) -> None:
            layout.write_record(name, ChecksumRecord(xxh3, info.size, info.sha256))

        return LocalFile(
            layout.path(name),
            info.size,
            info.sha256,
            record=layout.record_path(name),
            on_recorded=record,
        )

    async def _read_local(self, file: LocalFile, flight: Flight) -> Buffer:
        data = await read_verified(
            file,
            chunk_size=self._config.read_chunk_size,
            parallelism=self._config.read_parallelism,
            progress=flight.advance if flight.watched else None,
        )
        self._stats.bytes_read[CacheTier.NVME] += file.size
        return data

    async def _download(self, info: FragmentInfo, flight: Flight) -> Buffer | None:
        assert self._fetcher is not None and self._config.cdn_url is not None
        to_disk = self._disk.takes(info.size)
        if not to_disk and not flight.want_data:
            note("fragment too large for the disk tier; not prefetched", fragment=info.id)
            return None
        # Creating the buffer touches no memory yet: fine on the loop.
        buffer = FragmentBuffer(info.size) if flight.want_data else None
        sink = DownloadSink(
            info,
            buffer=buffer,
            layout=self._disk.layout if to_disk else None,
            writeback_step=self._config.writeback_step,
        )
        handed_over = False
        try:
            try:
                free = await anyio.to_thread.run_sync(sink.open)
                if free is not None and not await self._disk.make_room(info.size, free):
                    reason = f"{format_bytes(free)} free on the file system"
                    await anyio.to_thread.run_sync(sink.give_up_disk, reason)
                if sink.disk_refused is not None and not flight.want_data:
                    raise DiskUnwritable(sink.disk_refused)
                await self._fetcher.fetch(info.url(self._config.cdn_url), sink, flight.advance)
            except DiskUnwritable:
                assert sink.disk_refused is not None
                self._disk.refused(info.id, sink.disk_refused)
                return None  # a disk-only prefetch, and the disk tier cannot take it
            if sink.disk_refused is not None:
                self._disk.refused(info.id, sink.disk_refused)
            data = sink.result()  # before the sink is handed over
            handed_over = sink.to_disk and self._disk.admit_download(info, sink)
            return data
        finally:
            if not handed_over:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(sink.discard)
