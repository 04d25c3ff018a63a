"""The NVML path, against a fake ``pynvml`` module installed into ``sys.modules``.

The fake stands in only for what this machine lacks (a GPU and its driver); the code
under test imports it exactly as it would import NVIDIA's module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import pytest

from arbiter import GiB, MiB
from arbiter._gpu import (
    DetectionMethod,
    GpuDetector,
    GpuProbeError,
    GpuReading,
    GpuVendor,
    MemoryProbe,
    NvmlProbe,
    open_default_probe,
)
from arbiter._gpu._nvml import LIBRARY
from arbiter.testing import FakeGpu

pytestmark = pytest.mark.anyio

OUR_PID = os.getpid()
# A pid that is certainly alive and visible in our pid namespace, but not ours.
OTHER_PID = os.getppid()


class NVMLError(Exception):
    """Shaped like pynvml's: an error code in ``value``."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15


@dataclass
class Device:
    name: str | bytes
    uuid: str | bytes
    total: int
    used: int
    compute: list[Any] = field(default_factory=list)
    graphics: list[Any] = field(default_factory=list)


def process(pid: int, used: int | None) -> types.SimpleNamespace:
    return types.SimpleNamespace(pid=pid, usedGpuMemory=used, gpuInstanceId=0)


class FakeNvml:
    """A ``pynvml`` module with devices, counting inits and shutdowns."""

    def __init__(self, devices: list[Device]) -> None:
        self.devices = devices
        self.inits = 0
        self.shutdowns = 0
        self.initialised = 0
        self.threads: set[int] = set()
        module = types.ModuleType("pynvml")
        module.NVMLError = NVMLError  # type: ignore[attr-defined]
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(module, name, getattr(self, name))
        self.module = module

    def _check(self) -> None:
        self.threads.add(threading.get_ident())
        if self.initialised <= 0:
            raise NVMLError(1)

    def nvmlInit(self) -> None:
        self.inits += 1
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._check()
        self.shutdowns += 1
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Device:
        self._check()
        if not 0 <= index < len(self.devices):
            raise NVMLError(2)
        return self.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Device:
        self._check()
        for device in self.devices:
            if uuid in (device.uuid, getattr(device.uuid, "decode", str)()):
                return device
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetName(self, handle: Device) -> str | bytes:
        self._check()
        return handle.name

    def nvmlDeviceGetUUID(self, handle: Device) -> str | bytes:
        self._check()
        return handle.uuid

    def nvmlDeviceGetMemoryInfo(self, handle: Device) -> types.SimpleNamespace:
        self._check()
        return types.SimpleNamespace(
            total=handle.total, used=handle.used, free=handle.total - handle.used
        )

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Device) -> list[Any]:
        self._check()
        return list(handle.compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Device) -> list[Any]:
        self._check()
        return list(handle.graphics)


def h100() -> Device:
    return Device(
        name="NVIDIA H100 80GB HBM3",
        uuid="GPU-11111111-2222-3333-4444-555555555555",
        total=80 * GiB,
        used=10 * GiB,
        compute=[process(OUR_PID, 3 * GiB), process(OTHER_PID, 6 * GiB)],
        graphics=[process(OTHER_PID, 6 * GiB), process(1, 512 * MiB)],
    )


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNvml]:
    fake = FakeNvml([h100(), Device(b"NVIDIA A10", b"GPU-a10", 24 * GiB, GiB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    # No tool on PATH: when NVML fails, detection has nothing to fall back to.
    monkeypatch.setenv("PATH", "")
    yield fake
    # Every user handed its hold back, and NVML was shut down as often as it was started.
    assert LIBRARY.users == 0
    assert fake.initialised == 0


def fail(error: BaseException) -> Callable[..., Any]:
    def raise_it(*args: object) -> Any:
        raise error

    return raise_it


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll a condition that a thread we abandoned will make true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# Detection


def test_detection_lists_every_nvml_gpu(nvml: FakeNvml) -> None:
    result = GpuDetector(timeout=1).detect()
    assert result.method is DetectionMethod.NVML
    assert [(g.index, g.name, g.uuid) for g in result.gpus] == [
        (0, "NVIDIA H100 80GB HBM3", "GPU-11111111-2222-3333-4444-555555555555"),
        (1, "NVIDIA A10", "GPU-a10"),  # bytes from an older pynvml are decoded
    ]
    assert result.gpus[0].vendor is GpuVendor.NVIDIA
    assert result.gpus[0].free_vram_bytes == 70 * GiB
    assert result.total_vram_bytes == 104 * GiB
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_detection_skips_a_gpu_that_cannot_be_read(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    def memory(handle: Device) -> Any:
        if handle is nvml.devices[0]:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return FakeNvml.nvmlDeviceGetMemoryInfo(nvml, handle)

    monkeypatch.setattr(nvml.module, "nvmlDeviceGetMemoryInfo", memory)
    monkeypatch.setattr(nvml.module, "nvmlDeviceGetName", fail(NVMLError(3)))
    result = GpuDetector(timeout=1).detect()
    assert [(g.index, g.name) for g in result.gpus] == [(1, "NVIDIA GPU")]


def test_nvml_init_failure_falls_through(nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvml.module, "nvmlInit", fail(NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)))
    assert GpuDetector(timeout=1).detect().method is DetectionMethod.NONE


def test_nvml_count_failure_falls_through(nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvml.module, "nvmlDeviceGetCount", fail(NVMLError(999)))
    assert GpuDetector(timeout=1).detect().method is DetectionMethod.NONE
    assert nvml.shutdowns == 1


def test_missing_pynvml_falls_through(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry makes ``import pynvml`` raise ImportError, as without nvidia-ml-py.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setenv("PATH", "")
    assert GpuDetector(timeout=1).detect().method is DetectionMethod.NONE
    assert LIBRARY.users == 0


def test_hanging_nvml_init_is_abandoned(nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    init = nvml.module.nvmlInit

    def hang() -> None:
        release.wait(30)
        init()

    monkeypatch.setattr(nvml.module, "nvmlInit", hang)
    started = time.monotonic()
    result = GpuDetector(timeout=0.3).detect()
    assert result.method is DetectionMethod.NONE
    assert time.monotonic() - started < 2.0
    # Let the abandoned thread finish, so the fixture sees NVML shut down again.
    release.set()
    assert wait_until(lambda: nvml.shutdowns == 1 and LIBRARY.users == 0)


# The probe


async def test_probe_reads_ours_and_others(nvml: FakeNvml) -> None:
    async with NvmlProbe(0) as probe:
        reading = await probe.read()
    # Ours: 3 GiB. Others: 6 GiB (listed as compute and graphics, counted once) + 512 MiB.
    assert reading == GpuReading(
        total=80 * GiB, used=10 * GiB, ours=3 * GiB, external=6 * GiB + 512 * MiB
    )
    # NVML ran in worker threads, never on the event loop's thread.
    assert threading.get_ident() not in nvml.threads


async def test_probe_without_our_process(nvml: FakeNvml) -> None:
    nvml.devices[0].compute = [process(OTHER_PID, 4 * GiB)]
    nvml.devices[0].graphics = []
    async with NvmlProbe(0) as probe:
        reading = await probe.read()
    assert (reading.ours, reading.external) == (0, 4 * GiB)


@pytest.mark.parametrize(
    ("compute", "graphics"),
    [
        pytest.param([process(OTHER_PID, None)], [], id="memory not reported"),
        pytest.param([], [], id="no process listed"),
        # Host pids seen from a container: ours cannot be told apart from the others.
        pytest.param([process(4_000_000_001, 4 * GiB)], [], id="foreign pid namespace"),
        pytest.param([process(OTHER_PID, -1)], [], id="negative"),
        pytest.param(NVMLError(NVML_ERROR_NOT_SUPPORTED), [], id="compute list unsupported"),
        pytest.param([], NVMLError(NVML_ERROR_NOT_SUPPORTED), id="graphics list unsupported"),
    ],
)
async def test_probe_without_per_process_figures(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, compute: Any, graphics: Any
) -> None:
    for name, value in (
        ("nvmlDeviceGetComputeRunningProcesses", compute),
        ("nvmlDeviceGetGraphicsRunningProcesses", graphics),
    ):
        if isinstance(value, BaseException):
            monkeypatch.setattr(nvml.module, name, fail(value))
        else:
            setattr(nvml.devices[0], "compute" if "Compute" in name else "graphics", value)
    async with NvmlProbe(0) as probe:
        reading = await probe.read()
    assert reading == GpuReading(total=80 * GiB, used=10 * GiB, ours=None, external=None)


async def test_foreign_pids_are_trusted_when_ours_is_among_them(nvml: FakeNvml) -> None:
    nvml.devices[0].compute = [process(OUR_PID, GiB), process(4_000_000_001, 2 * GiB)]
    nvml.devices[0].graphics = []
    async with NvmlProbe(0) as probe:
        reading = await probe.read()
    assert (reading.ours, reading.external) == (GiB, 2 * GiB)


async def test_probe_by_uuid(nvml: FakeNvml) -> None:
    async with NvmlProbe("GPU-a10") as probe:
        assert (await probe.read()).total == 24 * GiB


async def test_nvml_error_mid_run_is_mapped_and_recovered(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with NvmlProbe(0) as probe:
        await probe.read()
        lost = NVMLError(NVML_ERROR_GPU_IS_LOST)
        monkeypatch.setattr(nvml.module, "nvmlDeviceGetMemoryInfo", fail(lost))
        with pytest.raises(GpuProbeError, match="could not read GPU 0") as caught:
            await probe.read()
        assert not isinstance(caught.value, NVMLError)
        assert caught.value.__cause__ is lost
        # The failed probe let NVML go; the next read opens it again and works.
        assert LIBRARY.users == 0
        monkeypatch.setattr(nvml.module, "nvmlDeviceGetMemoryInfo", nvml.nvmlDeviceGetMemoryInfo)
        assert (await probe.read()).used == 10 * GiB
        assert nvml.inits == 2


async def test_nvml_init_error_is_mapped(nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    error = NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    monkeypatch.setattr(nvml.module, "nvmlInit", fail(error))
    async with NvmlProbe(0) as probe:
        with pytest.raises(GpuProbeError, match="NVML is unavailable") as caught:
            await probe.read()
    assert caught.value.__cause__ is error


async def test_missing_device_is_a_probe_error(nvml: FakeNvml) -> None:
    async with NvmlProbe("GPU-nope") as probe:
        with pytest.raises(GpuProbeError, match="GPU-nope"):
            await probe.read()


async def test_probes_share_one_nvml_session(nvml: FakeNvml) -> None:
    first, second = NvmlProbe(0), NvmlProbe(1)
    await first.read()
    await second.read()
    assert (nvml.inits, LIBRARY.users) == (1, 2)
    await first.aclose()
    assert nvml.shutdowns == 0
    await second.aclose()
    await second.aclose()  # idempotent
    assert (nvml.shutdowns, LIBRARY.users) == (1, 0)


async def test_closed_probe_refuses_reads(nvml: FakeNvml) -> None:
    probe = NvmlProbe(0)
    await probe.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await probe.read()
    assert nvml.inits == 0


async def test_cancelled_read_returns_promptly(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck = threading.Event()
    release = threading.Event()

    def hang(handle: Device) -> Any:
        stuck.set()
        release.wait(30)
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)

    probe = NvmlProbe(0)
    try:
        await probe.read()
        monkeypatch.setattr(nvml.module, "nvmlDeviceGetMemoryInfo", hang)
        started = anyio.current_time()
        with anyio.move_on_after(0.1) as scope:
            await probe.read()
        assert scope.cancelled_caught
        assert stuck.is_set()
        assert anyio.current_time() - started < 2.0
    finally:
        release.set()
        await probe.aclose()
    # The abandoned thread hands its hold back once NVML returns.
    assert await anyio.to_thread.run_sync(wait_until, lambda: LIBRARY.users == 0)


async def test_open_default_probe(nvml: FakeNvml) -> None:
    probe = await open_default_probe(1)
    assert isinstance(probe, NvmlProbe)
    assert isinstance(probe, MemoryProbe)
    assert (await probe.read()).total == 24 * GiB
    await probe.aclose()


async def test_open_default_probe_without_the_device(nvml: FakeNvml) -> None:
    assert await open_default_probe(7) is None
    assert await open_default_probe("GPU-nope") is None


async def test_open_default_probe_without_nvml(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nvml.module, "nvmlInit", fail(NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)))
    assert await open_default_probe(0) is None
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert await open_default_probe(0) is None


async def test_open_default_probe_with_a_broken_module(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nvml.module, "nvmlDeviceGetMemoryInfo", fail(AttributeError("old")))
    assert await open_default_probe(0) is None


@pytest.mark.parametrize(
    ("device", "error"), [(-1, ValueError), ("", ValueError), (True, TypeError), (1.0, TypeError)]
)
def test_probe_checks_its_device(device: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="device"):
        NvmlProbe(device)  # type: ignore[arg-type]


def test_fake_gpu_is_a_memory_probe() -> None:
    assert isinstance(FakeGpu(GiB), MemoryProbe)


def test_import_does_not_load_pynvml() -> None:
    code = "import arbiter, arbiter.testing, sys; assert 'pynvml' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
