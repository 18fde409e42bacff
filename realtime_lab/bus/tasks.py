"""The background tasks of a bus component, ended together when it closes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from realtime_lab.errors import BusError, LimitReached

log = logging.getLogger(__name__)


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
        tasks = self._tasks | {task for task in more if task is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait neither raises the tasks' CancelledError nor hides our own.
            await asyncio.wait(tasks)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, BusError | OSError | LimitReached):
                log.error("bus task %s failed", task.get_name(), exc_info=exc)
