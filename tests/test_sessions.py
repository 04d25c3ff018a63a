"""The daemon's sessions in process: a `SessionHost` over a real `Arbiter`, its
sessions writing frames to a list instead of a socket. Orders and notices that depend
on what runs when within one pass of the daemon's loop, which a real socket makes a
matter of luck: the same tests over real processes live in ``test_remote_*``."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest

from arbiter import Arbiter, ArbiterConfig, GiB
from arbiter.remote._sessions import DaemonConfig, Session, SessionHost
from arbiter.remote._wire import Reclaim, Request, Resize, Status, Sync

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_time]

BACKGROUND, NORMAL = 0, 1


class FrameList:
    """What a session sends, kept: the frames' messages other than snapshots."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False  # as a `FrameSender` whose peer went away would be

    def send(self, data: bytes) -> None:
        self.data += data

    def messages(self) -> list[list[Any]]:
        found, data = [], self.data
        while data:
            (size,) = struct.unpack("!I", data[:4])
            message = msgspec.msgpack.decode(data[4 : 4 + size])
            data = data[4 + size :]
            if message[0] != "Snapshot":
                found.append(message)
        return found

    def answers(self) -> list[tuple[str, int]]:
        """What each request and resize was answered, by its key (not the updates)."""
        return [(m[0], m[1]) for m in self.messages() if m[0] != "Update"]


def request(key: int, gib: int, priority: int = NORMAL, timeout: float = 5.0) -> Request:
    return Request(key, "llm_inference", priority, gib * GiB, None, timeout, False, None,
                   True, None, None)  # fmt: skip


@pytest.fixture
async def arbiter() -> AsyncIterator[Arbiter]:
    config = ArbiterConfig.for_vram_gb(10)
    async with Arbiter(config, probe=None) as running:
        yield running


def host_for(arbiter: Arbiter, *, hold_new_for: float = 0.0) -> SessionHost:
    return SessionHost(arbiter, DaemonConfig(socket=Path("unused")), hold_new_for=hold_new_for)


def open_session(host: SessionHost, tasks: anyio.abc.TaskGroup, number: int) -> Session:
    session = Session(host, number, 1000 + number, 0, FrameList())  # type: ignore[arg-type]
    session.task_group = tasks
    host.open(session)
    return session


def sent(session: Session) -> FrameList:
    frames = session.sender
    assert isinstance(frames, FrameList)
    return frames


async def test_requests_held_by_a_restarted_daemon_keep_their_order_when_it_opens(
    arbiter: Arbiter,
) -> None:
    host = host_for(arbiter, hold_new_for=3600)
    async with anyio.create_task_group() as tasks:
        first, second = open_session(host, tasks, 1), open_session(host, tasks, 2)
        host.handle(first, request(1, 6))  # held back: waits for the hold to end
        await anyio.wait_all_tasks_blocked()
        host._admit_new.set()
        # In the same pass of the loop, before the held request's task runs again:
        host.handle(second, request(1, 6, timeout=0.05))
        await anyio.sleep(0.4)  # the 0.05 s timeouts have passed, generously
        assert sent(first).answers() == [("Granted", 1)]
        assert sent(second).answers() == [("Failed", 1)]  # it timed out behind the first
        tasks.cancel_scope.cancel()


async def test_a_growth_read_before_a_request_queues_first(arbiter: Arbiter) -> None:
    host = host_for(arbiter)
    async with anyio.create_task_group() as tasks:
        session = open_session(host, tasks, 1)
        host.handle(session, request(1, 4))
        # One read: grow it to 8 GiB, then ask for 5 GiB that would fit now.
        host.handle(session, Resize(2, 1, 8 * GiB, 5.0, False))
        host.handle(session, request(3, 5, timeout=0.05))
        await anyio.sleep(0.4)  # the 0.05 s timeouts have passed, generously
        assert sent(session).answers() == [("Granted", 1), ("Resized", 2), ("Failed", 3)]
        tasks.cancel_scope.cancel()


async def test_a_preemption_decided_while_a_reclaim_is_admitted_reaches_its_client(
    arbiter: Arbiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = host_for(arbiter)
    async with anyio.create_task_group() as tasks:
        restarted = open_session(host, tasks, 1)
        admit = arbiter._admit

        async def admit_then_preempt(*args: Any, **kwargs: Any) -> Any:
            alloc = await admit(*args, **kwargs)
            # Before the re-claim is registered: a higher priority needs its memory.
            tasks.start_soon(
                partial(arbiter.request_allocation, "llm_inference", "user_facing", 8 * GiB)
            )
            await anyio.wait_all_tasks_blocked()
            assert alloc.preempted
            return alloc

        monkeypatch.setattr(arbiter, "_admit", admit_then_preempt)
        claim = Reclaim(1, "llm_inference", BACKGROUND, 8 * GiB, None, True, None, "r", 0)
        await host.reclaim(restarted, claim)
        updates = [m for m in sent(restarted).messages() if m[0] == "Update"]
        assert sent(restarted).answers() == [("Reclaimed", 1)]
        assert updates and updates[-1][4] is True  # preempted: it will give the memory back
        tasks.cancel_scope.cancel()


async def test_queries_read_in_one_pass_are_answered_with_one_refresh_and_one_status(
    arbiter: Arbiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = host_for(arbiter)
    counts = {"refresh_stats": 0, "status": 0}
    for name in counts:
        method = getattr(host, name)

        def counted(*args: Any, _name: str = name, _method: Any = method) -> Any:
            counts[_name] += 1
            return _method(*args)

        monkeypatch.setattr(host, name, counted)
    async with anyio.create_task_group() as tasks:
        session = open_session(host, tasks, 1)
        # One read's worth of queries: the stats sort once, the holders are listed once.
        for key in range(1, 1_001):
            host.handle(session, Sync(key) if key % 2 else Status(key))
        host.handle(session, request(1_001, 4))  # read with them: answered first
        await anyio.wait_all_tasks_blocked()
        assert counts == {"refresh_stats": 1, "status": 1}
        answers = sent(session).messages()
        assert [(m[0], m[1]) for m in answers] == [("Granted", 1_001)] + [
            ("Synced" if key % 2 else "StatusReply", key) for key in range(1, 1_001)
        ]
        assert all(len(m[2]) == 1 for m in answers if m[0] == "StatusReply")  # the holder
        host.handle(session, Sync(1_002))  # a later read: a refresh of its own
        await anyio.wait_all_tasks_blocked()
        assert counts["refresh_stats"] == 2 and sent(session).answers()[-1] == ("Synced", 1_002)
        tasks.cancel_scope.cancel()


async def test_a_session_that_was_cut_off_is_sent_nothing_more(arbiter: Arbiter) -> None:
    host = host_for(arbiter)
    async with anyio.create_task_group() as tasks:
        session = open_session(host, tasks, 1)
        host.handle(session, request(1, 4))
        await anyio.wait_all_tasks_blocked()
        assert sent(session).answers() == [("Granted", 1)]
        sent(session).closed = True  # its peer stopped reading: the sender cut it off
        host.handle(session, Status(2))
        host.handle(session, Sync(3))
        await anyio.wait_all_tasks_blocked()
        assert sent(session).answers() == [("Granted", 1)]
        tasks.cancel_scope.cancel()


async def test_a_query_that_fails_is_an_error_and_the_session_goes_on(
    arbiter: Arbiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = host_for(arbiter)

    def broken(key: int) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(host, "status", broken)
    async with anyio.create_task_group() as tasks:
        session = open_session(host, tasks, 1)
        host.handle(session, Status(1))
        await anyio.wait_all_tasks_blocked()
        host.handle(session, request(2, 4))
        await anyio.wait_all_tasks_blocked()
        assert sent(session).messages()[0] == ["Error", "query failed: RuntimeError"]
        assert sent(session).answers()[-1] == ("Granted", 2)
        tasks.cancel_scope.cancel()
