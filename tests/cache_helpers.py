"""Shared pieces of the fragment cache tests: fragments, manifests, configs, an origin."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from origin_server import OriginServer

from arbiter.cache import CacheConfig

__all__ = ["FAST", "make_config", "make_fragments", "manifest_for", "origin", "random_bytes"]

# Retries without waiting: the backoff logic is exercised, the clock barely moves.
FAST: dict[str, Any] = {
    "retry_backoff_base": 0.001,
    "retry_backoff_cap": 0.005,
    "http_timeout": 10.0,
}


# A fragment longer than this repeats its own random block of this (prime) length: fresh
# random bytes cost about 2.4 ms of CPU per MiB, some 380 MiB over the cache tests. No
# offset that a chunk, a read or a range can land on (powers of two, round numbers) is a
# multiple of the period, so bytes from a wrong offset still differ.
RANDOM_PERIOD = 1_000_003


def random_bytes(size: int) -> bytes:
    """``size`` bytes: random up to `RANDOM_PERIOD`, that random block repeated beyond."""
    block = os.urandom(min(size, RANDOM_PERIOD))
    if size <= RANDOM_PERIOD:
        return block
    return (block * -(-size // RANDOM_PERIOD))[:size]


def make_fragments(count: int, size: int, prefix: str = "frag") -> dict[str, bytes]:
    """``count`` fragments of random bytes (see `random_bytes`), ids ``prefix/00`` ..."""
    return {f"{prefix}/{i:02d}": random_bytes(size) for i in range(count)}


def manifest_for(
    fragments: Mapping[str, bytes], paths: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The manifest mapping that describes ``fragments`` truthfully."""
    entries: dict[str, Any] = {}
    for fragment_id, data in fragments.items():
        entry: dict[str, Any] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if paths and fragment_id in paths:
            entry["path"] = paths[fragment_id]
        entries[fragment_id] = entry
    return {"fragments": entries}


def make_config(
    tmp_path: Path,
    fragments: Mapping[str, bytes],
    *,
    cdn_url: str | None = None,
    **overrides: Any,
) -> CacheConfig:
    """A config over ``fragments`` with its disk tier in ``tmp_path/cache``."""
    settings: dict[str, Any] = {
        "manifest": manifest_for(fragments),
        "disk_path": tmp_path / "cache",
        "ram_capacity": 64 * 1024 * 1024,
        "disk_capacity": 256 * 1024 * 1024,
        "cdn_url": cdn_url,
        **FAST,
    }
    settings.update(overrides)
    return CacheConfig(**settings)


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    """A real HTTP origin on 127.0.0.1, empty until a test puts files in ``origin.files``."""
    with OriginServer() as server:
        yield server
