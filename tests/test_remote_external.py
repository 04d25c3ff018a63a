"""A daemon served in this process (on asyncio and on trio) with a `FakeGpu`: the GPU
memory of its clients' processes is theirs, not external use."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from remote_helpers import LINUX_ONLY

from arbiter import Arbiter, ArbiterConfig, GiB, RemoteArbiter
from arbiter.remote._daemon import DaemonConfig, claim_socket, serve
from arbiter.testing import FakeGpu

pytestmark = [pytest.mark.anyio, LINUX_ONLY]

NOT_A_CLIENT = 2**22 + 17  # a pid that is no client of the daemon


async def _until(condition: object, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        # The poller's readings arrive on its own schedule: polling them is the point.
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_client_processes_are_not_external_use(tmp_path: Path) -> None:
    sock = tmp_path / "x.sock"
    fake = FakeGpu(total=24 * GiB)
    config = ArbiterConfig.for_vram_gb(20, poll_interval=0.01)
    claim = claim_socket(sock, ttl=5)
    try:
        async with Arbiter(config, probe=fake) as arbiter, anyio.create_task_group() as tg:
            await tg.start(serve, claim, arbiter, DaemonConfig(socket=sock, ttl=5), fake)
            fake.set_process_memory(os.getpid(), 4 * GiB)  # what this client uses
            fake.set_process_memory(NOT_A_CLIENT, 3 * GiB)
            async with RemoteArbiter(sock) as remote:
                assert fake.own_pids == {os.getpid()}
                await _until(lambda: arbiter.state().external_used == 3 * GiB)
                alloc = await remote.request_allocation("llm_inference", "normal", 4 * GiB)
                await remote.refresh()
                assert remote.state().external_used == 3 * GiB
                assert remote.state().vram_available == 13 * GiB
                alloc.release()
            # The client left: its process's memory is someone else's now.
            await _until(lambda: arbiter.state().external_used == 7 * GiB)
            assert fake.own_pids == frozenset()
            tg.cancel_scope.cancel()
    finally:
        claim.release()
    assert not sock.exists()
