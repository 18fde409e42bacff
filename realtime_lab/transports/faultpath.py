"""The chaos slow path of one streaming connection: writes a pause holds or a delay defers.

Made only when a fault is on (idle connections are many and never pay for it). Held writes go
out when the pause ends; delayed ones in order, by one timer, so that changing the delay never
lets a newer write overtake an older one. What is held or delayed counts against the
connection's ``send_buffer`` like unsent bytes: past it the connection overflows.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from realtime_lab.transports.chaos import Chaos
from realtime_lab.transports.outlet import Outlet


class FaultTarget(Outlet, Protocol):
    """What the slow path needs of its connection."""

    def write_event(self, data: bytes, event_id: str, is_end: bool) -> None:
        """Write one event's bytes now."""

    def update_steady(self) -> None:
        """Re-check whether the broadcast may write for it again."""


class FaultPath:
    """Held and delayed writes of one connection (see the module docstring)."""

    __slots__ = ("_bytes", "_chaos", "_conn", "_delayed", "_held", "_timer")

    def __init__(self, conn: FaultTarget, chaos: Chaos) -> None:
        self._conn = conn
        self._chaos = chaos
        self._held: list[tuple[bytes, str, bool]] = []  # (bytes, event id, is_end)
        self._delayed: deque[tuple[float, bytes, str, bool]] = deque()  # (due, ...) oldest first
        self._bytes = 0  # held and delayed
        self._timer: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> bool:
        """``True`` while writes are held or delayed: later ones must queue behind them."""
        return bool(self._held or self._delayed)

    def send(self, data: bytes, event_id: str, is_end: bool) -> None:
        """Write, hold or delay one event's bytes, as the faults in force say."""
        if self._chaos.paused:
            self._held.append((data, event_id, is_end))
        elif self._chaos.write_delay > 0 or self._delayed:
            loop = asyncio.get_running_loop()
            self._delayed.append((loop.time() + self._chaos.write_delay, data, event_id, is_end))
            if self._timer is None:
                self._timer = loop.call_at(self._delayed[0][0], self._write_delayed)
        else:
            self._write(data, event_id, is_end)
            return
        self._bytes += len(data)
        conn = self._conn
        conn.update_steady()
        if self._bytes > conn.send_buffer:
            self._clear()
            conn.overflow()

    def release_held(self) -> None:
        """Send what a pause held back (the pause has ended)."""
        held, self._held = self._held, []
        self._bytes -= sum(len(data) for data, _, _ in held)
        for data, event_id, is_end in held:
            self.send(data, event_id, is_end)
        self._conn.update_steady()

    def _write_delayed(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            _, data, event_id, is_end = delayed.popleft()
            self._bytes -= len(data)
            self._write(data, event_id, is_end)
        if self._conn.done.done():
            self._clear()
        elif delayed:
            self._timer = loop.call_at(delayed[0][0], self._write_delayed)
        self._conn.update_steady()

    def _clear(self) -> None:
        self._held.clear()
        self._delayed.clear()
        self._bytes = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _write(self, data: bytes, event_id: str, is_end: bool) -> None:
        if not self._conn.done.done():
            self._conn.write_event(data, event_id, is_end)
