"""The simulation engine, in process: traces small enough to work out by hand."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from arbiter import GiB, Priority, WorkloadType
from arbiter._stats import percentile
from arbiter.cli._record import Recorder, SchedulerResult
from arbiter.cli._simulate import SCHEDULERS, simulate
from arbiter.cli._trace import ExternalStep, Trace, TraceRow, builtin_trace, load_trace

pytest.importorskip("trio")

TRACES = Path(__file__).parent / "traces"
BUDGET = 24 * GiB
LLM, IMAGE, VIDEO = (
    WorkloadType.LLM_INFERENCE,
    WorkloadType.IMAGE_GENERATION,
    WorkloadType.VIDEO_GENERATION,
)


def run(
    trace: Trace, *names: str, budget: int = BUDGET, load_gbps: float = 4.0
) -> dict[str, SchedulerResult]:
    schedulers = [SCHEDULERS[n] for n in names]
    return {r.name: r for r in simulate(trace, schedulers, budget, load_gbps=load_gbps)}


def row(
    line: int, at: float, workload: WorkloadType, priority: Priority, gb: float, **kw: Any
) -> TraceRow:
    return TraceRow(line, at, workload, priority, int(gb * GiB), **kw)


def test_fifo_makes_user_facing_wait_behind_background_adaptive_preempts() -> None:
    # 20 of 24 GiB held by a background image for 100 s; a 6 GiB chat arrives at 1 s.
    results = run(load_trace(TRACES / "preempt.jsonl"), "fifo", "priority", "adaptive")
    fifo, priority, adaptive = results["fifo"], results["priority"], results["adaptive"]
    for plain in (fifo, priority):
        assert plain.wait_p50[Priority.USER_FACING] == pytest.approx(99.0)
        assert plain.preemptions == 0
        assert plain.last_completion == pytest.approx(105.0)
        # 20 GiB for 100 s and 6 GiB for 5 s, all of it useful, over 105 s of 24 GiB.
        assert plain.goodput == pytest.approx((20 * 100 + 6 * 5) / (24 * 105))
        assert plain.utilization == pytest.approx(plain.goodput)
    # Nothing elastic could shrink, so the grace is not waited: preempted at once.
    assert adaptive.wait_p99[Priority.USER_FACING] == pytest.approx(0.0, abs=1e-6)
    assert adaptive.preemptions == 1
    # The image was re-queued, waited for the chat (1 s -> 6 s), then paid for it: it
    # reloads its 20 GiB at 4 GiB/s (5 s) and starts its 100 s over.
    assert sorted(adaptive.wait_p50) == [Priority.BACKGROUND, Priority.USER_FACING]
    assert adaptive.wait_p99[Priority.BACKGROUND] == pytest.approx(4.95)
    assert adaptive.last_completion == pytest.approx(111.0)
    held = 20 * 1 + 6 * 5 + 20 * 105
    assert adaptive.utilization == pytest.approx(held / (24 * 111))
    # The second of work lost and the reload held memory but count for nothing.
    assert adaptive.goodput == pytest.approx((20 * 100 + 6 * 5) / (24 * 111))
    for result in results.values():
        assert result.completed == 2 and result.timeouts == 0 and result.rejected == 0


def test_a_resumable_row_keeps_its_progress_and_still_reloads() -> None:
    image, chat = load_trace(TRACES / "preempt.jsonl").rows
    trace = Trace(rows=(replace(image, resumable=True), chat))
    adaptive = run(trace, "adaptive", load_gbps=10.0)["adaptive"]
    assert adaptive.preemptions == 1
    # 1 s done before the chat; back at 6 s, 2 s of reload, then the 99 s left.
    assert adaptive.last_completion == pytest.approx(6 + 2 + 99)
    assert adaptive.goodput == pytest.approx((20 * 100 + 6 * 5) / (24 * 107))


def test_a_row_that_is_not_preemptible_is_never_preempted() -> None:
    image, chat = load_trace(TRACES / "preempt.jsonl").rows
    trace = Trace(rows=(replace(image, preemptible=False), chat))
    adaptive = run(trace, "adaptive")["adaptive"]
    assert adaptive.preemptions == 0
    assert adaptive.wait_p50[Priority.USER_FACING] == pytest.approx(99.0)


def test_elastic_holder_shrinks_for_user_facing_and_grows_back() -> None:
    results = run(load_trace(TRACES / "elastic.jsonl"), "fifo", "adaptive")
    fifo, adaptive = results["fifo"], results["adaptive"]
    # fifo: the chat waits its whole 30 s timeout behind the 20 GiB render.
    assert fifo.timeouts == 1 and fifo.completed == 1
    assert fifo.wait_p50[Priority.USER_FACING] == pytest.approx(30.0)
    assert fifo.mean_quality[LLM] is None  # it never held memory
    # adaptive: alone on the card, the render holds all 20 GiB at 1.0 (work-conserving);
    # the chat makes it shrink at once, nobody is preempted, and it grows back after.
    assert adaptive.preemptions == 0 and adaptive.timeouts == 0 and adaptive.completed == 2
    assert adaptive.wait_p99[Priority.USER_FACING] < 0.5
    assert adaptive.mean_quality[LLM] == 1.0
    steps = adaptive.timeline.memory[VIDEO]
    assert [t for t, _ in steps] == [0.0, 10.0, 15.0, 100.0]
    assert steps[0] == (0.0, 20 * GiB) and steps[2] == (15.0, 20 * GiB)
    # While the chat runs it holds at most the 16 GiB the chat leaves it.
    during = steps[1][1]
    assert 10 * GiB <= during <= 16 * GiB
    quality = 0.3 + 0.7 * (during - 10 * GiB) / (10 * GiB)
    # It runs at the quality of what it holds: 1.0 for 95 s, that for the chat's 5 s.
    assert adaptive.mean_quality[VIDEO] == pytest.approx((95 + quality * 5) / 100)
    assert adaptive.goodput == pytest.approx((20 * (95 + quality * 5) + 8 * 5) / (24 * 100))


def test_a_job_holding_its_full_memory_runs_at_full_quality() -> None:
    # A rigid image under pressure is announced a low target, but it holds all it asked
    # for: it runs (and is reported) at 1.0.
    trace = Trace(
        rows=(
            row(1, 0.0, LLM, Priority.HIGH, 12, duration=50.0),
            row(2, 0.0, IMAGE, Priority.BACKGROUND, 12, duration=50.0),
        )
    )
    adaptive = run(trace, "adaptive")["adaptive"]
    assert adaptive.mean_quality == {LLM: 1.0, IMAGE: 1.0}
    assert adaptive.goodput == pytest.approx(1.0)


def test_elastic_rows_run_at_the_quality_of_what_they_hold() -> None:
    # 8 GiB are taken by a resident for good; the render gets the 16 GiB left of its
    # 10..20 GiB, and keeps them: nothing else wants the memory (work-conserving).
    trace = Trace(
        rows=(
            row(1, 0.0, LLM, Priority.HIGH, 8, duration=1000.0),
            row(2, 1.0, VIDEO, Priority.BACKGROUND, 20, duration=100.0, min_memory=10 * GiB),
        )
    )
    adaptive = run(trace, "adaptive")["adaptive"]
    steps = adaptive.timeline.memory[VIDEO]
    assert steps[1][0] == 1.0 and steps[-1] == (101.0, 0)
    held = steps[1][1]
    assert 10 * GiB <= held <= 16 * GiB
    # Whatever it settles at, it is reported at the quality of that share, not 1.0.
    assert adaptive.mean_quality[VIDEO] is not None and adaptive.mean_quality[VIDEO] < 1.0


def test_fifo_submits_everything_at_one_priority_but_reports_each_rows_own() -> None:
    trace = Trace(
        rows=(
            row(1, 0.0, IMAGE, Priority.NORMAL, 20, duration=10.0),
            row(2, 1.0, IMAGE, Priority.BACKGROUND, 15, duration=10.0),
            row(3, 2.0, LLM, Priority.USER_FACING, 15, duration=10.0),
        )
    )
    results = run(trace, "fifo", "priority")
    # fifo serves arrival order: the background row first, the chat behind it.
    assert results["fifo"].wait_p50[Priority.BACKGROUND] == pytest.approx(9.0)
    assert results["fifo"].wait_p50[Priority.USER_FACING] == pytest.approx(18.0)
    # priority serves the chat first at 10 s (8 s), the background row at 20 s (19 s).
    assert results["priority"].wait_p50[Priority.USER_FACING] == pytest.approx(8.0)
    assert results["priority"].wait_p50[Priority.BACKGROUND] == pytest.approx(19.0)
    assert list(results["fifo"].wait_p50) == [
        Priority.USER_FACING,
        Priority.NORMAL,
        Priority.BACKGROUND,
    ]


def test_rejected_rows_are_larger_than_the_budget_as_requested() -> None:
    trace = Trace(
        rows=(
            row(1, 0.0, IMAGE, Priority.NORMAL, 30, duration=10.0),
            row(2, 0.0, VIDEO, Priority.BACKGROUND, 30, duration=10.0, min_memory=12 * GiB),
        )
    )
    results = run(trace, "fifo", "adaptive")
    assert results["fifo"].rejected == 2 and results["fifo"].completed == 0
    # adaptive asks for the elastic row's 12 GiB floor, which fits.
    assert results["adaptive"].rejected == 1 and results["adaptive"].completed == 1


def test_timed_out_waits_count_in_the_percentiles() -> None:
    trace = Trace(
        rows=(
            row(1, 0.0, IMAGE, Priority.NORMAL, 20, duration=100.0),
            row(2, 5.0, LLM, Priority.NORMAL, 10, duration=1.0, timeout=7.0),
        )
    )
    result = run(trace, "priority")["priority"]
    assert result.timeouts == 1 and result.completed == 1
    assert sorted([result.wait_p50[Priority.NORMAL], result.wait_p99[Priority.NORMAL]]) == [
        pytest.approx(3.5),
        pytest.approx(7.0 * 0.99),
    ]


def test_external_use_from_the_schedule_holds_requests_back() -> None:
    trace = Trace(
        rows=(row(1, 1.0, IMAGE, Priority.NORMAL, 20, duration=10.0),),
        external=(ExternalStep(0.0, 10 * GiB), ExternalStep(50.0, 0)),
    )
    result = run(trace, "adaptive")["adaptive"]
    # The poller sees the external process go within one poll interval (0.5 s).
    assert 49.0 <= result.wait_p50[Priority.NORMAL] <= 49.5 + 1e-6


@pytest.mark.cpu_heavy
def test_builtin_trace_meets_the_user_facing_targets() -> None:
    trace = builtin_trace(seed=1, minutes=20)
    results = run(trace, "fifo", "priority", "adaptive")
    fifo, priority, adaptive = results["fifo"], results["priority"], results["adaptive"]
    top = Priority.USER_FACING
    assert adaptive.wait_p99[top] <= 0.1 * fifo.wait_p99[top]
    assert adaptive.wait_p99[top] <= priority.wait_p99[top]
    assert adaptive.timeouts <= priority.timeouts
    assert adaptive.completed >= 0.9 * fifo.completed
    for result in results.values():
        assert result.completed + result.timeouts + result.rejected == len(trace.rows)
        assert 0.0 < result.utilization <= 1.0


def test_an_empty_trace_runs_and_reports_nothing() -> None:
    result = run(Trace(rows=()), "adaptive")["adaptive"]
    assert result.completed == 0 and result.utilization == 0.0
    assert result.wait_p50 == {} and result.mean_quality == {}


def test_progress_counts_every_job_of_every_run() -> None:
    trace = load_trace(TRACES / "preempt.jsonl")
    seen: list[int] = []
    simulate(trace, [SCHEDULERS["fifo"], SCHEDULERS["adaptive"]], BUDGET, progress=seen.append)
    assert sum(seen) == 4


def test_recorder_weights_quality_by_holding_time_and_utilization_by_span() -> None:
    recorder = Recorder(24 * GiB, [Priority.NORMAL], [LLM], first_arrival=0.0)
    holding = recorder.grant(LLM, 12 * GiB, 1.0, now=0.0)
    recorder.quality(holding, 0.5, now=30.0)
    recorder.resize(holding, 6 * GiB, now=30.0)
    recorder.release(holding, now=40.0)
    recorder.completed(Priority.NORMAL, 40.0, 12 * GiB, holding.useful)
    result = recorder.result("x")
    assert result.mean_quality[LLM] == pytest.approx((30 * 1.0 + 10 * 0.5) / 40)
    assert result.utilization == pytest.approx((12 * 30 + 6 * 10) / (24 * 40))
    # Useful work: its full 12 GiB x the quality it ran at, each second.
    assert holding.useful == pytest.approx(30 * 1.0 + 10 * 0.5)
    assert result.goodput == pytest.approx(12 * 35 / (24 * 40))
    assert result.wait_p50[Priority.NORMAL] is None


def test_recorder_splits_degraded_work_into_what_the_grant_explains() -> None:
    recorder = Recorder(24 * GiB, [Priority.NORMAL], [LLM], first_arrival=0.0)
    # Granted at 0.5, grows to 1.0 after 10 s, ends at 40 s.
    holding = recorder.grant(LLM, 6 * GiB, 0.5, now=0.0)
    recorder.resize(holding, 12 * GiB, now=10.0)
    recorder.quality(holding, 1.0, now=10.0)
    recorder.release(holding, now=40.0)
    recorder.completed(Priority.NORMAL, 40.0, 12 * GiB, holding.useful, holding.shortfall())
    result = recorder.result("x")
    assert result.goodput == pytest.approx(12 * (10 * 0.5 + 30) / (24 * 40))
    # 5 s of full-quality work lost; at 0.5 throughout it would have lost 20: capped at 5.
    assert result.degraded == pytest.approx(12 * 5 / (24 * 40))
    assert result.degraded_at_grant == result.degraded


def test_recorder_counts_no_work_before_a_reload_ends() -> None:
    recorder = Recorder(24 * GiB, [Priority.NORMAL], [LLM], first_arrival=0.0)
    holding = recorder.grant(LLM, 8 * GiB, 1.0, now=10.0, useful_from=12.0)
    recorder.release(holding, now=20.0)
    assert holding.useful == pytest.approx(8.0)


def test_the_one_percentile_interpolates_between_ranks() -> None:
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([0.0, 10.0], 0.5) == 5.0
    assert percentile(list(map(float, range(101))), 0.99) == pytest.approx(99.0)


def test_a_job_that_fails_ends_the_run_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from arbiter.cli import _simulate

    serve = _simulate._Run._serve

    async def failing(self: Any, row: TraceRow) -> None:
        if row.line == 2:
            raise LookupError("job 2 broke")
        await serve(self, row)

    monkeypatch.setattr(_simulate._Run, "_serve", failing)
    trace = Trace(
        rows=tuple(row(n, float(n), LLM, Priority.NORMAL, 4, duration=600.0) for n in (1, 2, 3))
    )
    with pytest.raises(BaseExceptionGroup) as raised:  # out of the run's task group
        run(trace, "adaptive")
    assert raised.group_contains(LookupError, match="job 2 broke", depth=1)


def test_simulate_scheduler_runs_on_trio_with_the_same_results() -> None:
    import anyio
    import trio.testing

    from arbiter.cli._simulate import simulate_scheduler

    trace = load_trace(TRACES / "preempt.jsonl")
    on_trio = anyio.run(
        simulate_scheduler,
        trace,
        SCHEDULERS["adaptive"],
        BUDGET,
        backend="trio",
        backend_options={"clock": trio.testing.MockClock(autojump_threshold=0)},
    )
    [on_asyncio] = simulate(trace, [SCHEDULERS["adaptive"]], BUDGET)
    assert on_trio.completed == on_asyncio.completed == 2
    assert on_trio.preemptions == on_asyncio.preemptions == 1
    assert on_trio.last_completion == pytest.approx(on_asyncio.last_completion)
