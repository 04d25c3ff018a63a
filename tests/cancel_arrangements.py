"""Where a task may stand when it reaches a checkpoint or makes a request: each
arrangement of anyio scopes around it, and whether a cancellation is pending there.
`reached_past` tells whether a point let the task through."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel

Point = Callable[[], Awaitable[None]]


async def _self_cancelled(point: Point) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        await point()


async def _cancelled_before_it_was_entered(point: Point) -> None:
    scope = anyio.CancelScope()
    scope.cancel()
    with scope:
        await point()


async def _move_on_after_zero(point: Point) -> None:
    with anyio.move_on_after(0):
        await point()


async def _nested_plain_scopes_of_a_cancelled_one(point: Point) -> None:
    with anyio.CancelScope() as outer:
        outer.cancel()
        with anyio.CancelScope(), anyio.CancelScope():
            await point()


async def _shielded_inside_a_cancelled_one(point: Point) -> None:
    with anyio.CancelScope() as outer:
        outer.cancel()
        with anyio.CancelScope(shield=True):
            await point()


async def _cancelled_inside_a_shield_inside_a_cancelled_one(point: Point) -> None:
    # The shield keeps the outer cancellation out, not its own.
    with anyio.CancelScope() as outer:
        outer.cancel()
        with anyio.CancelScope(shield=True) as shielded:
            shielded.cancel()
            await point()


async def _shield_lifted_inside_a_cancelled_one(point: Point) -> None:
    with anyio.CancelScope() as outer, anyio.CancelScope(shield=True) as shielded:
        outer.cancel()
        await anyio.lowlevel.checkpoint()  # the outer delivery stops: nothing to reach
        shielded.shield = False
        await point()


async def _cancel(scope: anyio.CancelScope) -> None:
    """Cancels ``scope`` from another task."""
    scope.cancel()


async def _left_a_shield_after_another_task_cancelled(point: Point) -> None:
    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            tg.start_soon(_cancel, scope)
            with anyio.CancelScope(shield=True):
                for _ in range(3):
                    await anyio.lowlevel.checkpoint()
            assert scope.cancel_called
            await point()


async def _caught_a_cancellation_and_requested_again(point: Point) -> None:
    # A task that swallowed the first delivery (a `finally` that awaits): the scope is
    # still cancelled, so the next checkpoint raises again.
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.lowlevel.checkpoint()
        except anyio.get_cancelled_exc_class():
            pass
        await point()


async def cancelled_by_another_task_while_it_waits(point: Point) -> None:
    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            tg.start_soon(_cancel, scope)
            await point()


async def _deadline_passed(point: Point) -> None:
    with anyio.CancelScope(deadline=anyio.current_time() - 1):
        await point()


async def _task_group_cancelled_by_its_host(point: Point) -> None:
    async with anyio.create_task_group() as tg:
        tg.cancel_scope.cancel()
        await point()


async def _nothing_pending(point: Point) -> None:
    with anyio.CancelScope():
        await point()


ARRANGEMENTS = [
    _self_cancelled,
    _cancelled_before_it_was_entered,
    _move_on_after_zero,
    _nested_plain_scopes_of_a_cancelled_one,
    _shielded_inside_a_cancelled_one,
    _cancelled_inside_a_shield_inside_a_cancelled_one,
    _shield_lifted_inside_a_cancelled_one,
    _left_a_shield_after_another_task_cancelled,
    _caught_a_cancellation_and_requested_again,
    cancelled_by_another_task_while_it_waits,
    _deadline_passed,
    _task_group_cancelled_by_its_host,
    _nothing_pending,
]
NOT_CANCELLED = (_shielded_inside_a_cancelled_one, _nothing_pending)


async def reached_past(arrangement: Callable[[Point], Awaitable[None]], point: Point) -> bool:
    passed = False

    async def point_then_mark() -> None:
        nonlocal passed
        await point()
        passed = True

    await arrangement(point_then_mark)
    return passed
