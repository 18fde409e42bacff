"""The background tasks of a bus component, ended together when it closes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Coroutine
from typing import Any, Final

from realtime_lab.errors import BusError, LimitReached

log = logging.getLogger(__name__)

#: How often :func:`cancel_and_wait` cancels again a task that did not end.
RECANCEL_S: Final = 0.25


def raise_if_cancelling() -> None:
    """Raise ``CancelledError`` when the running task was asked to cancel and is still going.

    Call it right after awaiting a Redis command. redis-py (8.1 here) can finish a command whose
    task was cancelled while it waited and return its answer: the cancel request is then lost
    (``task.cancelling()`` stays above 0, no ``CancelledError`` was raised), and a loop around
    the command runs on. Measured: 7 cancels in 10 landing mid-command were lost.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(tasks: Collection[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for every one to end; cancel again any that lost its cancel.

    A task whose cancel a library dropped (see :func:`raise_if_cancelling`) gets another one
    every :data:`RECANCEL_S` seconds, instead of a close that never returns. Neither raises
    the tasks' ``CancelledError`` nor hides the caller's own.
    """
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)


class Background:
    """Tasks started by one component (the hub, a broker); :meth:`cancel_all` them at close.

    A task that fails with anything but a refusal or a broker failure (which whoever waited on
    it sees) is a bug: it is logged with its traceback.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` in a task of its own until it ends or :meth:`cancel_all`."""
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    async def cancel_all(self, *more: asyncio.Task[None] | None) -> None:
        """Cancel every task (and ``more``) and wait for them to end."""
        await cancel_and_wait(self._tasks | {task for task in more if task is not None})

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, BusError | OSError | LimitReached):
                log.error("bus task %s failed", task.get_name(), exc_info=exc)
