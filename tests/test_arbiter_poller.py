"""The arbiter's poller, end to end with FakeGpu: external use, wake-ups, faults, shutdown."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest
import structlog.testing
from arbiter_helpers import settle

from arbiter import Arbiter, ArbiterConfig, GiB, MemoryPressure, Priority, WorkloadType
from arbiter._gpu import GpuReading
from arbiter.testing import FakeGpu

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]

INTERVAL = 0.02
LLM = WorkloadType.LLM_INFERENCE


def _config(**overrides: object) -> ArbiterConfig:
    return ArbiterConfig.for_vram_gb(24, poll_interval=INTERVAL, **overrides)


async def _until(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait (generously) until ``condition`` holds; fail if it never does.

    The poller changes state on its own clock and signals no one: polling is the test.
    """
    with anyio.fail_after(limit):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(INTERVAL / 2)


async def test_external_use_reaches_state() -> None:
    fake = FakeGpu(total=24 * GiB)
    async with Arbiter(_config(), probe=fake) as arbiter:
        fake.external_used = 6 * GiB
        reads = fake.reads
        await _until(lambda: arbiter.state().external_used == 6 * GiB)
        # Seen by the first or second reading after the change.
        assert fake.reads - reads <= 3
        state = arbiter.state()
        assert state.vram_available == 18 * GiB
        assert state.memory_pressure == pytest.approx(0.25)


async def test_waiter_blocked_by_external_use_is_granted_when_it_drops() -> None:
    fake = FakeGpu(total=24 * GiB, external_used=20 * GiB)
    async with Arbiter(_config(), probe=fake) as arbiter:
        await _until(lambda: arbiter.state().external_used == 20 * GiB)
        granted = anyio.Event()

        async def waiter() -> None:
            alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 8 * GiB, timeout=None)
            granted.set()
            alloc.release()

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await settle()
            assert arbiter.state().waiting == 1
            assert not granted.is_set()
            fake.external_used = 2 * GiB
            with anyio.fail_after(5):
                await granted.wait()
        assert arbiter.state().vram_used == 0


async def test_rising_external_use_lowers_quality_targets() -> None:
    fake = FakeGpu(total=24 * GiB)
    async with Arbiter(_config(), probe=fake) as arbiter:
        alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 4 * GiB)
        # Not alone on the card: a lone holder keeps 1.0 whatever external use is.
        other = await arbiter.request_allocation(LLM, Priority.NORMAL, 1 * GiB)
        assert arbiter.state().llm_quality == 1.0
        fake.external_used = 18 * GiB  # pressure (4 + 1 + 18) / 24 > 0.85
        await _until(lambda: arbiter.state().external_used == 18 * GiB)
        state = arbiter.state()
        assert state.pressure_level is MemoryPressure.CRITICAL
        assert state.llm_quality < 1.0
        assert alloc.quality == state.llm_quality
        other.release()
        assert alloc.quality == 1.0  # alone again
        alloc.release()


async def test_without_per_process_figures_external_is_used_minus_granted() -> None:
    fake = FakeGpu(total=24 * GiB, per_process=False)
    async with Arbiter(_config(), probe=fake) as arbiter:
        alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 4 * GiB)
        fake.ours = 4 * GiB  # the model really loaded
        fake.external_used = 3 * GiB
        await _until(lambda: arbiter.state().external_used == 3 * GiB)
        assert arbiter.state().vram_available == 17 * GiB
        alloc.release()


async def test_probe_failures_are_survived_and_logged_once() -> None:
    fake = FakeGpu(total=24 * GiB)
    with structlog.testing.capture_logs() as logs:
        async with Arbiter(_config(poll_backoff_max=0.05), probe=fake) as arbiter:
            await _until(lambda: fake.reads >= 1)
            fake.fail_next(4)
            await _until(lambda: fake.reads >= 8)
            # Still serving, as accounting only, through the outage.
            alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB)
            alloc.release()
            fake.external_used = GiB
            await _until(lambda: arbiter.state().external_used == GiB)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1, logs
    resumed = [e for e in logs if e["log_level"] == "info"]
    assert len(resumed) == 1, logs


class _HangingProbe:
    """A probe whose reads never finish: aclose() must not wait for them."""

    def __init__(self) -> None:
        self.reading = anyio.Event()

    async def read(self) -> GpuReading:
        self.reading.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


async def test_aclose_is_prompt_even_mid_read() -> None:
    probe = _HangingProbe()
    arbiter = Arbiter(_config(), probe=probe)
    with anyio.fail_after(2):
        async with arbiter:
            await probe.reading.wait()
            await arbiter.aclose()
    with pytest.raises(Exception, match="closed"):
        await arbiter.request_allocation(LLM, Priority.NORMAL, GiB)


async def test_no_probe_means_accounting_only() -> None:
    async with Arbiter(_config(), probe=None) as arbiter:
        alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB)
        assert arbiter.state().external_used == 0
        alloc.release()
