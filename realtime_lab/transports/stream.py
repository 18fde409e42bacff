"""The write path shared by the two streaming transports (SSE and WebSocket).

A :class:`StreamConnection` is a bus sink: fan-out calls :meth:`deliver` synchronously, and it
writes the event's pre-encoded bytes (cached on the event, identical for every subscriber)
straight to the socket's transport. There is no queue and no task per subscriber on the hot path.

Overflow policy: asyncio buffers what the kernel will not take yet. When that buffer passes
``send_buffer`` bytes the client is not keeping up; the connection is then ended with a clear
signal (an SSE ``error`` event / WebSocket close 1013, both naming the id to resume from) and the
socket is closed, and aborted after a short grace if the client never reads it. Memory per
subscriber is therefore bounded by ``send_buffer`` plus one event, whatever the client does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from aiohttp import web

from realtime_lab.protocol.envelope import END, Event
from realtime_lab.transports.common import Hub, LiveConnection
from realtime_lab.transports.faults import Chaos

log = logging.getLogger("realtime_lab.server")

#: Why a streaming connection ended.
END_OF_STREAM: Final = "end"
SHUTDOWN: Final = "shutdown"
OVERFLOW: Final = "overflow"
DROPPED: Final = "drop"
LOST: Final = "lost"
ABORT_GRACE_S: Final = 2.0


class StreamConnection(LiveConnection):
    """A streaming connection fed by the bus; subclasses say how an event is framed."""

    def __init__(
        self,
        request: web.Request,
        channel: str,
        client: str | None,
        hub: Hub,
        chaos: Chaos,
        send_buffer: int,
    ) -> None:
        super().__init__(channel, client)
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away before the stream started")
        self._transport: asyncio.Transport = transport
        self._hub = hub
        self._chaos = chaos
        self._limit = send_buffer
        self._held: list[tuple[bytes, bool]] = []  # writes held back by a chaos pause
        self._held_bytes = 0
        self.last_id: str | None = None
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    # Framing, per transport -------------------------------------------------------------------
    def frame(self, event: Event) -> bytes:
        """The bytes that carry ``event`` on this transport (cache them on the event)."""
        raise NotImplementedError

    def overflow_signal(self) -> bytes:
        """The last bytes written to a subscriber ended for falling behind."""
        return b""

    # Bus sink ----------------------------------------------------------------------------------
    def deliver(self, event: Event) -> None:
        if self.done.done():
            return
        self.last_id = event.id
        self.counters.events += 1
        data = self.frame(event)
        is_end = event.type == END
        if self._chaos.active:
            self._slow_send(data, is_end)
            return
        self.write(data)
        if is_end:
            self.finish(END_OF_STREAM)

    def close(self, reason: str) -> None:
        self.finish(SHUTDOWN)

    # Writing -----------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Write bytes to the socket now; a failed write ends the connection, once."""
        transport = self._transport
        if transport.is_closing():
            self.finish(LOST)
            return
        transport.write(data)
        self.counters.bytes += len(data)
        if transport.get_write_buffer_size() > self._limit:
            self.overflow()

    def overflow(self) -> None:
        """End a subscriber that fell more than ``send_buffer`` bytes behind."""
        if self.done.done():
            return
        log.warning(
            "%s connection %d on %r overflowed its %d-byte buffer; ending it (resume from %s)",
            self.transport,
            self.id,
            self.channel,
            self._limit,
            self.last_id,
        )
        self.counters.overflows += 1
        signal = self.overflow_signal()
        if signal and not self._transport.is_closing():
            self._transport.write(signal)
            self.counters.bytes += len(signal)
        self.finish(OVERFLOW)
        self._transport.close()
        # close() waits to flush; a client that never reads would keep the buffer for ever.
        asyncio.get_running_loop().call_later(ABORT_GRACE_S, self._transport.abort)

    def finish(self, reason: str) -> None:
        """Mark the connection ended; the handler wakes up and closes it accordingly."""
        if not self.done.done():
            self.done.set_result(reason)

    def shutdown(self) -> None:
        self.finish(SHUTDOWN)

    def drop(self) -> None:
        self.finish(DROPPED)
        self._transport.abort()

    # Chaos slow path ---------------------------------------------------------------------------
    def _slow_send(self, data: bytes, is_end: bool) -> None:
        if self._chaos.paused:
            self._held.append((data, is_end))
            self._held_bytes += len(data)
            if self._held_bytes > self._limit:
                self._held.clear()
                self.overflow()
        elif self._chaos.write_delay > 0:
            asyncio.get_running_loop().call_later(
                self._chaos.write_delay, self._late_write, data, is_end
            )
        else:
            self._late_write(data, is_end)

    def _late_write(self, data: bytes, is_end: bool) -> None:
        if self.done.done():
            return
        self.write(data)
        if is_end:
            self.finish(END_OF_STREAM)

    def release_held(self) -> None:
        """Send what a chaos pause held back (called when the pause ends)."""
        held, self._held, self._held_bytes = self._held, [], 0
        for data, is_end in held:
            self._slow_send(data, is_end)
