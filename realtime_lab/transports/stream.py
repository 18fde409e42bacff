"""The write path shared by the two streaming transports (SSE and WebSocket).

A :class:`StreamConnection` writes an event's pre-encoded bytes (cached on the event, identical
for every subscriber) straight to the socket's transport. In steady state it does not even do
that itself: its channel's :class:`~realtime_lab.transports.broadcast.Broadcast` writes the same
bytes to every steady member in one loop (see that module). :meth:`deliver` is the per-connection
path, for history replays, catch-up backlogs and chaos faults. There is no queue and no task per
subscriber on the hot path.

Overflow policy: asyncio buffers what the kernel will not take yet. When that buffer passes
``send_buffer`` bytes the client is not keeping up; the connection is then ended with a clear
signal (an SSE ``error`` event / WebSocket close 1013, both naming the id to resume from) and the
socket is closed, and aborted after a short grace if the client never reads it. Memory per
subscriber is therefore bounded by ``send_buffer`` plus one event, whatever the client does.

Catching up: the history a resuming client asks for is not its fault, and may be far larger than
``send_buffer``. The replay that ``bus.attach`` delivers (between :meth:`start_replay` and
:meth:`end_replay`) is written only as fast as the client takes it: what does not fit under half
of ``send_buffer`` waits as references to the bus's own events and is written by a short-lived
task as the socket drains. Live events that arrive meanwhile queue behind it, and it is their
lag, not the replay's size, that ``send_buffer`` bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from typing import TYPE_CHECKING, Final

from aiohttp import web

from realtime_lab.protocol.envelope import END, Event
from realtime_lab.transports.common import Counters, Hub, LiveConnection
from realtime_lab.transports.faults import Chaos

if TYPE_CHECKING:
    from realtime_lab.transports.broadcast import Broadcast

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

    __slots__ = (
        "_backlog",
        "_backlog_live",
        "_backlog_replay",
        "_catch_up",
        "_chaos",
        "_delay_timer",
        "_delayed",
        "_delayed_bytes",
        "_drain",
        "_fast_from",
        "_held",
        "_held_bytes",
        "_hub",
        "_limit",
        "_replaying",
        "_transport",
        "done",
        "group",
        "last_id",
        "limit",
        "steady",
        "transport_",
    )

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
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Without a cap, Linux grows a socket's send buffer to megabytes (4 MB on loopback)
            # before asyncio's buffer, which send_buffer bounds, even starts to fill: a stalled
            # client would hold that much kernel memory, uncounted. Cap it at send_buffer too.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self.transport_ = transport  # the broadcast writes to it directly
        self.limit = send_buffer
        # Pause (and so wake the catch-up writer's drain) at half the overflow limit.
        transport.set_write_buffer_limits(high=max(send_buffer // 2, 1))
        self._drain = request._payload_writer.drain
        self._hub = hub
        self._chaos = chaos
        self._limit = send_buffer
        # Writes held back by a chaos pause: (bytes, event id, is_end).
        self._held: list[tuple[bytes, str, bool]] = []
        self._held_bytes = 0
        # Writes a chaos delay holds, oldest first: (due time, bytes, event id, is_end). One
        # timer drains them in order, so changing the delay never lets a newer write overtake.
        self._delayed: deque[tuple[float, bytes, str, bool]] | None = None  # made when needed
        self._delay_timer: asyncio.TimerHandle | None = None
        self._delayed_bytes = 0
        # Events accepted while catching up and not written yet, oldest first.
        self._backlog: deque[Event] | None = None  # made when needed: idle connections are many
        self._backlog_replay = 0  # how many at the head of the backlog came from the replay
        self._backlog_live = 0  # frame bytes of the live events in the backlog
        self._replaying = False
        self._catch_up: asyncio.Task[None] | None = None
        self.last_id: str | None = None  # of the last event written: where to resume from
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        # Broadcast membership: while steady, the broadcast writes for us and counts once for
        # all members; our share is what it counted since ``_fast_from``.
        self.group: Broadcast | None = None
        self.steady = False
        self._fast_from: tuple[int, int] | None = None

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
        if self._backlog or (
            self._replaying and self._transport.get_write_buffer_size() > self._limit // 2
        ):
            self._queue(event)
        else:
            self._send(event)

    def _send(self, event: Event) -> None:
        self.counters.events += 1
        data = self.frame(event)
        is_end = event.type == END
        if self._chaos.active or self._delayed:
            self._slow_send(data, event.id, is_end)
            return
        self.last_id = event.id
        self.write(data)
        if is_end:
            self.finish(END_OF_STREAM)

    def close(self, reason: str) -> None:
        self.finish(SHUTDOWN)

    # Broadcast membership ----------------------------------------------------------------------
    def join(self, group: Broadcast) -> None:
        """Called by the broadcast when this connection becomes a member."""
        self.group = group
        self._update_steady()

    def leave(self, group: Broadcast) -> None:
        """Called by the broadcast when this connection stops being a member."""
        self._fold()
        self.steady = False
        self.group = None

    def _update_steady(self) -> None:
        steady = self.group is not None and not (
            self._replaying or self._backlog or self._delayed or self._held or self.done.done()
        )
        if steady and not self.steady:
            group = self.group
            assert group is not None
            self._fast_from = (group.stream_events, group.stream_bytes)
            self.steady = True
        elif not steady and self.steady:
            self._fold()
            self.steady = False

    def _fold(self) -> None:
        """Take our share of what the broadcast wrote for us into our own counters."""
        group, since = self.group, self._fast_from
        if group is not None and since is not None:
            events = group.stream_events - since[0]
            self.counters.events += events
            self.counters.bytes += group.stream_bytes - since[1]
            if events and group.last_id is not None:
                self.last_id = group.last_id
            self._fast_from = (group.stream_events, group.stream_bytes)
        if not self.steady:
            self._fast_from = None

    def rebase(self) -> None:
        """Count nothing of the last flush for us: we were sent it event by event."""
        if self._fast_from is not None and self.group is not None:
            self._fast_from = (self.group.stream_events, self.group.stream_bytes)

    def totals(self) -> Counters:
        if self._fast_from is None or self.group is None:
            return self.counters
        total = Counters()
        total.add(self.counters)
        total.events += self.group.stream_events - self._fast_from[0]
        total.bytes += self.group.stream_bytes - self._fast_from[1]
        return total

    def lost(self) -> None:
        """The socket is gone: end the connection."""
        self.finish(LOST)

    def finish_stream(self) -> None:
        """The channel's ``end`` was written: end the connection cleanly."""
        self.finish(END_OF_STREAM)

    # Catching up -------------------------------------------------------------------------------
    def start_replay(self) -> None:
        """Call right before ``bus.attach``; then :meth:`end_replay` once it returns.

        What the bus replays in between is written as the client reads it rather than all at
        once. A new replay (a WebSocket ``resume``) supersedes whatever was still queued.
        """
        if self._backlog is not None:
            self._backlog.clear()  # the same deque a running catch-up task reads
        self._backlog_replay = self._backlog_live = 0
        self._replaying = True
        self._update_steady()

    def end_replay(self) -> None:
        """The attach returned: events from now on are live (see :meth:`start_replay`)."""
        self._replaying = False
        self._update_steady()

    def discard(self) -> None:
        """Stop writing queued events (the handler is leaving). Idempotent."""
        if self._backlog is not None:
            self._backlog.clear()
        if self._catch_up is not None:
            self._catch_up.cancel()

    def _queue(self, event: Event) -> None:
        if self._backlog is None:
            self._backlog = deque()
        self._backlog.append(event)
        if self.steady:
            self._update_steady()
        if self._replaying:
            self._backlog_replay += 1
        else:
            self._backlog_live += len(self.frame(event))
            if self._backlog_live > self._limit:
                self._backlog.clear()
                self.overflow()
                return
        if self._catch_up is None:
            self._catch_up = asyncio.create_task(
                self._write_backlog(), name=f"{self.transport}-catch-up-{self.id}"
            )

    async def _write_backlog(self) -> None:
        backlog = self._backlog
        assert backlog is not None
        try:
            while backlog and not self.done.done():
                if self._transport.is_closing():
                    self.finish(LOST)
                elif self._transport.get_write_buffer_size() > self._limit // 2:
                    await self._drain()  # the transport paused above that mark: wait for room
                else:
                    event = backlog.popleft()
                    if self._backlog_replay:
                        self._backlog_replay -= 1
                    else:
                        self._backlog_live -= len(self.frame(event))
                    self._send(event)
        except ConnectionError:
            self.finish(LOST)
        finally:
            self._catch_up = None
            self._update_steady()

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
            self._update_steady()

    def shutdown(self) -> None:
        self.finish(SHUTDOWN)

    def drop(self) -> None:
        self.finish(DROPPED)
        self._transport.abort()

    # Chaos slow path ---------------------------------------------------------------------------
    def _slow_send(self, data: bytes, event_id: str, is_end: bool) -> None:
        if self._chaos.paused:
            self._held.append((data, event_id, is_end))
            self._held_bytes += len(data)
            self._update_steady()
            if self._held_bytes > self._limit:
                self._held.clear()
                self.overflow()
        elif self._chaos.write_delay > 0 or self._delayed:
            loop = asyncio.get_running_loop()
            if self._delayed is None:
                self._delayed = deque()
            self._delayed.append((loop.time() + self._chaos.write_delay, data, event_id, is_end))
            self._delayed_bytes += len(data)
            self._update_steady()
            if self._delayed_bytes > self._limit:
                self._delayed = None
                self._delayed_bytes = 0
                self.overflow()
            elif self._delay_timer is None:
                self._delay_timer = loop.call_at(self._delayed[0][0], self._write_delayed)
        else:
            self._late_write(data, event_id, is_end)

    def _write_delayed(self) -> None:
        self._delay_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            _, data, event_id, is_end = delayed.popleft()
            self._delayed_bytes -= len(data)
            self._late_write(data, event_id, is_end)
        if self.done.done() or not delayed:
            self._delayed = None
        else:
            self._delay_timer = loop.call_at(delayed[0][0], self._write_delayed)
        self._update_steady()

    def _late_write(self, data: bytes, event_id: str, is_end: bool) -> None:
        if self.done.done():
            return
        self.last_id = event_id
        self.write(data)
        if is_end:
            self.finish(END_OF_STREAM)

    def release_held(self) -> None:
        """Send what a chaos pause held back (called when the pause ends)."""
        held, self._held, self._held_bytes = self._held, [], 0
        for data, event_id, is_end in held:
            self._slow_send(data, event_id, is_end)
        self._update_steady()
