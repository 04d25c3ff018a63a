"""GPU detection against real fake tools: executables on a PATH of our own, run for real."""

from __future__ import annotations

import json
import shutil
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from arbiter import ArbiterConfig, GiB, MiB
from arbiter._gpu import DetectionMethod, GpuDetectionResult, GpuDetector, GpuInfo, GpuVendor
from arbiter._gpu._detect import DEFAULT_TOOL_TIMEOUT, DETECTION_TIMEOUT
from arbiter._gpu._nvml import LIBRARY
from arbiter._gpu._smi import NVIDIA_SMI_ARGS, ROCM_SMI_ARGS, parse_nvidia_smi, parse_rocm_smi

# Found before the tests narrow PATH down to their fake tools.
SLEEP = shutil.which("sleep") or "/bin/sleep"
CAT = shutil.which("cat") or "/bin/cat"
# Fast enough for a loaded 2-core machine to start a Python tool, short enough to keep
# the hang tests quick.
TOOL_TIMEOUT = 1.0
# The hang tests wait out the timeout once per hanging tool, so they take a shorter one.
HANG_TIMEOUT = 0.5
# Where every tool hangs, none has to answer (or even start) in time: what is checked is
# that detection gives up within its bound, and the shortest wait will do.
ALL_HANG_TIMEOUT = 0.2

TOOL = """#!{python}
import os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
name = os.path.basename(__file__)
with open(os.path.join(here, name + ".args"), "w") as f:
    f.write("\\n".join(sys.argv[1:]))
with open(os.path.join(here, name + ".pid"), "w") as f:
    f.write(str(os.getpid()))
if {hang!r}:
    time.sleep(600)
sys.stdout.buffer.write(open(os.path.join(here, name + ".out"), "rb").read())
sys.stdout.flush()
sys.exit({code})
"""


class Tools:
    """Fake vendor tools in a directory that is the whole PATH."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(
        self, name: str, stdout: bytes | str = b"", *, code: int = 0, hang: bool = False
    ) -> None:
        path = self.directory / name
        data = stdout.encode() if isinstance(stdout, str) else stdout
        (self.directory / f"{name}.out").write_bytes(data)
        path.write_text(TOOL.format(python=sys.executable, hang=hang, code=code))
        path.chmod(0o755)

    def add_shell(self, name: str, script: str) -> None:
        path = self.directory / name
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)

    def args(self, name: str) -> list[str]:
        return (self.directory / f"{name}.args").read_text().splitlines()

    def pid(self, name: str) -> int:
        return int((self.directory / f"{name}.pid").read_text())


def _nvml_missing() -> types.ModuleType:
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def nvml_init() -> None:
        raise NVMLError("NVML Shared Library Not Found")

    module.NVMLError = NVMLError  # type: ignore[attr-defined]
    module.nvmlInit = nvml_init  # type: ignore[attr-defined]
    return module


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tools:
    """No NVML, and a PATH holding only the tools a test adds."""
    monkeypatch.setitem(sys.modules, "pynvml", _nvml_missing())
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", str(directory))
    return Tools(directory)


@pytest.fixture(autouse=True)
def _nvml_released() -> Iterator[None]:
    yield
    assert LIBRARY.users == 0


def detect() -> GpuDetectionResult:
    return GpuDetector(timeout=TOOL_TIMEOUT).detect()


SMI_NOUNITS = (
    "0, NVIDIA GeForce RTX 4090, 24564, 1200, GPU-aaaaaaaa-0000-0000-0000-000000000000\n"
    "1, NVIDIA H100 80GB HBM3, 81559, 0, GPU-bbbbbbbb-0000-0000-0000-000000000000\n"
    "2, NVIDIA A10, 23028, 23028, GPU-cccccccc-0000-0000-0000-000000000000\n"
)


def test_nvidia_smi_lists_every_gpu(tools: Tools) -> None:
    tools.add("nvidia-smi", SMI_NOUNITS)
    result = detect()
    assert result.method is DetectionMethod.NVIDIA_SMI
    assert [g.index for g in result.gpus] == [0, 1, 2]
    first = result.gpus[0]
    assert first == GpuInfo(
        index=0,
        name="NVIDIA GeForce RTX 4090",
        vendor=GpuVendor.NVIDIA,
        total_vram_bytes=24564 * MiB,
        free_vram_bytes=(24564 - 1200) * MiB,
        uuid="GPU-aaaaaaaa-0000-0000-0000-000000000000",
    )
    assert result.gpus[2].free_vram_bytes == 0
    assert result.total_vram_bytes == (24564 + 81559 + 23028) * MiB
    # The query is the documented one, asking for plain MiB numbers.
    assert tuple(tools.args("nvidia-smi")) == NVIDIA_SMI_ARGS


def test_nvidia_smi_values_with_units(tools: Tools) -> None:
    tools.add(
        "nvidia-smi",
        "0, NVIDIA L4, 24576 MiB, 512 MiB, GPU-1\n1, NVIDIA L4, 24576 MiB, [N/A], GPU-2\n",
    )
    result = detect()
    assert result.method is DetectionMethod.NVIDIA_SMI
    assert [g.total_vram_bytes for g in result.gpus] == [24 * GiB, 24 * GiB]
    assert result.gpus[0].free_vram_bytes == 24 * GiB - 512 * MiB
    assert result.gpus[1].free_vram_bytes is None


def test_nvidia_smi_missing_values(tools: Tools) -> None:
    tools.add(
        "nvidia-smi",
        "0, NVIDIA T4, [N/A], [N/A], [N/A]\n1, NVIDIA T4, 15360, [Not Supported], [N/A]\n",
    )
    result = detect()
    # A GPU whose size is not reported cannot be budgeted; the other one is kept.
    assert [(g.index, g.free_vram_bytes, g.uuid) for g in result.gpus] == [(1, None, None)]


@pytest.mark.parametrize(
    ("stdout", "code"),
    [
        pytest.param(SMI_NOUNITS, 1, id="non-zero exit"),
        pytest.param(SMI_NOUNITS, 9, id="NVIDIA-SMI has failed"),
        pytest.param("NVIDIA-SMI has failed because it couldn't communicate\n", 0, id="prose"),
        pytest.param("0, A, lots, 1, GPU-x\n", 0, id="bad number"),
        pytest.param("x, NVIDIA A10, 23028, 0, GPU-1\n", 0, id="bad index"),
        pytest.param("0, NVIDIA A10, 23028\n", 0, id="short line"),
        pytest.param("0, A, 1, 0, G\n0, B, 1, 0, H\n", 0, id="repeated index"),
        pytest.param("", 0, id="empty"),
        pytest.param(b"\xff\xfe\x00\x81garbage\x00\x00", 0, id="binary"),
        pytest.param(b"0, NVIDIA\x00A10, 23028, 0, GPU-1\n", 0, id="nul bytes"),
        pytest.param(bytes(range(256)) * 8, 0, id="every byte"),
    ],
)
def test_nvidia_smi_failure_falls_through_to_rocm(
    tools: Tools, stdout: bytes | str, code: int
) -> None:
    tools.add("nvidia-smi", stdout, code=code)
    tools.add("rocm-smi", ROCM_TWO_CARDS)
    result = detect()
    assert result.method is DetectionMethod.ROCM_SMI
    assert len(result.gpus) == 2


def test_nothing_found_is_method_none(tools: Tools) -> None:
    result = detect()
    assert result == GpuDetectionResult(DetectionMethod.NONE, [], 0)


def test_every_tool_failing_is_method_none(tools: Tools) -> None:
    tools.add("nvidia-smi", b"\x00\x01\x02", code=0)
    tools.add("rocm-smi", "ERROR: No AMD GPUs", code=2)
    assert detect().method is DetectionMethod.NONE


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_hanging_tool_is_killed_and_detection_moves_on(tools: Tools) -> None:
    tools.add_shell(
        "nvidia-smi", f"echo $$ > {tools.directory / 'nvidia-smi.pid'}\nexec {SLEEP} 600\n"
    )
    (tools.directory / "rocm-smi.out").write_text(ROCM_TWO_CARDS)
    tools.add_shell("rocm-smi", f"exec {CAT} {tools.directory / 'rocm-smi.out'}\n")
    started = time.monotonic()
    result = GpuDetector(timeout=HANG_TIMEOUT).detect()
    elapsed = time.monotonic() - started
    assert result.method is DetectionMethod.ROCM_SMI
    assert elapsed < 3 * HANG_TIMEOUT + 1.0
    assert _gone(tools.pid("nvidia-smi"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_hanging_shell_wrapper_is_killed_with_its_children(tools: Tools) -> None:
    pids = tools.directory / "pids"
    tools.add_shell("nvidia-smi", f"echo $$ > {pids}\n{SLEEP} 600 &\necho $! >> {pids}\nwait\n")
    started = time.monotonic()
    result = GpuDetector(timeout=HANG_TIMEOUT).detect()
    assert time.monotonic() - started < 3 * HANG_TIMEOUT + 1.0
    assert result.method is DetectionMethod.NONE
    shell, sleeper = (int(p) for p in pids.read_text().split())
    assert _gone(shell)
    # The tool's own child dies with it: nothing is left running after detection.
    deadline = time.monotonic() + 5
    while not _gone(sleeper) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _gone(sleeper)


def test_every_tool_hanging_stays_within_the_bound(tools: Tools) -> None:
    tools.add("nvidia-smi", "", hang=True)
    tools.add("rocm-smi", "", hang=True)
    started = time.monotonic()
    result = GpuDetector(timeout=ALL_HANG_TIMEOUT).detect()
    assert result.method is DetectionMethod.NONE
    assert time.monotonic() - started < 3 * ALL_HANG_TIMEOUT + 1.0


def test_default_timeouts_keep_the_contract() -> None:
    assert GpuDetector().timeout == DEFAULT_TOOL_TIMEOUT <= 5.0
    # Three methods at most; killing a hung tool must still fit inside 15 s.
    assert DETECTION_TIMEOUT < 15.0


@pytest.mark.parametrize("timeout", [0, -1, 5.5, float("nan"), float("inf")])
def test_bad_timeout_is_a_value_error(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        GpuDetector(timeout=timeout)


@pytest.mark.parametrize("timeout", ["1", True, None])
def test_timeout_of_wrong_type_is_a_type_error(timeout: object) -> None:
    with pytest.raises(TypeError, match="timeout"):
        GpuDetector(timeout=timeout)  # type: ignore[arg-type]


ROCM_TWO_CARDS = json.dumps(
    {
        "card0": {
            "VRAM Total Memory (B)": "25753026560",
            "VRAM Total Used Memory (B)": "1000000000",
            "Card series": "Radeon RX 7900 XTX",
            "Card model": "0x744c",
            "Unique ID": "0x1234abcd",
        },
        "card1": {
            "VRAM Total Memory (B)": "68702699520",
            "VRAM Total Used Memory (B)": "10747904",
            "Card Series": "AMD Instinct MI210",
            "Unique ID": "N/A",
        },
        "system": {"Driver version": "6.7.0"},
    }
)


def test_rocm_smi_lists_every_card(tools: Tools) -> None:
    tools.add(
        "rocm-smi", "WARNING: AMD GPU device(s) is/are in a low-power state.\n" + ROCM_TWO_CARDS
    )
    result = detect()
    assert result.method is DetectionMethod.ROCM_SMI
    assert result.gpus == [
        GpuInfo(0, "Radeon RX 7900 XTX", GpuVendor.AMD, 25753026560, 24753026560, "0x1234abcd"),
        GpuInfo(1, "AMD Instinct MI210", GpuVendor.AMD, 68702699520, 68702699520 - 10747904, None),
    ]
    assert result.total_vram_bytes == 25753026560 + 68702699520
    assert tuple(tools.args("rocm-smi")) == ROCM_SMI_ARGS


@pytest.mark.parametrize(
    "text",
    [
        "not json at all",
        "[1, 2, 3]",
        '{"card0": "oops"}',
        '{"card0": {"VRAM Total Memory (B)": "lots"}}',
        '{"card0": {"VRAM Total Memory (B)": true}}',
        '{"card0": {"VRAM Total Memory (B)": "-5"}}',
        '{"system": {"Driver version": "6.7.0"}}',
        '{"card0": {',
        "{" * 100_000,
    ],
)
def test_rocm_smi_garbage_finds_nothing(text: str) -> None:
    assert parse_rocm_smi(text) == []


def test_rocm_smi_card_without_used_memory() -> None:
    (gpu,) = parse_rocm_smi('{"card3": {"VRAM Total Memory (B)": 17163091968}}')
    assert (gpu.index, gpu.name, gpu.free_vram_bytes, gpu.uuid) == (3, "AMD GPU", None, None)


def test_nvidia_smi_name_with_a_comma() -> None:
    (gpu,) = parse_nvidia_smi("0, Quadro RTX 8000, Rev. B, 46080, 0, GPU-1\n")
    assert gpu.name == "Quadro RTX 8000, Rev. B"
    assert gpu.total_vram_bytes == 46080 * MiB


def test_nvidia_smi_blank_lines_and_order() -> None:
    gpus = parse_nvidia_smi("\n1, B, 1024, 0, GPU-2\n\n0, A, 2048, 0, GPU-1\n\n")
    assert [(g.index, g.name) for g in gpus] == [(0, "A"), (1, "B")]


def test_detect_or_default_assumes_one_gpu(tools: Tools) -> None:
    result = GpuDetector(timeout=TOOL_TIMEOUT).detect_or_default(8 * GiB)
    assert result.method is DetectionMethod.NONE
    assert result.gpus == [GpuInfo(0, "assumed GPU", GpuVendor.UNKNOWN, 8 * GiB, None, None)]
    assert result.total_vram_bytes == 8 * GiB


def test_detect_or_default_returns_what_was_found(tools: Tools) -> None:
    tools.add("nvidia-smi", SMI_NOUNITS)
    result = GpuDetector(timeout=TOOL_TIMEOUT).detect_or_default(8 * GiB)
    assert result.method is DetectionMethod.NVIDIA_SMI
    assert len(result.gpus) == 3


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError)])
def test_detect_or_default_checks_its_argument(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="default_bytes"):
        GpuDetector().detect_or_default(value)  # type: ignore[arg-type]


def test_auto_detect_budgets_the_detected_device(tools: Tools) -> None:
    tools.add("nvidia-smi", SMI_NOUNITS)
    config = ArbiterConfig.auto_detect(device=1)
    assert config.vram_budget == int(81559 * MiB * 0.9)
    by_uuid = ArbiterConfig.auto_detect(device="GPU-cccccccc-0000-0000-0000-000000000000")
    assert by_uuid.vram_budget == int(23028 * MiB * 0.9)


def test_auto_detect_without_gpu_assumes_8_gib(tools: Tools) -> None:
    assert ArbiterConfig.auto_detect().vram_budget == int(8 * GiB * 0.9)


def test_result_total_must_be_the_sum() -> None:
    gpu = GpuInfo(0, "A", GpuVendor.NVIDIA, GiB)
    with pytest.raises(ValueError, match="sum"):
        GpuDetectionResult(DetectionMethod.NVML, [gpu], 2 * GiB)
    assert GpuDetectionResult.of(DetectionMethod.NVML, [gpu, gpu]).total_vram_bytes == 2 * GiB


def test_result_as_dict_is_json_ready() -> None:
    result = GpuDetectionResult.of(
        DetectionMethod.NVIDIA_SMI, [GpuInfo(0, "A", GpuVendor.NVIDIA, GiB, MiB, "GPU-1")]
    )
    assert json.loads(json.dumps(result.as_dict())) == {
        "method": "nvidia_smi",
        "gpus": [
            {
                "index": 0,
                "name": "A",
                "vendor": "nvidia",
                "total_vram_bytes": GiB,
                "free_vram_bytes": MiB,
                "uuid": "GPU-1",
            }
        ],
        "total_vram_bytes": GiB,
    }


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"index": -1}, ValueError),
        ({"index": True}, TypeError),
        ({"name": None}, TypeError),
        ({"vendor": "intel"}, ValueError),
        ({"vendor": 3}, TypeError),
        ({"total_vram_bytes": 0}, ValueError),
        ({"total_vram_bytes": 1.0}, TypeError),
        ({"free_vram_bytes": -1}, ValueError),
        ({"free_vram_bytes": 2 * GiB}, ValueError),
        ({"uuid": 5}, TypeError),
    ],
)
def test_gpu_info_is_validated(fields: dict[str, object], error: type[Exception]) -> None:
    base: dict[str, object] = {
        "index": 0,
        "name": "A",
        "vendor": GpuVendor.NVIDIA,
        "total_vram_bytes": GiB,
    }
    with pytest.raises(error):
        GpuInfo(**{**base, **fields})  # type: ignore[arg-type]


def test_gpu_info_accepts_a_vendor_string() -> None:
    assert GpuInfo(0, "A", "amd", GiB).vendor is GpuVendor.AMD  # type: ignore[arg-type]


def test_tools_run_with_a_fixed_locale(tools: Tools) -> None:
    tools.add_shell("nvidia-smi", f'echo "$LC_ALL" > {tools.directory / "locale"}\nexit 1\n')
    detect()
    assert (tools.directory / "locale").read_text().strip() == "C"
