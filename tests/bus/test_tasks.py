"""Background tasks end at close even when a library drops a cancel."""

from __future__ import annotations

import asyncio

import pytest

from realtime_lab.bus.tasks import Background, cancel_and_wait, raise_if_cancelling


async def _drops_one_cancel(ran_on: list[str]) -> None:
    # What redis-py 8.1 does to a command cancelled mid-flight: the cancel is lost and the
    # caller's loop goes on to its next await.
    try:
        await asyncio.Event().wait()  # a command that would never answer
    except asyncio.CancelledError:
        ran_on.append("dropped")
    await asyncio.Event().wait()


async def test_cancel_and_wait_cancels_again_a_task_that_dropped_its_cancel() -> None:
    ran_on: list[str] = []
    task = asyncio.create_task(_drops_one_cancel(ran_on))
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait([task])
    assert ran_on == ["dropped"]
    assert task.cancelled()


async def test_background_close_ends_a_task_that_dropped_its_cancel() -> None:
    background = Background()
    ran_on: list[str] = []
    task = background.spawn(_drops_one_cancel(ran_on), "dropper")
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await background.cancel_all()
    assert task.cancelled()


async def test_raise_if_cancelling_raises_only_for_a_pending_cancel() -> None:
    raise_if_cancelling()  # nothing asked: nothing raised
    swallowed = asyncio.Event()

    async def loop_that_checks() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # as a library would: the answer came anyway
        raise_if_cancelling()
        await asyncio.Event().wait()  # never reached

    task = asyncio.create_task(loop_that_checks())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert swallowed.is_set()
