"""The programs in examples/ work: the Starlette app over ASGI, the trio program as a process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType

import anyio
import httpx
import pytest

from arbiter import ArbiterConfig, GiB
from arbiter.testing import FakeGpu

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
async def test_concurrent_chats_and_images_all_complete_and_the_ledger_ends_at_zero() -> None:
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

    assert [r.status_code for r in responses] == [200] * 10
    images = [r.json() for r in responses if "memory_gb" in r.json()]
    assert len(images) == 4
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
        await anyio.wait_all_tasks_blocked()  # the poller has made its first read
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
            await anyio.wait_all_tasks_blocked()
            assert (await client.get("/state")).json()["waiting"] == 1
            fake.external_used = 0
    assert replies[0].status_code == 200
    assert replies[0].json()["quality"] == 1.0


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
