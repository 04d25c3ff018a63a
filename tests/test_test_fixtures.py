"""The suite's own fixtures (conftest.py): the virtual clock and the default probe."""

from __future__ import annotations

import time

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
