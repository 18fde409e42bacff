"""The heartbeat: one task that sends every stream's keep-alive (an SSE comment, a WebSocket ping).

Proxies cut streams that stay quiet (nginx after ``proxy_read_timeout``), so each stream gets a
heartbeat every ``settings.heartbeat`` seconds. A changed interval takes effect at once
(:meth:`Heartbeat.reschedule`), not after the old interval has run out.
"""

from __future__ import annotations

import asyncio
import contextlib

from realtime_lab.config import Settings
from realtime_lab.transports.accounting import Hub
from realtime_lab.transports.chaos import Chaos

#: The transports whose connections have heartbeats.
BEATING = ("sse", "ws", "fetch")


class Heartbeat:
    """Sends the heartbeats of every open stream (see the module docstring)."""

    def __init__(self, hub: Hub, settings: Settings, chaos: Chaos) -> None:
        self._hub = hub
        self._settings = settings
        self._chaos = chaos
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the heartbeat task; :meth:`stop` it at shutdown."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="heartbeats")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def reschedule(self) -> None:
        """The interval changed: the next beat is due one new interval from now."""
        self._changed.set()

    def beat(self) -> None:
        """Send one heartbeat to every stream now (unless chaos silences them)."""
        if not self._chaos.heartbeats:
            return
        for name in BEATING:
            for conn in tuple(self._hub.stats[name].live.values()):
                conn.heartbeat()

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.heartbeat):
                    await self._changed.wait()
                continue  # rescheduled: wait a whole new interval
            self.beat()
