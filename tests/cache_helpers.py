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

__all__ = ["FAST", "make_config", "make_fragments", "manifest_for", "origin"]

# Retries without waiting: the backoff logic is exercised, the clock barely moves.
FAST: dict[str, Any] = {
    "retry_backoff_base": 0.001,
    "retry_backoff_cap": 0.005,
    "http_timeout": 10.0,
}


def make_fragments(count: int, size: int, prefix: str = "frag") -> dict[str, bytes]:
    """``count`` fragments of random bytes, ids ``prefix/00`` ..."""
    return {f"{prefix}/{i:02d}": os.urandom(size) for i in range(count)}


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
