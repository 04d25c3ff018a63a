"""A Starlette app that serves LLM chats and image generations from one shared GPU.

The app's lifespan owns one `Arbiter` (``async with``): its poller runs while the app
serves, and every request asks it for memory with ``arbiter.allocate(...)``. Chats are
``USER_FACING``; images are ``NORMAL`` and elastic, so they run at a lower quality (fewer
denoising steps here) when the card is busy, and give way to chats if they must.

Run it from the repository root (uvicorn is not a dependency of gpu-arbiter:
``pip install uvicorn`` first)::

    uvicorn examples.starlette_app:app
    curl -X POST localhost:8000/chat -d '{"prompt": "hello", "memory_gb": 4}'
    curl -X POST localhost:8000/image -d '{"memory_gb": 10, "min_memory_gb": 6}'
    curl localhost:8000/state

``ARBITER_VRAM_GB`` sets the budget in GiB (default 24). Errors map to statuses:
`AllocationTimeout` and `Preempted` are 503 with ``Retry-After``, `ShuttingDown` is 503,
`InsufficientMemory` (a request larger than the whole budget) is 413, a bad body is 400.
Run one worker per GPU: each worker process would hold its own arbiter.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from arbiter import (
    AllocationTimeout,
    Arbiter,
    ArbiterConfig,
    GiB,
    InsufficientMemory,
    MemoryProbe,
    Preempted,
    Priority,
    ShuttingDown,
    WorkloadType,
)

VRAM_GB_ENV = "ARBITER_VRAM_GB"
# What a client is told to wait before retrying when the card is full.
RETRY_AFTER_S = 2
# The simulated model: a chat costs this much per token, an image this much per step.
SECONDS_PER_TOKEN = 0.002
SECONDS_PER_STEP = 0.01


def create_app(
    config: ArbiterConfig | None = None, *, probe: MemoryProbe | None = None
) -> Starlette:
    """Build the app. ``config`` defaults to ``ARBITER_VRAM_GB`` GiB (24); ``probe``
    defaults to NVML when it works (tests pass an ``arbiter.testing.FakeGpu``)."""
    if config is None:
        config = ArbiterConfig.for_vram_gb(float(os.environ.get(VRAM_GB_ENV, "24")))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with Arbiter(config, probe=probe) as arbiter:
            app.state.arbiter = arbiter
            yield

    return Starlette(
        routes=[
            Route("/chat", chat, methods=["POST"]),
            Route("/image", image, methods=["POST"]),
            Route("/state", state, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={
            AllocationTimeout: _error(503, retry_after=RETRY_AFTER_S),
            Preempted: _error(503, retry_after=RETRY_AFTER_S),
            ShuttingDown: _error(503),
            InsufficientMemory: _error(413),
            ValueError: _error(400),  # a malformed body, or a size the arbiter refuses
        },
    )


async def chat(request: Request) -> JSONResponse:
    """Generate a reply: ``{"prompt", "memory_gb": 4, "max_tokens": 64, "timeout": 10}``."""
    body = await _body(request)
    arbiter: Arbiter = request.app.state.arbiter
    async with arbiter.allocate(
        WorkloadType.LLM_INFERENCE,
        Priority.USER_FACING,
        memory=_gib(body, "memory_gb", 4),
        timeout=_number(body, "timeout", 10.0),
        label="chat",
    ) as alloc:
        waited = anyio.current_time() - alloc.created_at  # created at the request
        quality = alloc.quality
        await anyio.sleep(_number(body, "max_tokens", 64) * SECONDS_PER_TOKEN)
    reply = f"you said {body.get('prompt', '')!r}"
    return JSONResponse({"reply": reply, "quality": quality, "waited_s": waited})


async def image(request: Request) -> JSONResponse:
    """Generate an image with whatever fits between ``min_memory_gb`` (default half) and
    ``memory_gb`` (10): ``{"memory_gb", "min_memory_gb", "steps": 30, "timeout": 30}``."""
    body = await _body(request)
    arbiter: Arbiter = request.app.state.arbiter
    memory = _gib(body, "memory_gb", 10)
    async with arbiter.allocate(
        WorkloadType.IMAGE_GENERATION,
        Priority.NORMAL,
        memory=memory,
        min_memory=_gib(body, "min_memory_gb", memory / 2 / GiB),
        timeout=_number(body, "timeout", 30.0),
        label="image",
    ) as alloc:
        waited = anyio.current_time() - alloc.created_at  # created at the request
        quality, held = alloc.quality, alloc.memory
        # Lower quality, fewer denoising steps: the share we got decides the cost.
        steps = max(1, round(_number(body, "steps", 30) * quality))
        await anyio.sleep(steps * SECONDS_PER_STEP)
    return JSONResponse(
        {"quality": quality, "memory_gb": held / GiB, "steps": steps, "waited_s": waited}
    )


async def state(request: Request) -> JSONResponse:
    """The arbiter's `ArbiterState` snapshot; memory in bytes."""
    arbiter: Arbiter = request.app.state.arbiter
    return JSONResponse(dataclasses.asdict(arbiter.state()))


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    body = json.loads(raw) if raw else {}  # a JSONDecodeError is a ValueError: 400
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HTTPException(400, f"{key} must be a number, got {value!r}")
    return value


def _gib(body: dict[str, Any], key: str, default: float) -> int:
    return int(_number(body, key, default) * GiB)


def _error(
    status: int, *, retry_after: int | None = None
) -> Callable[[Request, Exception], Awaitable[Response]]:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None

    async def handler(request: Request, exc: Exception) -> Response:
        return JSONResponse(
            {"error": type(exc).__name__, "detail": str(exc)}, status_code=status, headers=headers
        )

    return handler


app = create_app()
