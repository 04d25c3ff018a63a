"""The trace format of DESIGN.md and the built-in trace generator."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from arbiter import GiB, Priority, WorkloadType
from arbiter.cli import _trace
from arbiter.cli._trace import TraceError, builtin_trace, load_trace, parse_trace

TRACES = Path(__file__).parent / "traces"

GOOD = {
    "at": 1.5,
    "workload": "llm_inference",
    "priority": "user_facing",
    "memory_gb": 6,
    "duration": 2.5,
}


def line(**changes: object) -> str:
    data = {**GOOD, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...})


def test_a_row_reads_sizes_in_gib_and_names_as_enums() -> None:
    trace = parse_trace([line(min_memory_gb=3, timeout=30)])
    (row,) = trace.rows
    assert row.line == 1 and row.at == 1.5 and row.duration == 2.5
    assert row.workload is WorkloadType.LLM_INFERENCE
    assert row.priority is Priority.USER_FACING
    assert row.memory == 6 * GiB and row.min_memory == 3 * GiB and row.elastic
    assert row.timeout == 30.0


def test_optional_keys_default_to_not_elastic_and_no_timeout() -> None:
    (row,) = parse_trace([line()]).rows
    assert row.min_memory is None and not row.elastic and row.timeout is None
    assert row.preemptible and not row.resumable


def test_preemptible_and_resumable_are_read() -> None:
    (row,) = parse_trace([line(preemptible=False, resumable=True)]).rows
    assert not row.preemptible and row.resumable


@pytest.mark.parametrize("key", ["preemptible", "resumable"])
@pytest.mark.parametrize("value", [0, 1, "false", None])
def test_preemptible_and_resumable_must_be_booleans(key: str, value: object) -> None:
    with pytest.raises(TraceError, match=f"line 1: {key} must be true or false"):
        parse_trace([line(**{key: value})])


def test_a_trace_with_no_rows_is_bad_input() -> None:
    with pytest.raises(TraceError, match=r"t\.jsonl has no rows"):
        parse_trace(["", "  "], source="t.jsonl")


def test_a_trace_with_too_many_rows_is_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_trace, "MAX_ROWS", 3)
    assert len(parse_trace([line()] * 3).rows) == 3
    with pytest.raises(TraceError, match="line 4: more than 3 rows"):
        parse_trace([line()] * 4)


def test_dash_reads_standard_input(monkeypatch: pytest.MonkeyPatch) -> None:
    data = (line(at=2) + "\n" + line(at=1) + "\n").encode()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    trace = load_trace("-")
    assert [r.at for r in trace.rows] == [1.0, 2.0] and trace.name == "-"


def test_rows_are_sorted_by_arrival_and_blank_lines_skipped() -> None:
    trace = parse_trace([line(at=5), "", "   ", line(at=1)])
    assert [(r.at, r.line) for r in trace.rows] == [(1.0, 4), (5.0, 1)]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "must be a JSON object"),
        (line(colour="red"), "unknown key 'colour'"),
        (line(duration=...), "missing key 'duration'"),
        (line(workload="audio"), "workload must be one of"),
        (line(priority="urgent"), "priority must be one of"),
        (line(priority="USER_FACING"), "priority must be one of"),
        (line(memory_gb=0), "memory_gb must be > 0"),
        (line(memory_gb=-2), "memory_gb must be > 0"),
        (line(memory_gb="6"), "memory_gb must be a finite number"),
        (line(memory_gb=True), "memory_gb must be a finite number"),
        (line(min_memory_gb=0), "min_memory_gb must be > 0"),
        (line(min_memory_gb=8), "exceeds memory_gb"),
        (line(at=-1), "at must be >= 0"),
        (line(duration=-1), "duration must be >= 0"),
        (line(timeout=-1), "timeout must be >= 0"),
        (line(at=float("nan")), "at must be a finite number"),
    ],
)
def test_bad_rows_name_the_line_and_the_problem(text: str, problem: str) -> None:
    with pytest.raises(TraceError) as info:
        parse_trace([line(), "", text], source="t.jsonl")
    message = str(info.value)
    assert message.startswith("t.jsonl line 3: ")
    assert problem in message
    assert "\n" not in message


def test_load_trace_reads_a_file(tmp_path: Path) -> None:
    trace = load_trace(TRACES / "preempt.jsonl")
    assert len(trace.rows) == 2 and trace.external == ()
    assert trace.source.endswith("preempt.jsonl") and trace.name == trace.source


def test_load_trace_refuses_a_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="trace file not found"):
        load_trace(tmp_path / "missing.jsonl")
    with pytest.raises(TraceError, match="cannot read trace file"):
        load_trace(tmp_path)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TraceError, match="not UTF-8"):
        load_trace(binary)


def test_builtin_trace_is_deterministic_per_seed() -> None:
    assert builtin_trace(seed=3, minutes=10) == builtin_trace(seed=3, minutes=10)
    assert builtin_trace(seed=3, minutes=10) != builtin_trace(seed=4, minutes=10)


def test_builtin_trace_looks_like_a_shared_card() -> None:
    trace = builtin_trace(seed=0, minutes=60)
    rows = trace.rows
    assert [r.line for r in rows] == list(range(1, len(rows) + 1))
    assert [r.at for r in rows] == sorted(r.at for r in rows)
    resident = rows[0]
    assert resident.workload is WorkloadType.LLM_INFERENCE and resident.duration == 3600
    assert (resident.memory, resident.min_memory) == (14 * GiB, 8 * GiB)
    # The weights the chats run on: never preempted, and they keep what they did.
    assert not resident.preemptible and resident.resumable
    assert all(r.preemptible and not r.resumable for r in rows[1:])
    assert trace.name == "built-in"
    chats = [r for r in rows if r.priority is Priority.USER_FACING]
    images = [r for r in rows if r.workload is WorkloadType.IMAGE_GENERATION]
    videos = [r for r in rows if r.workload is WorkloadType.VIDEO_GENERATION]
    # Poisson arrivals: about one chat per 6 s, one image per 45 s, one render per 4 min.
    assert 450 <= len(chats) <= 750 and 50 <= len(images) <= 110 and 6 <= len(videos) <= 30
    assert all(1 * GiB <= r.memory <= 4 * GiB and 2 <= r.duration <= 20 for r in chats)
    assert all(6 * GiB <= r.memory <= 10 * GiB and 5 <= r.duration <= 30 for r in images)
    assert all(r.priority is Priority.NORMAL for r in images)
    assert all(12 * GiB <= r.memory <= 20 * GiB and r.elastic for r in videos)
    assert all(r.priority is Priority.BACKGROUND and r.duration >= 120 for r in videos)
    # The external process: grabs and releases, never two at once.
    used = [step.used for step in trace.external]
    assert used and used[1::2] == [0] * (len(used) // 2)
    assert all(3 * GiB <= u <= 6 * GiB for u in used[::2])
    assert [s.at for s in trace.external] == sorted(s.at for s in trace.external)


@pytest.mark.parametrize("minutes", [0, -5, float("inf")])
def test_builtin_trace_refuses_a_bad_length(minutes: float) -> None:
    with pytest.raises(ValueError, match="minutes"):
        builtin_trace(minutes=minutes)
