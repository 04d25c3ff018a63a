"""MemoryPoller with FakeGpu, on asyncio and trio; FakeGpu itself."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from arbiter_helpers import settle
from structlog.testing import capture_logs

from arbiter import GiB
from arbiter._gpu import GpuProbeError, GpuReading
from arbiter._poller import MemoryPoller, PollerStatistics, backoff_delay
from arbiter.testing import FakeGpu

pytestmark = pytest.mark.virtual_time

INTERVAL = 0.02


class Collector:
    """on_reading / on_failure callbacks that tasks can wait on."""

    def __init__(self) -> None:
        self.readings: list[GpuReading] = []
        self.times: list[float] = []
        self.errors: list[BaseException] = []
        self._wanted: tuple[Callable[[], bool], anyio.Event] | None = None

    def on_reading(self, reading: GpuReading) -> None:
        self.readings.append(reading)
        self.times.append(anyio.current_time())
        self._check()

    def on_failure(self, error: BaseException) -> None:
        self.errors.append(error)
        self._check()

    def _check(self) -> None:
        if self._wanted is not None and self._wanted[0]():
            self._wanted[1].set()

    async def wait(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        if condition():
            return
        event = anyio.Event()
        self._wanted = (condition, event)
        with anyio.fail_after(timeout):
            await event.wait()
        self._wanted = None


def make_poller(probe: Any, collector: Collector, **kwargs: Any) -> MemoryPoller:
    options: dict[str, Any] = {"interval": INTERVAL, "max_backoff": 8 * INTERVAL}
    options.update(kwargs)
    return MemoryPoller(
        probe, on_reading=collector.on_reading, on_failure=collector.on_failure, **options
    )


@pytest.mark.anyio
async def test_readings_reach_on_reading() -> None:
    fake = FakeGpu(24 * GiB, external_used=2 * GiB, ours=GiB)
    collector = Collector()
    poller = make_poller(fake, collector)
    async with anyio.create_task_group() as tg:
        tg.start_soon(poller.run)
        await collector.wait(lambda: len(collector.readings) >= 3)
        tg.cancel_scope.cancel()
    expected = GpuReading(total=24 * GiB, used=3 * GiB, ours=GiB, external=2 * GiB)
    assert collector.readings[:3] == [expected] * 3
    stats = poller.statistics()
    assert stats.reads == len(collector.readings)
    assert stats.last_reading == expected
    assert stats.last_reading_at is not None
    assert stats.last_reading_at <= collector.times[-1]
    assert (stats.failures, stats.consecutive_failures, stats.delay) == (0, 0, INTERVAL)
    # The poller reads the probe but does not own it.
    assert not fake.closed


@pytest.mark.anyio
async def test_first_read_is_immediate() -> None:
    collector = Collector()
    poller = make_poller(FakeGpu(GiB), collector, interval=60.0, max_backoff=60.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(poller.run)
        await collector.wait(lambda: len(collector.readings) == 1, timeout=5)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_external_change_is_seen_within_two_intervals() -> None:
    fake = FakeGpu(24 * GiB)
    collector = Collector()
    poller = make_poller(fake, collector, interval=0.05, max_backoff=0.4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(poller.run)
        await collector.wait(lambda: len(collector.readings) >= 2)
        changed_at, reads_before = anyio.current_time(), fake.reads
        fake.external_used = 5 * GiB
        await collector.wait(lambda: collector.readings[-1].external == 5 * GiB)
        seen_at = collector.times[-1]
        tg.cancel_scope.cancel()
    # The read in flight may predate the change; the one after it cannot.
    assert fake.reads - reads_before <= 2
    assert seen_at - changed_at <= 2 * 0.05 + 0.5  # generous for a loaded machine
    assert collector.readings[-1].used == 5 * GiB


@pytest.mark.anyio
async def test_outage_is_logged_once_and_recovery_once() -> None:
    fake = FakeGpu(8 * GiB)
    fake.fail_next(3)
    collector = Collector()
    poller = make_poller(fake, collector)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(poller.run)
            await collector.wait(lambda: len(collector.readings) >= 2)
            tg.cancel_scope.cancel()
    failed = [e for e in logs if e["event"] == "gpu probe failed"]
    recovered = [e for e in logs if e["event"] == "gpu probe recovered"]
    assert len(failed) == 1
    assert failed[0]["log_level"] == "warning"
    assert "scripted read failure" in failed[0]["error"]
    assert len(recovered) == 1
    assert recovered[0]["log_level"] == "info"
    assert recovered[0]["failures"] == 3
    assert len(collector.errors) == 3
    assert all(isinstance(e, GpuProbeError) for e in collector.errors)
    stats = poller.statistics()
    assert (stats.failures, stats.consecutive_failures) == (3, 0)
    assert stats.reads == len(collector.readings) >= 2


@pytest.mark.anyio
async def test_every_outage_is_logged() -> None:
    fake = FakeGpu(8 * GiB)
    collector = Collector()
    poller = make_poller(fake, collector)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(poller.run)
            for outage in (1, 2):
                await collector.wait(lambda: len(collector.readings) >= 1)
                fake.fail_next(2, RuntimeError(f"outage {outage}"))
                await collector.wait(lambda n=outage: len(collector.errors) == 2 * n)
                collector.readings.clear()
            await collector.wait(lambda: len(collector.readings) >= 1)
            tg.cancel_scope.cancel()
    events = [e["event"] for e in logs]
    assert events == ["gpu probe failed", "gpu probe recovered"] * 2
    assert [e["error"] for e in logs if e["event"] == "gpu probe failed"] == [
        "RuntimeError: outage 1",
        "RuntimeError: outage 2",
    ]


class TimedProbe:
    """Delegates to a FakeGpu and notes when each read starts."""

    def __init__(self, fake: FakeGpu) -> None:
        self.fake = fake
        self.starts: list[float] = []

    async def read(self) -> GpuReading:
        self.starts.append(anyio.current_time())
        return await self.fake.read()

    async def aclose(self) -> None:
        await self.fake.aclose()


@pytest.mark.anyio
async def test_backoff_doubles_up_to_its_cap() -> None:
    fake = FakeGpu(8 * GiB)
    fake.fail_next(5)
    probe = TimedProbe(fake)
    collector = Collector()
    delays: list[float] = []

    def on_failure(error: BaseException) -> None:
        # The wait the poller is about to make, as its statistics show it.
        delays.append(poller.statistics().delay)
        collector.on_failure(error)

    poller = MemoryPoller(
        probe,
        interval=INTERVAL,
        max_backoff=5 * INTERVAL,
        on_reading=collector.on_reading,
        on_failure=on_failure,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(poller.run)
        await collector.wait(lambda: len(collector.readings) >= 2)
        tg.cancel_scope.cancel()
    planned = [2 * INTERVAL, 4 * INTERVAL, 5 * INTERVAL, 5 * INTERVAL, 5 * INTERVAL]
    assert delays == pytest.approx(planned)
    gaps = [b - a for a, b in zip(probe.starts, probe.starts[1:], strict=False)]
    # Sleeps never end early (small tolerance for clock granularity); they may end late.
    for gap, delay in zip(gaps, planned, strict=False):
        assert gap >= 0.9 * delay
    assert poller.statistics().delay == INTERVAL


def test_backoff_delay() -> None:
    assert backoff_delay(0.5, 8.0, 0) == 0.5
    assert [backoff_delay(0.5, 8.0, n) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert backoff_delay(0.5, 8.0, 10_000) == 8.0
    assert math.isfinite(backoff_delay(1e-9, 1.0, 10**9))


class BlockedProbe:
    """A probe whose reads never complete."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self._never = anyio.Event()

    async def read(self) -> GpuReading:
        self.entered.set()
        await self._never.wait()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


@pytest.mark.anyio
async def test_cancellation_stops_a_blocked_read_promptly() -> None:
    probe = BlockedProbe()
    collector = Collector()
    poller = make_poller(probe, collector)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(poller.run)
            await probe.entered.wait()
            cancelled_at = anyio.current_time()
            tg.cancel_scope.cancel()
    assert anyio.current_time() - cancelled_at < 1.0
    assert collector.readings == [] and collector.errors == []


@pytest.mark.anyio
async def test_cancellation_during_the_wait_is_prompt() -> None:
    collector = Collector()
    poller = make_poller(FakeGpu(GiB), collector, interval=60.0, max_backoff=60.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(poller.run)
        await collector.wait(lambda: len(collector.readings) == 1)
        await settle()
        cancelled_at = anyio.current_time()
        tg.cancel_scope.cancel()
    assert anyio.current_time() - cancelled_at < 1.0


@pytest.mark.anyio
async def test_failing_callbacks_do_not_stop_the_poller() -> None:
    fake = FakeGpu(GiB)
    done = anyio.Event()

    def on_reading(reading: GpuReading) -> None:
        if fake.reads >= 4:
            done.set()
        raise ValueError("broken handler")

    poller = MemoryPoller(fake, interval=INTERVAL, max_backoff=INTERVAL, on_reading=on_reading)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(poller.run)
            with anyio.fail_after(10):
                await done.wait()
            tg.cancel_scope.cancel()
    errors = [e for e in logs if e["event"] == "gpu poller callback failed"]
    assert len(errors) == 1
    assert errors[0]["callback"] == "on_reading"
    assert poller.statistics().reads >= 4


@pytest.mark.anyio
async def test_readings_without_per_process_figures_pass_through() -> None:
    fake = FakeGpu(16 * GiB, external_used=3 * GiB, ours=GiB, per_process=False)
    collector = Collector()
    poller = make_poller(fake, collector)
    async with anyio.create_task_group() as tg:
        tg.start_soon(poller.run)
        await collector.wait(lambda: len(collector.readings) >= 1)
        tg.cancel_scope.cancel()
    assert collector.readings[0] == GpuReading(16 * GiB, 4 * GiB, None, None)


def test_statistics_before_the_first_read() -> None:
    poller = MemoryPoller(FakeGpu(GiB), interval=0.5, max_backoff=8, on_reading=print)
    assert poller.statistics() == PollerStatistics(0, 0, 0, None, None, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"interval": 0}, ValueError, "interval"),
        ({"interval": -1}, ValueError, "interval"),
        ({"interval": math.nan}, ValueError, "interval"),
        ({"interval": math.inf}, ValueError, "interval"),
        ({"interval": "1"}, TypeError, "interval"),
        ({"interval": True}, TypeError, "interval"),
        ({"max_backoff": 0.1}, ValueError, "max_backoff"),
        ({"max_backoff": None}, TypeError, "max_backoff"),
        ({"on_reading": 3}, TypeError, "on_reading"),
        ({"on_failure": "log"}, TypeError, "on_failure"),
        ({"probe": object()}, TypeError, "probe"),
    ],
)
def test_poller_checks_its_arguments(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    options: dict[str, Any] = {
        "probe": FakeGpu(GiB),
        "interval": 0.5,
        "max_backoff": 8.0,
        "on_reading": print,
    }
    options.update(kwargs)
    probe = options.pop("probe")
    with pytest.raises(error, match=match):
        MemoryPoller(probe, **options)


# FakeGpu


@pytest.mark.anyio
async def test_fake_gpu_follows_its_figures() -> None:
    fake = FakeGpu(24 * GiB)
    assert await fake.read() == GpuReading(24 * GiB, 0, 0, 0)
    fake.external_used = 10 * GiB
    fake.ours = 4 * GiB
    assert await fake.read() == GpuReading(24 * GiB, 14 * GiB, 4 * GiB, 10 * GiB)
    fake.per_process = False
    assert await fake.read() == GpuReading(24 * GiB, 14 * GiB, None, None)
    assert fake.reading() == GpuReading(24 * GiB, 14 * GiB, None, None)
    assert fake.reads == 3


@pytest.mark.anyio
async def test_fake_gpu_scripted_failures() -> None:
    fake = FakeGpu(GiB)
    error = OSError("driver gone")
    fake.fail_next(2, error)
    for _ in range(2):
        with pytest.raises(OSError) as caught:
            await fake.read()
        assert caught.value is error
    assert (await fake.read()).total == GiB
    fake.fail_next()
    with pytest.raises(GpuProbeError):
        await fake.read()
    fake.fail_next(5)
    fake.fail_next(0)
    await fake.read()
    assert fake.reads == 5


@pytest.mark.anyio
async def test_fake_gpu_close() -> None:
    fake = FakeGpu(GiB)
    await fake.aclose()
    await fake.aclose()
    assert fake.closed
    with pytest.raises(anyio.ClosedResourceError):
        await fake.read()


@pytest.mark.anyio
async def test_fake_gpu_read_is_a_checkpoint() -> None:
    fake = FakeGpu(GiB)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await fake.read()
    assert scope.cancelled_caught
    assert fake.reads == 0


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((0,), {}, ValueError),
        ((-1,), {}, ValueError),
        ((1.5,), {}, TypeError),
        ((True,), {}, TypeError),
        ((GiB,), {"external_used": -1}, ValueError),
        ((GiB,), {"external_used": 2 * GiB}, ValueError),
        ((GiB,), {"external_used": 0.5}, TypeError),
        ((GiB,), {"ours": 2 * GiB}, ValueError),
        ((GiB,), {"ours": GiB, "external_used": 1}, ValueError),
        ((GiB,), {"per_process": 1}, TypeError),
    ],
)
def test_fake_gpu_checks_its_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        FakeGpu(*args, **kwargs)


def test_fake_gpu_checks_what_is_set() -> None:
    fake = FakeGpu(GiB, external_used=GiB // 2)
    with pytest.raises(ValueError, match="exceeds"):
        fake.ours = GiB
    with pytest.raises(TypeError, match="external_used"):
        fake.external_used = None  # type: ignore[assignment]
    with pytest.raises(ValueError, match="n must be"):
        fake.fail_next(-1)
    with pytest.raises(TypeError, match="n must be"):
        fake.fail_next(1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="error"):
        fake.fail_next(1, ValueError)  # type: ignore[arg-type]
    assert (fake.ours, fake.external_used) == (0, GiB // 2)
