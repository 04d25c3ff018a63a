"""The ``arbiter`` command line: in process through ``arbiter.cli.main(argv)``, and a few
smoke tests of the real console entry point as a subprocess (``python -m arbiter``)."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest
import structlog

from arbiter import ArbiterConfig
from arbiter.cli import main

pytest.importorskip("rich")
pytest.importorskip("trio")

TRACES = Path(__file__).parent / "traces"
PRIORITIES = {"user_facing", "high", "normal", "background"}
WORKLOADS = {"llm_inference", "image_generation", "video_generation"}
GPU_KEYS = {"index", "name", "vendor", "total_vram_bytes", "free_vram_bytes", "uuid"}
POLICY_KEYS = {
    "wait_p50_s",
    "wait_p99_s",
    "completed",
    "timeouts",
    "rejected",
    "preemptions",
    "mean_quality",
    "utilization",
    "goodput",
}


class Done:
    """What an in-process run of `main` returned and printed."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Done]:
    def run(*args: str | Path) -> Done:
        structlog.reset_defaults()  # as in a fresh process: no logging set up by tests
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Done(code, out, err)

    return run


def test_help_names_both_commands_and_every_simulate_option(cli: Callable[..., Done]) -> None:
    # The console entry point's --help is smoke-tested as a process in test_package.py.
    top = cli("--help")
    assert top.returncode == 0 and "detect" in top.stdout and "simulate" in top.stdout
    sim = cli("simulate", "--help")
    assert sim.returncode == 0
    for option in ("--vram-gb", "--trace", "--policies", "--plot", "--json", "--seed"):
        assert option in sim.stdout


def test_detect_json_has_the_documented_shape(cli: Callable[..., Done]) -> None:
    done = cli("detect", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == {"method", "gpus", "total_vram_bytes", "config"}
    assert data["method"] in {"nvml", "nvidia_smi", "rocm_smi", "none"}
    for gpu in data["gpus"]:
        assert set(gpu) == {
            "index",
            "name",
            "vendor",
            "total_vram_bytes",
            "free_vram_bytes",
            "uuid",
        }
    assert data["total_vram_bytes"] == sum(g["total_vram_bytes"] for g in data["gpus"])
    assert set(data["config"]) == {f.name for f in fields(ArbiterConfig)}
    # What auto_detect() builds: 90 % of the device, 8 GiB assumed when none is found.
    device = data["gpus"][0]["total_vram_bytes"] if data["gpus"] else 8 * 1024**3
    assert data["config"]["vram_budget"] == int(device * 0.9)


def test_detect_prints_tables(cli: Callable[..., Done]) -> None:
    done = cli("detect")
    assert done.returncode == 0, done.stderr
    assert "auto_detect()" in done.stdout and "vram_budget" in done.stdout


def test_simulate_builtin_trace_json_has_the_documented_shape(cli: Callable[..., Done]) -> None:
    done = cli("simulate", "--minutes", "5", "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # a short run prints no progress
    data = json.loads(done.stdout)
    assert set(data) == {"vram_gb", "trace", "rows", "seed", "policies"}
    assert data["vram_gb"] == 24.0 and data["trace"] == "built-in" and data["seed"] == 0
    assert data["rows"] > 0
    assert list(data["policies"]) == ["fifo", "priority", "adaptive"]
    for figures in data["policies"].values():
        assert set(figures) == POLICY_KEYS
        assert set(figures["wait_p50_s"]) == set(figures["wait_p99_s"]) == PRIORITIES
        assert set(figures["mean_quality"]) == WORKLOADS
        assert 0.0 < figures["utilization"] <= 1.0
        assert 0.0 < figures["goodput"] <= figures["utilization"] + 1e-9
    top = {name: p["wait_p99_s"]["user_facing"] for name, p in data["policies"].items()}
    assert top["adaptive"] <= 0.1 * top["fifo"]


def test_simulate_hand_computed_trace(cli: Callable[..., Done]) -> None:
    # A background image holds 20 of 24 GiB for 100 s; a 6 GiB chat arrives at 1 s.
    done = cli("simulate", "--trace", TRACES / "preempt.jsonl", "--json", "--load-gbps", "2")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["trace"] == str(TRACES / "preempt.jsonl") and data["rows"] == 2
    policies = data["policies"]
    assert policies["fifo"]["wait_p50_s"]["user_facing"] == pytest.approx(99.0)
    assert policies["fifo"]["preemptions"] == 0
    # adaptive preempts the image and serves the chat within the reclaim grace.
    assert policies["adaptive"]["wait_p99_s"]["user_facing"] <= ArbiterConfig().reclaim_grace
    assert policies["adaptive"]["preemptions"] == 1
    assert all(p["completed"] == 2 for p in policies.values())
    assert set(policies["fifo"]["wait_p50_s"]) == {"user_facing", "background"}
    # The image starts over at 6 s after a 10 s reload (20 GiB at 2 GiB/s): done at 116 s.
    assert policies["adaptive"]["goodput"] == pytest.approx(
        (20 * 100 + 6 * 5) / (24 * 116), abs=1e-4
    )


def test_simulate_reads_a_trace_from_standard_input(
    cli: Callable[..., Done], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = (TRACES / "preempt.jsonl").read_bytes()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    done = cli("simulate", "--trace", "-", "--json", "--policies", "fifo")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["trace"] == "-" and result["rows"] == 2


@pytest.mark.cpu_heavy
def test_same_seed_same_json_in_process(cli: Callable[..., Done]) -> None:
    runs = {cli("simulate", "--minutes", "8", "--seed", "5", "--json").stdout for _ in range(2)}
    assert len(runs) == 1
    other = cli("simulate", "--minutes", "8", "--seed", "6", "--json").stdout
    assert other not in runs and json.loads(other)["seed"] == 6


def test_same_seed_same_json_whatever_the_hash_seed() -> None:
    # Side by side: the three processes' start-up overlaps.
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "arbiter", "simulate", "--minutes", "8", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        for hash_seed in ("0", "1", "4242")
    ]
    outputs = set()
    try:
        for run in runs:
            out, err = run.communicate(timeout=120)
            assert run.returncode == 0, err
            outputs.add(out)
    finally:
        for run in runs:
            run.kill()
    assert len(outputs) == 1


def test_simulate_report_table_and_verdict(cli: Callable[..., Done]) -> None:
    done = cli("simulate", "--trace", TRACES / "preempt.jsonl", "--policies", "fifo,adaptive")
    assert done.returncode == 0, done.stderr
    assert "wait p99 user_facing (s)" in done.stdout and "goodput" in done.stdout
    assert "adaptive wins on user_facing p99 wait" in done.stdout
    assert "priority" not in done.stdout.split("Schedulers compared")[1].splitlines()[2]


@pytest.mark.cpu_heavy
def test_simulate_plot_writes_a_png(cli: Callable[..., Done], tmp_path: Path) -> None:
    out = tmp_path / "timeline.png"
    # Two schedulers, two rows (a 680-pixel figure): the file's format is what is checked
    # here, and each row costs about 0.15 s of drawing.
    done = cli(
        "simulate", "--trace", TRACES / "elastic.jsonl", "--policies", "fifo,adaptive",
        "--plot", out, "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    json.loads(done.stdout)  # the plot leaves stdout pure JSON
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 1000 and height >= 600 and len(data) > 20_000


@pytest.mark.cpu_heavy
def test_simulate_plot_writes_the_format_its_suffix_names(
    cli: Callable[..., Done], tmp_path: Path
) -> None:
    out = tmp_path / "timeline.svg"
    done = cli(
        "simulate", "--trace", TRACES / "elastic.jsonl", "--policies", "fifo",
        "--plot", out, "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"<svg" in out.read_bytes()[:500]


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) that process ``pid`` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_exits_130_with_one_line() -> None:
    # A long run, interrupted once it is simulating (the progress line says so).
    process = subprocess.Popen(
        [sys.executable, "-m", "arbiter", "simulate", "--minutes", "10000", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Interrupted once past its imports (a SIGINT during `import arbiter.cli` is
        # Python's, not the command's): measured in the child's CPU time, which load on
        # the machine does not stretch as it stretches a sleep. Its imports take about
        # 0.1 s of CPU (a whole `--minutes 1` run 0.11 s); later is fine too.
        deadline = time.monotonic() + 60
        while _cpu_seconds(process.pid) < 0.25 and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert err.splitlines()[-1:] == ["arbiter: interrupted"]
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("json_output", [False, True])
def test_a_closed_pipe_ends_quietly(json_output: bool) -> None:
    # A short run: the report (a few KiB at any length) is written once, at the end.
    command = [sys.executable, "-m", "arbiter", "simulate", "--minutes", "1"]
    if json_output:
        command.append("--json")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.read(5)  # what `| head -c 5` reads
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) in (0, 141)
    assert err == ""


GOOD_ROW = {
    "at": 0,
    "workload": "llm_inference",
    "priority": "normal",
    "memory_gb": 1,
    "duration": 1,
}


def _trace_with_line_2(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n" + text + "\n")
    return str(path)


def _row(**changes: object) -> str:
    return "<" + json.dumps({**GOOD_ROW, **changes})


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["simulate", "--trace", "{tmp}/missing.jsonl"], "trace file not found"),
        (["simulate", "--trace", "<{not json"], "line 2: malformed JSON"),
        (["simulate", "--trace", _row(colour=1)], "line 2: unknown key 'colour'"),
        (["simulate", "--trace", _row(workload="audio")], "line 2: workload must be one of"),
        (["simulate", "--trace", _row(priority="asap")], "line 2: priority must be one of"),
        (["simulate", "--trace", _row(memory_gb=0)], "line 2: memory_gb must be > 0"),
        (["simulate", "--trace", _row(memory_gb=-3)], "line 2: memory_gb must be > 0"),
        (["simulate", "--trace", _row(min_memory_gb=-1)], "line 2: min_memory_gb must be > 0"),
        (["simulate", "--trace", _row(memory_gb=1e300)], "line 2: memory_gb must be at most"),
        (["simulate", "--trace", _row(at=1e17)], "line 2: at must be at most"),
        (["simulate", "--trace", _row(duration=1e9)], "line 2: duration must be at most"),
        (["simulate", "--vram-gb", "1e300"], "--vram-gb: must be at most"),
        (["simulate", "--policies", "fifo,lottery"], "unknown scheduler 'lottery'"),
        (["simulate", "--vram-gb", "0"], "--vram-gb"),
        (["simulate", "--vram-gb", "-8"], "--vram-gb"),
        (["simulate", "--vram-gb", "lots"], "--vram-gb"),
        (["simulate", "--vram-gb", "1e-12"], "--vram-gb"),
        (["simulate", "--colour"], "unrecognized arguments: --colour"),
        (["launch"], "invalid choice: 'launch'"),
        ([], "choose a command: detect, simulate, serve or status"),
        (["status", "--socket", ""], "--socket: must be a path, got ''"),
        (["simulate", "--plot", "{tmp}/no/such/folder/out.png"], "cannot write plot"),
        (["simulate", "--plot", "{tmp}/out.jpeg2"], "--plot: must end in .png"),
        (["simulate", "--trace", "{tmp}/t.jsonl", "--minutes", "3"], "--minutes applies"),
        (["simulate", "--seed", "x"], "--seed: must be an integer"),
        (["simulate", "--load-gbps", "0"], "--load-gbps"),
        (["simulate", "--load-gbps", "1e-6"], "--load-gbps: must be at least 0.01"),
        (["simulate", "--trace", _row(memory_gb=10**400)], "line 2: memory_gb must be a finite"),
        (["simulate", "--trace", _row(memory_gb=10**300)], "at most 1048576 GiB, got ~10**"),
        (["simulate", "--trace", _row(at=-(10**400))], "line 2: at must be a finite number"),
        (["simulate", "--trace", "<" + "[" * 100_000 + "]" * 100_000], "line 2: JSON nested"),
        (["simulate", "--trace", _row(resumable=1)], "line 2: resumable must be true or false"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(
    cli: Callable[..., Done], tmp_path: Path, args: list[str], expected: str
) -> None:
    argv = []
    for arg in args:
        if arg.startswith("<"):
            arg = _trace_with_line_2(tmp_path, arg[1:])
        argv.append(arg.replace("{tmp}", str(tmp_path)))
    done = cli(*argv)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("arbiter: error: ")
    assert expected in lines[0]
    assert done.stdout == ""


def test_an_empty_trace_is_bad_input(cli: Callable[..., Done], tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    done = cli("simulate", "--trace", empty)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"arbiter: error: {empty} has no rows"]
