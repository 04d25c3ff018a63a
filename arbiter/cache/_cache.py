"""FragmentCache: the async shell that ties the tiers, the origins and the flights together.

Lookups and admissions are synchronous (the S3-FIFO policies decide); only reads,
downloads, unlinks and charges wait. A get looks in RAM, then joins or starts the
fragment's flight, which tries the disk tier, then ``source_dir``, then the CDN.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread
import httpx

from .._config import ArbiterConfig
from .._errors import FragmentError, FragmentUnavailable
from .._log import log
from ._buffer import Buffer, Reaper
from ._client import new_client
from ._config import CacheConfig
from ._flight import Flight, ProgressCallback, ProgressTracker
from ._http import CdnFetcher
from ._loader import Loader
from ._manifest import FragmentInfo, Manifest
from ._stats import CacheStats, CacheStatsRecorder, CacheTier
from ._tiers import DiskTier, RamTier
from ._vram import VramTier

if TYPE_CHECKING:
    from .._arbiter import Arbiter

__all__ = ["FragmentCache"]


# A tier by its lower-case name, as the other enums take theirs.
_TIERS_BY_NAME = {t.name.lower(): t for t in CacheTier}


def _check_tier(tier: object) -> CacheTier:
    if isinstance(tier, str):
        if tier not in _TIERS_BY_NAME:
            choices = ", ".join(_TIERS_BY_NAME)
            raise ValueError(f"tier must be one of {choices}, got {tier!r}")
        tier = _TIERS_BY_NAME[tier]
    if not isinstance(tier, CacheTier):
        raise TypeError(f"tier must be a CacheTier, got {tier!r}")
    if tier is CacheTier.CDN:
        raise ValueError("tier must be VRAM, RAM or NVME (the CDN is an origin, not a target)")
    return tier


class FragmentCache:
    """Model-weight fragments in tiers VRAM <- RAM <- NVME <- CDN, verified, shared.

    Use it as an async context manager: entering cleans leftover temp files, scans the
    disk tier and opens the HTTP client; leaving closes them and releases the VRAM charge.

    Args:
        config: a `CacheConfig`; its manifest is loaded and validated here.
        arbiter: the `Arbiter` that charges the VRAM tier; without one there is no VRAM tier.

    Raises:
        TypeError, ValueError: a bad config or manifest (an unsafe path among them).
        OSError: the manifest file cannot be read.
    """

    __slots__ = (
        "_arbiter",
        "_client",
        "_config",
        "_disk",
        "_flights",
        "_loader",
        "_manifest",
        "_ram",
        "_reaper",
        "_state",
        "_stats",
        "_tg",
        "_vram",
    )

    def __init__(self, config: CacheConfig, arbiter: Arbiter | None = None) -> None:
        if not isinstance(config, CacheConfig):
            raise TypeError(f"config must be a CacheConfig, got {config!r}")
        if arbiter is not None and not isinstance(getattr(arbiter, "config", None), ArbiterConfig):
            raise TypeError(f"arbiter must be None, an Arbiter or a RemoteArbiter, got {arbiter!r}")
        self._config = config
        self._arbiter = arbiter
        self._manifest = Manifest.load(config.manifest)
        ram_capacity = config.ram_capacity
        if ram_capacity is None:
            ram_capacity = (arbiter.config if arbiter is not None else ArbiterConfig()).ram_budget
        self._stats = CacheStatsRecorder(config.latency_window)
        self._reaper = Reaper()
        self._ram = RamTier(ram_capacity, config, self._stats, self._reaper)
        self._disk = DiskTier(config, self._stats)
        self._vram = (
            VramTier(arbiter, config, self._stats, self._reaper) if arbiter is not None else None
        )
        self._flights: dict[str, Flight] = {}
        self._client: httpx.AsyncClient | None = None
        self._loader: Loader | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._state = "new"

    @property
    def config(self) -> CacheConfig:
        """The cache's configuration."""
        return self._config

    @property
    def manifest(self) -> Manifest:
        """The validated manifest (a mapping of id to `FragmentInfo`)."""
        return self._manifest

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> FragmentCache:
        if self._state != "new":
            raise RuntimeError("a FragmentCache can be opened once")
        self._state = "opening"
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._reaper.attach(self._tg)
        fetcher = None
        try:
            await self._disk.open(self._manifest, self._tg)
            if self._vram is not None:
                await self._vram.open(self._tg)
            if self._config.cdn_url is not None:
                # Building a client loads the TLS trust store: tens of ms, not on the loop.
                self._client = await anyio.to_thread.run_sync(new_client, self._config)
                fetcher = CdnFetcher(self._client, self._config, self._stats)
        except BaseException:
            self._state = "closed"
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            self._reaper.attach(None)
            raise
        self._loader = Loader(self._config, self._disk, self._stats, fetcher)
        self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every load (their waiters get `FragmentUnavailable`), release the VRAM
        charge, close the HTTP client. Idempotent."""
        if self._state in ("closed", "new"):
            self._state = "closed"
            return
        self._state = "closed"
        try:
            # Buried in the task group, so that its exit waits for the buffers to be dropped.
            if self._vram is not None:
                self._vram.close()
            self._ram.clear()
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
                await self._tg.__aexit__(None, None, None)
        finally:
            self._reaper.attach(None)
            if self._client is not None:
                with anyio.CancelScope(shield=True):
                    await self._client.aclose()

    def _require_open(self) -> anyio.abc.TaskGroup:
        if self._state != "open" or self._tg is None:
            raise RuntimeError("the FragmentCache is not open: use `async with cache:`")
        return self._tg

    # -- public API ------------------------------------------------------------------

    async def get(
        self,
        fragment_id: str,
        tier: CacheTier | str = CacheTier.RAM,
        *,
        progress: ProgressCallback | None = None,
    ) -> Buffer:
        """The verified bytes of a fragment, from the fastest tier that holds it.

        Args:
            fragment_id: a manifest id.
            tier: the fastest tier to fill on the way up: ``RAM`` (default), ``NVME``
                (leave RAM alone) or ``VRAM`` (also place it on the device when the
                arbiter grants the memory; the get succeeds without it); or its
                lower-case name.
            progress: called as ``progress(bytes_done, bytes_total)``.

        Returns:
            ``bytes`` or a read-only ``memoryview`` of an immutable buffer.

        Raises:
            KeyError: the id is not in the manifest.
            IntegrityError: every copy found failed verification.
            FragmentUnavailable: no tier or origin could deliver it.
        """
        info = self._manifest[fragment_id]
        tier = _check_tier(tier)
        self._require_open()
        tracker = ProgressTracker(progress, info.size)
        data, source = await self._obtain(info, tier, tracker)
        self._stats.served(source)
        tracker.finish()
        return data

    async def prefetch(
        self,
        fragment_ids: Iterable[str],
        tier: CacheTier | str = CacheTier.RAM,
        *,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Bring fragments into ``tier`` (and the tiers between) without counting gets.

        Args:
            fragment_ids: manifest ids (all checked before any work starts).
            tier: ``VRAM``, ``RAM`` or ``NVME`` (or its lower-case name).
            progress: called as ``progress(bytes_done, bytes_total)`` over all of them.

        Raises:
            KeyError: an id is not in the manifest.
            IntegrityError, FragmentUnavailable: the first fragment that failed (the
                others are still brought in).
        """
        if isinstance(fragment_ids, str) or not isinstance(fragment_ids, Iterable):
            raise TypeError(f"fragment_ids must be an iterable of ids, got {fragment_ids!r}")
        infos = list({i: self._manifest[i] for i in fragment_ids}.values())
        tier = _check_tier(tier)
        self._require_open()
        tracker = ProgressTracker(progress, sum(info.size for info in infos))
        failures: list[FragmentError] = []

        async def bring(info: FragmentInfo) -> None:
            try:
                await self._obtain(info, tier, tracker, counted=False)
            except FragmentError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as group:
            for info in infos:
                group.start_soon(bring, info)
        if failures:
            raise failures[0]
        tracker.finish()

    @asynccontextmanager
    async def pin(self, fragment_id: str) -> AsyncIterator[Buffer]:
        """Load a fragment into RAM and keep it there until the block ends; yields its bytes.

        A fragment larger than the RAM tier can take (beside other pinned fragments)
        is yielded all the same, held by the block rather than by the tier.

        Raises:
            KeyError, IntegrityError, FragmentUnavailable: as `get`.
        """
        data = await self.get(fragment_id)
        pinned = self._ram.admit(self._manifest[fragment_id], data)
        if pinned:
            self._ram.policy.pin(fragment_id)
        else:
            log.warning("fragment too large to pin in RAM", fragment=fragment_id)
        try:
            yield data
        finally:
            if pinned:
                self._ram.policy.unpin(fragment_id)

    def device_fragment(self, fragment_id: str) -> Any:
        """The VRAM tier's copy of a fragment (a CUDA tensor, or the stand-in's bytes), or
        ``None``. It may be evicted at any time; the copy stays valid while referenced."""
        self._manifest[fragment_id]
        return self._vram.handle(fragment_id) if self._vram is not None else None

    def stats(self) -> CacheStats:
        """A snapshot of the counters; every dict holds every tier."""
        held = {
            CacheTier.VRAM: self._vram.bytes_held if self._vram is not None else 0,
            CacheTier.RAM: self._ram.policy.bytes_held,
            CacheTier.NVME: self._disk.policy.bytes_held,
        }
        return self._stats.snapshot(held)

    # -- the path of a get -----------------------------------------------------------

    async def _obtain(
        self, info: FragmentInfo, tier: CacheTier, tracker: ProgressTracker, *, counted: bool = True
    ) -> tuple[Buffer, CacheTier]:
        vram = self._vram
        if tier is CacheTier.VRAM and vram is not None and vram.holds(info.id, touch=counted):
            data = self._ram.get(info.id, touch=counted)
            if data is None:
                data = await vram.read_back(info.id)
            if data is not None:
                if counted:
                    self._stats.bytes_read[CacheTier.VRAM] += info.size
                return data, CacheTier.VRAM
        data = self._ram.get(info.id, touch=counted)
        if data is not None:
            if counted:
                self._stats.bytes_read[CacheTier.RAM] += info.size
            source = CacheTier.RAM
        else:
            want_data = counted or tier <= CacheTier.RAM
            fetched, source = await self._load(info, tracker, want_data=want_data)
            if fetched is None:
                return b"", source  # a disk-only prefetch: nobody reads the bytes
            data = fetched
            if tier <= CacheTier.RAM:
                self._ram.admit(info, data)
        if tier is CacheTier.VRAM and vram is not None:
            await vram.place(info.id, data)
        return data, source

    async def _load(
        self, info: FragmentInfo, tracker: ProgressTracker, *, want_data: bool
    ) -> tuple[Buffer | None, CacheTier]:
        """Join or start the fragment's flight and wait for it to land."""
        while True:
            data = self._ram.get(info.id, touch=False)
            if data is not None:
                return data, CacheTier.RAM
            flight = self._flights.get(info.id)
            if flight is None:
                flight = Flight(info, want_data=want_data)
                self._flights[info.id] = flight
                self._require_open().start_soon(self._fly, flight)
            contributed = 0

            def listener(delta: int) -> None:
                nonlocal contributed
                contributed += delta
                tracker.advance(delta)

            if tracker.reports:
                flight.listen(listener)
            try:
                await flight.landed.wait()
            finally:
                flight.unlisten(listener)
            data, source = flight.outcome()
            if data is not None or not want_data:
                return data, source
            tracker.advance(-contributed)  # a disk-only flight landed; now read it back

    async def _fly(self, flight: Flight) -> None:
        start = anyio.current_time()
        try:
            assert self._loader is not None
            flight.data, flight.source = await self._loader.load(flight)
            self._stats.fetches += 1
            self._stats.latencies.append(anyio.current_time() - start)
        except FragmentError as exc:
            flight.error = exc
        except OSError as exc:
            flight.error = FragmentUnavailable(f"fragment {flight.info.id!r}: {exc}")
        except Exception as exc:  # a bug: hand it to the waiters instead of the task group
            flight.error = exc
        finally:
            if flight.source is None and flight.error is None:
                flight.error = FragmentUnavailable(
                    f"fragment {flight.info.id!r}: the cache closed while it was loading"
                )
            if self._flights.get(flight.info.id) is flight:
                del self._flights[flight.info.id]
            flight.landed.set()
