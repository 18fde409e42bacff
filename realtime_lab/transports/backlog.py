"""The catch-up backlog of one streaming connection: events written as its socket drains.

The history a resuming client asks for is not its fault, and may be far larger than the
connection's ``send_buffer``. What does not fit under half of it waits here, as references to the
bus's own events, and a short-lived task writes it as the socket drains. Live events that arrive
meanwhile queue behind it, and it is their lag, not the replay's size, that ``send_buffer`` bounds.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from realtime_lab.protocol.envelope import Event
from realtime_lab.transports.outlet import Outlet


class BacklogTarget(Outlet, Protocol):
    """What the backlog needs of its connection."""

    def frame(self, event: Event) -> bytes:
        """The bytes that carry ``event``."""

    def send(self, event: Event) -> None:
        """Write one event now."""

    def update_steady(self) -> None:
        """Re-check whether the broadcast may write for it again."""


class Backlog:
    """Events accepted and not written yet, oldest first (see the module docstring)."""

    __slots__ = ("_conn", "_drain", "_events", "_live_bytes", "_name", "_replayed", "_task")

    def __init__(
        self,
        conn: BacklogTarget,
        drain: Callable[[], Coroutine[Any, Any, None]],
        name: str,
    ) -> None:
        self._conn = conn
        self._drain = drain
        self._name = name
        self._events: deque[Event] = deque()
        self._replayed = 0  # how many at the head came from the replay
        self._live_bytes = 0  # frame bytes of the live events queued
        self._task: asyncio.Task[None] | None = None

    def __bool__(self) -> bool:
        return bool(self._events)

    def add(self, event: Event, *, replayed: bool) -> None:
        """Queue ``event``; a live one past ``send_buffer`` of lag overflows the connection."""
        conn = self._conn
        self._events.append(event)
        if replayed:
            self._replayed += 1
        else:
            self._live_bytes += len(conn.frame(event))
            if self._live_bytes > conn.send_buffer:
                self.clear()
                conn.overflow()
                return
        if self._task is None:
            self._task = asyncio.create_task(self._write(), name=self._name)

    def clear(self) -> None:
        """Forget what is queued (a new replay supersedes it, or the connection ends)."""
        self._events.clear()
        self._replayed = self._live_bytes = 0

    def stop(self) -> None:
        """Forget what is queued and stop writing. Idempotent."""
        self.clear()
        if self._task is not None:
            self._task.cancel()

    async def _write(self) -> None:
        conn, events = self._conn, self._events
        try:
            while events and not conn.done.done():
                if conn.socket.is_closing():
                    conn.lost()
                elif conn.socket.get_write_buffer_size() > conn.send_buffer // 2:
                    await self._drain()  # the transport paused above that mark: wait for room
                else:
                    event = events.popleft()
                    if self._replayed:
                        self._replayed -= 1
                    else:
                        self._live_bytes -= len(conn.frame(event))
                    conn.send(event)
        except ConnectionError:
            conn.lost()
        finally:
            self._task = None
            conn.update_steady()
