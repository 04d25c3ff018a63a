"""The programs in examples/ work: the Starlette app over ASGI, the trio program as a process."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
from arbiter_helpers import settle

from arbiter import Allocation, Arbiter, ArbiterConfig, GiB
from arbiter.testing import FakeGpu

Message = MutableMapping[str, Any]

pytest.importorskip("starlette")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


starlette_app = _load("starlette_app")


@asynccontextmanager
async def _client(fake: FakeGpu | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan entered (ASGITransport does not run lifespan events)."""
    config = ArbiterConfig.for_vram_gb(24, poll_interval=0.01, reclaim_grace=5.0)
    app = starlette_app.create_app(config, probe=fake or FakeGpu(total=24 * GiB))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app") as client,
    ):
        yield client


@pytest.mark.anyio
async def test_chat_on_an_empty_card_runs_at_full_quality() -> None:
    async with _client() as client:
        response = await client.post("/chat", json={"prompt": "hello", "max_tokens": 1})
    assert response.status_code == 200
    body = response.json()
    assert body["quality"] == 1.0
    assert body["waited_s"] < 1.0
    assert "hello" in body["reply"]


@pytest.mark.anyio
async def test_concurrent_chats_and_images_complete_and_the_ledger_ends_at_zero() -> None:
    responses: list[httpx.Response] = []

    async def post(client: httpx.AsyncClient, path: str, body: dict[str, int]) -> None:
        responses.append(await client.post(path, json=body))

    async with _client() as client:
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(post, client, "/chat", {"memory_gb": 4, "max_tokens": 5})
            for _ in range(4):
                tg.start_soon(
                    post, client, "/image", {"memory_gb": 10, "min_memory_gb": 6, "steps": 2}
                )
        state = (await client.get("/state")).json()

    chats = [r for r in responses if "reply" in r.text]
    images = [r.json() for r in responses if r.status_code == 200 and "memory_gb" in r.json()]
    assert len(chats) == 6 and all(r.status_code == 200 for r in chats)
    # Six chats fill the card: one that arrives while the images hold it may preempt an
    # image already at its floor (DESIGN's order: nothing to ask, so no grace to wait),
    # which the app answers 503 Preempted. Which one depends on arrival order.
    others = [r for r in responses if r not in chats and r.status_code != 200]
    assert all(r.status_code == 503 and r.json()["error"] == "Preempted" for r in others)
    assert len(images) + len(others) == 4
    assert all(6 <= image["memory_gb"] <= 10 and 0 < image["quality"] <= 1 for image in images)
    assert state["vram_used"] == 0
    assert state["waiting"] == 0
    assert state["active_llm_workloads"] == state["active_diffusion_workloads"] == 0
    assert state["vram_available"] == 24 * GiB


@pytest.mark.anyio
async def test_an_image_larger_than_the_card_is_413() -> None:
    async with _client() as client:
        response = await client.post("/image", json={"memory_gb": 100, "min_memory_gb": 50})
    assert response.status_code == 413
    assert response.json()["error"] == "InsufficientMemory"


@pytest.mark.anyio
async def test_a_bad_body_is_400() -> None:
    async with _client() as client:
        assert (await client.post("/chat", content=b"{not json")).status_code == 400
        assert (await client.post("/chat", json={"memory_gb": "four"})).status_code == 400
        assert (
            await client.post("/image", json={"memory_gb": 4, "min_memory_gb": 6})
        ).status_code == 400


@pytest.mark.anyio
async def test_a_chat_on_a_card_filled_by_another_process_is_503_with_retry_after() -> None:
    fake = FakeGpu(total=24 * GiB, external_used=24 * GiB)  # a notebook holds the whole card
    async with _client(fake) as client:
        await settle()  # the poller has made its first read
        assert (await client.get("/state")).json()["external_used"] == 24 * GiB
        response = await client.post("/chat", json={"timeout": 0.05})
        assert response.status_code == 503
        assert response.json()["error"] == "AllocationTimeout"
        assert int(response.headers["Retry-After"]) > 0

        # A patient chat is served as soon as the poller sees the card freed.
        replies: list[httpx.Response] = []

        async def patient_chat() -> None:
            replies.append(await client.post("/chat", json={"timeout": 30, "max_tokens": 1}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(patient_chat)
            await settle()
            assert (await client.get("/state")).json()["waiting"] == 1
            fake.external_used = 0
    assert replies[0].status_code == 200
    assert replies[0].json()["quality"] == 1.0


# -- the app as a server runs it: lifespan in its own task, clients that hang up ----------


class Served:
    """The app with its lifespan running in a task of its own, as a server runs it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app")
        self.stop = anyio.Event()

    @property
    def arbiter(self) -> Arbiter:
        arbiter: Arbiter = self.app.state.arbiter
        return arbiter

    async def call(self, path: str, body: bytes, hang_up: anyio.Event) -> list[Message]:
        """One request driven as an ASGI server does, from a client that leaves when
        ``hang_up`` is set. What the app sent back, if anything."""
        sent: list[Message] = []
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await hang_up.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 50000),
            "server": ("app", 80),
            "state": {},
        }
        await self.app(scope, receive, send)
        return sent


@asynccontextmanager
async def _served(fake: FakeGpu | None = None, *, max_waiting: int = 64) -> AsyncIterator[Served]:
    config = ArbiterConfig.for_vram_gb(24, poll_interval=0.01, reclaim_grace=5.0)
    app = starlette_app.create_app(
        config, probe=fake or FakeGpu(total=24 * GiB), max_waiting=max_waiting
    )
    served = Served(app)
    started = anyio.Event()

    async def lifespan() -> None:
        async with app.router.lifespan_context(app):
            started.set()
            await served.stop.wait()

    with anyio.fail_after(30):  # a hang fails instead of blocking the suite
        async with anyio.create_task_group() as tg, served.client:
            tg.start_soon(lifespan)
            await started.wait()
            try:
                yield served
            finally:
                served.stop.set()


async def _hold_the_card(served: Served) -> Allocation:
    """All 24 GiB held by a holder that nothing can preempt."""
    return await served.arbiter.request_allocation(
        "llm_inference", "user_facing", 24 * GiB, preemptible=False
    )


def _assert_error_body(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == error
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in response.text


@pytest.mark.anyio
async def test_a_client_that_leaves_while_queued_withdraws_its_request() -> None:
    async with _served() as served:
        holder = await _hold_the_card(served)
        hang_up = anyio.Event()
        answers: list[list[Message]] = []

        answered = anyio.Event()

        async def leaving_client() -> None:
            answers.append(await served.call("/chat", b'{"timeout": 30}', hang_up))
            answered.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(leaving_client)
            await settle()
            assert served.arbiter.state().waiting == 1
            hang_up.set()
            with anyio.fail_after(1):
                await answered.wait()
            assert served.arbiter.state().waiting == 0  # it left the queue at once
        assert answers == [[]]  # nothing answered to a client that is gone
        assert served.arbiter.stats().cancelled == 1
        holder.release()
        # The app's own count of queued work went with it: nothing is expected to wait.
        response = await served.client.post("/chat", json={"max_tokens": 1, "timeout": 0})
        assert response.status_code == 200


@pytest.mark.anyio
async def test_a_client_that_leaves_while_served_cancels_its_work() -> None:
    async with _served() as served:
        hang_up = anyio.Event()
        answers: list[list[Message]] = []
        body = b'{"max_tokens": 1024, "memory_gb": 6}'  # about 2 s of work

        answered = anyio.Event()

        async def leaving_client() -> None:
            answers.append(await served.call("/chat", body, hang_up))
            answered.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(leaving_client)
            await settle()
            assert served.arbiter.state().vram_used == 6 * GiB
            left_at = anyio.current_time()
            hang_up.set()
            with anyio.fail_after(1):
                await answered.wait()
            assert anyio.current_time() - left_at < 1.0  # not the 2 s the work would take
        assert answers == [[]]
        assert served.arbiter.state().vram_used == 0
        assert served.arbiter.stats().successful_allocations == 1  # granted, then given back


@pytest.mark.anyio
async def test_a_client_that_stays_gets_its_answer_through_the_watch() -> None:
    async with _served() as served:
        stays = anyio.Event()  # never set: the client waits for its answer
        sent = await served.call("/chat", b'{"max_tokens": 1, "prompt": "hi"}', stays)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert b"hi" in b"".join(m.get("body", b"") for m in sent[1:])


BAD_BODIES: list[tuple[str, bytes]] = [
    ("/chat", b'{"max_tokens": 1e9}'),
    ("/chat", b'{"max_tokens": 1000000000}'),
    ("/chat", b'{"max_tokens": "x"}'),
    ("/chat", b'{"max_tokens": 0}'),
    ("/chat", b'{"max_tokens": 1.5}'),
    ("/chat", b'{"max_tokens": true}'),
    ("/chat", b'{"max_tokens": null}'),
    ("/chat", b'{"max_tokens": Infinity}'),
    ("/chat", b'{"max_tokens": -Infinity}'),
    ("/chat", b'{"timeout": NaN}'),
    ("/chat", b'{"memory_gb": 1e400}'),
    ("/chat", b'{"memory_gb": 1e300}'),
    ("/chat", b'{"memory_gb": ' + b"9" * 5000 + b"}"),
    ("/chat", b'{"memory_gb": 0}'),
    ("/chat", b'{"memory_gb": -4}'),
    ("/chat", b'{"memory_gb": "four"}'),
    ("/chat", b'{"memory_gb": [4]}'),
    ("/chat", b'{"timeout": 1e9}'),
    ("/chat", b'{"timeout": -1}'),
    ("/chat", b'{"prompt": 5}'),
    ("/chat", b'{"prompt": {"a": {"b": {}}}}'),
    ("/chat", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("/chat", b"[" * 8000 + b"]" * 8000),
    ("/chat", b'{"unknown": 1}'),
    ("/chat", b'"just a string"'),
    ("/chat", b"[1, 2]"),
    ("/chat", b"{not json"),
    ("/chat", b"\xff\xfe{}"),
    ("/image", b'{"steps": 1e9}'),
    ("/image", b'{"steps": 0}'),
    ("/image", b'{"memory_gb": 4, "min_memory_gb": 6}'),
    ("/image", b'{"min_memory_gb": 0}'),
    ("/image", b'{"timeout": Infinity}'),
]


@pytest.mark.anyio
async def test_every_bad_field_is_a_400_before_any_memory_is_requested() -> None:
    async with _served() as served:
        for path, body in BAD_BODIES:
            response = await served.client.post(path, content=body)
            _assert_error_body(response, 400, "BadRequest")
            assert len(response.text) < 400, "the detail quotes at most a short piece"
        assert served.arbiter.stats().total_allocations == 0  # nothing asked for memory


@pytest.mark.anyio
async def test_every_error_has_the_same_json_body() -> None:
    fake = FakeGpu(total=24 * GiB)
    async with _served(fake) as served:
        client = served.client
        _assert_error_body(await client.get("/nowhere"), 404, "NotFound")
        not_allowed = await client.get("/chat")
        _assert_error_body(not_allowed, 405, "MethodNotAllowed")
        assert "POST" in not_allowed.headers["Allow"]
        _assert_error_body(await client.post("/chat", content=b"{"), 400, "BadRequest")
        too_large = await client.post("/chat", content=b" " * (20 * 1024))
        _assert_error_body(too_large, 413, "PayloadTooLarge")
        huge = await client.post("/image", json={"memory_gb": 100, "min_memory_gb": 50})
        _assert_error_body(huge, 413, "InsufficientMemory")
        holder = await _hold_the_card(served)
        timed_out = await client.post("/chat", json={"timeout": 0})
        _assert_error_body(timed_out, 503, "AllocationTimeout")
        assert int(timed_out.headers["Retry-After"]) >= 1
        holder.release()
        await served.arbiter.aclose()
        _assert_error_body(await client.post("/chat", json={}), 503, "ShuttingDown")


@pytest.mark.anyio
async def test_an_internal_error_is_a_json_500_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with _served() as served:
        monkeypatch.setattr(starlette_app, "SECONDS_PER_TOKEN", None)  # a bug in the app
        transport = httpx.ASGITransport(served.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.post("/chat", json={"max_tokens": 1})
        _assert_error_body(response, 500, "InternalError")


@pytest.mark.anyio
async def test_too_many_waiting_requests_are_turned_away_at_once_with_retry_after() -> None:
    async with _served(max_waiting=2) as served:
        holder = await _hold_the_card(served)
        replies: list[httpx.Response] = []

        async def patient_chat() -> None:
            replies.append(await served.client.post("/chat", json={"max_tokens": 1}))

        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(patient_chat)
            await settle()
            assert served.arbiter.state().waiting == 2
            with anyio.fail_after(2):  # not after its 10 s timeout
                shed = await served.client.post("/chat", json={"max_tokens": 1})
            _assert_error_body(shed, 503, "Overloaded")
            assert int(shed.headers["Retry-After"]) >= 1
            assert served.arbiter.state().waiting == 2  # the shed one never queued
            holder.release()
        assert [r.status_code for r in replies] == [200, 200]


@pytest.mark.anyio
async def test_a_request_that_would_outwait_its_timeout_is_turned_away_at_once() -> None:
    async with _served() as served:
        holder = await _hold_the_card(served)
        replies: list[httpx.Response] = []

        async def long_chat() -> None:  # ~2 s of work each, once the card is free
            replies.append(await served.client.post("/chat", json={"max_tokens": 1000}))

        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(long_chat)
            await settle()
            with anyio.fail_after(0.9):  # at once, not after its 1 s timeout
                shed = await served.client.post("/chat", json={"timeout": 1})
            _assert_error_body(shed, 503, "Overloaded")
            assert int(shed.headers["Retry-After"]) == 4  # 2 x 2.0 s of queued work
            assert "expected wait" in shed.json()["detail"]
            # A patient request is still accepted.
            tg.start_soon(long_chat)
            await settle()
            assert served.arbiter.state().waiting == 3
            tg.cancel_scope.cancel()
        holder.release()


@pytest.mark.anyio
@pytest.mark.virtual_time  # the running chat takes 2 s of the clock
async def test_shutdown_answers_queued_requests_503_at_once_and_lets_running_ones_finish() -> None:
    async with _served() as served:
        replies: dict[str, httpx.Response] = {}

        queued_answered = anyio.Event()

        async def post(name: str, body: dict[str, Any]) -> None:
            replies[name] = await served.client.post("/chat", json=body)
            if name == "queued":
                queued_answered.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(post, "running", {"memory_gb": 20, "max_tokens": 1000})  # 2 s
            await settle()
            tg.start_soon(post, "queued", {"memory_gb": 8, "timeout": 30})
            await settle()
            assert served.arbiter.state().waiting == 1
            served.stop.set()  # the server ends the lifespan
            with anyio.fail_after(1):
                await queued_answered.wait()
            assert "running" not in replies  # answered while the running one still runs
        _assert_error_body(replies["queued"], 503, "ShuttingDown")
        assert replies["running"].status_code == 200


@pytest.mark.anyio
async def test_sigterm_answers_queued_requests_503_and_reaches_the_servers_handler() -> None:
    seen: list[int] = []

    def server_handler(signum: int, frame: object) -> None:  # as uvicorn's handle_exit
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, server_handler)
    try:
        async with _served() as served:
            holder = await _hold_the_card(served)
            replies: list[httpx.Response] = []

            answered = anyio.Event()

            async def queued_chat() -> None:
                replies.append(await served.client.post("/chat", json={"timeout": 30}))
                answered.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(queued_chat)
                await settle()
                assert served.arbiter.state().waiting == 1
                signal.raise_signal(signal.SIGTERM)
                with anyio.fail_after(1):
                    await answered.wait()
            assert seen == [signal.SIGTERM]  # the server still learns of it, and drains
            _assert_error_body(replies[0], 503, "ShuttingDown")
            assert holder.memory == 24 * GiB and not holder.released  # running work stays
            holder.release()
        assert signal.getsignal(signal.SIGTERM) is server_handler  # put back as found
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_example_says_what_to_install() -> None:
    doc = starlette_app.__doc__ or ""
    assert "pip install" in doc
    for package in ("starlette", "uvicorn", "hypercorn"):
        assert package in doc


def test_the_trio_program_runs_and_prints_its_summary() -> None:
    pytest.importorskip("trio")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "trio_app.py"), "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    chats = next(line for line in lines if line.startswith("chats: "))
    assert int(chats.split()[1]) > 0
    assert any(line.startswith("renders: ") for line in lines)
    assert any("quality reductions" in line and "preemptions" in line for line in lines)
