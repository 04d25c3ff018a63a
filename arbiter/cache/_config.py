"""CacheConfig: every number the fragment cache treats as policy, validated once, frozen."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._checks import check_bytes, check_count, check_ratio, check_seconds
from .._types import GiB, KiB, MiB, WorkloadType, coerce_workload

__all__ = ["CacheConfig"]

# Disk reads are issued in chunks of at least this many bytes (small reads waste syscalls).
MIN_READ_CHUNK = 1 * MiB
# Network bytes are handed to the writer thread in batches of at least this many bytes.
MIN_WRITE_CHUNK = 64 * KiB


# The largest number a numeric field takes: what a signed 64-bit file offset holds. A
# larger int cannot be a size or a count the OS could use, and overflows (OverflowError)
# once turned into a float.
MAX_NUMBER = 2**63 - 1
# The longest time a field takes (about 31 years): socket timeouts and the loop's clock
# count nanoseconds in 64 bits and overflow past about 292 years.
MAX_SECONDS = 10**9


def _check_magnitude(name: str, value: object, limit: int, *, floats: bool) -> None:
    """ValueError for a number beyond ``limit`` (named, without printing all its digits);
    a float is looked at only where ``floats`` are taken (elsewhere it is a TypeError)."""
    kinds = (int, float) if floats else (int,)
    if isinstance(value, bool) or not isinstance(value, kinds) or not abs(value) > limit:
        return  # NaN, wrong types and the rest are for the field's own check
    shown = f"an int of {value.bit_length()} bits" if isinstance(value, int) else repr(value)
    sign = "-" if isinstance(value, int) and value < 0 else ""
    bound = "2**63 - 1" if limit == MAX_NUMBER else f"{limit:.0e}"
    raise ValueError(f"{name} must be at most {bound} in size, got {sign}{shown}")


def _check_path(name: str, value: object, *, optional: bool) -> Path | None:
    if value is None and optional:
        return None
    if not isinstance(value, str | os.PathLike) or (isinstance(value, str) and not value):
        kind = "None, " if optional else ""
        raise TypeError(f"{name} must be {kind}a non-empty path, got {value!r}")
    return Path(os.fspath(value)).expanduser()


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """How a `FragmentCache` keeps and fetches fragments. Validated on construction.

    Args:
        manifest: the manifest, as a JSON file path or the same structure as a mapping.
        ram_capacity: bytes of host RAM for the RAM tier; ``None`` takes the arbiter's
            ``ram_budget`` (64 GiB without an arbiter).
        disk_path: folder of the disk (NVME) tier; ``~`` is expanded. Temp files of
            downloads live inside it too.
        disk_capacity: bytes the disk tier may hold; 0 turns the disk tier off.
        cdn_url: ``http(s)`` base URL of the CDN origin, or ``None``.
        source_dir: a local model folder read in place (counted as NVME), or ``None``.
        vram_capacity: most bytes the VRAM tier asks of the arbiter; ``None`` takes half
            the arbiter's ``vram_budget``.
        vram_workload: the workload type the VRAM tier's allocation is charged as.
        vram_grow_timeout: seconds a VRAM charge may wait to grow before the fragment
            is left out of VRAM.
        max_concurrent_fetches: origin fetches (CDN or ``source_dir``) running at once.
        fetch_retries: retries of a broken download after the first try (a try that
            made progress does not use one up).
        integrity_retries: fresh downloads after a body failed verification.
        retry_backoff_base, retry_backoff_cap: seconds; the n-th retry waits up to
            ``min(cap, base * 2**n)``.
        retry_jitter: share of that wait drawn at random, in [0, 1].
        http_timeout: seconds of network silence before a try is abandoned.
        read_chunk_size: bytes per disk read (at least 1 MiB).
        read_parallelism: reader threads of one fragment checked with sha256 (one more
            thread hashes behind them); a fast-checksum read takes one thread.
        write_chunk_size: bytes gathered from the network before a write (>= 64 KiB).
        writeback_step: bytes of a download between two starts of its writeback to disk,
            so that the fsync before the commit is short (0: leave it all to the fsync).
        small_queue_share: S3-FIFO small queue's share of a tier, in (0, 1).
        ghost_share: bytes of evicted ids remembered by S3-FIFO, as a share of a tier.
        max_frequency: S3-FIFO frequency cap (re-insertions a popular entry may earn).
        latency_window: how many recent fetch latencies the percentiles cover.

    Raises:
        TypeError, ValueError: naming the field, for a wrong type or value.
    """

    manifest: str | os.PathLike[str] | Mapping[str, Any]
    ram_capacity: int | None = None
    disk_path: str | os.PathLike[str] = "~/.cache/arbiter"
    disk_capacity: int = 100 * GiB
    cdn_url: str | None = None
    source_dir: str | os.PathLike[str] | None = None
    vram_capacity: int | None = None
    vram_workload: WorkloadType = WorkloadType.LLM_INFERENCE
    vram_grow_timeout: float = 0.0
    max_concurrent_fetches: int = 4
    fetch_retries: int = 5
    integrity_retries: int = 1
    retry_backoff_base: float = 0.25
    retry_backoff_cap: float = 8.0
    retry_jitter: float = 0.5
    http_timeout: float = 30.0
    read_chunk_size: int = 4 * MiB
    read_parallelism: int = 1
    write_chunk_size: int = 1 * MiB
    writeback_step: int = 4 * MiB
    small_queue_share: float = 0.1
    ghost_share: float = 0.9
    max_frequency: int = 3
    latency_window: int = 1024

    def __post_init__(self) -> None:
        for field in _NUMERIC_FIELDS:
            limit = MAX_SECONDS if field in _SECONDS_FIELDS else MAX_NUMBER
            floats = field in _FLOAT_FIELDS
            _check_magnitude(field, getattr(self, field), limit, floats=floats)
        if isinstance(self.manifest, Mapping):
            pass
        elif isinstance(self.manifest, str | os.PathLike):
            manifest = _check_path("manifest", self.manifest, optional=False)
            object.__setattr__(self, "manifest", manifest)
        else:
            raise TypeError(f"manifest must be a path or a mapping, got {self.manifest!r}")
        if self.ram_capacity is not None:
            check_bytes("ram_capacity", self.ram_capacity, allow_zero=True)
        disk_path = _check_path("disk_path", self.disk_path, optional=False)
        object.__setattr__(self, "disk_path", disk_path)
        check_bytes("disk_capacity", self.disk_capacity, allow_zero=True)
        if self.cdn_url is not None:
            if not isinstance(self.cdn_url, str):
                raise TypeError(f"cdn_url must be None or a URL string, got {self.cdn_url!r}")
            parts = urlsplit(self.cdn_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"cdn_url must be an http(s) URL, got {self.cdn_url!r}")
            if not self.cdn_url.endswith("/"):
                object.__setattr__(self, "cdn_url", self.cdn_url + "/")
        source_dir = _check_path("source_dir", self.source_dir, optional=True)
        object.__setattr__(self, "source_dir", source_dir)
        if self.vram_capacity is not None:
            check_bytes("vram_capacity", self.vram_capacity, allow_zero=True)
        workload = coerce_workload(self.vram_workload, "vram_workload")
        object.__setattr__(self, "vram_workload", workload)
        check_seconds("vram_grow_timeout", self.vram_grow_timeout, positive=False)
        check_count("max_concurrent_fetches", self.max_concurrent_fetches, minimum=1)
        check_count("fetch_retries", self.fetch_retries, minimum=0)
        check_count("integrity_retries", self.integrity_retries, minimum=0)
        check_seconds("retry_backoff_base", self.retry_backoff_base, positive=False)
        check_seconds("retry_backoff_cap", self.retry_backoff_cap, positive=False)
        if self.retry_backoff_cap < self.retry_backoff_base:
            raise ValueError(
                f"retry_backoff_cap must be >= retry_backoff_base ({self.retry_backoff_base!r}), "
                f"got {self.retry_backoff_cap!r}"
            )
        check_ratio("retry_jitter", self.retry_jitter, zero=True)
        check_seconds("http_timeout", self.http_timeout, positive=True)
        check_count("read_chunk_size", self.read_chunk_size, minimum=MIN_READ_CHUNK)
        check_count("read_parallelism", self.read_parallelism, minimum=1)
        check_count("write_chunk_size", self.write_chunk_size, minimum=MIN_WRITE_CHUNK)
        check_count("writeback_step", self.writeback_step, minimum=0)
        check_ratio("small_queue_share", self.small_queue_share, one=False)
        if isinstance(self.ghost_share, bool) or not isinstance(self.ghost_share, int | float):
            raise TypeError(f"ghost_share must be a number, got {self.ghost_share!r}")
        if math.isnan(self.ghost_share) or math.isinf(self.ghost_share) or self.ghost_share < 0:
            raise ValueError(f"ghost_share must be a finite number >= 0, got {self.ghost_share!r}")
        check_count("max_frequency", self.max_frequency, minimum=1)
        check_count("latency_window", self.latency_window, minimum=1)

    @property
    def disk_root(self) -> Path:
        """``disk_path`` as an expanded `Path`."""
        assert isinstance(self.disk_path, Path)  # set in __post_init__
        return self.disk_path

    @property
    def source_root(self) -> Path | None:
        """``source_dir`` as an expanded `Path`, or ``None``."""
        assert self.source_dir is None or isinstance(self.source_dir, Path)
        return self.source_dir


_NUMERIC_FIELDS = (
    "ram_capacity",
    "disk_capacity",
    "vram_capacity",
    "vram_grow_timeout",
    "max_concurrent_fetches",
    "fetch_retries",
    "integrity_retries",
    "retry_backoff_base",
    "retry_backoff_cap",
    "retry_jitter",
    "http_timeout",
    "read_chunk_size",
    "read_parallelism",
    "write_chunk_size",
    "writeback_step",
    "small_queue_share",
    "ghost_share",
    "max_frequency",
    "latency_window",
)
_SECONDS_FIELDS = frozenset(
    {"vram_grow_timeout", "retry_backoff_base", "retry_backoff_cap", "http_timeout"}
)
_FLOAT_FIELDS = _SECONDS_FIELDS | {"retry_jitter", "small_queue_share", "ghost_share"}
