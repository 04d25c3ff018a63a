"""Quality policies: pure properties with hypothesis, then the targets an Arbiter gives.

DESIGN.md, "Quality" and rule 7 of "Requesting memory".
"""

from __future__ import annotations

import anyio
import pytest
from arbiter_helpers import make_arbiter, request_in_background, settle
from hypothesis import given, settings
from hypothesis import strategies as st

from arbiter import (
    AllocationTimeout,
    ArbiterConfig,
    GiB,
    InsufficientQuality,
    Priority,
    QualityPolicy,
    WorkloadType,
)
from arbiter._quality import elastic_share_quality, policy_target, size_for_quality

pytestmark = pytest.mark.virtual_time

LLM = WorkloadType.LLM_INFERENCE
IMAGE = WorkloadType.IMAGE_GENERATION
VIDEO = WorkloadType.VIDEO_GENERATION

policies = st.sampled_from(list(QualityPolicy))
priorities = st.sampled_from(list(Priority))
pressures = st.floats(min_value=0.0, max_value=1.5, allow_nan=False)
fractions = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)  # (0, 1]
shares = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)

fast = settings(deadline=None)  # max_examples from the profile (tests/conftest.py)


def target(
    policy: QualityPolicy,
    priority: Priority,
    pressure: float,
    threshold: float,
    floor: float,
    share: float = 1.0,
) -> float:
    return policy_target(
        policy, priority, pressure, threshold=threshold, floor=floor, family_share=share
    )


# -- pure properties -------------------------------------------------------------


@fast
@given(policies, priorities, pressures, fractions, fractions, shares)
def test_target_stays_between_the_floor_and_one(
    policy: QualityPolicy,
    priority: Priority,
    pressure: float,
    threshold: float,
    floor: float,
    share: float,
) -> None:
    assert floor <= target(policy, priority, pressure, threshold, floor, share) <= 1.0


@fast
@given(policies, priorities, priorities, pressures, fractions, fractions, shares)
def test_higher_priority_never_gets_a_lower_target(
    policy: QualityPolicy,
    a: Priority,
    b: Priority,
    pressure: float,
    threshold: float,
    floor: float,
    share: float,
) -> None:
    low, high = sorted((a, b))
    assert target(policy, high, pressure, threshold, floor, share) >= target(
        policy, low, pressure, threshold, floor, share
    )


@fast
@given(policies, priorities, pressures, pressures, fractions, fractions, shares)
def test_more_pressure_never_raises_a_target(
    policy: QualityPolicy,
    priority: Priority,
    p: float,
    q: float,
    threshold: float,
    floor: float,
    share: float,
) -> None:
    lower, higher = sorted((p, q))
    assert target(policy, priority, higher, threshold, floor, share) <= target(
        policy, priority, lower, threshold, floor, share
    )


@fast
@given(policies, priorities, st.data(), fractions, fractions, shares)
def test_pressure_below_the_threshold_gives_one(
    policy: QualityPolicy,
    priority: Priority,
    data: st.DataObject,
    threshold: float,
    floor: float,
    share: float,
) -> None:
    below = data.draw(st.floats(min_value=0.0, max_value=threshold, exclude_max=True))
    assert target(policy, priority, below, threshold, floor, share) == 1.0


@fast
@given(priorities, pressures, fractions, fractions, shares)
def test_fixed_is_always_one(
    priority: Priority, pressure: float, threshold: float, floor: float, share: float
) -> None:
    assert target(QualityPolicy.FIXED, priority, pressure, threshold, floor, share) == 1.0


@fast
@given(policies, priorities, pressures, fractions, fractions, shares)
def test_the_other_family_leaving_gives_the_best_the_pressure_allows(
    policy: QualityPolicy,
    priority: Priority,
    pressure: float,
    threshold: float,
    floor: float,
    share: float,
) -> None:
    # family_share is 1.0 when the other family holds nothing: no share does better.
    alone = target(policy, priority, pressure, threshold, floor, 1.0)
    assert alone >= target(policy, priority, pressure, threshold, floor, share)
    if policy is QualityPolicy.PROPORTIONAL:
        assert alone == 1.0  # only the other family's share lowers a proportional target


@fast
@given(priorities, pressures, fractions, fractions, shares, shares)
def test_proportional_target_rises_with_the_family_share(
    priority: Priority, pressure: float, threshold: float, floor: float, s: float, t: float
) -> None:
    small, large = sorted((s, t))
    policy = QualityPolicy.PROPORTIONAL
    assert target(policy, priority, pressure, threshold, floor, large) >= target(
        policy, priority, pressure, threshold, floor, small
    )


@fast
@given(policies, priorities, fractions, st.floats(min_value=1e-6, max_value=0.999))
def test_full_pressure_lowers_every_target_unless_fixed(
    policy: QualityPolicy, priority: Priority, threshold: float, floor: float
) -> None:
    full = target(policy, priority, 1.0, threshold, floor, 0.0)
    if policy is QualityPolicy.FIXED:
        assert full == 1.0
    else:
        assert floor <= full < 1.0
        # Lower priorities fall first and furthest.
        assert target(policy, Priority.BACKGROUND, 1.0, threshold, floor, 0.0) <= full


@fast
@given(policies, st.booleans(), fractions)
def test_adaptive_quality_off_makes_every_policy_fixed(
    policy: QualityPolicy, adaptive: bool, threshold: float
) -> None:
    config = ArbiterConfig(
        quality_policy=policy, adaptive_quality=adaptive, pressure_threshold=threshold
    )
    assert config.effective_policy is (policy if adaptive else QualityPolicy.FIXED)


def test_adaptive_lowers_lower_priorities_first() -> None:
    # Just past the threshold, USER_FACING has barely moved while BACKGROUND has.
    targets = [target(QualityPolicy.ADAPTIVE, p, 0.9, 0.85, 0.4) for p in sorted(Priority)]
    assert targets == sorted(targets) and targets[0] < targets[-1]
    assert targets[-1] > 0.99


sizes = st.integers(min_value=1, max_value=64 * GiB)


@fast
@given(sizes, sizes, st.data(), fractions)
def test_elastic_share_maps_min_to_floor_max_to_one_linear_between(
    a: int, b: int, data: st.DataObject, floor: float
) -> None:
    lo, hi = sorted((a, b))
    assert elastic_share_quality(hi, lo, hi, floor) == pytest.approx(1.0)
    if lo == hi:
        return
    assert elastic_share_quality(lo, lo, hi, floor) == pytest.approx(floor)
    m, n = sorted(data.draw(st.integers(min_value=lo, max_value=hi)) for _ in range(2))
    qm, qn = (elastic_share_quality(x, lo, hi, floor) for x in (m, n))
    assert floor <= qm <= qn <= 1.0
    assert qm == pytest.approx(floor + (1 - floor) * (m - lo) / (hi - lo))


@fast
@given(sizes, sizes, st.floats(min_value=1e-6, max_value=0.999), fractions)
def test_size_for_quality_is_the_smallest_size_that_reaches_it(
    a: int, b: int, floor: float, quality: float
) -> None:
    # (A floor of 1.0 makes every size reach every quality; it answers max_memory then.)
    lo, hi = sorted((a, b))
    size = size_for_quality(quality, lo, hi, floor)
    assert lo <= size <= hi
    assert elastic_share_quality(size, lo, hi, floor) >= quality - 1e-9
    if size > lo:
        assert elastic_share_quality(size - 1, lo, hi, floor) < quality + 1e-9


# -- through the Arbiter -------------------------------------------------------------


@pytest.mark.anyio
async def test_seed_high_llm_gets_at_least_the_quality_of_normal_diffusion() -> None:
    arbiter = make_arbiter()
    llm = await arbiter.request_allocation(LLM, Priority.HIGH, 10 * GiB)
    diffusion = await arbiter.request_allocation(IMAGE, Priority.NORMAL, 8 * GiB)
    assert llm.quality >= diffusion.quality
    assert arbiter.state().active_llm_workloads == 1
    assert arbiter.state().active_diffusion_workloads == 1


@pytest.mark.anyio
async def test_under_pressure_high_llm_beats_normal_diffusion() -> None:
    arbiter = make_arbiter()
    llm = await arbiter.request_allocation(LLM, Priority.HIGH, 12 * GiB)
    diffusion = await arbiter.request_allocation(VIDEO, Priority.NORMAL, 10 * GiB)
    assert llm.quality > diffusion.quality
    config = arbiter.config
    assert config.diffusion_min_quality <= diffusion.quality < 1.0
    # No priority inversion: the HIGH holder sees only its own 12 GiB, not the NORMAL 10.
    assert llm.quality == 1.0


@pytest.mark.anyio
async def test_recommended_quality_follows_the_policy_at_the_current_pressure() -> None:
    arbiter = make_arbiter()
    assert arbiter.recommended_quality(LLM) == 1.0
    assert arbiter.recommended_quality("image_generation", "background") == 1.0
    held = await arbiter.request_allocation(LLM, Priority.NORMAL, 23 * GiB)
    config = arbiter.config
    pressure = 23 / 24
    for priority in Priority:
        for workload, floor in (
            (LLM, config.llm_min_quality),
            (IMAGE, config.diffusion_min_quality),
        ):
            # A request above NORMAL does not see the NORMAL holder (no priority inversion).
            expected = (
                1.0
                if priority > Priority.NORMAL
                else policy_target(
                    QualityPolicy.ADAPTIVE,
                    priority,
                    pressure,
                    threshold=config.pressure_threshold,
                    floor=floor,
                )
            )
            assert arbiter.recommended_quality(workload, priority) == pytest.approx(expected)
    ordered = [arbiter.recommended_quality(LLM, p) for p in sorted(Priority)]
    assert ordered == sorted(ordered) and ordered[0] < 1.0 and ordered[-1] == 1.0
    state = arbiter.state()
    assert state.llm_quality == arbiter.recommended_quality(LLM, Priority.NORMAL)
    assert state.diffusion_quality == arbiter.recommended_quality(VIDEO, Priority.NORMAL)
    assert state.memory_pressure == pytest.approx(pressure)
    held.release()
    assert arbiter.state().llm_quality == 1.0 and arbiter.state().diffusion_quality == 1.0


@pytest.mark.anyio
async def test_recommended_quality_checks_its_arguments() -> None:
    arbiter = make_arbiter()
    with pytest.raises(ValueError):
        arbiter.recommended_quality("not a workload")
    with pytest.raises(ValueError):
        arbiter.recommended_quality(LLM, "not a priority")


@pytest.mark.anyio
async def test_fixed_policy_and_adaptive_off_never_lower_targets() -> None:
    for arbiter in (make_arbiter(adaptive_quality=False), make_arbiter(quality_policy="fixed")):
        held = await arbiter.request_allocation(LLM, Priority.BACKGROUND, 24 * GiB)
        assert held.quality == 1.0
        assert arbiter.recommended_quality(IMAGE, Priority.BACKGROUND) == 1.0
        assert arbiter.state().llm_quality == 1.0


@pytest.mark.anyio
async def test_proportional_targets_recover_when_the_other_family_leaves() -> None:
    arbiter = make_arbiter(quality_policy=QualityPolicy.PROPORTIONAL, pressure_threshold=0.5)
    llm = await arbiter.request_allocation(LLM, Priority.NORMAL, 18 * GiB)
    diffusion = await arbiter.request_allocation(IMAGE, Priority.NORMAL, 5 * GiB)
    # Each family's target falls with the share the other one holds.
    assert diffusion.quality < llm.quality < 1.0
    assert arbiter.state().diffusion_quality < arbiter.state().llm_quality < 1.0
    diffusion.release()
    # Pressure is still past the threshold (18/24), but the LLM family is alone.
    assert arbiter.state().memory_pressure > 0.5
    assert llm.quality == 1.0 and arbiter.state().llm_quality == 1.0


@pytest.mark.anyio
async def test_adaptive_targets_recover_to_what_the_pressure_allows() -> None:
    arbiter = make_arbiter()
    llm = await arbiter.request_allocation(LLM, Priority.NORMAL, 12 * GiB)
    diffusion = await arbiter.request_allocation(IMAGE, Priority.NORMAL, 11 * GiB)
    assert llm.quality < 1.0
    diffusion.release()
    assert llm.quality == 1.0  # 12/24 is below the threshold


@pytest.mark.parametrize(("held_gib", "expected_share"), [(0, 1.0), (4, 0.5), (8, 0.0)])
@pytest.mark.anyio
async def test_elastic_grant_target_is_capped_by_its_share(
    held_gib: int, expected_share: float
) -> None:
    # FIXED: no pressure-driven drop, so the target is the share cap alone (a full card
    # is past the threshold, where ADAPTIVE would lower it too).
    arbiter = make_arbiter(adaptive_quality=False)
    if held_gib:
        await arbiter.request_allocation(IMAGE, Priority.USER_FACING, held_gib * GiB)
    elastic = await arbiter.request_allocation(LLM, Priority.NORMAL, 24 * GiB, min_memory=16 * GiB)
    floor = arbiter.config.llm_min_quality
    assert elastic.memory == (24 - held_gib) * GiB
    assert elastic.quality == pytest.approx(floor + (1 - floor) * expected_share)


@pytest.mark.anyio
async def test_min_quality_blocks_until_the_timeout_then_insufficient_quality() -> None:
    arbiter = make_arbiter(adaptive_quality=False)  # the share alone decides
    await arbiter.request_allocation(IMAGE, Priority.NORMAL, 12 * GiB)
    floor = arbiter.config.llm_min_quality
    with anyio.fail_after(5), pytest.raises(InsufficientQuality) as caught:
        # 12 GiB free: 4 of the 8 elastic GiB, so the quality would be floor + half.
        await arbiter.request_allocation(
            LLM, Priority.NORMAL, 16 * GiB, min_memory=8 * GiB, min_quality=0.9, timeout=0.05
        )
    assert caught.value.minimum == 0.9
    assert caught.value.available == pytest.approx(floor + (1 - floor) * 0.5)
    assert arbiter.state().waiting == 0 and arbiter.state().vram_used == 12 * GiB
    assert arbiter.stats().failed_allocations == 1


@pytest.mark.anyio
async def test_min_quality_that_can_be_met_is_granted() -> None:
    arbiter = make_arbiter(adaptive_quality=False)  # the share alone decides
    await arbiter.request_allocation(IMAGE, Priority.NORMAL, 12 * GiB)
    alloc = await arbiter.request_allocation(
        LLM, Priority.NORMAL, 16 * GiB, min_memory=8 * GiB, min_quality=0.7, timeout=0.05
    )
    assert alloc.memory == 12 * GiB and alloc.quality >= 0.7


@pytest.mark.anyio
async def test_min_quality_met_up_to_float_error_is_granted() -> None:
    # 8 GiB of 1..16 at floor 0.4 is a share of exactly 0.68, computed as 0.6799999999999999.
    arbiter = make_arbiter(adaptive_quality=False)  # the share alone decides
    await arbiter.request_allocation(IMAGE, Priority.NORMAL, 16 * GiB)
    alloc = await arbiter.request_allocation(
        LLM, Priority.NORMAL, 16 * GiB, min_memory=1 * GiB, min_quality=0.68, timeout=0
    )
    assert alloc.memory == 8 * GiB and alloc.quality == pytest.approx(0.68)


def test_insufficient_quality_never_shows_the_best_as_the_minimum() -> None:
    message = str(InsufficientQuality(0.68, 0.6769))
    assert message == "min_quality 0.68 not met, best available 0.676"


@pytest.mark.parametrize("elastic", [False, True])
@pytest.mark.anyio
async def test_min_quality_counts_the_requests_own_memory(elastic: bool) -> None:
    # Nothing else is held, but the request itself would push the pressure past the
    # threshold: its target would then be below min_quality.
    arbiter = make_arbiter()
    min_memory = 22 * GiB if elastic else None
    with anyio.fail_after(5):
        try:
            alloc = await arbiter.request_allocation(
                LLM,
                Priority.NORMAL,
                23 * GiB,
                min_memory=min_memory,
                min_quality=0.9,
                timeout=0.05,
            )
        except InsufficientQuality as exc:
            assert exc.minimum == 0.9 and exc.available < 0.9
            assert arbiter.state().vram_used == 0
        else:
            assert alloc.quality >= 0.9, "granted below its min_quality"


@pytest.mark.anyio
async def test_min_quality_waits_for_memory_then_is_granted() -> None:
    arbiter = make_arbiter()
    other = await arbiter.request_allocation(IMAGE, Priority.NORMAL, 12 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            got = []

            async def wait_for_quality() -> None:
                got.append(
                    await arbiter.request_allocation(
                        LLM, Priority.NORMAL, 16 * GiB, min_memory=8 * GiB, min_quality=0.9
                    )
                )

            tg.start_soon(wait_for_quality)
            await settle()
            assert not got and arbiter.state().waiting == 1
            other.release()
            await settle()
            assert got and got[0].memory == 16 * GiB and got[0].quality >= 0.9


@pytest.mark.parametrize(("min_quality", "admissible"), [(0.9, False), (0.65, True)])
@pytest.mark.anyio
async def test_a_head_waiting_for_its_min_quality_counts_only_if_shrinking_can_admit_it(
    min_quality: float, admissible: bool
) -> None:
    # A holds 16 GiB (elastic down to 8), an image 4: 4 GiB free. B waits for an elastic
    # 16 GiB (down to 8). At min_quality 0.9 B needs about 14.9 GiB: even A at its floor
    # would leave 12, so counting B's 8 GiB minimum in A's pressure would drop A's target
    # for nothing (a shrink that cannot admit B); A stays at 1.0. At 0.65 B needs 12 GiB,
    # which A's shrinking can give: B's demand is in A's pressure and A's target falls.
    arbiter = make_arbiter()
    holder = await arbiter.request_allocation(VIDEO, Priority.NORMAL, 16 * GiB, min_memory=8 * GiB)
    await arbiter.request_allocation(IMAGE, Priority.NORMAL, 4 * GiB)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            waiting = await request_in_background(
                tg, arbiter, Priority.NORMAL, 16, min_memory=8 * GiB, min_quality=min_quality
            )
            assert not waiting and arbiter.state().waiting == 1
            if admissible:
                assert holder.quality < 1.0
            else:
                assert holder.quality == 1.0
                assert arbiter.stats().quality_reductions == 0
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_min_quality_without_memory_is_a_plain_timeout() -> None:
    arbiter = make_arbiter()
    await arbiter.request_allocation(IMAGE, Priority.NORMAL, 20 * GiB)
    with anyio.fail_after(5), pytest.raises(AllocationTimeout) as caught:
        await arbiter.request_allocation(
            LLM, Priority.NORMAL, 8 * GiB, min_quality=0.5, timeout=0.05
        )
    assert not isinstance(caught.value, InsufficientQuality)


@pytest.mark.parametrize("bad", [0, -0.1, 1.01, float("nan")])
@pytest.mark.anyio
async def test_min_quality_outside_zero_one_is_a_value_error(bad: float) -> None:
    arbiter = make_arbiter()
    with pytest.raises(ValueError, match="min_quality"):
        await arbiter.request_allocation(LLM, Priority.NORMAL, GiB, min_quality=bad)
    with pytest.raises(TypeError, match="min_quality"):
        await arbiter.request_allocation(LLM, Priority.NORMAL, GiB, min_quality="high")  # type: ignore[arg-type]
    assert arbiter.stats().total_allocations == 0


@fast
@given(priorities, st.floats(min_value=1.0, max_value=4.0), fractions, fractions)
def test_adaptive_stays_at_its_full_card_value_when_more_is_wanted(
    priority: Priority, pressure: float, threshold: float, floor: float
) -> None:
    # What waits is admitted by shrink requests for what it needs; the policy does not
    # send every holder that sees it to its floor.
    adaptive = QualityPolicy.ADAPTIVE
    full = target(adaptive, priority, 1.0, threshold, floor)
    assert target(adaptive, priority, pressure, threshold, floor) == full
