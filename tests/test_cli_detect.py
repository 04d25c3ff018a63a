"""``arbiter detect`` in process, with detection answering as a two-GPU machine would."""

from __future__ import annotations

import json

import pytest

from arbiter import GiB
from arbiter._gpu import DetectionMethod, GpuDetectionResult, GpuDetector, GpuInfo, GpuVendor
from arbiter.cli import main

pytest.importorskip("rich")

TWO_GPUS = GpuDetectionResult.of(
    DetectionMethod.NVIDIA_SMI,
    [
        GpuInfo(0, "NVIDIA RTX 4090", GpuVendor.NVIDIA, 24 * GiB, 20 * GiB, "GPU-aaaa"),
        GpuInfo(1, "NVIDIA RTX 3060", GpuVendor.NVIDIA, 12 * GiB, None, None),
    ],
)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GpuDetector, "detect", lambda self: TWO_GPUS)


@pytest.mark.usefixtures("two_gpus")
def test_detect_json_lists_each_gpu_and_the_config_for_device_0(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["detect", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "nvidia_smi"
    assert data["total_vram_bytes"] == 36 * GiB
    assert data["gpus"] == [
        {
            "index": 0,
            "name": "NVIDIA RTX 4090",
            "vendor": "nvidia",
            "total_vram_bytes": 24 * GiB,
            "free_vram_bytes": 20 * GiB,
            "uuid": "GPU-aaaa",
        },
        {
            "index": 1,
            "name": "NVIDIA RTX 3060",
            "vendor": "nvidia",
            "total_vram_bytes": 12 * GiB,
            "free_vram_bytes": None,
            "uuid": None,
        },
    ]
    assert data["config"]["vram_budget"] == int(24 * GiB * 0.9)
    assert data["config"]["ram_budget"] == 4 * 24 * GiB
    assert data["config"]["device"] == 0


@pytest.mark.usefixtures("two_gpus")
def test_detect_table_shows_each_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["detect"]) == 0
    out = capsys.readouterr().out
    assert "method: nvidia_smi" in out
    assert "RTX 4090" in out and "RTX 3060" in out and "24.0 GiB" in out
    assert "unknown" in out  # the 3060's free memory and uuid
    assert "21.6 GiB" in out  # the budget: 90 % of device 0
