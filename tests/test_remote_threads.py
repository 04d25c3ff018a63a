"""One `RemoteArbiter` used from several threads: a worker thread's own event loop
(the other backend) requests through it, has its body preempted by the owning loop,
and releases; a thread with no loop releases too."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from remote_helpers import LINUX_ONLY, daemon

from arbiter import GiB, Preempted, RemoteArbiter

pytestmark = [pytest.mark.anyio, LINUX_ONLY]


@pytest.fixture(scope="module")
def sock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("threads") / "gpu.sock"
    with daemon(path, vram_gb=10):
        yield path


async def test_a_loop_in_another_thread_shares_the_session(sock: Path, anyio_backend: str) -> None:
    other_backend = "trio" if anyio_backend == "asyncio" else "asyncio"
    started = threading.Event()
    result: dict[str, Any] = {}
    async with RemoteArbiter(sock) as remote:

        async def in_worker_loop() -> None:
            try:
                async with remote.allocate("image_generation", "background", memory=8 * GiB):
                    started.set()
                    await anyio.sleep(30)
            except Preempted:
                result["outcome"] = "preempted"
            alloc = await remote.request_allocation("llm_inference", "normal", GiB, timeout=10)
            result["second"] = alloc.memory
            with alloc.busy():
                result["quality"] = [q async for q in _first(alloc.quality_changes())]
            alloc.release()

        def worker() -> None:
            try:
                anyio.run(in_worker_loop, backend=other_backend)
            except BaseException as exc:
                result["error"] = repr(exc)
                started.set()

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        assert await anyio.to_thread.run_sync(started.wait, 20)
        assert "error" not in result, result
        with anyio.fail_after(20):
            urgent = await remote.request_allocation("llm_inference", "user_facing", 6 * GiB)
        await anyio.to_thread.run_sync(thread.join, 20)
        assert result == {"outcome": "preempted", "second": GiB, "quality": [1.0]}, result
        # A thread without an event loop releases too.
        await anyio.to_thread.run_sync(urgent.release)
        assert urgent.released
        await remote.refresh()
        assert remote.state().vram_used == 0


async def _first(changes: Any) -> Any:
    async for quality in changes:
        yield quality
        return


async def test_a_cancelled_request_from_another_thread_is_withdrawn(
    sock: Path, anyio_backend: str
) -> None:
    other_backend = "trio" if anyio_backend == "asyncio" else "asyncio"
    result: dict[str, Any] = {}
    async with RemoteArbiter(sock) as remote:
        holder = await remote.request_allocation("llm_inference", "high", 10 * GiB)

        async def in_worker_loop() -> None:
            with anyio.move_on_after(0.3) as scope:
                await remote.request_allocation("llm_inference", "normal", 4 * GiB, timeout=None)
            result["cancelled"] = scope.cancelled_caught

        await anyio.to_thread.run_sync(lambda: anyio.run(in_worker_loop, backend=other_backend))
        assert result == {"cancelled": True}
        await remote.refresh()
        assert remote.state().waiting == 0
        holder.release()
        await remote.refresh()
        assert (remote.state().vram_used, remote.state().waiting) == (0, 0)
