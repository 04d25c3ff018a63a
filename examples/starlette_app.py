"""A Starlette app that serves LLM chats and image generations from one shared GPU.

The app's lifespan owns one `Arbiter` (``async with``): its poller runs while the app
serves, and every request asks it for memory with ``arbiter.allocate(...)``. Chats are
``USER_FACING``; images are ``NORMAL`` and elastic, so they run at a lower quality (fewer
denoising steps here) when the card is busy, and give way to chats if they must. The
models are simulated with ``anyio.sleep``: no GPU is needed to try it.

Install starlette and a server, uvicorn (asyncio) or hypercorn (asyncio or trio); none of
them is a dependency of gpu-arbiter (in a checkout, ``pip install -e .`` stands for
``gpu-arbiter``). Run from the repository root::

    pip install gpu-arbiter starlette uvicorn
    uvicorn examples.starlette_app:app

    pip install gpu-arbiter starlette hypercorn trio
    python examples/starlette_app.py --trio      # hypercorn on trio, port 8000

    curl -X POST localhost:8000/chat -d '{"prompt": "hello", "memory_gb": 4}'
    curl -X POST localhost:8000/image -d '{"memory_gb": 10, "min_memory_gb": 6}'
    curl localhost:8000/state

``ARBITER_VRAM_GB`` sets the budget in GiB (default 24). Run one worker per GPU: each
worker process would hold its own arbiter.

What a copy of this app should keep:

- **Every field is checked, with bounds, before memory is requested** (`CHAT_FIELDS`,
  `IMAGE_FIELDS`): a wrong type, a number out of bounds, ``Infinity``/``NaN``, a huge
  number, deeply nested JSON, an unknown field or a body over 16 KiB is a 400 (413 for
  the size), never a 500 and never a request that holds memory first.
- **One error body for every 4xx and 5xx**: ``{"error": "<Name>", "detail": "<text>"}``.
  `InsufficientMemory` (larger than the whole budget) is 413; `AllocationTimeout`,
  `Preempted` and ``Overloaded`` are 503 with ``Retry-After``; `ShuttingDown` is 503.
- **A client that disconnects withdraws its queued request and cancels its running
  work** (`WatchClient`): its memory goes to clients that are still there.
- **Load is shed early**: a request is answered 503 ``Overloaded`` at once, with a
  ``Retry-After`` from the expected wait, when ``max_waiting`` requests wait already
  or the expected wait exceeds its own timeout, instead of holding it for its timeout.
- **Shutdown answers queued requests 503 at once and lets running ones finish**: on
  SIGTERM or SIGINT (`StopSignals`) and in the lifespan's shutdown the arbiter is
  closed, so every waiting request gets `ShuttingDown`; the server then drains the
  running ones (a chat lasts at most ~2 s, an image ~1 s) and exits. Servers drain
  requests *before* the lifespan's shutdown, hence the signal hook. The hook sees the
  signals of the serving process: uvicorn's, and hypercorn's when it is run by `main`
  below. The ``hypercorn`` command instead signals its worker process through an event
  the app cannot see: there queued requests are served or, past hypercorn's graceful
  timeout (3 s), cut off without an answer; run `main` for the 503s.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from http import HTTPStatus
from types import FrameType
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from arbiter import (
    AllocationTimeout,
    Arbiter,
    ArbiterConfig,
    ArbiterError,
    GiB,
    InsufficientMemory,
    InsufficientQuality,
    MemoryProbe,
    Preempted,
    Priority,
    WorkloadType,
)

VRAM_GB_ENV = "ARBITER_VRAM_GB"
# The simulated model: a chat costs this much per token, an image this much per step.
SECONDS_PER_TOKEN = 0.002
SECONDS_PER_STEP = 0.01

# Bounds on what a client may ask for.
MAX_BODY_BYTES = 16 * 1024
MAX_PROMPT_CHARS = 8000
MAX_MEMORY_GB = 1024.0
MAX_TOKENS = 1024  # a chat holds its memory ~2 s at most
MAX_STEPS = 100  # an image ~1 s
MAX_TIMEOUT_S = 60.0
# More waiting requests than this, and new ones are turned away at once.
MAX_WAITING = 64
# How often the lifespan checks whether a stop signal arrived (as uvicorn's own loop).
STOP_POLL_S = 0.1


# -- errors: one body shape ---------------------------------------------------------


class ApiError(Exception):
    """An error answered as ``{"error": name, "detail": detail}`` with ``status``."""

    def __init__(
        self, status: int, name: str, detail: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.name = name
        self.detail = detail
        self.retry_after = retry_after


def error_response(
    status: int, name: str, detail: str, *, retry_after: float | None = None
) -> JSONResponse:
    """The one JSON body every 4xx and 5xx of this app has."""
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return JSONResponse({"error": name, "detail": detail}, status_code=status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.name, exc.detail, retry_after=exc.retry_after)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    name = HTTPStatus(exc.status_code).phrase.title().replace(" ", "").replace("-", "")
    response = error_response(exc.status_code, name, str(exc.detail))
    response.headers.update(exc.headers or {})  # e.g. Allow on a 405
    return response


async def _arbiter_error(request: Request, exc: Exception) -> Response:
    status = 413 if isinstance(exc, InsufficientMemory) else 503
    return error_response(status, type(exc).__name__, str(exc))


async def _internal_error(request: Request, exc: Exception) -> Response:
    # The server logs the traceback; the client gets the same shape, and no traceback.
    return error_response(500, "InternalError", "the server failed; this is a bug")


# -- request bodies: checked with bounds before memory is requested -----------------


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _reject_constant(name: str) -> Any:
    raise ApiError(400, "BadRequest", f"{name} is not a number this API accepts")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise ApiError(400, "BadRequest", f"{_shown(text)} is too large a number")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 20:  # past any bound below; int() would also refuse 4300 digits
        raise ApiError(400, "BadRequest", f"{_shown(text)} is too large a number")
    return int(text)


async def read_body(request: Request, fields: Mapping[str, object]) -> dict[str, Any]:
    """The body as a JSON object with only ``fields`` in it (an empty body is ``{}``)."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(
            raw,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except RecursionError:
        raise ApiError(400, "BadRequest", "the body is nested too deeply") from None
    except ValueError as exc:  # a JSONDecodeError, or bytes that are not UTF-8
        raise ApiError(400, "BadRequest", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the body must be a JSON object")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ApiError(
            400,
            "BadRequest",
            f"unknown field {_shown(unknown[0])}; expected some of {', '.join(fields)}",
        )
    return body


def _integer(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(
            400, "BadRequest", f"{key} must be an integer in [{low}, {high}], got {_shown(value)}"
        )
    return value


def _number(
    body: dict[str, Any], key: str, default: float, low: float, high: float, *, open_low: bool
) -> float:
    value = body.get(key, default)
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if ok:
        ok = (low < value if open_low else low <= value) and value <= high
    if not ok:
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise ApiError(
            400, "BadRequest", f"{key} must be a number in {bounds}, got {_shown(value)}"
        )
    return float(value)


def _text(body: dict[str, Any], key: str, limit: int) -> str:
    value = body.get(key, "")
    if not isinstance(value, str) or len(value) > limit:
        raise ApiError(400, "BadRequest", f"{key} must be a string of at most {limit} characters")
    return value


def _bytes_of(gib: float) -> int:
    return max(1, int(gib * GiB))  # memory is an int of bytes


def _seconds(body: dict[str, Any], default: float) -> float:
    return _number(body, "timeout", default, 0.0, MAX_TIMEOUT_S, open_low=False)


CHAT_FIELDS = {
    "prompt": f"a string, at most {MAX_PROMPT_CHARS} characters",
    "memory_gb": f"GiB to hold, in (0, {MAX_MEMORY_GB:g}] (4)",
    "max_tokens": f"tokens to generate, in [1, {MAX_TOKENS}] (64)",
    "timeout": f"seconds to wait for memory, in [0, {MAX_TIMEOUT_S:g}] (10)",
}
IMAGE_FIELDS = {
    "prompt": f"a string, at most {MAX_PROMPT_CHARS} characters",
    "memory_gb": f"GiB for full quality, in (0, {MAX_MEMORY_GB:g}] (10)",
    "min_memory_gb": "the least GiB it runs with, in (0, memory_gb] (half)",
    "steps": f"denoising steps at full quality, in [1, {MAX_STEPS}] (30)",
    "timeout": f"seconds to wait for memory, in [0, {MAX_TIMEOUT_S:g}] (30)",
}


# -- load shedding ------------------------------------------------------------------


class Backlog:
    """Seconds of work waiting and requests running, per route: the expected wait.

    The estimate is the work queued on a route divided among the requests of that route
    running now; rough, but it needs no history and turns a request away at once when
    it could not be served within its own timeout.
    """

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._queued: dict[str, float] = {}
        self._running: dict[str, int] = {}

    def expected_wait(self, route: str) -> float:
        """Seconds a new request on ``route`` may expect to wait."""
        return self._queued.get(route, 0.0) / max(1, self._running.get(route, 0))

    def admit(self, arbiter: Arbiter, route: str, timeout: float) -> None:
        """Raise a 503 ``Overloaded`` now if the request would wait too long."""
        expected = self.expected_wait(route)
        waiting = arbiter.state().waiting
        if waiting >= self.max_waiting:
            detail = f"{waiting} requests are waiting for the GPU already"
        elif expected > timeout:
            detail = f"the expected wait ({expected:.1f} s) exceeds the timeout ({timeout:g} s)"
        else:
            return
        raise ApiError(503, "Overloaded", detail, retry_after=expected)

    @contextmanager
    def track(self, route: str, seconds: float) -> Iterator[Callable[[], None]]:
        """Count a request as queued work; the function it gives marks it running."""
        running = False

        def started() -> None:
            nonlocal running
            running = True
            self._queued[route] -= seconds
            self._running[route] = self._running.get(route, 0) + 1

        self._queued[route] = self._queued.get(route, 0.0) + seconds
        try:
            yield started
        finally:
            if running:
                self._running[route] -= 1
            else:
                self._queued[route] -= seconds


@contextmanager
def _arbiter_errors(backlog: Backlog, route: str) -> Iterator[None]:
    """Answer the arbiter's refusals, with a ``Retry-After`` where retrying may help."""
    try:
        yield
    except (AllocationTimeout, Preempted, InsufficientQuality) as exc:
        wait = backlog.expected_wait(route)
        raise ApiError(503, type(exc).__name__, str(exc), retry_after=wait) from None


# -- endpoints --------------------------------------------------------------------


async def chat(request: Request) -> JSONResponse:
    """Generate a reply: ``{"prompt", "memory_gb": 4, "max_tokens": 64, "timeout": 10}``."""
    body = await read_body(request, CHAT_FIELDS)
    prompt = _text(body, "prompt", MAX_PROMPT_CHARS)
    memory_gb = _number(body, "memory_gb", 4.0, 0.0, MAX_MEMORY_GB, open_low=True)
    max_tokens = _integer(body, "max_tokens", 64, 1, MAX_TOKENS)
    timeout = _seconds(body, 10.0)
    arbiter: Arbiter = request.app.state.arbiter
    backlog: Backlog = request.app.state.backlog
    cost = max_tokens * SECONDS_PER_TOKEN
    backlog.admit(arbiter, "chat", timeout)
    with backlog.track("chat", cost) as started, _arbiter_errors(backlog, "chat"):
        async with arbiter.allocate(
            WorkloadType.LLM_INFERENCE,
            Priority.USER_FACING,
            memory=_bytes_of(memory_gb),
            timeout=timeout,
            label="chat",
        ) as alloc:
            started()
            waited = anyio.current_time() - alloc.created_at  # created at the request
            quality = alloc.quality
            await anyio.sleep(cost)
    reply = f"you said {prompt!r}"
    return JSONResponse({"reply": reply, "quality": quality, "waited_s": waited})


async def image(request: Request) -> JSONResponse:
    """Generate an image with whatever fits between ``min_memory_gb`` (default half) and
    ``memory_gb`` (10): ``{"memory_gb", "min_memory_gb", "steps": 30, "timeout": 30}``."""
    body = await read_body(request, IMAGE_FIELDS)
    _text(body, "prompt", MAX_PROMPT_CHARS)
    memory_gb = _number(body, "memory_gb", 10.0, 0.0, MAX_MEMORY_GB, open_low=True)
    min_memory_gb = _number(body, "min_memory_gb", memory_gb / 2, 0.0, memory_gb, open_low=True)
    full_steps = _integer(body, "steps", 30, 1, MAX_STEPS)
    timeout = _seconds(body, 30.0)
    arbiter: Arbiter = request.app.state.arbiter
    backlog: Backlog = request.app.state.backlog
    backlog.admit(arbiter, "image", timeout)
    with (
        backlog.track("image", full_steps * SECONDS_PER_STEP) as started,
        _arbiter_errors(backlog, "image"),
    ):
        async with arbiter.allocate(
            WorkloadType.IMAGE_GENERATION,
            Priority.NORMAL,
            memory=_bytes_of(memory_gb),
            min_memory=min(_bytes_of(min_memory_gb), _bytes_of(memory_gb)),
            timeout=timeout,
            label="image",
        ) as alloc:
            started()
            waited = anyio.current_time() - alloc.created_at  # created at the request
            quality, held = alloc.quality, alloc.memory
            # Lower quality, fewer denoising steps: the share we got decides the cost.
            steps = max(1, round(full_steps * quality))
            await anyio.sleep(steps * SECONDS_PER_STEP)
    return JSONResponse(
        {"quality": quality, "memory_gb": held / GiB, "steps": steps, "waited_s": waited}
    )


async def state(request: Request) -> JSONResponse:
    """The arbiter's `ArbiterState` snapshot; memory in bytes."""
    arbiter: Arbiter = request.app.state.arbiter
    return JSONResponse(dataclasses.asdict(arbiter.state()))


# -- a client that leaves takes its request with it ----------------------------------


class WatchClient:
    """ASGI middleware: reads the body (at most ``max_body`` bytes), then runs the app
    beside a task that listens for ``http.disconnect`` and cancels the app when the
    client goes, so a queued request leaves the arbiter's queue and running work stops.
    """

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before it finished asking
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                detail = f"the body is larger than {self.max_body} bytes"
                await error_response(413, "PayloadTooLarge", detail)(scope, receive, send)
                return

        client_left = anyio.Event()
        answered = False
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            await client_left.wait()
            return {"type": "http.disconnect"}

        async def tracked_send(message: Message) -> None:
            nonlocal answered
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered = True

        async def watch(cancel: anyio.CancelScope) -> None:
            # After the body, the next message is a disconnect: the client left, or
            # (once the response is complete) the exchange is over.
            while (await receive())["type"] != "http.disconnect":
                pass
            client_left.set()
            if not answered:
                cancel.cancel()

        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, tg.cancel_scope)
            try:
                await self.app(scope, replay, tracked_send)
            except Exception as exc:  # raised below as itself, not in an exception group
                failure = exc
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure


# -- shutdown --------------------------------------------------------------------------


class StopSignals:
    """Notes SIGTERM and SIGINT, then hands each on to the handler that was there (the
    server's). Only a Python handler is chained: a default or ignored signal is left as
    it is. Signal handlers can only be set from the main thread; elsewhere this is a
    no-op.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received = False
        self._previous: dict[int, Callable[[int, FrameType | None], Any]] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = True  # only a flag: a signal handler must not touch the loop
        self._previous[signum](signum, frame)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Chain this handler in front of the present ones while the block runs."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        for signum in self.SIGNALS:
            previous = signal.getsignal(signum)
            if callable(previous):
                self._previous[signum] = previous
                signal.signal(signum, self._on_signal)
        try:
            yield
        finally:
            for signum, previous in self._previous.items():
                if signal.getsignal(signum) == self._on_signal:
                    signal.signal(signum, previous)


async def _close_when_stopped(arbiter: Arbiter, stop: StopSignals) -> None:
    # Polled, not awaited on an Event: a signal handler may run in the middle of the
    # event loop's own code, where setting an Event is not safe (uvicorn polls too).
    while not stop.received:  # noqa: ASYNC110
        await anyio.sleep(STOP_POLL_S)
    await arbiter.aclose()  # every waiting request gets ShuttingDown: 503 at once


def create_app(
    config: ArbiterConfig | None = None,
    *,
    probe: MemoryProbe | None = None,
    max_waiting: int = MAX_WAITING,
) -> Starlette:
    """Build the app. ``config`` defaults to ``ARBITER_VRAM_GB`` GiB (24); ``probe``
    defaults to NVML when it works (tests pass an ``arbiter.testing.FakeGpu``);
    ``max_waiting`` waiting requests make it turn new ones away."""
    if config is None:
        config = ArbiterConfig.for_vram_gb(float(os.environ.get(VRAM_GB_ENV, "24")))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        stop = StopSignals()
        async with Arbiter(config, probe=probe) as arbiter, anyio.create_task_group() as tg:
            app.state.arbiter = arbiter
            app.state.backlog = Backlog(max_waiting)
            with stop.installed():
                tg.start_soon(_close_when_stopped, arbiter, stop)
                try:
                    yield
                finally:
                    # First of all: queued requests are answered 503 now; running ones
                    # keep their memory until they finish.
                    await arbiter.aclose()
                    tg.cancel_scope.cancel()

    handlers: dict[Any, Callable[[Request, Exception], Any]] = {
        ApiError: _api_error,
        HTTPException: _http_error,
        ArbiterError: _arbiter_error,
        Exception: _internal_error,
    }
    return Starlette(
        routes=[
            Route("/chat", chat, methods=["POST"]),
            Route("/image", image, methods=["POST"]),
            Route("/state", state, methods=["GET"]),
        ],
        middleware=[Middleware(WatchClient)],
        lifespan=lifespan,
        exception_handlers=handlers,
    )


app = create_app()


def main(argv: list[str] | None = None) -> None:
    """Serve the app with hypercorn on asyncio or trio; SIGTERM or Ctrl+C stops it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trio", action="store_true", help="run on trio (default: asyncio)")
    parser.add_argument("--bind", default="127.0.0.1:8000", help="host:port (%(default)s)")
    args = parser.parse_args(argv)
    from hypercorn.config import Config

    config = Config()
    config.bind = [args.bind]

    server = importlib.import_module("hypercorn.trio" if args.trio else "hypercorn.asyncio")

    async def serve() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

            async def stopped() -> None:
                async for _ in signals:
                    return

            await server.serve(app, config, shutdown_trigger=stopped)

    anyio.run(serve, backend="trio" if args.trio else "asyncio")


if __name__ == "__main__":
    main()
