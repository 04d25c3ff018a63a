"""S3-FIFO eviction, accounted in bytes, with pins. Synchronous: sizes in, victims out.

S3-FIFO (Yang et al., SOSP 2023) keeps a small FIFO queue that new entries enter, a
main FIFO queue for entries that proved themselves, and a ghost list of ids recently
evicted from the small queue. A scan passes through the small queue once and leaves,
so it cannot flush the main queue: that is what makes the policy scan-resistant.

Here every queue is accounted in bytes (entries are fragments of very different
sizes), and pinned entries are skipped by eviction: in the small queue they are moved
to the main queue, in the main queue they go round again without losing frequency.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["S3FifoPolicy"]

_SMALL, _MAIN = 0, 1


class _Entry:
    __slots__ = ("freq", "pins", "queue", "size")

    def __init__(self, size: int, queue: int) -> None:
        self.size = size
        self.queue = queue
        self.freq = 0
        self.pins = 0


class S3FifoPolicy:
    """Decides which keys a tier of ``capacity`` bytes keeps.

    Args:
        capacity: bytes the tier may hold.
        small_share: the small queue's share of ``capacity``, in (0, 1).
        ghost_share: bytes of evicted keys remembered, as a share of ``capacity``.
        max_frequency: cap on the hits an entry can bank.
    """

    __slots__ = (
        "_capacity",
        "_entries",
        "_ghost",
        "_ghost_bytes",
        "_ghost_share",
        "_held",
        "_main",
        "_main_unpinned",
        "_max_frequency",
        "_pinned_bytes",
        "_small",
        "_small_bytes",
        "_small_share",
    )

    def __init__(
        self,
        capacity: int,
        *,
        small_share: float = 0.1,
        ghost_share: float = 0.9,
        max_frequency: int = 3,
    ) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 bytes, got {capacity!r}")
        self._capacity = capacity
        self._small_share = small_share
        self._ghost_share = ghost_share
        self._max_frequency = max_frequency
        self._entries: dict[str, _Entry] = {}
        # Oldest first: eviction looks at the front, insertion appends.
        self._small: OrderedDict[str, None] = OrderedDict()
        self._main: OrderedDict[str, None] = OrderedDict()
        self._ghost: OrderedDict[str, int] = OrderedDict()
        self._held = 0
        self._small_bytes = 0
        self._ghost_bytes = 0
        self._pinned_bytes = 0
        # Invariant: _main_unpinned == number of entries in _main with pins == 0.
        self._main_unpinned = 0

    @property
    def capacity(self) -> int:
        """Bytes the tier may hold."""
        return self._capacity

    @property
    def bytes_held(self) -> int:
        """Bytes of the entries held now (never above ``capacity`` but for pinned bytes)."""
        return self._held

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the entries that are pinned."""
        return self._pinned_bytes

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """The keys held, in no particular order."""
        return list(self._entries)

    def touch(self, key: str) -> bool:
        """Record a hit on ``key``; returns whether it is held."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        entry.freq = min(entry.freq + 1, self._max_frequency)
        return True

    def fits(self, size: int) -> bool:
        """Whether an entry of ``size`` bytes could be admitted now (pins considered)."""
        return size <= self._capacity - self._pinned_bytes

    def admit(self, key: str, size: int) -> list[str] | None:
        """Insert ``key``; returns the keys evicted to make room, or ``None`` when it
        cannot fit (larger than the capacity left beside pinned entries): nothing changes then.
        An entry already held counts as a hit and evicts nothing."""
        if size < 0:
            raise ValueError(f"size must be >= 0 bytes, got {size!r}")
        if self.touch(key):
            return []
        if not self.fits(size):
            return None
        evicted = self._evict_until(self._capacity - size)
        ghost_size = self._ghost.pop(key, None)
        if ghost_size is not None:
            self._ghost_bytes -= ghost_size
            self._entries[key] = _Entry(size, _MAIN)
            self._main[key] = None
            self._main_unpinned += 1
        else:
            self._entries[key] = _Entry(size, _SMALL)
            self._small[key] = None
            self._small_bytes += size
        self._held += size
        return evicted

    def remove(self, key: str) -> bool:
        """Drop ``key`` whether pinned or not (its copy is gone); returns whether it was held."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._unlink(key, entry)
        return True

    def resize(self, capacity: int) -> list[str]:
        """Set a new capacity; returns the keys evicted to fit it (pinned ones stay)."""
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 bytes, got {capacity!r}")
        self._capacity = capacity
        evicted = self._evict_until(capacity)
        self._trim_ghost()
        return evicted

    def evict_until(self, limit: int) -> list[str]:
        """Evict entries (pinned ones stay) until at most ``limit`` bytes are held, as an
        admission would; the capacity stays. Returns the keys evicted."""
        return self._evict_until(limit)

    def pin(self, key: str) -> None:
        """Protect ``key`` from eviction until a matching `unpin` (``KeyError`` if not held)."""
        entry = self._entries[key]
        if entry.pins == 0:
            self._pinned_bytes += entry.size
            if entry.queue == _MAIN:
                self._main_unpinned -= 1
        entry.pins += 1

    def unpin(self, key: str) -> None:
        """Undo one `pin`; a key no longer held is ignored."""
        entry = self._entries.get(key)
        if entry is None or entry.pins == 0:
            return
        entry.pins -= 1
        if entry.pins == 0:
            self._pinned_bytes -= entry.size
            if entry.queue == _MAIN:
                self._main_unpinned += 1

    def _unlink(self, key: str, entry: _Entry) -> None:
        self._held -= entry.size
        if entry.pins:
            self._pinned_bytes -= entry.size
        if entry.queue == _SMALL:
            del self._small[key]
            self._small_bytes -= entry.size
        else:
            del self._main[key]
            if not entry.pins:
                self._main_unpinned -= 1

    def _evict_until(self, limit: int) -> list[str]:
        evicted: list[str] = []
        # Terminates: every round evicts one unpinned entry, and the loop stops once only
        # pinned bytes are left (they may exceed a shrunken capacity).
        while self._held > limit and self._held > self._pinned_bytes:
            evicted.append(self._evict_one())
        return evicted

    def _evict_one(self) -> str:
        small_target = self._small_share * self._capacity
        order: tuple[int, ...]
        if self._small and self._small_bytes >= small_target:
            order = (_SMALL, _MAIN)
        else:
            order = (_MAIN, _SMALL, _MAIN)
        for queue in order:
            victim = self._evict_small() if queue == _SMALL else self._evict_main()
            if victim is not None:
                return victim
        raise AssertionError("an unpinned entry must exist when held bytes exceed pinned bytes")

    def _evict_small(self) -> str | None:
        while self._small:
            key = next(iter(self._small))
            entry = self._entries[key]
            del self._small[key]
            self._small_bytes -= entry.size
            if entry.pins or entry.freq > 0:
                # Re-used (or in use) while on probation: it earned a place in main.
                entry.queue = _MAIN
                self._main[key] = None
                if not entry.pins:
                    self._main_unpinned += 1
                continue
            del self._entries[key]
            self._held -= entry.size
            self._ghost[key] = entry.size
            self._ghost_bytes += entry.size
            self._trim_ghost()
            return key
        return None

    def _evict_main(self) -> str | None:
        while self._main_unpinned:
            key = next(iter(self._main))
            entry = self._entries[key]
            if entry.pins or entry.freq > 0:
                if not entry.pins:
                    entry.freq -= 1
                self._main.move_to_end(key)
                continue
            del self._main[key]
            del self._entries[key]
            self._main_unpinned -= 1
            self._held -= entry.size
            return key
        return None

    def _trim_ghost(self) -> None:
        limit = self._ghost_share * self._capacity
        while self._ghost and self._ghost_bytes > limit:
            _, size = self._ghost.popitem(last=False)
            self._ghost_bytes -= size
