"""The fast checksum recorded next to each disk-tier fragment when it was verified on entry.

sha256 is the check of what enters the cache (from the CDN or ``source_dir``); it runs
at about 1 GB/s per core, slower than an NVMe drive or the page cache delivers. A
fragment verified with sha256 gets an xxh3-128 checksum recorded beside it (xxh3 runs
at over 10 GB/s per core and lets go of the GIL, so it hides behind the reads), and a
later read of the disk copy is checked against that record.

xxh3-128 rather than BLAKE3: the record guards against a damaged disk, not an
adversary (sha256 keeps that role at the door), and on a machine of few cores a
single-threaded hash at memory speed beats a multi-threaded one that competes with
the reader threads for the same cores.

A record is one line, ``xxh3-128 <32 hex> size <int> sha256 <64 hex>``: it names the
manifest entry it was made for, so a record left from an older manifest entry (or from
another fragment's file) never vouches for the wrong bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import xxhash

__all__ = ["RECORD_MAX_SIZE", "ChecksumRecord", "Hasher", "fast_hasher"]

_RECORD = re.compile(r"xxh3-128 ([0-9a-f]{32}) size (\d{1,20}) sha256 ([0-9a-f]{64})\n")
# A valid record is about 130 bytes; reading more than this tells a corrupt one.
RECORD_MAX_SIZE = 256


class Hasher(Protocol):
    """What hashlib's and xxhash's hash objects have in common."""

    def update(self, data: Any, /) -> None: ...

    def hexdigest(self) -> str: ...


def fast_hasher() -> Hasher:
    """A fresh xxh3-128 hash (lets go of the GIL on large updates)."""
    return xxhash.xxh3_128()


@dataclass(frozen=True, slots=True)
class ChecksumRecord:
    """A fragment file's xxh3-128 and the manifest entry (size, sha256) it was verified for."""

    xxh3: str
    size: int
    sha256: str

    def encode(self) -> bytes:
        """The record's one line, as stored."""
        return f"xxh3-128 {self.xxh3} size {self.size} sha256 {self.sha256}\n".encode("ascii")

    @classmethod
    def decode(cls, raw: bytes) -> ChecksumRecord | None:
        """The record stored as ``raw``, or ``None`` when it is damaged."""
        try:
            match = _RECORD.fullmatch(raw.decode("ascii"))
        except UnicodeDecodeError:
            return None
        if match is None:
            return None
        return cls(match[1], int(match[2]), match[3])

    def vouches_for(self, size: int, sha256: str) -> bool:
        """Whether this record was made for the manifest entry ``size``, ``sha256``."""
        return self.size == size and self.sha256 == sha256
