"""The VRAM tier: charged to a real Arbiter as one BACKGROUND elastic allocation.

Without PyTorch or a GPU the tier places fragments in the host-memory stand-in, which
is charged exactly as CUDA tensors would be; these tests check the charge and how the
tier gives way. The last test runs the real CUDA store where torch and a GPU exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from cache_helpers import make_config, make_fragments

from arbiter import Arbiter, ArbiterConfig, MiB, Priority, WorkloadType
from arbiter.cache import CacheTier, FragmentCache
from arbiter.testing import FakeGpu

pytestmark = pytest.mark.anyio

LLM = WorkloadType.LLM_INFERENCE


def model_folder(tmp_path: Path, fragments: dict[str, bytes]) -> Path:
    folder = tmp_path / "model"
    for fragment_id, data in fragments.items():
        (folder / fragment_id).parent.mkdir(parents=True, exist_ok=True)
        (folder / fragment_id).write_bytes(data)
    return folder


def vram_cache(
    tmp_path: Path, fragments: dict[str, bytes], arbiter: Arbiter, **overrides: Any
) -> FragmentCache:
    source = model_folder(tmp_path, fragments)
    return FragmentCache(make_config(tmp_path, fragments, source_dir=source, **overrides), arbiter)


def arbiter_of(budget: int, **overrides: Any) -> Arbiter:
    return Arbiter(ArbiterConfig(vram_budget=budget, **overrides), probe=None)


async def test_vram_get_places_the_fragment_and_charges_its_bytes(tmp_path) -> None:
    fragments = make_fragments(2, 2 * MiB)
    arbiter = arbiter_of(16 * MiB)
    async with vram_cache(tmp_path, fragments, arbiter) as cache:
        data = await cache.get("frag/00", CacheTier.VRAM)
        assert bytes(data) == fragments["frag/00"]
        assert arbiter.state().vram_used == 2 * MiB
        assert bytes(cache.device_fragment("frag/00")) == fragments["frag/00"]
        await cache.get("frag/01", CacheTier.VRAM)
        assert arbiter.state().vram_used == 4 * MiB  # one allocation, grown
        assert arbiter.stats().total_allocations == 1
        assert bytes(await cache.get("frag/00", CacheTier.VRAM)) == fragments["frag/00"]
        stats = cache.stats()
        assert stats.hits[CacheTier.VRAM] == 1
        assert stats.bytes_held[CacheTier.VRAM] == 4 * MiB
        # A plain get never touches VRAM.
        await cache.get("frag/01")
        assert cache.stats().hits[CacheTier.VRAM] == 1
    assert arbiter.state().vram_used == 0  # closing the cache released the charge


async def test_the_charge_is_one_background_elastic_allocation(tmp_path) -> None:
    fragments = make_fragments(1, 1 * MiB)
    arbiter = arbiter_of(16 * MiB)
    async with vram_cache(tmp_path, fragments, arbiter) as cache:
        await cache.get("frag/00", CacheTier.VRAM)
        (holding,) = list(arbiter._ledger.holdings())
        assert holding.priority is Priority.BACKGROUND
        assert holding.preemptible and holding.elastic
        assert holding.ticket.label == "fragment-cache"  # type: ignore[attr-defined]


async def test_vram_stand_in_shrinks_when_a_higher_priority_needs_the_memory(tmp_path) -> None:
    fragments = make_fragments(6, 2 * MiB)
    arbiter = arbiter_of(16 * MiB, reclaim_grace=5.0)
    async with vram_cache(tmp_path, fragments, arbiter, vram_capacity=12 * MiB) as cache:
        await cache.prefetch(fragments, tier=CacheTier.VRAM)
        assert cache.stats().bytes_held[CacheTier.VRAM] == 12 * MiB
        assert arbiter.state().vram_used == 12 * MiB
        with anyio.fail_after(4):  # well inside the grace: the cache shrank, nobody waited it out
            alloc = await arbiter.request_allocation(LLM, Priority.USER_FACING, 10 * MiB)
        held = cache.stats().bytes_held[CacheTier.VRAM]
        assert held <= 6 * MiB
        assert arbiter.state().vram_used == 10 * MiB + max(held, 1)
        assert arbiter.stats().preemptions == 0
        assert arbiter.stats().quality_reductions >= 1
        # The gets still succeed: what left VRAM is served from RAM.
        for fragment_id, data in fragments.items():
            assert bytes(await cache.get(fragment_id, CacheTier.VRAM)) == data
        assert arbiter.state().vram_used <= 16 * MiB
        alloc.release()


async def test_vram_tier_is_preempted_without_grace_and_drops_everything(tmp_path) -> None:
    fragments = make_fragments(4, 2 * MiB)
    # 8 of 10 MiB: below the pressure threshold, where the policy leaves it alone.
    arbiter = arbiter_of(10 * MiB, reclaim_grace=0.0)
    async with vram_cache(tmp_path, fragments, arbiter, vram_capacity=8 * MiB) as cache:
        await cache.prefetch(fragments, tier=CacheTier.VRAM)
        assert arbiter.state().vram_used == 8 * MiB
        with anyio.fail_after(5):
            alloc = await arbiter.request_allocation(LLM, Priority.HIGH, 8 * MiB)
        assert cache.stats().bytes_held[CacheTier.VRAM] == 0
        assert cache.device_fragment("frag/00") is None
        assert arbiter.stats().preemptions == 1
        alloc.release()


async def test_a_fragment_that_cannot_be_charged_is_not_placed(tmp_path) -> None:
    fragments = make_fragments(1, 3 * MiB)
    arbiter = arbiter_of(8 * MiB)
    other = await arbiter.request_allocation(LLM, Priority.NORMAL, 6 * MiB)
    async with vram_cache(tmp_path, fragments, arbiter) as cache:
        data = await cache.get("frag/00", CacheTier.VRAM)
        assert bytes(data) == fragments["frag/00"]
        assert cache.stats().bytes_held[CacheTier.VRAM] == 0
        assert cache.stats().bytes_held[CacheTier.RAM] == 3 * MiB
        assert arbiter.state().vram_used == 6 * MiB
        assert arbiter.stats().failed_allocations == 0  # it did not even ask
        other.release()
        await cache.get("frag/00", CacheTier.VRAM)  # memory is free now
        assert cache.stats().bytes_held[CacheTier.VRAM] == 3 * MiB
        assert arbiter.state().vram_used == 3 * MiB


async def test_vram_tier_evicts_within_its_capacity(tmp_path) -> None:
    fragments = make_fragments(5, 2 * MiB)
    arbiter = arbiter_of(64 * MiB)
    async with vram_cache(tmp_path, fragments, arbiter, vram_capacity=5 * MiB) as cache:
        for fragment_id in fragments:
            await cache.get(fragment_id, CacheTier.VRAM)
            assert cache.stats().bytes_held[CacheTier.VRAM] <= 5 * MiB
            assert arbiter.state().vram_used <= 5 * MiB
        assert cache.stats().evictions >= 3
        huge = make_fragments(1, 6 * MiB, prefix="huge")
    async with vram_cache(tmp_path / "2", huge, arbiter, vram_capacity=5 * MiB) as cache:
        await cache.get("huge/00", CacheTier.VRAM)  # larger than the tier: bypasses it
        assert cache.stats().bytes_held[CacheTier.VRAM] == 0
        assert arbiter.state().vram_used == 0


async def test_vram_tier_gives_way_to_external_pressure(tmp_path) -> None:
    fragments = make_fragments(4, 2 * MiB)
    fake = FakeGpu(total=32 * MiB)
    config = ArbiterConfig(vram_budget=16 * MiB, poll_interval=0.01)
    async with Arbiter(config, probe=fake) as arbiter:
        async with vram_cache(tmp_path, fragments, arbiter) as cache:
            await cache.prefetch(fragments, tier=CacheTier.VRAM)
            assert cache.stats().bytes_held[CacheTier.VRAM] == 8 * MiB
            # Not alone on the card (a lone holder keeps its memory whatever external
            # use is: DESIGN's work-conserving rule): a 1 MiB model beside it.
            await arbiter.request_allocation("llm_inference", "normal", 1 * MiB)
            fake.external_used = 12 * MiB  # another process takes most of the GPU
            with anyio.fail_after(5):
                # The poller reads the fake on its clock: there is no event to wait on.
                while cache.stats().bytes_held[CacheTier.VRAM] > 3 * MiB:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            assert arbiter.state().vram_used <= 4 * MiB
            await cache.get("frag/00", CacheTier.VRAM)  # no room: served, not placed back
            assert arbiter.state().vram_used <= 4 * MiB


async def test_a_lone_vram_tier_keeps_its_memory_until_a_request_needs_it(tmp_path) -> None:
    """Alone on the card, the tier keeps its memory whatever external use (DESIGN,
    Quality: work-conserving); a request that external use leaves without room makes
    it shrink."""
    fragments = make_fragments(4, 2 * MiB)
    fake = FakeGpu(total=32 * MiB)
    config = ArbiterConfig(vram_budget=16 * MiB, poll_interval=0.01, reclaim_grace=5)
    async with Arbiter(config, probe=fake) as arbiter:
        async with vram_cache(tmp_path, fragments, arbiter) as cache:
            await cache.prefetch(fragments, tier=CacheTier.VRAM)
            fake.external_used = 6 * MiB
            with anyio.fail_after(5):
                while arbiter.state().external_used < 6 * MiB:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            assert cache.stats().bytes_held[CacheTier.VRAM] == 8 * MiB
            with anyio.fail_after(5):
                alloc = await arbiter.request_allocation("llm_inference", "normal", 6 * MiB)
            assert cache.stats().bytes_held[CacheTier.VRAM] <= 4 * MiB
            assert arbiter.stats().preemptions == 0
            alloc.release()


async def test_a_failed_device_copy_leaves_the_get_served_and_nothing_charged(
    tmp_path, monkeypatch
) -> None:
    from arbiter.cache._device import HostDeviceStore, TorchDeviceStore

    def out_of_memory(self: object, data: object) -> bytes:
        raise RuntimeError("CUDA out of memory")

    # Whichever store the cache opens: the torch one where torch sees a GPU.
    for store in (HostDeviceStore, TorchDeviceStore):
        monkeypatch.setattr(store, "place", out_of_memory)
    fragments = make_fragments(1, 2 * MiB)
    arbiter = arbiter_of(16 * MiB)
    async with vram_cache(tmp_path, fragments, arbiter) as cache:
        assert bytes(await cache.get("frag/00", CacheTier.VRAM)) == fragments["frag/00"]
        assert cache.stats().bytes_held[CacheTier.VRAM] == 0
        assert cache.device_fragment("frag/00") is None
        assert arbiter.state().vram_used == 0  # the charge taken for it was given back


async def test_without_an_arbiter_a_vram_get_is_a_ram_get(tmp_path) -> None:
    fragments = make_fragments(1, 1000)
    source = model_folder(tmp_path, fragments)
    async with FragmentCache(make_config(tmp_path, fragments, source_dir=source)) as cache:
        assert bytes(await cache.get("frag/00", CacheTier.VRAM)) == fragments["frag/00"]
        assert cache.device_fragment("frag/00") is None
        assert cache.stats().bytes_held[CacheTier.VRAM] == 0


async def test_real_cuda_store_when_torch_and_a_gpu_are_there(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    fragments = make_fragments(1, 4 * MiB)
    arbiter = arbiter_of(256 * MiB)
    async with vram_cache(tmp_path, fragments, arbiter) as cache:
        await cache.get("frag/00", CacheTier.VRAM)
        tensor = cache.device_fragment("frag/00")
        assert tensor.is_cuda and tensor.numel() == 4 * MiB
        assert bytes(tensor.cpu().numpy().tobytes()) == fragments["frag/00"]
        assert arbiter.state().vram_used == 4 * MiB
