"""The in-process contract, run against `Arbiter` and against `RemoteArbiter` talking to an
``arbiter serve`` subprocess: the same tests prove the same semantics (timing aside).

One daemon serves the whole module (10 GiB); every test leaves it empty, which the
fixture checks. Stats are compared as differences, since the daemon's stats are shared.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from remote_helpers import LINUX_ONLY, daemon, daemon_log

from arbiter import (
    Allocation,
    AllocationTimeout,
    Arbiter,
    ArbiterConfig,
    ArbiterState,
    ArbiterStats,
    GiB,
    InsufficientMemory,
    Preempted,
    Priority,
    RemoteArbiter,
    ShuttingDown,
    WorkloadType,
)
from arbiter.testing import FakeGpu

pytestmark = [pytest.mark.anyio, LINUX_ONLY]

LLM = WorkloadType.LLM_INFERENCE
IMAGE = WorkloadType.IMAGE_GENERATION
BUDGET_GB = 10


@pytest.fixture(scope="module")
def daemon_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    sock = tmp_path_factory.mktemp("contract") / "gpu.sock"
    with daemon(sock, vram_gb=BUDGET_GB):
        yield sock
    assert "session failed" not in daemon_log(sock).read_text()


@pytest.fixture(params=["local", "remote"])
async def arbiter(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "local":
        config = ArbiterConfig.for_vram_gb(BUDGET_GB)
        async with Arbiter(config, probe=FakeGpu(total=BUDGET_GB * GiB)) as local:
            yield local
        return
    sock = request.getfixturevalue("daemon_socket")
    async with RemoteArbiter(sock) as remote:
        yield remote
        with anyio.fail_after(10):
            await remote.refresh()
        state = remote.state()
        assert (state.vram_used, state.waiting) == (0, 0), "a test left memory held"


async def settle(arbiter: Any) -> None:
    """Until what was sent has been acted on (and, remote, its state pushed back)."""
    await anyio.wait_all_tasks_blocked()
    if isinstance(arbiter, RemoteArbiter):
        with anyio.fail_after(10):  # a daemon that stopped answering fails, never hangs
            await arbiter.refresh()
        await anyio.wait_all_tasks_blocked()


async def test_grant_at_once_and_state(arbiter: Any) -> None:
    alloc = await arbiter.request_allocation(LLM, "normal", 4 * GiB, label="chat")
    assert (alloc.memory, alloc.workload, alloc.priority, alloc.label) == (
        4 * GiB, LLM, Priority.NORMAL, "chat",
    )  # fmt: skip
    assert isinstance(alloc.id, str) and 0 < alloc.quality <= 1.0
    assert not alloc.released and not alloc.preempted
    assert type(alloc) is Allocation  # one handle type, over either port
    state = arbiter.state()
    assert isinstance(state, ArbiterState)
    assert state.vram_used == 4 * GiB and state.active_llm_workloads >= 1
    alloc.release()
    alloc.release()  # idempotent
    assert alloc.released
    await settle(arbiter)
    assert arbiter.state().vram_used == 0


async def test_timeout_and_stats(arbiter: Any) -> None:
    await settle(arbiter)
    before = arbiter.stats()
    holder = await arbiter.request_allocation(LLM, "high", 8 * GiB, preemptible=False)
    with pytest.raises(AllocationTimeout) as caught:
        await arbiter.request_allocation(LLM, "normal", 4 * GiB, timeout=0.05)
    assert isinstance(caught.value, TimeoutError) and caught.value.timeout == 0.05
    holder.release()
    await settle(arbiter)
    after = arbiter.stats()
    assert isinstance(after, ArbiterStats)
    assert after.total_allocations - before.total_allocations == 2
    assert after.successful_allocations - before.successful_allocations == 1
    assert after.timeouts - before.timeouts == 1
    assert after.failed_allocations - before.failed_allocations == 1


async def test_insufficient_memory_and_argument_errors(arbiter: Any) -> None:
    with pytest.raises(InsufficientMemory) as caught:
        await arbiter.request_allocation(LLM, "normal", 11 * GiB)
    assert (caught.value.requested, caught.value.available) == (11 * GiB, BUDGET_GB * GiB)
    with pytest.raises(ValueError, match="memory"):
        await arbiter.request_allocation(LLM, "normal", 0)
    with pytest.raises(TypeError):
        await arbiter.request_allocation(LLM, "normal", "lots")
    with pytest.raises(ValueError):
        await arbiter.request_allocation("nope", "normal", GiB)
    with pytest.raises(ValueError):
        arbiter.allocate(LLM, "normal", memory=2 * GiB, min_memory=3 * GiB)


async def test_cancelled_waiter_leaks_nothing(arbiter: Any) -> None:
    holder = await arbiter.request_allocation(LLM, "high", 8 * GiB, preemptible=False)
    async with anyio.create_task_group() as tg:

        async def wait() -> None:
            await arbiter.request_allocation(LLM, "normal", 4 * GiB, timeout=None)

        tg.start_soon(wait)
        await settle(arbiter)
        assert arbiter.state().waiting == 1
        tg.cancel_scope.cancel()
    holder.release()
    whole = await arbiter.request_allocation(LLM, "normal", BUDGET_GB * GiB, timeout=5)
    whole.release()


async def test_priority_then_arrival_order(arbiter: Any) -> None:
    holder = await arbiter.request_allocation(LLM, "user_facing", 10 * GiB, preemptible=False)
    order: list[str] = []
    async with anyio.create_task_group() as tg:

        async def wait(name: str, priority: str) -> None:
            alloc = await arbiter.request_allocation(LLM, priority, 6 * GiB, timeout=10)
            order.append(name)
            await anyio.sleep(0.01)
            alloc.release()

        for name, priority in (("n1", "normal"), ("bg", "background"), ("n2", "normal"),
                               ("uf", "user_facing")):  # fmt: skip
            tg.start_soon(wait, name, priority)
            await settle(arbiter)
        holder.release()
    assert order == ["uf", "n1", "n2", "bg"]


async def test_preemption_cancels_allocate_body(arbiter: Any) -> None:
    started = anyio.Event()
    outcome: list[str] = []

    async def background() -> None:
        try:
            async with arbiter.allocate(IMAGE, "background", memory=8 * GiB) as alloc:
                started.set()
                await anyio.sleep(30)
                outcome.append(f"body finished {alloc.id}")
        except Preempted:
            outcome.append("preempted")

    async with anyio.create_task_group() as tg:
        tg.start_soon(background)
        await started.wait()
        with anyio.fail_after(10):
            urgent = await arbiter.request_allocation(LLM, "user_facing", 6 * GiB)
    assert outcome == ["preempted"]
    urgent.release()


async def test_wait_preempted_and_release(arbiter: Any) -> None:
    holder = await arbiter.request_allocation(IMAGE, "background", 8 * GiB)
    granted: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def urgent() -> None:
            granted.append(await arbiter.request_allocation(LLM, "high", 6 * GiB, timeout=10))

        tg.start_soon(urgent)
        with anyio.fail_after(10):
            await holder.wait_preempted()
        assert holder.preempted and not holder.released
        holder.release()
    assert granted[0].memory == 6 * GiB
    granted[0].release()


async def test_resize(arbiter: Any) -> None:
    alloc = await arbiter.request_allocation(LLM, "normal", 4 * GiB, min_memory=2 * GiB)
    await alloc.resize(2 * GiB)
    assert alloc.memory == 2 * GiB
    await settle(arbiter)
    assert arbiter.state().vram_used == 2 * GiB
    with pytest.raises(ValueError):
        await alloc.resize(1 * GiB)
    await alloc.resize(6 * GiB)
    assert alloc.memory == 6 * GiB
    with pytest.raises(InsufficientMemory):
        await alloc.resize(11 * GiB)
    assert alloc.memory == 6 * GiB
    assert alloc.memory_for_quality(1.0) >= 4 * GiB
    alloc.release()
    with pytest.raises(RuntimeError):
        await alloc.resize(3 * GiB)


async def test_quality_changes_end_at_release(arbiter: Any) -> None:
    alloc = await arbiter.request_allocation(LLM, "normal", 4 * GiB)
    seen: list[float] = []
    async with anyio.create_task_group() as tg:

        async def read() -> None:
            seen.extend([quality async for quality in alloc.quality_changes()])

        tg.start_soon(read)
        await settle(arbiter)
        alloc.release()
    assert seen == [alloc.quality] or seen[0] == 1.0


async def test_recommended_quality(arbiter: Any) -> None:
    for workload in WorkloadType:
        for priority in Priority:
            assert 0 < arbiter.recommended_quality(workload, priority) <= 1.0
    assert arbiter.recommended_quality("llm_inference") == arbiter.state().llm_quality
    with pytest.raises(ValueError):
        arbiter.recommended_quality("nope")


async def test_busy_spans(arbiter: Any) -> None:
    alloc = await arbiter.request_allocation(LLM, "normal", 2 * GiB)
    with alloc.busy():
        await settle(arbiter)
    alloc.release()


async def test_closed_arbiter_shuts_down(arbiter: Any, request: pytest.FixtureRequest) -> None:
    if isinstance(arbiter, RemoteArbiter):
        other: Any = RemoteArbiter(arbiter.socket)
    else:
        other = Arbiter(ArbiterConfig.for_vram_gb(BUDGET_GB), probe=FakeGpu(total=GiB))
    async with other:
        await other.aclose()
        with pytest.raises(ShuttingDown):
            await other.request_allocation(LLM, "normal", GiB)


async def test_request_is_a_checkpoint(arbiter: Any) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        await arbiter.request_allocation(LLM, "normal", GiB)
    assert scope.cancelled_caught
    await settle(arbiter)
    assert arbiter.state().vram_used == 0


async def test_a_cancelled_growth_keeps_the_old_size(arbiter: Any) -> None:
    holder = await arbiter.request_allocation(LLM, "high", 7 * GiB, preemptible=False)
    alloc = await arbiter.request_allocation(LLM, "normal", 2 * GiB)
    with anyio.move_on_after(0.1) as scope:
        await alloc.resize(6 * GiB, timeout=None)
    assert scope.cancelled_caught
    holder.release()
    await settle(arbiter)
    assert alloc.memory == 2 * GiB
    assert arbiter.state().vram_used == 2 * GiB
    alloc.release()


async def test_elastic_grant_takes_what_fits(arbiter: Any) -> None:
    holder = await arbiter.request_allocation(LLM, "high", 7 * GiB, preemptible=False)
    alloc = await arbiter.request_allocation(LLM, "normal", 6 * GiB, min_memory=2 * GiB)
    assert (alloc.memory, alloc.min_memory) == (3 * GiB, 2 * GiB)
    assert alloc.quality < 1.0
    alloc.release()
    holder.release()


async def test_keep_alive_asks_an_idle_holder_back(arbiter: Any) -> None:
    alloc = await arbiter.request_allocation(LLM, "normal", 2 * GiB, keep_alive=0.1)
    with anyio.fail_after(10):
        await alloc.wait_preempted()
    assert alloc.preempted and not alloc.released
    alloc.release()


async def test_degrade_before_preempt_across_the_port(arbiter: Any) -> None:
    alloc = await arbiter.request_allocation(IMAGE, "background", 8 * GiB, min_memory=2 * GiB)
    seen: list[float] = []
    async with anyio.create_task_group() as tg:

        async def follow() -> None:
            async for quality in alloc.quality_changes():
                seen.append(quality)
                size = alloc.memory_for_quality(quality)
                if size < alloc.memory:
                    await alloc.resize(size)

        tg.start_soon(follow)
        await settle(arbiter)
        with anyio.fail_after(10):
            urgent = await arbiter.request_allocation(LLM, "user_facing", 6 * GiB)
        await settle(arbiter)  # remote: the shrink's answer may follow the grant it made
        assert not alloc.preempted
        assert alloc.memory <= 4 * GiB and min(seen) < 1.0
        assert arbiter.state().vram_used <= BUDGET_GB * GiB
        urgent.release()
        alloc.release()
