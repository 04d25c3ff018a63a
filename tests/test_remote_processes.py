"""Real processes around one ``arbiter serve``: sharing, priorities and preemption across
processes, kill -9, SIGSTOP, daemon restarts, refused starts, status and metrics.

Every process is a real subprocess, bounded by a timeout and ended by its own pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from remote_helpers import (
    LINUX_ONLY,
    ROOT,
    Client,
    daemon,
    daemon_log,
    serve_command,
    start_daemon,
    status_json,
    status_json_command,
    stop,
    wait_connectable,
    wait_for,
)

from arbiter import ArbiterUnavailable, GiB, RemoteArbiter

pytestmark = [LINUX_ONLY, pytest.mark.real_processes]

# The ttl of the restart tests: a holder re-claims within it from the old daemon's end.
RESTART_TTL = "5"
# The ttl of a daemon started in place of one killed: it grants nothing new for that long
# (re-claims it admits at once). The tests wait for the re-claim before a newcomer asks,
# so the hold only delays the newcomer; it is also the new sessions' silence limit.
STALE_RESTART_TTL = "2"

HOLD = """
async def main():
    async with RemoteArbiter(SOCK) as arbiter:
        alloc = await arbiter.request_allocation({workload!r}, {priority!r}, {gib} * GiB,
                                                 timeout={timeout})
        say("granted", alloc.id, alloc.memory)
        await line()
        alloc.release()
        await arbiter.refresh()
        say("released")
anyio.run(main)
"""

BODY = """
async def main():
    async with RemoteArbiter(SOCK) as arbiter:
        try:
            async with arbiter.allocate({workload!r}, {priority!r}, memory={gib} * GiB) as alloc:
                say("body", alloc.id)
                await line()
            say("finished")
        except Preempted:
            say("preempted")
        except SessionLost:
            say("lost")
        except ArbiterUnavailable:
            say("unavailable")
anyio.run(main)
"""


def hold(sock: Path, gib: int, priority: str = "normal", timeout: float | None = 30) -> Client:
    return Client(
        sock,
        HOLD.format(workload="llm_inference", priority=priority, gib=gib, timeout=timeout),
    )


def body(sock: Path, gib: int, priority: str = "background") -> Client:
    return Client(sock, BODY.format(workload="image_generation", priority=priority, gib=gib))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, metrics_port: int) -> Iterator[Path]:
    """One daemon (10 GiB, Prometheus on ``metrics_port``) for the tests that need no
    daemon of their own: each leaves it as it found it."""
    sock = tmp_path_factory.mktemp("procs") / "gpu.sock"
    with daemon(sock, "--metrics", f"127.0.0.1:{metrics_port}", vram_gb=10):
        yield sock
    assert "session failed" not in daemon_log(sock).read_text()


@pytest.fixture(scope="module")
def short_ttl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One daemon with a 1 s ttl for the tests of silent sessions (each its own client)."""
    sock = tmp_path_factory.mktemp("ttl") / "ttl.sock"
    with daemon(sock, "--ttl", "1"):
        yield sock


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    started: list[Client] = []
    yield started
    for client in started:
        client.close()


def test_two_processes_share_one_budget(shared: Path, clients: list[Client]) -> None:
    first = hold(shared, 8)
    clients.append(first)
    first.expect("granted")
    second = hold(shared, 4)
    clients.append(second)
    wait_for(lambda: len(status_json(shared)["waiters"]) == 1)
    status = status_json(shared)
    assert [h["pid"] for h in status["holders"]] == [first.pid]
    assert status["waiters"][0]["pid"] == second.pid
    first.tell("release")
    first.expect("released")
    second.expect("granted")
    second.tell("release")
    second.expect("released")
    assert first.finish()[0] == 0 and second.finish()[0] == 0


def test_user_facing_process_preempts_background_body(shared: Path, clients: list[Client]) -> None:
    diffusion = body(shared, 8, "background")
    clients.append(diffusion)
    diffusion.expect("body")
    started = time.monotonic()
    llm = hold(shared, 6, "user_facing")
    clients.append(llm)
    diffusion.expect("preempted")
    llm.expect("granted")
    assert time.monotonic() - started < 10
    llm.tell("release")
    llm.expect("released")
    assert diffusion.finish()[0] == 0 and llm.finish()[0] == 0


def test_kill_9_of_a_holder_frees_its_memory(shared: Path, clients: list[Client]) -> None:
    holder = hold(shared, 8)
    clients.append(holder)
    holder.expect("granted")
    waiter = hold(shared, 4)
    clients.append(waiter)
    wait_for(lambda: len(status_json(shared)["waiters"]) == 1)
    holder.kill(signal.SIGKILL)
    waiter.expect("granted")
    assert [h["pid"] for h in status_json(shared)["holders"]] == [waiter.pid]
    waiter.tell("release")
    waiter.expect("released")


def test_status_json_shape(
    shared: Path, clients: list[Client], capsys: pytest.CaptureFixture[str]
) -> None:
    from arbiter.cli import main

    holder = hold(shared, 3, "high")
    clients.append(holder)
    holder.expect("granted")
    status = status_json_command(shared)
    assert set(status) == {"state", "stats", "holders", "waiters"}
    assert status["state"]["vram_used"] == 3 * GiB
    assert status["state"]["pressure_level"] in {"low", "moderate", "high", "critical"}
    assert set(status["state"]) >= {
        "active_llm_workloads", "active_diffusion_workloads", "llm_quality",
        "diffusion_quality", "memory_pressure", "external_used", "vram_available", "waiting",
    }  # fmt: skip
    assert {"total_allocations", "preemptions", "wait_percentiles"} <= set(status["stats"])
    assert set(status["stats"]["wait_percentiles"]) == {
        "background", "normal", "high", "user_facing",
    }  # fmt: skip
    (h,) = status["holders"]
    assert set(h) == {
        "id", "pid", "label", "workload", "priority", "memory", "quality", "busy", "age_s",
    }  # fmt: skip
    assert (h["pid"], h["workload"], h["priority"], h["memory"], h["busy"]) == (
        holder.pid, "llm_inference", "high", 3 * GiB, False,
    )  # fmt: skip
    capsys.readouterr()
    # The table in process (`arbiter status --json` above is the command's smoke test).
    assert main(["status", "--socket", str(shared)]) == 0
    assert f"pid {holder.pid}" in capsys.readouterr().out
    holder.tell("release")
    holder.expect("released")


def test_status_without_daemon_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from arbiter.cli import main

    assert main(["status", "--socket", str(tmp_path / "none.sock")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "none.sock" in err


@pytest.mark.anyio
async def test_no_daemon_is_arbiter_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ArbiterUnavailable, match=r"nothing\.sock"):
        async with RemoteArbiter(tmp_path / "nothing.sock"):
            pass


def test_wrong_protocol_version_is_refused_clearly(shared: Path) -> None:
    import msgspec

    from arbiter.remote._wire import PROTOCOL_VERSION, Hello, frame

    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(10)
        raw.connect(str(shared))
        raw.sendall(frame(msgspec.msgpack.encode(Hello(version=99))))
        reply = msgspec.msgpack.decode(raw.recv(65536)[4:])
    assert reply["type"] == "Refused" and reply["reason"] == "version"
    assert f"protocol {PROTOCOL_VERSION}" in reply["message"] and "99" in reply["message"]


def test_second_daemon_on_a_live_socket_exits_2(shared: Path) -> None:
    done = subprocess.run(
        serve_command(shared), capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"arbiter: error: a live daemon already serves {shared}"
    ]


def test_socket_and_folder_permissions(shared: Path) -> None:
    assert shared.stat().st_mode & 0o777 == 0o600
    assert shared.parent.stat().st_mode & 0o777 == 0o700


def test_metrics_names(shared: Path, metrics_port: int, clients: list[Client]) -> None:
    import httpx

    sock, port = shared, metrics_port
    holder = hold(sock, 2)
    clients.append(holder)
    holder.expect("granted")
    text = ""

    def scraped() -> bool:
        nonlocal text
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        return "gpu_arbiter_granted_bytes 2.147483648e+09" in text

    wait_for(scraped)
    for name in (
        "gpu_arbiter_vram_budget_bytes 1.073741824e+10",
        "gpu_arbiter_external_bytes",
        "gpu_arbiter_waiting_requests",
        'gpu_arbiter_allocations_total{outcome="granted"}',
        "gpu_arbiter_preemptions_total",
        'gpu_arbiter_quality_target{family="llm"}',
        'gpu_arbiter_quality_target{family="diffusion"}',
        'gpu_arbiter_wait_seconds_bucket{le="0.005",priority="normal"}',
    ):
        assert name in text, name
    holder.tell("release")
    holder.expect("released")


def test_sigterm_exits_0_and_removes_the_socket(tmp_path: Path) -> None:
    sock = tmp_path / "t.sock"
    proc = start_daemon(sock)
    assert stop(proc, signal.SIGTERM) == 0
    assert not sock.exists()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sock))
    dead.close()  # a socket file that nobody serves
    with daemon(sock):
        wait_connectable(sock)


def test_sigstop_past_the_ttl_loses_the_session(short_ttl: Path, clients: list[Client]) -> None:
    sock = short_ttl
    sleeper = body(sock, 8, "normal")
    clients.append(sleeper)
    sleeper.expect("body")
    sleeper.kill(signal.SIGSTOP)
    try:
        other = hold(sock, 8, "normal")  # fits only once the silent session is gone
        clients.append(other)
        other.expect("granted")
    finally:
        sleeper.kill(signal.SIGCONT)
    sleeper.expect("lost")
    other.tell("release")
    other.expect("released")


def _reclaimed_first(sock: Path, holder: Client, priority: str, clients: list[Client]) -> None:
    """A restarted daemon holds ``holder``'s re-claimed 6 GiB; a newcomer of ``priority``
    waits behind it and is granted once the holder's body ends."""
    wait_for(lambda: [h["pid"] for h in status_json(sock)["holders"]] == [holder.pid])
    newcomer = hold(sock, 6, priority, timeout=10)
    clients.append(newcomer)
    holder.tell("done")
    holder.expect("finished")
    newcomer.expect("granted")
    newcomer.tell("release")
    newcomer.expect("released")


def test_daemon_kill_9_and_restart_keeps_a_live_holder(
    tmp_path: Path, clients: list[Client]
) -> None:
    sock = tmp_path / "restart.sock"
    # The holder re-claims within the first daemon's ttl, counted from its death: the ttl
    # must outlast starting the second daemon on a loaded machine (1.5 s did not at load
    # 10, nor 3 s with six busy loops beside the suite). The newcomer waits out the second
    # daemon's ttl.
    first = start_daemon(sock, "--ttl", RESTART_TTL)
    try:
        holder = body(sock, 6, "normal")
        clients.append(holder)
        holder.expect("body")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        stop(first)
    with daemon(sock, "--ttl", STALE_RESTART_TTL) as second:
        _reclaimed_first(sock, holder, "normal", clients)
        assert second.poll() is None


def test_what_is_not_reclaimed_in_time_is_unavailable(
    tmp_path: Path, clients: list[Client]
) -> None:
    sock = tmp_path / "gone.sock"
    first = start_daemon(sock, "--ttl", "1")
    try:
        holder = body(sock, 2, "normal")
        clients.append(holder)
        holder.expect("body")
    finally:
        stop(first, signal.SIGKILL)
    holder.expect("unavailable")


def test_sigterm_restart_within_the_ttl_keeps_a_live_holder(
    tmp_path: Path, clients: list[Client]
) -> None:
    sock = tmp_path / "handover.sock"
    # The holder re-claims within the ttl: it must outlast a daemon start on a loaded machine.
    first = start_daemon(sock, "--ttl", RESTART_TTL)
    try:
        holder = body(sock, 6, "normal")
        clients.append(holder)
        holder.expect("body")
    finally:
        assert stop(first, signal.SIGTERM) == 0
    assert not sock.exists()
    with daemon(sock, "--ttl", RESTART_TTL):
        _reclaimed_first(sock, holder, "user_facing", clients)


def _hello_as(sock: Path, uid: int) -> dict[str, object]:
    """Connect as ``uid`` from a forked child and return the daemon's first answer."""
    import msgspec

    from arbiter.remote._wire import PROTOCOL_VERSION, Hello, frame

    hello = frame(msgspec.msgpack.encode(Hello(PROTOCOL_VERSION)))
    read_end, write_end = os.pipe()
    # A fork, since a new interpreter could not run as another user (it lives under /root
    # here). Python 3.12+ warns that a threaded process (a pytest worker) forks: the child
    # only makes system calls through modules already imported, then _exits.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: stdlib sockets only, then _exit
        code = 0
        try:
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as raw:
                raw.settimeout(10)
                raw.connect(str(sock))
                with contextlib.suppress(OSError):  # a refusal may come before the hello
                    raw.sendall(hello)
                os.write(write_end, raw.recv(65536)[4:])
        except BaseException as exc:
            os.write(write_end, repr(exc).encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reply:
        data = reply.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    answer: dict[str, object] = msgspec.msgpack.decode(data)
    return answer


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_other_uids_are_refused_unless_allowed() -> None:
    import tempfile

    nobody = 65534
    for allow, expected in (((), "Refused"), (("--allow-uid", str(nobody)), "Welcome")):
        # Under /tmp (pytest's folders are closed to other users).
        with tempfile.TemporaryDirectory(prefix="arbiter-uid-") as folder:
            sock = Path(folder) / "u.sock"
            with daemon(sock, *allow):
                # Open the folder and socket to everyone: only the uid check is left.
                sock.parent.chmod(0o755)
                sock.chmod(0o666)
                assert _hello_as(sock, nobody)["type"] == expected


WAIT_THEN_AGAIN = """
async def main():
    async with RemoteArbiter(SOCK) as arbiter:
        try:
            await arbiter.request_allocation("llm_inference", "normal", 8 * GiB, timeout=None)
        except ArbiterError as exc:
            say("failed", type(exc).__name__)
        await line()
        alloc = await arbiter.request_allocation("llm_inference", "normal", GiB, timeout=10)
        say("again", alloc.memory)
anyio.run(main)
"""


def test_a_waiting_request_fails_at_once_when_the_daemon_dies(
    tmp_path: Path, clients: list[Client]
) -> None:
    sock = tmp_path / "dies.sock"
    first = start_daemon(sock, "--ttl", "2")
    try:
        holder = hold(sock, 8)
        clients.append(holder)
        holder.expect("granted")
        waiter = Client(sock, WAIT_THEN_AGAIN)
        clients.append(waiter)
        wait_for(lambda: len(status_json(sock)["waiters"]) == 1)
        started = time.monotonic()
    finally:
        stop(first, signal.SIGKILL)
    waiter.expect("failed ArbiterUnavailable")
    assert time.monotonic() - started < 1.5  # at once, not after the ttl
    # Its start was stale: it grants nothing new for its ttl (the first daemon's 2 s had to
    # exceed the 1.5 s bound above; this one's need not).
    with daemon(sock, "--ttl", "1"):
        holder.kill()  # its re-claim is not what this test is about
        waiter.tell("go")  # a later call opens a new session by itself
        waiter.expect(f"again {GiB}")


def test_later_calls_open_a_new_session_after_session_lost(
    short_ttl: Path, clients: list[Client]
) -> None:
    sock = short_ttl
    waiter = Client(sock, WAIT_THEN_AGAIN.replace("8 * GiB, timeout=None", "20 * GiB"))
    clients.append(waiter)
    waiter.expect("failed InsufficientMemory")
    waiter.kill(signal.SIGSTOP)
    try:
        wait_for(lambda: status_json(sock)["state"]["vram_used"] == 0, timeout=5)
        # Past the ttl the daemon ends the silent session (and says so in its log).
        expired = re.compile(rf"event='session expired' session=\d+ pid={waiter.pid} ")
        wait_for(lambda: expired.search(daemon_log(sock).read_text()) is not None, timeout=10)
    finally:
        waiter.kill(signal.SIGCONT)
    waiter.tell("go")
    waiter.expect(f"again {GiB}")


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--vram-gb", "-1"],
        ["serve", "--ttl", "0"],
        ["serve", "--metrics", "nowhere"],
        ["serve", "--allow-uid", "root"],
        ["serve", "--socket", "/tmp/" + "x" * 120],
        ["serve", "--ttl", "1e-9"],  # no client could say hello in time
        ["serve", "--allow-uid", "1" + "0" * 400],
        ["serve", "--allow-uid", "\u0663"],  # a digit, in another script
        ["serve", "--metrics", "127.0.0.1:\u0668\u0660"],
    ],
    ids=[
        "vram",
        "ttl",
        "metrics",
        "uid",
        "long-path",
        "tiny-ttl",
        "huge-uid",
        "uid-script",
        "port-script",
    ],
)
def test_bad_serve_flags_are_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from arbiter.cli import main

    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("arbiter: error: ")


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_serve_never_replaces_what_is_not_a_socket(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from arbiter.cli import main

    taken = tmp_path / "precious"
    if kind == "file":
        taken.write_text("important")
    else:
        taken.mkdir()
    assert main(["serve", "--vram-gb", "1", "--socket", str(taken)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"arbiter: error: {taken} is there and is not a socket: not replacing it"
    ]
    assert taken.read_text() == "important" if kind == "file" else taken.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # nothing made beside it


def test_a_refused_start_leaves_a_stale_socket_and_its_handover(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """They tell the next start that clients may come back to re-claim (DESIGN: it then
    grants nothing new until ttl has passed); a start refused for its --metrics port
    must not take them away."""
    from arbiter.cli import main

    sock = tmp_path / "d.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(sock))  # a socket nobody serves: a daemon died
    handover = tmp_path / "d.sock.handover"
    handover.write_text(repr(time.time()))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["serve", "--vram-gb", "1", "--socket", str(sock), "--metrics", f"127.0.0.1:{port}"]
        assert main(argv) == 2
    assert capsys.readouterr().err.startswith("arbiter: error: cannot serve metrics")
    assert sock.is_socket() and handover.exists()


def test_serve_metrics_without_prometheus_client_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from arbiter.cli import main

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "arbiter.remote._metrics", raising=False)
    argv = ["serve", "--socket", str(tmp_path / "d.sock"), "--metrics", "127.0.0.1:0"]
    assert main(argv) == 2  # no --vram-gb: refused before detection could log
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "arbiter: error: --metrics needs prometheus-client: pip install 'gpu-arbiter[cli]'"
    ]
