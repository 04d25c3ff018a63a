"""The suite's own fixtures and hooks (conftest.py): the virtual clock, the default probe,
the shared TLS trust store, and how marked tests are dealt to xdist's workers."""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
import pytest

import arbiter._gpu
from arbiter import Arbiter, ArbiterConfig, GiB, Priority, WorkloadType


@pytest.mark.anyio
@pytest.mark.virtual_time
async def test_virtual_time_is_virtual_on_trio_only(anyio_backend_name: str) -> None:
    started, real_started = anyio.current_time(), time.monotonic()
    hour = 3600.0 if anyio_backend_name == "trio" else 0.01
    await anyio.sleep(hour)
    assert anyio.current_time() - started >= hour
    if anyio_backend_name == "trio":
        assert time.monotonic() - real_started < 10


@pytest.mark.anyio
async def test_the_default_probe_is_no_gpu() -> None:
    assert await arbiter._gpu.open_default_probe(0) is None
    # `async with` starts no poller: nothing external is ever read.
    async with Arbiter(ArbiterConfig.for_vram_gb(4)) as arb:
        alloc = await arb.request_allocation(WorkloadType.LLM_INFERENCE, Priority.NORMAL, GiB)
        assert arb.state().external_used == 0
        alloc.release()


@pytest.mark.real_gpu_probe
def test_a_marked_test_sees_the_real_default_probe() -> None:
    from arbiter._gpu._probe import open_default_probe

    assert arbiter._gpu.open_default_probe is open_default_probe


def test_the_tests_daemons_cannot_import_pynvml() -> None:
    import subprocess
    import sys

    from remote_helpers import no_nvml_env

    check = "import pynvml"
    done = subprocess.run(
        [sys.executable, "-c", check], env=no_nvml_env(), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1 and "hidden from the daemons" in done.stderr


def test_the_default_tls_context_is_built_once_per_worker() -> None:
    import httpx

    assert httpx.create_ssl_context() is httpx.create_ssl_context()
    # Any other context (verification off, another trust store) is still built fresh.
    assert httpx.create_ssl_context(verify=False) is not httpx.create_ssl_context(verify=False)


class _Definition:
    def __init__(self, scope: str) -> None:
        self.scope = scope


class _FixtureInfo:
    def __init__(self, scopes: dict[str, str]) -> None:
        self.name2fixturedefs = {name: [_Definition(scope)] for name, scope in scopes.items()}


class _Item:
    """What `pytest_collection_modifyitems` in conftest.py reads of a test item."""

    def __init__(self, module: str, name: str, mark: str | None, scopes: dict[str, str]) -> None:
        from pathlib import Path

        self.path = Path(module)
        self.nodeid = f"{module}::{name}"
        self._mark = mark
        self._fixtureinfo = _FixtureInfo(scopes)

    def get_closest_marker(self, name: str) -> object:
        return object() if name == self._mark else None


REAL, HEAVY = "real_processes", "cpu_heavy"


class _WorkerConfig:
    def __init__(self, workers: int) -> None:
        self.workerinput = {"workercount": workers}


def test_marked_tests_sharing_a_module_daemon_start_on_one_worker() -> None:
    from conftest import pytest_collection_modifyitems

    shared = [_Item("a.py", f"shared{i}", REAL, {"daemon": "module"}) for i in range(4)]
    own = [_Item("a.py", f"own{i}", REAL, {"tmp_path": "function"}) for i in range(4)]
    plain = [_Item("b.py", f"plain{i}", None, {}) for i in range(40)]
    items: list[Any] = [*shared, *own, *plain]
    pytest_collection_modifyitems(_WorkerConfig(4), items)  # type: ignore[arg-type]
    assert len(items) == 48 and {id(item) for item in items} == {
        id(item) for item in [*shared, *own, *plain]
    }
    # xdist's worksteal first sends each worker one contiguous quarter of the items.
    quarters = [items[i * 12 : (i + 1) * 12] for i in range(4)]
    holding_shared = [q for q in quarters if any(item in shared for item in q)]
    assert len(holding_shared) == 1 and holding_shared[0][:4] == shared
    # The tests with daemons of their own are spread over the other workers.
    assert sorted(sum(item in own for item in q) for q in quarters) == [0, 1, 1, 2]
    for quarter in quarters:  # each worker starts with its marked tests
        marked = [item not in plain for item in quarter]
        assert marked == sorted(marked, reverse=True)


def test_cpu_heavy_tests_of_one_file_start_together_after_the_real_processes() -> None:
    from conftest import pytest_collection_modifyitems

    real = [_Item("a.py", f"real{i}", REAL, {}) for i in range(3)]
    plotting = [_Item("c.py", f"plot{i}", HEAVY, {}) for i in range(2)]
    machine = [_Item("d.py", "machine", HEAVY, {})]
    plain = [_Item("b.py", f"plain{i}", None, {}) for i in range(24)]
    items: list[Any] = [*plain[:12], *plotting, *real, *plain[12:], *machine]
    pytest_collection_modifyitems(_WorkerConfig(3), items)  # type: ignore[arg-type]
    assert sorted(map(id, items)) == sorted(map(id, [*real, *plotting, *machine, *plain]))
    thirds = [items[i * 10 : (i + 1) * 10] for i in range(3)]
    # One file's heavy tests on one worker (they share their imports), the other file's
    # on another; on each worker, the real processes first, then the heavy tests.
    (with_plots,) = [third for third in thirds if plotting[0] in third]
    assert plotting[1] in with_plots
    assert machine[0] not in with_plots
    for third in thirds:
        marks = [item._mark for item in third]
        assert marks == sorted(marks, key=[REAL, HEAVY, None].index)


def test_each_mark_is_dealt_to_the_workers_with_the_fewest_of_that_mark() -> None:
    from conftest import pytest_collection_modifyitems

    daemon = [_Item("a.py", f"daemon{i}", REAL, {"daemon": "module"}) for i in range(3)]
    alone = [_Item("a.py", "alone", REAL, {})]
    heavy = [_Item(f"{name}.py", "heavy", HEAVY, {}) for name in "cd"]
    plain = [_Item("b.py", f"plain{i}", None, {}) for i in range(24)]
    items: list[Any] = [*daemon, *alone, *heavy, *plain]
    pytest_collection_modifyitems(_WorkerConfig(3), items)  # type: ignore[arg-type]
    thirds = [items[i * 10 : (i + 1) * 10] for i in range(3)]
    # The real processes: the daemon's hand on the first worker, the other on the second;
    # the heavy tests by their own count, not behind the real processes' load.
    assert thirds[0][:4] == [*daemon, heavy[0]]
    assert thirds[1][:2] == [*alone, heavy[1]]
    assert all(item._mark is None for item in thirds[2])


def test_the_order_is_made_after_deselection() -> None:
    # -k, -m and --deselect drop items in their own pytest_collection_modifyitems; the
    # chunks are counted on what is left only if this hook runs after them.
    import conftest

    assert conftest.pytest_collection_modifyitems.pytest_impl["trylast"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("cpus", "workers"), [(None, 3), (1, 3), (2, 6), (5, 15), (64, 16)])
def test_auto_runs_three_workers_per_cpu_up_to_16(
    cpus: int | None, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import pytest_xdist_auto_num_workers

    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert pytest_xdist_auto_num_workers(None) == workers  # type: ignore[arg-type]
