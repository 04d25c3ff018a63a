"""Logging: one structlog debug event per grant, release and timeout, carrying the ids,
sizes, priority and wait; and nothing printed at all while structlog is unconfigured.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator, MutableMapping
from typing import Any

import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from arbiter import AllocationTimeout, Arbiter, ArbiterConfig, GiB, Priority, WorkloadType

pytestmark = pytest.mark.virtual_time

LLM = WorkloadType.LLM_INFERENCE
Logs = list[MutableMapping[str, Any]]


@pytest.fixture
def logs() -> Iterator[Logs]:
    was_configured = structlog.is_configured()
    with capture_logs() as entries:
        yield entries
    if not was_configured:
        # capture_logs() leaves structlog marked configured; put it back as found.
        structlog.reset_defaults()


def _events(logs: Logs, alloc_id: str) -> Logs:
    return [entry for entry in logs if entry.get("id") == alloc_id]


@pytest.mark.anyio
async def test_one_debug_event_per_grant_and_per_release(logs: Logs) -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    alloc = await arbiter.request_allocation(LLM, Priority.HIGH, 3 * GiB, label="chat")
    alloc.release()
    alloc.release()  # idempotent: no second event
    events = _events(logs, alloc.id)
    assert [e["event"] for e in events] == ["allocation granted", "allocation released"]
    assert all(e["log_level"] == "debug" for e in events)
    granted, released = events
    assert granted["memory"] == 3 * GiB
    assert granted["priority"] in ("high", Priority.HIGH)
    # Granted at once; the bound is generous as the real clock goes on while a loaded
    # machine pauses the process (0.28 s was seen).
    assert 0.0 <= granted["waited"] < 1.0
    assert released["memory"] == 3 * GiB
    assert released["priority"] in ("high", Priority.HIGH)


@pytest.mark.anyio
async def test_grant_after_a_wait_logs_the_wait(logs: Logs) -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    holder = await arbiter.request_allocation(LLM, Priority.NORMAL, 10 * GiB, preemptible=False)
    got = []

    async def waiter() -> None:
        got.append(await arbiter.request_allocation(LLM, Priority.USER_FACING, 4 * GiB))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.05)
        holder.release()
    [granted] = [e for e in _events(logs, got[0].id) if e["event"] == "allocation granted"]
    assert granted["log_level"] == "debug"
    assert granted["memory"] == 4 * GiB
    assert granted["waited"] >= 0.04
    assert len(_events(logs, holder.id)) == 2  # its grant and its release


@pytest.mark.anyio
async def test_one_debug_event_per_timeout(logs: Logs) -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    await arbiter.request_allocation(LLM, Priority.NORMAL, 10 * GiB)
    before = len(logs)
    with pytest.raises(AllocationTimeout):
        await arbiter.request_allocation(LLM, Priority.NORMAL, 2 * GiB, timeout=0.01)
    new = logs[before:]
    timeouts = [e for e in new if "timed out" in e["event"]]
    assert len(timeouts) == 1
    [event] = timeouts
    assert event["log_level"] == "debug"
    assert isinstance(event["id"], str) and event["id"]
    assert event.get("waited", event.get("timeout")) == pytest.approx(0.01, abs=0.05)
    assert not [e for e in new if e["event"] == "allocation granted"]


@pytest.mark.anyio
async def test_ids_in_events_are_the_allocation_ids(logs: Logs) -> None:
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(10), probe=None)
    allocs = [await arbiter.request_allocation(LLM, "normal", GiB) for _ in range(3)]
    for alloc in allocs:
        alloc.release()
    for alloc in allocs:
        assert [e["event"] for e in _events(logs, alloc.id)] == [
            "allocation granted",
            "allocation released",
        ]


SCRIPT = textwrap.dedent(
    """
    import sys
    import anyio
    from arbiter import AllocationTimeout, Arbiter, ArbiterConfig, GiB
    from arbiter.testing import FakeGpu

    async def main():
        arbiter = Arbiter(ArbiterConfig.for_vram_gb(4, poll_interval=0.01),
                          probe=FakeGpu(total=4 * GiB))
        async with arbiter:
            alloc = await arbiter.request_allocation("llm_inference", "normal", 3 * GiB)
            try:
                await arbiter.request_allocation("llm_inference", "high", 2 * GiB, timeout=0.02)
            except AllocationTimeout:
                pass
            alloc.release()
            async with arbiter.allocate("image_generation", "user_facing", memory=GiB):
                await anyio.sleep(0.03)

    anyio.run(main, backend=sys.argv[1])
    """
)


def _run_python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a new interpreter (a program that never configured structlog); it
    must exit 0."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_nothing_is_printed_while_structlog_is_unconfigured(backend: str) -> None:
    done = _run_python(SCRIPT, backend)
    assert done.stdout == ""
    assert done.stderr == ""


WARNING_SCRIPT = textwrap.dedent(
    """
    import sys
    import anyio
    from arbiter import Arbiter, ArbiterConfig, GiB
    from arbiter.testing import FakeGpu

    async def main():
        fake = FakeGpu(total=4 * GiB)
        fake.fail_next(1)  # the poller's first read fails: one warning
        config = ArbiterConfig.for_vram_gb(4, poll_interval=0.01)
        async with Arbiter(config, probe=fake):
            while fake.reads < 3:  # it failed, then recovered
                await anyio.sleep(0.01)
        print("the program's own output")

    anyio.run(main, backend=sys.argv[1])
    """
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_warnings_go_to_stderr_while_structlog_is_unconfigured(backend: str) -> None:
    done = _run_python(WARNING_SCRIPT, backend)
    assert done.stdout == "the program's own output\n"  # no warning mixed in
    [warning] = [line for line in done.stderr.splitlines() if "gpu probe failed" in line]
    assert "warning" in warning
    assert "Traceback" not in done.stderr


def test_a_configured_structlog_decides_where_warnings_go(logs: Logs) -> None:
    from arbiter._log import log

    log.warning("something odd", detail=1)
    assert logs[-1] == {"event": "something odd", "detail": 1, "log_level": "warning"}


DAEMON_LOGGING_SCRIPT = textwrap.dedent(
    """
    import sys
    from arbiter._log import log
    from arbiter.cli._serve import _configure_logging

    _configure_logging()
    print(sorted(name for name in sys.modules if name.split(".")[0] == "rich"))
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("boom", detail=1)
    import rich.console  # a later import of rich still works
    """
)


def test_the_daemons_logging_loads_no_rich_and_still_prints_tracebacks() -> None:
    done = _run_python(DAEMON_LOGGING_SCRIPT)
    assert done.stdout == "[]\n"
    [line] = done.stderr.splitlines()  # key=value, the traceback escaped inside it
    assert "level='error' event='boom' detail=1 exception=" in line
    assert "ZeroDivisionError: division by zero" in line
