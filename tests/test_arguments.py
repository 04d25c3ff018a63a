"""Rule 1 of "Requesting memory": every argument is checked first, at the call.

A bad argument raises ``TypeError`` (wrong type) or ``ValueError`` (wrong value) whose
message names the argument, and changes nothing: neither the state nor the counters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import anyio
import pytest
from arbiter_helpers import settle

from arbiter import (
    Arbiter,
    ArbiterConfig,
    ArbiterStats,
    GiB,
    Priority,
    ShuttingDown,
    WorkloadType,
)

LLM = WorkloadType.LLM_INFERENCE
NAN = float("nan")

# (argument, bad value, the error it must raise)
BAD_ARGUMENTS: list[tuple[str, Any, type[Exception]]] = [
    ("memory", 0, ValueError),
    ("memory", -1, ValueError),
    ("memory", -GiB, ValueError),
    ("memory", 1.5, TypeError),
    ("memory", float(GiB), TypeError),
    ("memory", True, TypeError),
    ("memory", False, TypeError),
    ("memory", "1", TypeError),
    ("memory", None, TypeError),
    ("memory", NAN, TypeError),
    ("min_memory", 0, ValueError),
    ("min_memory", -1, ValueError),
    ("min_memory", 1.5, TypeError),
    ("min_memory", True, TypeError),
    ("min_memory", "1", TypeError),
    ("min_memory", NAN, TypeError),
    ("min_memory", 2 * GiB + 1, ValueError),  # more than memory (2 GiB)
    ("workload", "unknown", ValueError),
    ("workload", "LLM_INFERENCE_", ValueError),
    ("workload", "", ValueError),
    ("workload", None, TypeError),
    ("workload", 0, TypeError),
    ("workload", Priority.NORMAL, TypeError),
    ("priority", "urgent", ValueError),
    ("priority", "", ValueError),
    ("priority", None, TypeError),
    ("priority", 1.5, TypeError),
    ("priority", WorkloadType.LLM_INFERENCE, ValueError),  # a str, but no priority's name
    ("timeout", -1, ValueError),
    ("timeout", -0.001, ValueError),
    ("timeout", -math.inf, ValueError),
    ("timeout", NAN, ValueError),
    ("timeout", "1", TypeError),
    ("timeout", True, TypeError),
    ("timeout", [1], TypeError),
    ("min_quality", 0, ValueError),
    ("min_quality", 0.0, ValueError),
    ("min_quality", -0.5, ValueError),
    ("min_quality", 1.5, ValueError),
    ("min_quality", 1.0000001, ValueError),
    ("min_quality", NAN, ValueError),
    ("min_quality", math.inf, ValueError),
    ("min_quality", "0.5", TypeError),
    ("min_quality", True, TypeError),
    ("keep_alive", -1, ValueError),
    ("keep_alive", NAN, ValueError),
    ("keep_alive", "10", TypeError),
    ("keep_alive", True, TypeError),
    ("label", 1, TypeError),
    ("label", b"chat", TypeError),
    ("label", ["chat"], TypeError),
    ("preemptible", 1, TypeError),
    ("preemptible", "yes", TypeError),
    ("preemptible", None, TypeError),
]


def _call_args(name: str, value: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional workload and priority, keyword everything else; one argument bad."""
    args: dict[str, Any] = {"workload": LLM, "priority": Priority.NORMAL, "memory": 2 * GiB}
    args[name] = value
    workload, priority = args.pop("workload"), args.pop("priority")
    return (workload, priority), args


def _counters(stats: ArbiterStats) -> dict[str, Any]:
    """Every stats field; the time-weighted averages are compared with a tolerance."""
    fields = dataclasses.asdict(stats)
    for name in ("avg_memory_pressure", "avg_llm_quality", "avg_diffusion_quality"):
        fields[name] = pytest.approx(fields[name])
    return fields


def _check_message(exc: BaseException, name: str, value: Any) -> None:
    message = str(exc)
    assert name in message, f"{message!r} does not name {name!r}"
    assert repr(value) in message, f"{message!r} does not show {value!r}"


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "value", "error"), BAD_ARGUMENTS)
async def test_bad_argument_raises_and_changes_nothing(
    name: str, value: Any, error: type[Exception]
) -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    held = await arbiter.request_allocation(LLM, Priority.NORMAL, 9 * GiB)
    async with anyio.create_task_group() as tg:
        # Something waits, so a request that slipped through would queue behind it.
        tg.start_soon(lambda: arbiter.request_allocation(LLM, Priority.NORMAL, 5 * GiB))
        await settle()
        state, stats = arbiter.state(), _counters(arbiter.stats())
        args, kwargs = _call_args(name, value)
        with pytest.raises(error) as info:
            await arbiter.request_allocation(*args, **kwargs)
        assert type(info.value) in (TypeError, ValueError)
        _check_message(info.value, name, value)
        assert arbiter.state() == state
        assert _counters(arbiter.stats()) == stats
        # The same through allocate(): the body never runs.
        with pytest.raises(error) as info:
            async with arbiter.allocate(*args, **kwargs):
                pytest.fail("the body ran")
        _check_message(info.value, name, value)
        assert arbiter.state() == state
        assert _counters(arbiter.stats()) == stats
        arbiter._ledger.check_invariants()
        tg.cancel_scope.cancel()
    held.release()


@pytest.mark.anyio
async def test_argument_errors_come_before_insufficient_memory() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    with pytest.raises(TypeError, match="label"):
        await arbiter.request_allocation(LLM, "normal", 100 * GiB, label=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        await arbiter.request_allocation(LLM, "normal", 100 * GiB, timeout=-1)
    assert arbiter.stats().total_allocations == 0


@pytest.mark.anyio
async def test_argument_errors_come_before_shutting_down() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    await arbiter.aclose()
    with pytest.raises(ValueError, match="memory"):
        await arbiter.request_allocation(LLM, "normal", 0)
    with pytest.raises(ShuttingDown):
        await arbiter.request_allocation(LLM, "normal", 1)
    stats = arbiter.stats()
    assert stats.total_allocations == stats.failed_allocations == 1


@pytest.mark.anyio
async def test_enum_string_values_are_accepted() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    alloc = await arbiter.request_allocation("llm_inference", "user_facing", 1 * GiB)
    assert alloc.workload is WorkloadType.LLM_INFERENCE
    assert alloc.priority is Priority.USER_FACING
    async with arbiter.allocate("video_generation", "background", memory=1 * GiB) as other:
        assert other.workload is WorkloadType.VIDEO_GENERATION
        assert other.workload.is_diffusion
        assert other.priority is Priority.BACKGROUND
    for workload in WorkloadType:
        for priority in Priority:
            got = await arbiter.request_allocation(workload.value, priority.name.lower(), 1)
            assert (got.workload, got.priority) == (workload, priority)
            got.release()
    assert arbiter.recommended_quality("image_generation", "high") == 1.0
    assert arbiter.state().active_llm_workloads == 1


@pytest.mark.anyio
async def test_good_edge_values_are_accepted() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    alloc = await arbiter.request_allocation(
        LLM,
        Priority.NORMAL,
        2 * GiB,
        min_memory=2 * GiB,  # == memory
        timeout=0,
        min_quality=1,
        preemptible=False,
        keep_alive=0.5,
        label="",
    )
    assert alloc.memory == 2 * GiB and alloc.min_memory == 2 * GiB and alloc.label == ""
    one = await arbiter.request_allocation(LLM, Priority.NORMAL, 1, timeout=math.inf)
    assert one.memory == 1
    tiny = await arbiter.request_allocation(LLM, Priority.NORMAL, 1, min_quality=1e-9, timeout=1)
    assert tiny.memory == 1


def test_release_allocation_rejects_what_is_not_its_allocation() -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)

    async def other_arbiters_allocation() -> Any:
        other = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
        return await other.request_allocation(LLM, Priority.NORMAL, 1 * GiB)

    foreign = anyio.run(other_arbiters_allocation)
    for bad in (None, "alloc-1", foreign):
        with pytest.raises(TypeError, match="alloc"):
            arbiter.release_allocation(bad)  # type: ignore[arg-type]
    assert foreign.released is False
