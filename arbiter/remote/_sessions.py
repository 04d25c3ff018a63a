"""The daemon's sessions and its one door into the arbiter.

`SessionHost` serves the daemon's real `Arbiter` to its sessions through the port that
the in-process handles use: each session is the *owner* of what it is granted, so the
arbiter tells it (under its lock, as it tells a handle) when one of its allocations is
preempted or its quality target moves, and the session pushes that to its client at
once; a session that ends has everything it holds released in one step of the core.
A request that waits is a task parked in the arbiter, as an in-process waiter is.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from .._allocation import Allocation
from .._arbiter import Arbiter
from .._arguments import DEFAULT, Default, RequestArgs, check_request
from .._backend import current_backend
from .._checks import check_count
from .._errors import (
    AllocationTimeout,
    InsufficientMemory,
    InsufficientQuality,
    ShuttingDown,
)
from .._gpu import MemoryProbe
from .._ledger import Outcome
from .._log import log
from .._stats import ArbiterStats
from .._types import Priority, WorkloadType, check_memory, check_timeout
from ._wire import (
    MAX_FRAME,
    Busy,
    ClientMessage,
    Error,
    Failed,
    FrameSender,
    Granted,
    HolderInfo,
    Ping,
    Reclaim,
    Reclaimed,
    Release,
    Request,
    Resize,
    Resized,
    Snapshot,
    Status,
    StatusReply,
    Sync,
    Synced,
    Update,
    WaiterInfo,
    Withdraw,
    frame,
)

__all__ = ["DaemonConfig", "Session", "SessionHost"]


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """How the daemon serves; every number here is a policy.

    Args:
        socket: the Unix socket path.
        ttl: seconds a silent session lives; also how long a restarted daemon waits
            for re-claims before it grants anything new.
        allow_uids: uids served besides the daemon's own.
        snapshot_interval: how often sessions with nothing else to receive are sent
            the daemon's changed state.
        stats_interval: how often fresh stats (percentiles sort their samples) are
            computed for the snapshots.
        max_connections: how many connections are served at once (one per client
            process, usually); more are refused. Each may buffer up to a frame
            (1 MiB), so this bounds what clients can make the daemon keep.
    """

    socket: Path
    ttl: float = 10.0
    allow_uids: frozenset[int] = field(default_factory=frozenset)
    snapshot_interval: float = 0.05
    stats_interval: float = 0.5
    max_connections: int = 128

    def __post_init__(self) -> None:
        for name in ("ttl", "snapshot_interval", "stats_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number of seconds, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        check_count("max_connections", self.max_connections, minimum=1)


# -- sessions ---------------------------------------------------------------------------


_ENCODER = msgspec.msgpack.Encoder()

# What a status reply may fill of a frame (the rest: the frame's own envelope).
_STATUS_ROOM = MAX_FRAME - 1024


def _fitted(reply: StatusReply) -> StatusReply:
    """``reply``, or as much of it as fits in one frame: the last waiters go first,
    then the last holders (one session can queue many requests with long labels)."""
    size = len(_ENCODER.encode(reply))
    while size > _STATUS_ROOM:
        holders, waiters = reply.holders, reply.waiters
        listed = len(holders) + len(waiters)
        # Entries are about the same size: cut the share that overflows, and a tenth more.
        cut = max(1, listed - listed * _STATUS_ROOM * 9 // (size * 10))
        from_waiters = min(cut, len(waiters))
        waiters = waiters[: len(waiters) - from_waiters]
        holders = holders[: len(holders) - (cut - from_waiters)]
        reply = StatusReply(reply.key, holders, waiters, reply.omitted + cut)
        size = len(_ENCODER.encode(reply))
    return reply


class _Waiting:
    """A request or growing resize in progress for a session."""

    __slots__ = ("label", "memory", "priority", "queued", "scope", "since", "workload")

    def __init__(
        self,
        workload: WorkloadType,
        priority: Priority,
        memory: int,
        label: str | None,
        since: float,
    ) -> None:
        self.workload = workload
        self.priority = priority
        self.memory = memory
        self.label = label
        self.since = since
        self.scope = anyio.CancelScope()
        self.queued = False  # in the arbiter's queue (or granted): status reads it there


class Session:
    """One client connection: the owner of what it holds (`AllocationOwner`), what it
    waits for, what it is sent."""

    __slots__ = (
        "closed",
        "held",
        "host",
        "keys",
        "number",
        "pid",
        "queries",
        "sender",
        "snapshot_version",
        "task_group",
        "uid",
        "waiting",
    )

    def __init__(
        self, host: SessionHost, number: int, pid: int, uid: int, sender: FrameSender
    ) -> None:
        self.host = host
        self.number = number
        self.pid = pid
        self.uid = uid
        self.sender = sender
        # What it holds, by the client's key, and each allocation's key.
        self.held: dict[int, Allocation] = {}
        self.keys: dict[Allocation, int] = {}
        self.waiting: dict[int, _Waiting] = {}
        self.snapshot_version = -1
        # The Syncs and Statuses read in one pass, answered together (`SessionHost._answer`).
        self.queries: list[Sync | Status] | None = None
        self.closed = False
        self.task_group: anyio.abc.TaskGroup | None = None

    def push(self, message: Any) -> None:
        """Send ``message`` (after the daemon's state, when it changed); never blocks.
        Not under the arbiter's lock: the state is read under it."""
        if self.closed or self.sender.closed:  # ended, or cut off: nobody reads it
            return
        data = frame(_ENCODER.encode(message))
        host = self.host
        if self.snapshot_version != host.version:
            # State first: a client that reads a grant already sees it in state().
            self.snapshot_version = host.version
            data = host.snapshot_frame() + data
        self.sender.send(data)

    def send_snapshot(self) -> None:
        """Send the daemon's state if it changed since this session last got it."""
        host = self.host
        if not self.closed and self.snapshot_version != host.version:
            self.snapshot_version = host.version
            self.sender.send(host.snapshot_frame())

    def key_in_use(self, key: int) -> bool:
        return key in self.held or key in self.waiting

    def allocation_changed(self, alloc: Allocation, preempted: bool) -> None:
        """The arbiter preempted one of ours or moved its quality target (under its
        lock): the client hears it now, its state with the next snapshot."""
        key = self.keys.get(alloc)
        if key is None or self.closed:
            return
        holding = alloc._holding
        host = self.host
        host.changed()
        quality = host.arbiter._quality_of(alloc)
        update = Update(key, holding.memory, quality, holding.preempt_requested)
        self.sender.send(frame(_ENCODER.encode(update)))
        if preempted:
            log.info("allocation preempted", id=alloc.id, pid=self.pid, memory=holding.memory)


def _failure(key: int, exc: BaseException) -> Failed:
    if isinstance(exc, InsufficientMemory):
        return Failed(key, "insufficient_memory", [exc.requested, exc.available])
    if isinstance(exc, InsufficientQuality):
        return Failed(key, "insufficient_quality", [exc.minimum, exc.available])
    if isinstance(exc, AllocationTimeout):
        return Failed(key, "timeout", [exc.timeout])
    if isinstance(exc, ShuttingDown):
        return Failed(key, "shutting_down", [str(exc)])
    if isinstance(exc, TypeError):
        return Failed(key, "type", [str(exc)])
    if isinstance(exc, ValueError):
        return Failed(key, "value", [str(exc)])
    return Failed(key, "runtime", [str(exc)])


class _Turns:
    """The order in which requests and growths reach the arbiter's queue: the order the
    daemon read them, whatever order their tasks run in (trio shuffles its run queue).

    Each takes a number when read and queues only in its turn; one that ends before
    its turn (withdrawn, timed out) gives its turn up. While any is on its way
    (`idle` is false), no later request may be granted at once.
    """

    __slots__ = ("_changed", "_given_up", "_next", "_now_serving")

    def __init__(self) -> None:
        self._next = 0
        self._now_serving = 0
        self._given_up: set[int] = set()
        self._changed = anyio.Event()

    @property
    def idle(self) -> bool:
        return self._now_serving == self._next

    def take(self) -> int:
        number = self._next
        self._next += 1
        return number

    def up(self, number: int) -> bool:
        return self._now_serving == number

    async def wait(self, number: int) -> None:
        while self._now_serving != number:
            await self._changed.wait()

    def end(self, number: int) -> None:
        """``number`` has queued, or never will: the next one's turn (idempotent)."""
        if number < self._now_serving:
            return
        if number != self._now_serving:
            self._given_up.add(number)
            return
        self._now_serving += 1
        while self._now_serving in self._given_up:
            self._given_up.remove(self._now_serving)
            self._now_serving += 1
        changed, self._changed = self._changed, anyio.Event()
        changed.set()


class SessionHost:
    """The daemon's use of the arbiter, on behalf of sessions (the handles' port).

    Args:
        arbiter: the running arbiter.
        config: the daemon's config.
        probe: the arbiter's probe; when it has ``own_pids``, the sessions' pids are
            set there so that their GPU memory does not count as external.
        hold_new_for: seconds from now during which nothing new is granted (re-claims are).
    """

    def __init__(
        self,
        arbiter: Arbiter,
        config: DaemonConfig,
        *,
        probe: MemoryProbe | None = None,
        hold_new_for: float = 0.0,
    ) -> None:
        self.arbiter = arbiter
        self.config = config
        self.instance = uuid.uuid4().hex
        self.sessions: dict[int, Session] = {}
        self.version = 0
        self._probe = probe
        self._snapshot: tuple[int, bytes] | None = None
        self._stats: ArbiterStats = arbiter.stats()
        self.last_state = arbiter.state()  # for readers in other threads (metrics)
        self._stats_version = -1
        self._admit_new_at = anyio.current_time() + hold_new_for
        self._admit_new = anyio.Event()
        if hold_new_for <= 0:
            self._admit_new.set()
        self.on_grant: Callable[[Priority, float], None] | None = None
        self._turns = _Turns()

    # -- snapshots --------------------------------------------------------------

    def changed(self) -> None:
        self.version += 1

    def refresh_stats(self) -> None:
        self._stats = self.arbiter.stats()
        self._stats_version = self.version
        self.changed()

    @property
    def last_stats(self) -> ArbiterStats:
        """The stats last computed (every ``stats_interval``, or on a client's sync)."""
        return self._stats

    def stats_stale(self) -> bool:
        return self._stats_version != self.version

    def snapshot_frame(self) -> bytes:
        """The state now (and the last stats) as one frame, built once per version."""
        cached = self._snapshot
        if cached is not None and cached[0] == self.version:
            return cached[1]
        arbiter = self.arbiter
        recommended = arbiter._recommended_table()
        data = frame(_ENCODER.encode(Snapshot(arbiter.state(), recommended, self._stats)))
        self._snapshot = (self.version, data)
        return data

    # -- sessions ---------------------------------------------------------------

    def open(self, session: Session) -> None:
        self.sessions[session.number] = session
        self._update_pids()
        self.changed()

    def close(self, session: Session) -> None:
        """Release everything ``session`` holds and withdraw what it waits for. Idempotent."""
        if session.closed:
            return
        session.closed = True
        for waiting in session.waiting.values():
            waiting.scope.cancel()
        self.arbiter._release_owner(session)
        session.held.clear()
        session.keys.clear()
        self.sessions.pop(session.number, None)
        self._update_pids()
        self.changed()

    def _update_pids(self) -> None:
        probe = self._probe
        if probe is not None and hasattr(probe, "own_pids"):
            probe.own_pids = frozenset(s.pid for s in self.sessions.values())

    def _hold(self, session: Session, key: int, alloc: Allocation) -> None:
        """``session`` holds ``alloc`` as ``key``; from now on it hears of its changes."""
        session.held[key] = alloc
        session.keys[alloc] = key
        arbiter = self.arbiter
        with arbiter._lock:
            arbiter._watch(alloc, +1)

    def _drop(self, session: Session, key: int) -> None:
        alloc = session.held.pop(key, None)
        if alloc is not None:
            del session.keys[alloc]
            alloc.release()

    # -- operations -------------------------------------------------------------

    def handle(self, session: Session, message: ClientMessage) -> None:
        """Act on one decoded message from ``session``."""
        if isinstance(message, Ping):
            return  # any frame is a sign of life; the reader already counted it
        self.changed()
        if isinstance(message, Request):
            if session.key_in_use(message.key):
                session.push(Failed(message.key, "value", [f"key {message.key} is in use"]))
            else:
                self._request_now(session, message)
        elif isinstance(message, Release):
            self._drop(session, message.key)
        elif isinstance(message, Withdraw):
            waiting = session.waiting.get(message.key)
            if waiting is not None:
                waiting.scope.cancel()
        elif isinstance(message, Resize):
            if session.key_in_use(message.key):
                session.push(Failed(message.key, "value", [f"key {message.key} is in use"]))
            else:
                self._start_resize(session, message)
        elif isinstance(message, Busy):
            alloc = session.held.get(message.key)
            # The client's spans, mirrored: never closed below zero.
            if alloc is not None and (message.busy or alloc._holding.busy_spans > 0):
                self.arbiter._set_busy(alloc, message.busy)
        else:
            assert isinstance(message, Sync | Status)
            if session.queries is None:
                assert session.task_group is not None
                session.queries = []
                session.task_group.start_soon(self._answer, session, session.queries)
            session.queries.append(message)

    @staticmethod
    def _arguments(message: Request, timeout: Any) -> RequestArgs:
        """A request message's arguments, checked as `Arbiter.request_allocation` checks
        them (``TypeError``, ``ValueError``: that request's failure)."""
        return check_request(
            WorkloadType(message.workload), Priority(message.priority), message.memory,
            message.min_memory, timeout, message.min_quality, message.preemptible,
            message.keep_alive, message.label,
        )  # fmt: skip

    def _request_now(self, session: Session, message: Request) -> None:
        """Grant a request now when nothing waits and it fits: no task, no wait. Else it
        waits in a task, as an in-process waiter parks; it is `waiting` (a withdrawal
        finds it) from now on."""
        timeout: Any = DEFAULT if message.default_timeout else message.timeout
        try:
            args = self._arguments(message, timeout)
        except Exception as exc:
            session.push(_failure(message.key, exc))
            return
        if self._turns.idle and self._admit_new.is_set():
            alloc = self.arbiter._grant_at_once(args, session)
            if alloc is not None:
                self._granted(session, message.key, alloc, 0.0)
                return
        waiting = session.waiting[message.key] = _Waiting(
            args[0], args[1], message.memory, message.label, anyio.current_time()
        )
        assert session.task_group is not None
        session.task_group.start_soon(
            self._request, session, message.key, args, waiting, self._turns.take()
        )

    async def _request(
        self, session: Session, key: int, args: RequestArgs, waiting: _Waiting, turn: int
    ) -> None:
        alloc: Allocation | None = None
        try:
            with waiting.scope:
                timeout = await self._wait_turn(turn, args[4], counted=True)
                self._turns.end(turn)  # the next may go once this one has queued: now
                waiting.queued = True
                args = (*args[:4], timeout, *args[5:])
                alloc = await self.arbiter._admit(args, current_backend(), owner=session)
        except Exception as exc:
            session.push(_failure(key, exc))
            return
        finally:
            self._turns.end(turn)
            session.waiting.pop(key, None)
            self.changed()
        if alloc is None:
            return  # withdrawn, or the session closed
        if session.closed:
            alloc.release()
            return
        self._granted(session, key, alloc, anyio.current_time() - waiting.since)

    def _granted(self, session: Session, key: int, alloc: Allocation, waited: float) -> None:
        self._hold(session, key, alloc)
        holding = alloc._holding
        session.push(Granted(key, alloc._number, holding.memory, alloc.quality, alloc.preempted))
        if self.on_grant is not None:
            self.on_grant(holding.priority, waited)
        log.info(
            "allocation granted",
            id=alloc.id,
            pid=session.pid,
            label=alloc.label,
            workload=holding.workload.value,
            priority=holding.priority.name.lower(),
            memory=holding.memory,
            waited_s=round(waited, 6),
        )

    async def _answer(self, session: Session, queries: list[Sync | Status]) -> None:
        """Answer the Syncs and Statuses read in one pass, in order, with one refresh of
        the stats (which sorts their samples) and one status (which lists every holder
        and waiter) at most: a flood of them costs the daemon one of each per read."""
        session.queries = None  # the pass is over: a query read from now on starts anew
        # Tasks run in the order they were started: one checkpoint lets the requests
        # received before these queries reach the arbiter (and park) before they are
        # answered.
        await anyio.lowlevel.checkpoint()
        try:
            if any(type(query) is Sync for query in queries):
                self.refresh_stats()
            status = None
            for query in queries:
                if type(query) is Sync:
                    session.push(Synced(query.key))
                else:
                    if status is None:
                        status = self.status(query.key)
                    session.push(msgspec.structs.replace(status, key=query.key))
        except Exception as exc:  # a bug answering must not end the session
            log.error("query failed", session=session.number, exc_info=exc)
            session.push(Error(f"query failed: {type(exc).__name__}"))

    async def _wait_turn(self, turn: int, timeout: Any, *, counted: bool) -> Any:
        """Wait for ``turn``, and (a restarted daemon) until new grants are admitted;
        returns the timeout left. A request that ends meanwhile never reached the
        arbiter's queue, and is counted in its stats as such when ``counted``."""
        turns = self._turns
        if turns.up(turn) and self._admit_new.is_set():
            return timeout
        limit = self.arbiter.config.allocation_timeout if timeout is DEFAULT else timeout
        started = anyio.current_time()
        try:
            with anyio.move_on_after(math.inf if limit is None else limit):
                await turns.wait(turn)
                await self._admit_new.wait()
        except BaseException:
            if counted:  # withdrawn, or the session ended
                self.arbiter._count_unqueued(Outcome.CANCELLED)
            raise
        if not (turns.up(turn) and self._admit_new.is_set()):
            assert limit is not None
            if counted:
                self.arbiter._count_unqueued(Outcome.TIMED_OUT)
            raise AllocationTimeout(limit)
        return None if limit is None else max(0.0, limit - (anyio.current_time() - started))

    async def admit_new_after_hold(self) -> None:
        """Open new grants once the hold of a restarted daemon is over."""
        await anyio.sleep_until(self._admit_new_at)
        self._admit_new.set()

    def _start_resize(self, session: Session, message: Resize) -> None:
        alloc = session.held.get(message.alloc)
        timeout: Any = DEFAULT if message.default_timeout else message.timeout
        try:
            if alloc is None:
                raise RuntimeError(f"no allocation {message.alloc}")
            check_memory(message.memory, "memory")
            if not isinstance(timeout, Default):
                timeout = check_timeout(timeout)
        except Exception as exc:
            session.push(_failure(message.key, exc))
            return
        waiting = session.waiting[message.key] = _Waiting(
            alloc.workload, alloc.priority, message.memory, alloc.label, anyio.current_time()
        )
        assert session.task_group is not None
        session.task_group.start_soon(
            self._resize, session, message, alloc, timeout, waiting, self._turns.take()
        )

    async def _resize(
        self,
        session: Session,
        message: Resize,
        alloc: Allocation,
        timeout: Any,
        waiting: _Waiting,
        turn: int,
    ) -> None:
        try:
            with waiting.scope:
                timeout = await self._wait_turn(turn, timeout, counted=False)
                self._turns.end(turn)  # a growth queues without yielding
                waiting.queued = True
                await self.arbiter._resize(alloc, message.memory, timeout)
        except Exception as exc:
            session.push(_failure(message.key, exc))
            return
        finally:
            self._turns.end(turn)
            session.waiting.pop(message.key, None)
            self.changed()
        if waiting.scope.cancelled_caught:
            # Withdrawn: the client waits for this answer to forget the resize.
            session.push(Failed(message.key, "cancelled", []))
            return
        session.push(Resized(message.key, alloc.memory, alloc.quality))

    async def reclaim(self, session: Session, reclaim: Reclaim) -> None:
        """Admit an allocation a client held with this daemon's predecessor, if it fits."""
        try:
            args = check_request(
                WorkloadType(reclaim.workload), Priority(reclaim.priority), reclaim.memory,
                reclaim.min_memory if reclaim.min_memory != reclaim.memory else None, 0, None,
                reclaim.preemptible, reclaim.keep_alive, reclaim.label,
            )  # fmt: skip
            alloc = await self.arbiter._admit(args, current_backend(), owner=session)
        except Exception:
            session.push(Reclaimed(reclaim.key, None, 0.0))
            return
        if session.key_in_use(reclaim.key) or alloc.memory != reclaim.memory:
            alloc.release()
            session.push(Reclaimed(reclaim.key, None, 0.0))
            return
        self._hold(session, reclaim.key, alloc)
        if reclaim.busy > 0:  # one span stands for "busy": never trust a client's count
            self.arbiter._set_busy(alloc, True)
        session.push(Reclaimed(reclaim.key, alloc._number, alloc.quality))
        log.info("allocation reclaimed", id=alloc.id, pid=session.pid, memory=alloc.memory)
        if alloc.preempted:  # decided while the re-claim was on its way: nobody heard it
            with self.arbiter._lock:
                session.allocation_changed(alloc, True)

    # -- status -------------------------------------------------------------------

    def status(self, key: int) -> StatusReply:
        """Every session's holders and waiters, read at one moment with the state that
        goes out before it (a request granted whose task has not resumed yet is a
        holder, as the arbiter's figures count it)."""
        now = anyio.current_time()
        held, queued = self.arbiter._allocations()
        holders = [
            HolderInfo(
                id=alloc.id,
                pid=self._pid_of(alloc),
                label=alloc.label,
                workload=alloc.workload.value,
                priority=alloc.priority.name.lower(),
                memory=alloc.memory,
                quality=alloc.quality,
                busy=alloc._holding.busy_spans > 0,
                age_s=max(0.0, now - alloc.created_at),
            )
            for alloc in held
        ]
        waiters = [
            WaiterInfo(
                id=alloc.id,
                pid=self._pid_of(alloc),
                label=alloc.label,
                workload=alloc.workload.value,
                priority=alloc.priority.name.lower(),
                memory=size,
                waited_s=max(0.0, waited),
            )
            for alloc, size, waited in queued
        ]
        for session in self.sessions.values():
            waiters.extend(  # held back by a restarted daemon, or waiting for their turn
                WaiterInfo(
                    id=f"{session.pid}/{wkey}",
                    pid=session.pid,
                    label=waiting.label,
                    workload=waiting.workload.value,
                    priority=waiting.priority.name.lower(),
                    memory=waiting.memory,
                    waited_s=max(0.0, now - waiting.since),
                )
                for wkey, waiting in session.waiting.items()
                if not waiting.queued
            )
        return _fitted(StatusReply(key, holders, waiters))

    @staticmethod
    def _pid_of(alloc: Allocation) -> int:
        owner = alloc._holding.owner
        return owner.pid if isinstance(owner, Session) else 0
