"""The write path shared by the two streaming transports (SSE and WebSocket).

A :class:`StreamConnection` writes an event's pre-encoded bytes (cached on the event, identical
for every subscriber) straight to the socket's transport. In steady state it does not even do
that itself: its channel's :class:`~realtime_lab.transports.broadcast.Broadcast` writes the same
bytes to every steady member in one loop (see that module), and the connection's counters are
its share of what the broadcast counted. :meth:`deliver` is the per-connection path, for history
replays (paced by :class:`~realtime_lab.transports.backlog.Backlog`) and chaos faults
(:class:`~realtime_lab.transports.faultpath.FaultPath`). There is no queue and no task per
subscriber on the hot path.

Overflow policy: asyncio buffers what the kernel will not take yet. When that buffer passes
``send_buffer`` bytes the client is not keeping up; the connection is then ended with a clear
signal (an SSE ``error`` event / WebSocket close 1013, both naming the id to resume from) and the
socket is closed, and aborted after a short grace if the client never reads it. Memory per
subscriber is therefore bounded by ``send_buffer`` plus one event, whatever the client does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Final

from aiohttp import web

from realtime_lab.protocol.envelope import END, Event
from realtime_lab.transports.accounting import Counters, LiveConnection
from realtime_lab.transports.backlog import Backlog
from realtime_lab.transports.broadcast import Broadcast
from realtime_lab.transports.chaos import Chaos
from realtime_lab.transports.faultpath import FaultPath

log = logging.getLogger("realtime_lab.server")

#: Why a streaming connection ended.
END_OF_STREAM: Final = "end"
SHUTDOWN: Final = "shutdown"
TIMEOUT: Final = "timeout"
OVERFLOW: Final = "overflow"
DROPPED: Final = "drop"
LOST: Final = "lost"
#: The bus could not attach the stream (Redis unreachable, the channel cap): the client retries.
UNAVAILABLE: Final = "unavailable"
ABORT_GRACE_S: Final = 2.0
#: Every way a stream can end, as counted per transport in ``/metrics``.
OUTCOMES: Final = (
    "done",
    "cancelled",
    "error",
    "timeout",
    "client-gone",
    "overflow",
    "shutdown",
    "unavailable",
)
_OUTCOME_OF: Final = {
    SHUTDOWN: "shutdown",
    TIMEOUT: "timeout",
    OVERFLOW: "overflow",
    UNAVAILABLE: "unavailable",
    DROPPED: "client-gone",  # a chaos cut looks like a network failure: the client is gone
    LOST: "client-gone",
}


class StreamConnection(LiveConnection):
    """A streaming connection fed by the bus; subclasses say how an event is framed."""

    __slots__ = (
        "_backlog",
        "_chaos",
        "_corked",
        "_corked_size",
        "_fast_from",
        "_faults",
        "_replaying",
        "_writer",
        "done",
        "end_reason",
        "group",
        "last_id",
        "problem",
        "send_buffer",
        "socket",
        "steady",
    )

    def __init__(
        self,
        request: web.Request,
        channel: str,
        client: str | None,
        chaos: Chaos,
        send_buffer: int,
    ) -> None:
        super().__init__(channel, client)
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away before the stream started")
        self.socket: asyncio.Transport = transport  # the broadcast writes to it directly
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Without a cap, Linux grows a socket's send buffer to megabytes (4 MB on loopback)
            # before asyncio's buffer, which send_buffer bounds, even starts to fill: a stalled
            # client would hold that much kernel memory, uncounted. Cap it at send_buffer too.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self.send_buffer = send_buffer
        # Pause (and so wake the catch-up writer's drain) at half the overflow limit.
        transport.set_write_buffer_limits(high=max(send_buffer // 2, 1))
        # The writer, not its bound drain: idle connections are many, and few ever queue.
        self._writer = request._payload_writer
        self._chaos = chaos
        # Made when needed: idle connections are many.
        self._faults: FaultPath | None = None
        self._backlog: Backlog | None = None
        self._replaying = False
        # A replay's writes, joined into one socket write when it ends (see start_replay).
        self._corked: list[bytes] | None = None
        self._corked_size = 0
        self.end_reason: str | None = None  # the channel's end (done, cancelled, error)
        self.last_id: str | None = None  # of the last event written: where to resume from
        self.problem = ""  # why the bus could not serve it (see fail)
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

    def wire(self, event: Event) -> bytes:
        """The bytes :meth:`send` writes for ``event``, called once per event in write order:
        :meth:`frame`, unless the connection compresses with a context of its own (then
        :meth:`frame` is only the size the backlog estimates with)."""
        return self.frame(event)

    def overflow_signal(self) -> bytes:
        """The last bytes written to a subscriber ended for falling behind."""
        return b""

    def problem_signal(self, code: str, message: str) -> bytes:
        """The last event written to a stream that could not be served (:meth:`fail`); none
        where the close itself says it (a WebSocket's close code and reason)."""
        return b""

    # Bus sink ----------------------------------------------------------------------------------
    def deliver(self, event: Event) -> None:
        if self.done.done():
            return
        if self._backlog or (
            self._replaying
            and self.socket.get_write_buffer_size() + self._corked_size > self.send_buffer // 2
        ):
            self._queue(event)
        else:
            self.send(event)

    def send(self, event: Event) -> None:
        """Write one event now (or hand it to the chaos slow path)."""
        self.counters.events += 1
        data = self.wire(event)
        is_end = event.type == END
        if is_end:
            self.end_reason = str(event.data.get("reason", "done"))
        if self._chaos.active or (self._faults is not None and self._faults.busy):
            if self._faults is None:
                self._faults = FaultPath(self, self._chaos)
            self._faults.send(data, event.id, is_end)
            return
        self.write_event(data, event.id, is_end)

    def write_event(self, data: bytes, event_id: str, is_end: bool) -> None:
        """Write one event's bytes; after ``end`` the connection is over."""
        self.last_id = event_id
        self.write(data)
        if is_end:
            self.finish(END_OF_STREAM)

    def close(self, reason: str) -> None:
        self.finish(SHUTDOWN)

    # Broadcast membership ----------------------------------------------------------------------
    def join(self, group: Broadcast) -> None:
        """Called by the broadcast when this connection becomes a member."""
        self.group = group
        self.update_steady()

    def leave(self, group: Broadcast) -> None:
        """Called by the broadcast when this connection stops being a member."""
        self._fold()
        self.steady = False
        self.group = None

    def update_steady(self) -> None:
        """Let the broadcast write for us exactly while nothing of ours is queued or held."""
        faults = self._faults
        steady = self.group is not None and not (
            self._replaying
            or self._backlog
            or (faults is not None and faults.busy)
            or self.done.done()
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

    def finish_stream(self, reason: str = "done") -> None:
        """The channel's ``end`` (``reason``) was written: end the connection cleanly."""
        self.end_reason = reason
        self.finish(END_OF_STREAM)

    def outcome(self) -> str:
        """How the stream ended, one word (see :data:`OUTCOMES`); call once it is over."""
        reason = self.done.result() if self.done.done() else LOST
        if reason == END_OF_STREAM:
            return self.end_reason or "done"
        return _OUTCOME_OF[reason]

    # Catching up -------------------------------------------------------------------------------
    def start_replay(self) -> None:
        """Call right before ``bus.attach``; then :meth:`end_replay` once it returns.

        What the bus replays in between is written as the client reads it rather than all at
        once. A new replay (a WebSocket ``resume``) supersedes whatever was still queued.
        """
        if self._backlog is not None:
            self._backlog.clear()
        self._replaying = True
        # The bus gives the whole history in one step of the loop: one write for all of it
        # (a late reader of a chat gets its answer so far in one syscall, not one per token).
        if self._corked is None:
            self._corked = []
        self.update_steady()

    def end_replay(self) -> None:
        """The attach returned: events from now on are live (see :meth:`start_replay`)."""
        self._uncork()
        self._replaying = False
        self.update_steady()

    def discard(self) -> None:
        """Stop writing queued events (the handler is leaving). Idempotent."""
        if self._backlog is not None:
            self._backlog.stop()

    def _queue(self, event: Event) -> None:
        if self._backlog is None:
            name = f"{self.transport}-catch-up-{self.id}"
            self._backlog = Backlog(self, self._writer.drain, name)
        self._backlog.add(event, replayed=self._replaying)
        if self.steady:
            self.update_steady()

    # Writing -----------------------------------------------------------------------------------
    def _uncork(self) -> None:
        corked = self._corked
        if corked is None:
            return
        self._corked, self._corked_size = None, 0
        if corked:
            self.counters.bytes -= sum(len(piece) for piece in corked)  # write() counts them
            self.write(corked[0] if len(corked) == 1 else b"".join(corked))

    def write(self, data: bytes) -> None:
        """Write bytes to the socket now; a failed write ends the connection, once."""
        if self._corked is not None:
            self._corked.append(data)
            self._corked_size += len(data)
            self.counters.bytes += len(data)
            return
        transport = self.socket
        if transport.is_closing():
            self.finish(LOST)
            return
        transport.write(data)
        self.counters.bytes += len(data)
        if transport.get_write_buffer_size() > self.send_buffer:
            self.overflow()

    def overflow(self) -> None:
        """End a subscriber that fell more than ``send_buffer`` bytes behind."""
        self._uncork()  # its events before the signal (this may overflow it already)
        if self.done.done():
            return
        log.warning(
            "%s connection %d on %r overflowed its %d-byte buffer; ending it (resume from %s)",
            self.transport,
            self.id,
            self.channel,
            self.send_buffer,
            self.last_id,
        )
        self.counters.overflows += 1
        signal = self.overflow_signal()
        if signal and not self.socket.is_closing():
            self.socket.write(signal)
            self.counters.bytes += len(signal)
        self.finish(OVERFLOW)
        self.socket.close()
        # close() waits to flush; a client that never reads would keep the buffer for ever.
        asyncio.get_running_loop().call_later(ABORT_GRACE_S, self.socket.abort)

    def fail(self, code: str, message: str) -> None:
        """End a stream the bus could not serve: tell the client why; the handler then closes
        it cleanly (the client retries).

        For a failure once the response has started (its status can no longer say it): a
        ``bus-unavailable`` or ``too-many-channels`` from the attach. Logged once, no traceback.
        """
        if self.done.done():
            return
        log.warning(
            "%s connection %d on %r: %s (%s); ending it",
            self.transport,
            self.id,
            self.channel,
            message,
            code,
        )
        self.counters.errors += 1
        self.problem = f"{code}: {message}"
        signal = self.problem_signal(code, message)
        if signal:
            self.write(signal)
        self.finish(UNAVAILABLE)

    def finish(self, reason: str) -> None:
        """Mark the connection ended; the handler wakes up and closes it accordingly."""
        self._uncork()  # what was written before the end goes out before it
        if not self.done.done():
            self.done.set_result(reason)
            self.update_steady()

    def written_id(self) -> str | None:
        """The id of the last event written to this client: where it resumes from."""
        if self.steady and self.group is not None and self.group.last_id is not None:
            return self.group.last_id  # the broadcast wrote for us since we counted last
        return self.last_id

    def timeout_notice(self) -> bytes:
        """The bytes that tell the client its stream timed out (``--stream-timeout``)."""
        return b""

    def time_out(self) -> None:
        """The stream has been open ``--stream-timeout`` seconds: end it; the client resumes.

        The client is told with an ``end`` whose reason is ``timeout`` and whose id is null (it
        is not an event of the channel: resuming from the last real id loses nothing).
        """
        if self.done.done():
            return
        notice = self.timeout_notice()
        if notice and not self.socket.is_closing():
            self.write(notice)
        self.finish(TIMEOUT)

    def shutdown(self) -> None:
        self.finish(SHUTDOWN)

    def drop(self) -> None:
        self.finish(DROPPED)
        self.socket.abort()

    def release_held(self) -> None:
        """Send what a chaos pause held back (called when the pause ends)."""
        if self._faults is not None:
            self._faults.release_held()


#: The ends after which the handler closes the response cleanly (final chunk, close 1000/1001).
CLEAN_ENDS: Final = frozenset({END_OF_STREAM, SHUTDOWN, TIMEOUT})


def timeout_envelope(conn: StreamConnection) -> dict[str, object]:
    """The ``end`` a timed-out stream's client gets: not a channel event (no id)."""
    return {
        "channel": conn.channel,
        "id": None,
        "type": END,
        "data": {"reason": TIMEOUT, "resume_after": conn.written_id()},
        "ts": time.time() * 1000.0,
    }


def schedule_timeout(conn: StreamConnection, seconds: float) -> asyncio.TimerHandle | None:
    """End ``conn`` after ``seconds`` (``--stream-timeout``; ``0``: never). Cancel the handle
    when the stream ends first."""
    if seconds <= 0:
        return None
    return asyncio.get_running_loop().call_later(seconds, conn.time_out)
