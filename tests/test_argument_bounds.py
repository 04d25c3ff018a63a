"""Numbers at and past their bounds: huge numbers are bad values (``ValueError`` naming
the argument), never an ``OverflowError`` from deep inside, except a timeout, where a
huge number means forever. A float memory gets a ``TypeError`` that says memory is an
``int`` of bytes; ``memory_for_quality`` checks its quality.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest
from arbiter_helpers import settle

from arbiter import Allocation, Arbiter, ArbiterConfig, GiB, Priority, WorkloadType

LLM = WorkloadType.LLM_INFERENCE
HUGE = 10**400
NAN = float("nan")


def _short(value: object) -> str | None:
    """A test id: huge ints by their size, the rest as pytest shows them."""
    if isinstance(value, int) and abs(value) > 2**64:
        return "-huge" if value < 0 else "huge"
    return None


def _arbiter(**overrides: Any) -> Arbiter:
    return Arbiter(ArbiterConfig.for_vram_gb(10, **overrides), probe=None)


def _check(error: BaseException, name: str) -> None:
    message = str(error)
    assert name in message, f"{message!r} does not name {name!r}"
    assert len(message) < 300, "a huge number is shown by its size, not its digits"


# (argument, value) pairs that must be ValueErrors naming the argument
HUGE_ARGUMENTS: list[tuple[str, Any]] = [
    ("memory", HUGE),
    ("memory", 2**63),  # one past the largest byte count
    ("memory", -HUGE),
    ("min_memory", HUGE),
    ("min_memory", -HUGE),
    ("min_quality", HUGE),
    ("min_quality", -HUGE),
    ("timeout", -HUGE),
    ("keep_alive", -HUGE),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "value"), HUGE_ARGUMENTS, ids=_short)
async def test_request_allocation_rejects_huge_numbers_naming_the_argument(
    name: str, value: Any
) -> None:
    arbiter = _arbiter()
    kwargs: dict[str, Any] = {"memory": GiB, name: value}
    with pytest.raises(ValueError) as info:
        await arbiter.request_allocation(LLM, Priority.NORMAL, **kwargs)
    assert type(info.value) is ValueError
    _check(info.value, name)
    assert arbiter.stats().total_allocations == 0
    assert arbiter.state().vram_used == 0


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "value"), HUGE_ARGUMENTS, ids=_short)
async def test_allocate_rejects_huge_numbers_naming_the_argument(name: str, value: Any) -> None:
    arbiter = _arbiter()
    kwargs: dict[str, Any] = {"memory": GiB, name: value}
    with pytest.raises(ValueError) as info:
        async with arbiter.allocate(LLM, Priority.NORMAL, **kwargs):
            pytest.fail("the body ran")
    assert type(info.value) is ValueError
    _check(info.value, name)
    assert arbiter.state().vram_used == 0


@pytest.mark.anyio
async def test_the_largest_byte_count_is_a_request_that_cannot_fit() -> None:
    from arbiter import InsufficientMemory

    arbiter = _arbiter()
    with pytest.raises(InsufficientMemory):
        await arbiter.request_allocation(LLM, Priority.NORMAL, 2**63 - 1)


@pytest.mark.anyio
async def test_a_huge_timeout_means_forever() -> None:
    arbiter = _arbiter()
    holder = await arbiter.request_allocation(LLM, Priority.NORMAL, 10 * GiB)
    got: list[Allocation] = []

    async def patient() -> None:
        got.append(await arbiter.request_allocation(LLM, Priority.NORMAL, GiB, timeout=HUGE))

    async with anyio.create_task_group() as tg:
        tg.start_soon(patient)
        await settle()
        assert arbiter.state().waiting == 1
        holder.release()
    assert got[0].memory == GiB


@pytest.mark.anyio
async def test_a_huge_default_timeout_means_forever() -> None:
    arbiter = Arbiter(ArbiterConfig(vram_budget=10 * GiB, allocation_timeout=HUGE), probe=None)
    assert arbiter.config.allocation_timeout == math.inf
    holder = await arbiter.request_allocation(LLM, Priority.NORMAL, 10 * GiB)
    async with anyio.create_task_group() as tg:

        async def patient() -> None:
            async with arbiter.allocate(LLM, Priority.NORMAL, memory=GiB) as alloc:
                assert alloc.memory == GiB

        tg.start_soon(patient)
        await settle()
        holder.release()
    assert arbiter.state().vram_used == 0


@pytest.mark.anyio
async def test_a_huge_keep_alive_never_reclaims() -> None:
    async with _arbiter() as arbiter:
        alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB, keep_alive=HUGE)
        await anyio.sleep(0.05)
        assert not alloc.preempted and not alloc.released
        alloc.release()


@pytest.mark.anyio
@pytest.mark.parametrize("memory", [HUGE, 2**63, -HUGE], ids=_short)
async def test_resize_rejects_huge_memory_naming_it(memory: int) -> None:
    arbiter = _arbiter()
    alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB)
    with pytest.raises(ValueError) as info:
        await alloc.resize(memory)
    assert type(info.value) is ValueError
    _check(info.value, "memory")
    assert alloc.memory == GiB


@pytest.mark.anyio
async def test_resize_with_a_huge_timeout_waits_for_the_growth() -> None:
    arbiter = _arbiter()
    alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB)
    other = await arbiter.request_allocation(LLM, Priority.NORMAL, 9 * GiB)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: alloc.resize(2 * GiB, timeout=HUGE))
        await settle()
        assert alloc.memory == GiB
        other.release()
    assert alloc.memory == 2 * GiB
    with pytest.raises(ValueError, match="timeout"):
        await alloc.resize(3 * GiB, timeout=-HUGE)


# -- a float memory ---------------------------------------------------------------


def _says_int_of_bytes(error: BaseException, name: str) -> None:
    message = str(error)
    assert name in message
    assert "int" in message and "bytes" in message
    assert "int(" in message, f"{message!r} does not suggest int(...)"


@pytest.mark.anyio
async def test_a_float_memory_is_told_memory_is_an_int_of_bytes() -> None:
    arbiter = _arbiter()
    with pytest.raises(TypeError) as info:
        await arbiter.request_allocation(LLM, Priority.NORMAL, 1.5 * GiB)  # type: ignore[arg-type]
    _says_int_of_bytes(info.value, "memory")
    with pytest.raises(TypeError) as info:
        async with arbiter.allocate(LLM, "normal", memory=GiB, min_memory=0.5 * GiB):  # type: ignore[arg-type]
            pytest.fail("the body ran")
    _says_int_of_bytes(info.value, "min_memory")
    alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, GiB)
    with pytest.raises(TypeError) as info:
        await alloc.resize(1.5 * GiB)  # type: ignore[arg-type]
    _says_int_of_bytes(info.value, "memory")
    assert int(1.5 * GiB) == 1610612736  # what the message suggests works
    await alloc.resize(int(1.5 * GiB))
    assert alloc.memory == int(1.5 * GiB)


# -- memory_for_quality ---------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("elastic", [True, False])
@pytest.mark.parametrize(
    ("quality", "error"),
    [
        ("x", TypeError),
        (None, TypeError),
        (True, TypeError),
        (NAN, ValueError),
        (-0.1, ValueError),
        (1.5, ValueError),
        (math.inf, ValueError),
        (HUGE, ValueError),
        (-HUGE, ValueError),
    ],
    ids=_short,
)
async def test_memory_for_quality_checks_its_quality(
    elastic: bool, quality: Any, error: type[Exception]
) -> None:
    arbiter = _arbiter()
    min_memory = 2 * GiB if elastic else None
    alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 4 * GiB, min_memory=min_memory)
    with pytest.raises(error) as info:
        alloc.memory_for_quality(quality)
    assert type(info.value) is error
    _check(info.value, "quality")


@pytest.mark.anyio
async def test_memory_for_quality_accepts_the_closed_unit_interval() -> None:
    arbiter = _arbiter()
    alloc = await arbiter.request_allocation(LLM, Priority.NORMAL, 4 * GiB, min_memory=2 * GiB)
    assert alloc.memory_for_quality(0) == 2 * GiB
    assert alloc.memory_for_quality(1) == 4 * GiB
    assert 2 * GiB < alloc.memory_for_quality(0.9) < 4 * GiB


@pytest.mark.parametrize(
    ("field", "value"),
    [("index", HUGE), ("index", 2**31), ("total_vram_bytes", HUGE), ("total_vram_bytes", 2**63)],
    ids=lambda v: _short(v) if isinstance(v, int) else str(v),
)
def test_a_gpu_info_with_a_huge_number_is_a_bad_value(field: str, value: int) -> None:
    from arbiter import GpuInfo, GpuVendor

    fields: dict[str, Any] = {
        "index": 0, "name": "A", "vendor": GpuVendor.NVIDIA, "total_vram_bytes": GiB,
    }  # fmt: skip
    with pytest.raises(ValueError, match=field):
        GpuInfo(**{**fields, field: value})


def test_from_detection_of_something_else_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="GpuDetectionResult"):
        ArbiterConfig.from_detection("x")  # type: ignore[arg-type]
