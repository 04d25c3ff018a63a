"""The manifest (validation, traversal refused) and CacheConfig (validation, defaults)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from arbiter import GiB, WorkloadType
from arbiter.cache import CacheConfig, FragmentCache, Manifest
from arbiter.cache._manifest import disk_name

SHA = hashlib.sha256(b"x").hexdigest()


def manifest(**entry: Any) -> dict[str, Any]:
    return {"fragments": {"layer/0": {"size": 1, "sha256": SHA, **entry}}}


def test_manifest_from_a_file_and_from_a_mapping_agree(tmp_path: Path) -> None:
    data = manifest(path="weights/layer0.bin")
    path = tmp_path / "model.manifest.json"
    path.write_text(json.dumps(data))
    for loaded in (Manifest.load(path), Manifest.load(str(path)), Manifest.load(data)):
        info = loaded["layer/0"]
        assert (info.id, info.size, info.sha256, info.path) == (
            "layer/0",
            1,
            SHA,
            "weights/layer0.bin",
        )
    assert Manifest.load(manifest())["layer/0"].path == "layer/0"  # defaults to the id


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "../outside.bin",
        "models/../../outside.bin",
        "models/..",
        "C:/weights.bin",
        "C:weights.bin",
        "\\\\server\\share\\w.bin",
        "models\\..\\x",
        "a//b",
        "./a",
        "a/",
        "",
        "a\x00b",
    ],
)
def test_unsafe_paths_are_refused_at_load(path: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Manifest.load(manifest(path=path))
    with pytest.raises(ValueError):
        FragmentCache(CacheConfig(manifest(path=path), disk_path=tmp_path))


def test_an_id_that_would_climb_out_is_refused_when_it_is_the_path() -> None:
    with pytest.raises(ValueError, match="climbs out"):
        Manifest.load({"fragments": {"../x": {"size": 1, "sha256": SHA}}})
    # With a safe path the id is only a name: it never reaches the file system.
    loaded = Manifest.load({"fragments": {"../x": {"size": 1, "sha256": SHA, "path": "x"}}})
    assert disk_name("../x") == hashlib.sha256(b"../x").hexdigest()
    assert loaded["../x"].path == "x"


@pytest.mark.parametrize(
    "bad",
    [
        {"fragments": {"a": {"size": -1, "sha256": SHA}}},
        {"fragments": {"a": {"size": True, "sha256": SHA}}},
        {"fragments": {"a": {"size": 1.5, "sha256": SHA}}},
        {"fragments": {"a": {"sha256": SHA}}},
        {"fragments": {"a": {"size": 1, "sha256": "abc"}}},
        {"fragments": {"a": {"size": 1, "sha256": SHA, "colour": "red"}}},
        {"fragments": {"": {"size": 1, "sha256": SHA}}},
        {"fragments": {"a": "not an object"}},
        {"fragments": []},
        {"no fragments": {}},
    ],
)
def test_malformed_manifests_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Manifest.load(bad)


def test_manifest_file_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        Manifest.load(path)
    with pytest.raises(FileNotFoundError):
        Manifest.load(tmp_path / "missing.json")


def test_upper_case_digests_are_accepted_and_normalised() -> None:
    assert Manifest.load(manifest(sha256=SHA.upper()))["layer/0"].sha256 == SHA


def test_unknown_id_is_a_key_error_naming_it() -> None:
    loaded = Manifest.load(manifest())
    with pytest.raises(KeyError, match="layer/9"):
        loaded["layer/9"]
    assert "layer/0" in loaded and "layer/9" not in loaded and len(loaded) == 1


def test_cdn_url_joins_the_quoted_path() -> None:
    info = Manifest.load(manifest(path="unet/block 3#a.bin"))["layer/0"]
    assert info.url("https://cdn.example/models/") == (
        "https://cdn.example/models/unet/block%203%23a.bin"
    )


def test_config_defaults_and_home_expansion() -> None:
    config = CacheConfig(manifest())
    assert config.disk_root == Path("~/.cache/arbiter").expanduser()
    assert config.max_concurrent_fetches == 4 and config.fetch_retries == 5
    assert config.vram_workload is WorkloadType.LLM_INFERENCE
    config = CacheConfig(
        manifest(), disk_path="~/x", source_dir="~/m", cdn_url="http://h/p", ram_capacity=GiB
    )
    assert config.disk_root == Path.home() / "x"
    assert config.source_root == Path.home() / "m"
    assert config.cdn_url == "http://h/p/"
    assert CacheConfig(manifest(), vram_workload="image_generation").vram_workload is (
        WorkloadType.IMAGE_GENERATION
    )


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("manifest", 3, TypeError),
        ("ram_capacity", -1, ValueError),
        ("ram_capacity", 1.5, TypeError),
        ("disk_capacity", True, TypeError),
        ("disk_path", "", TypeError),
        ("cdn_url", "ftp://x/", ValueError),
        ("cdn_url", b"http://x/", TypeError),
        ("source_dir", 5, TypeError),
        ("vram_capacity", -5, ValueError),
        ("vram_workload", "painting", ValueError),
        ("vram_grow_timeout", -1.0, ValueError),
        ("max_concurrent_fetches", 0, ValueError),
        ("max_concurrent_fetches", 2.0, TypeError),
        ("fetch_retries", -1, ValueError),
        ("integrity_retries", -1, ValueError),
        ("retry_backoff_base", float("nan"), ValueError),
        ("retry_backoff_cap", 0.1, ValueError),  # below the default base
        ("retry_jitter", 1.5, ValueError),
        ("http_timeout", 0, ValueError),
        ("read_chunk_size", 4096, ValueError),
        ("read_parallelism", 0, ValueError),
        ("write_chunk_size", 10, ValueError),
        ("small_queue_share", 1.0, ValueError),
        ("small_queue_share", 0, ValueError),
        ("ghost_share", -0.1, ValueError),
        ("max_frequency", 0, ValueError),
        ("latency_window", 0, ValueError),
    ],
)
def test_config_refuses_bad_values_naming_the_field(
    field: str, value: object, error: type[Exception]
) -> None:
    kwargs: dict[str, Any] = {"manifest": manifest(), field: value}
    with pytest.raises(error, match=field):
        CacheConfig(**kwargs)


def test_config_is_frozen() -> None:
    config = CacheConfig(manifest())
    with pytest.raises(AttributeError):
        config.fetch_retries = 1  # type: ignore[misc]


def test_cache_wants_a_config() -> None:
    with pytest.raises(TypeError, match="CacheConfig"):
        FragmentCache({"manifest": manifest()})  # type: ignore[arg-type]


NUMERIC_FIELDS = [
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
]


def test_every_numeric_field_is_covered() -> None:
    import dataclasses

    others = {"manifest", "disk_path", "cdn_url", "source_dir", "vram_workload"}
    assert {f.name for f in dataclasses.fields(CacheConfig)} - others == set(NUMERIC_FIELDS)


@pytest.mark.parametrize(
    "value",
    [10**400, -(10**400), 10**5000, 2**63, 1e300],
    ids=["10**400", "-10**400", "10**5000", "2**63", "1e300"],
)
@pytest.mark.parametrize("field", NUMERIC_FIELDS)
def test_huge_numbers_are_value_errors_naming_the_field(field: str, value: object) -> None:
    kwargs: dict[str, Any] = {"manifest": manifest(), field: value}
    if field == "retry_backoff_base":
        kwargs["retry_backoff_cap"] = 1e9
    if isinstance(value, float) and field in (
        "ram_capacity",
        "disk_capacity",
        "vram_capacity",
        "max_concurrent_fetches",
        "fetch_retries",
        "integrity_retries",
        "read_chunk_size",
        "read_parallelism",
        "write_chunk_size",
        "writeback_step",
        "max_frequency",
        "latency_window",
    ):
        error: type[Exception] = TypeError  # a float where an int is due
    else:
        error = ValueError
    with pytest.raises(error, match=field):
        CacheConfig(**kwargs)


def test_the_largest_numbers_taken_still_work() -> None:
    config = CacheConfig(
        manifest(),
        ram_capacity=2**63 - 1,
        disk_capacity=2**63 - 1,
        http_timeout=1e9,
        retry_backoff_cap=1e9,
        latency_window=2**63 - 1,
    )
    assert config.disk_capacity == 2**63 - 1
