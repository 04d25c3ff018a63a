"""The RAM and disk tiers: an S3-FIFO policy each, and what the policy's choices mean.

RAM keeps the frozen bytes-like objects themselves. The disk tier keeps files named
by a hash of the fragment id (see `DiskLayout`). A download is accounted when it is
verified and committed (fsync, replace) in the background; a read of its file waits
for that commit. An evicted file is unlinked in a worker thread, after its commit if
one is pending, and a new copy of the same fragment waits for that unlink before it
replaces the file, so an old unlink can never remove a new copy.
"""

from __future__ import annotations

import anyio
import anyio.abc
import anyio.to_thread

from .._log import log, note
from ._buffer import Buffer, Reaper
from ._config import CacheConfig
from ._disk import DiskLayout
from ._manifest import FragmentInfo, Manifest, disk_name
from ._s3fifo import S3FifoPolicy
from ._sink import DownloadSink
from ._stats import CacheStatsRecorder

__all__ = ["DiskTier", "RamTier", "new_policy"]


def new_policy(capacity: int, config: CacheConfig) -> S3FifoPolicy:
    """An S3-FIFO policy of ``capacity`` bytes with the config's queue shares."""
    return S3FifoPolicy(
        capacity,
        small_share=config.small_queue_share,
        ghost_share=config.ghost_share,
        max_frequency=config.max_frequency,
    )


class RamTier:
    """Verified fragments in host memory, at most ``capacity`` bytes (pins included)."""

    __slots__ = ("_data", "_reaper", "_stats", "policy")

    def __init__(
        self, capacity: int, config: CacheConfig, stats: CacheStatsRecorder, reaper: Reaper
    ) -> None:
        self.policy = new_policy(capacity, config)
        self._data: dict[str, Buffer] = {}
        self._stats = stats
        self._reaper = reaper

    def get(self, fragment_id: str, *, touch: bool) -> Buffer | None:
        """The fragment's bytes, or ``None``; ``touch`` counts a hit for eviction."""
        data = self._data.get(fragment_id)
        if data is not None and touch:
            self.policy.touch(fragment_id)
        return data

    def admit(self, info: FragmentInfo, data: Buffer) -> bool:
        """Keep ``data``, evicting colder fragments; False when it cannot fit (it bypasses RAM)."""
        if info.id in self._data:
            return True
        evicted = self.policy.admit(info.id, info.size)
        if evicted is None:
            return False
        self._stats.evictions += len(evicted)
        self._reaper.bury([self._data.pop(victim) for victim in evicted])
        self._data[info.id] = data
        return True

    def clear(self) -> None:
        """Let go of every fragment (the cache is closing)."""
        self._reaper.bury(list(self._data.values()))
        self._data.clear()


class DiskTier:
    """Verified fragment files under ``disk_path``, at most ``capacity`` bytes."""

    __slots__ = (
        "_capacity",
        "_committing",
        "_full",
        "_stats",
        "_tg",
        "_unlinking",
        "layout",
        "policy",
    )

    def __init__(self, config: CacheConfig, stats: CacheStatsRecorder) -> None:
        self._capacity = config.disk_capacity
        self.policy = new_policy(config.disk_capacity, config)
        self.layout = DiskLayout(config.disk_root)
        self._stats = stats
        self._unlinking: dict[str, anyio.Event] = {}
        self._committing: dict[str, anyio.Event] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._full = False

    def refused(self, fragment_id: str, reason: str) -> None:
        """A fragment could not be written to disk (no room): it goes through RAM only.
        The first refusal logs a warning; the next ones are quiet until a write succeeds."""
        if not self._full:
            self._full = True
            log.warning(
                "disk tier cannot write; fragments bypass it until it can",
                fragment=fragment_id,
                reason=reason,
                path=str(self.layout.root),
            )
        else:
            note("disk tier still cannot write", fragment=fragment_id, reason=reason)

    async def open(self, manifest: Manifest, tg: anyio.abc.TaskGroup) -> None:
        """Create the folders, clean leftover temp files, and take in the fragment files
        (oldest first). A file of the wrong size, one that no longer fits, anything that
        is not a regular file at a fragment's path, and a checksum record without its
        fragment are removed; what belongs to no id of ``manifest`` is left alone."""
        scan = await anyio.to_thread.run_sync(self.layout.prepare)
        stale = [name for name in scan.others if manifest.id_for_disk_name(name) is not None]
        kept = set()
        for file in sorted(scan.files, key=lambda f: f.mtime):
            fragment_id = manifest.id_for_disk_name(file.name)
            if fragment_id is None:
                continue
            if file.size != manifest[fragment_id].size:
                stale.append(file.name)
                continue
            evicted = self.policy.admit(fragment_id, file.size)
            if evicted is None:
                stale.append(file.name)
            else:
                kept.add(file.name)
                stale.extend(disk_name(victim) for victim in evicted)
                kept.difference_update(disk_name(victim) for victim in evicted)
        stale.extend(
            name
            for name in scan.records - kept
            if manifest.id_for_disk_name(name) is not None and name not in stale
        )
        for name in stale:
            await anyio.to_thread.run_sync(self.layout.remove, name)
        self._tg = tg

    def holds(self, fragment_id: str) -> bool:
        """Whether the disk tier has a verified file of the fragment."""
        return fragment_id in self.policy

    def takes(self, size: int) -> bool:
        """Whether a fragment of ``size`` bytes may go to disk (else it bypasses the tier),
        as far as ``disk_capacity`` goes (see `make_room` for the file system)."""
        return 0 < self._capacity and size <= self._capacity

    async def make_room(self, size: int, free: int) -> bool:
        """Before a download of ``size`` bytes is written: fit the tier to the file system,
        which has ``free`` bytes free, and evict (unlink) colder fragments until the bytes
        fit on it. The tier holds at most what it holds now plus what is free (never more
        than ``disk_capacity``); the bound is taken anew at every download, so the tier
        grows back when space is freed. False when the bytes cannot fit."""
        room = min(self._capacity, self.policy.bytes_held + max(0, free))
        if room != self.policy.capacity:
            self.policy.resize(room)  # evicts nothing: room >= bytes held
        if size > room:
            return False
        # The bytes are written before they are admitted: the room is made first.
        evicted = self.policy.evict_until(room - size)
        self._stats.evictions += len(evicted)
        waits = [victim for victim in evicted if victim not in self._committing]
        for victim in evicted:
            self._unlink_later(victim)  # after its commit, when one is pending
        for victim in waits:
            # A victim still committing frees its space after the commit (the download
            # must not wait for that fsync; a disk still full then falls back to RAM).
            await self.wait_unlinked(victim)
        return True

    async def wait_unlinked(self, fragment_id: str) -> None:
        """Return once no unlink of an older copy of the fragment is pending."""
        pending = self._unlinking.get(fragment_id)
        if pending is not None:
            await pending.wait()

    async def wait_committed(self, fragment_id: str) -> None:
        """Return once the fragment's file is in place (or its commit failed)."""
        pending = self._committing.get(fragment_id)
        if pending is not None:
            await pending.wait()

    def admit_download(self, info: FragmentInfo, sink: DownloadSink) -> bool:
        """Account a verified download, evicting (unlinking) colder fragments, and commit
        its temp file in the background: the get that downloaded it has its bytes and
        need not wait for the fsync. Reads of the file wait for the commit. Takes the
        sink over (it is discarded once committed); False when the tier has no room (the
        sink stays the caller's)."""
        evicted = self.policy.admit(info.id, info.size)
        if evicted is None:
            return False
        self._stats.evictions += len(evicted)
        for victim in evicted:
            self._unlink_later(victim)
        done = anyio.Event()
        self._committing[info.id] = done
        assert self._tg is not None, "DiskTier.admit_download() before open()"
        self._tg.start_soon(self._commit, info, sink, done)
        return True

    async def _commit(self, info: FragmentInfo, sink: DownloadSink, done: anyio.Event) -> None:
        # Shielded: closing the cache waits for the fsync rather than lose the download.
        with anyio.CancelScope(shield=True):
            try:
                await self.wait_unlinked(info.id)  # an old unlink must not hit the new copy
                if await anyio.to_thread.run_sync(sink.commit):
                    self._full = False
                else:
                    self.policy.remove(info.id)
                    self.refused(info.id, sink.disk_refused or "the commit failed")
            except Exception as exc:  # the bytes were served; only the disk copy is lost
                self.policy.remove(info.id)
                log.warning("disk tier commit failed", fragment=info.id, error=repr(exc))
            finally:
                await anyio.to_thread.run_sync(sink.discard)
                if self._committing.get(info.id) is done:
                    del self._committing[info.id]
                done.set()

    async def forget(self, fragment_id: str) -> None:
        """Drop a copy that failed verification or vanished, and its file."""
        self.policy.remove(fragment_id)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.layout.remove, disk_name(fragment_id))

    def _unlink_later(self, fragment_id: str) -> None:
        done = anyio.Event()
        self._unlinking[fragment_id] = done
        # The commit pending now, if any: a later copy's commit waits for this unlink.
        committed = self._committing.get(fragment_id)
        assert self._tg is not None, "DiskTier used before open()"
        self._tg.start_soon(self._unlink, fragment_id, done, committed)

    async def _unlink(
        self, fragment_id: str, done: anyio.Event, committed: anyio.Event | None
    ) -> None:
        try:
            with anyio.CancelScope(shield=True):
                if committed is not None:
                    await committed.wait()  # else the commit would put the file back after
                await anyio.to_thread.run_sync(self.layout.remove, disk_name(fragment_id))
        finally:
            if self._unlinking.get(fragment_id) is done:
                del self._unlinking[fragment_id]
            done.set()
