"""The fan-out hot path of the streaming transports: one bus sink per channel and framing.

Every SSE (or WebSocket) connection to a channel receives the same bytes. So instead of one bus
sink per connection, a :class:`Broadcast` is the channel's only sink for that framing: it frames
each event once, and writes the one byte string to every member's socket in a plain loop, with
no Python call per member beyond the transport's own ``write``. Accounting is aggregated too:
the broadcast counts what it wrote once per flush, and each member's share is derived from where
it joined (:meth:`StreamConnection.totals`), not paid per write.

Coalescing: events reaching the broadcast are written at the next turn of the event loop, all
that arrived by then in one write per member (a broadcast of at most :data:`AT_ONCE` members,
a chat read by its one user, writes each event at once instead). At low load that is one
event per write, as soon as the loop is free, so latency is untouched; when the server falls
behind (a fan-out takes longer than the gap between events), several events share one write,
which is what keeps the kernel's per-write cost from growing with the backlog. ``coalesce_ms``
adds a bounded window on top, used only while the server is behind: the previous flush took
longer than the window *and* longer than events are apart (a moving average), so that the next
event would have queued behind it anyway. A fan-out that finishes before the next event is due
is never delayed, however many members it has.

A member that is not *steady* (still replaying history, catching up a backlog, or under a chaos
fault) gets the events one by one through its ``deliver``, which knows how to pace, hold or delay
them.

Joining: a connection is first attached to the channel on its own (:meth:`Bus.attach`, where the
hub joins its history and the live events without gap or duplicate), and then, in the same step
of the event loop, moved into the broadcast at the position it reached. No history is read here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final, Protocol

from realtime_lab.bus import After, Bus
from realtime_lab.bus.hub import Attachment
from realtime_lab.errors import BusError
from realtime_lab.protocol.cursor import LIVE, Cursor
from realtime_lab.protocol.envelope import END, Event
from realtime_lab.transports.chaos import Chaos
from realtime_lab.transports.outlet import Outlet

log = logging.getLogger("realtime_lab.server")

MAX_JOIN_ROUNDS: Final = 5
#: Weight of the newest gap in the moving average of the time between events.
GAP_WEIGHT: Final = 0.125

Frame = Callable[[Event], bytes]
#: Members written per loop turn in one fan-out (about 1 ms of writes): a larger fan-out lets the
#: loop serve other work between its slices.
SLICE: Final = 128
#: A broadcast of at most this many members writes each event at once; a larger one at the next
#: loop turn, so that events arriving together share one write per member.
AT_ONCE: Final = 4


class _FanOut:
    """A fan-out under way: who, how far, what."""

    __slots__ = ("ahead", "data", "events", "members", "next")

    def __init__(
        self,
        members: tuple[Member, ...],
        next: int,
        events: list[Event],
        data: bytes,
        ahead: dict[int, int],
    ) -> None:
        self.members = members
        self.next = next
        self.events = events
        self.data = data
        self.ahead = ahead

    def pending(self) -> tuple[Member, ...]:
        return self.members[self.next :]


class Member(Outlet, Protocol):
    """What a broadcast needs of a connection it writes for."""

    @property
    def id(self) -> int:
        """Unique among the process's connections."""
        ...

    @property
    def steady(self) -> bool:
        """``True`` while the broadcast may write for it (nothing queued, held or delayed)."""
        ...

    last_id: str | None

    def deliver(self, event: Event) -> None:
        """Take one event on its own (replay, backlog, chaos)."""

    def start_replay(self) -> None:
        """What it is given from now on is history: pace it."""

    def end_replay(self) -> None:
        """What it is given from now on is live."""

    def join(self, group: Broadcast) -> None:
        """It has become a member of ``group``."""

    def leave(self, group: Broadcast) -> None:
        """It is no longer a member of ``group``."""

    def rebase(self) -> None:
        """It was sent the last flush event by event: none of its shared count is its share."""

    def finish_stream(self, reason: str = "done") -> None:
        """The channel's ``end`` (``reason``: done, cancelled, error) was written to it."""

    def close(self, reason: str) -> None:
        """The channel ended under it."""


class Broadcast:
    """All steady connections of one framing on one channel (see the module docstring)."""

    def __init__(
        self,
        owner: Broadcasts,
        channel: str,
        key: str,
        frame: Frame,
    ) -> None:
        self._owner = owner
        self.channel = channel
        self.key = key
        self.frame = frame
        self.members: dict[int, Member] = {}
        self.pending: list[Event] = []
        # Members that have events the broadcast has not written yet: id -> the seq they have.
        self._ahead: dict[int, int] = {}
        self._handle: asyncio.Handle | None = None  # a delayed flush (coalescing window)
        self._scheduled = False  # a flush is due: delayed, or in the owner's next batch
        self._rest: _FanOut | None = None  # a fan-out written a slice per loop turn
        self._started = 0.0
        self._slow_flush = False  # behind: the last flush outlasted the window and the gap
        self._gap = 1.0  # moving average of the seconds between events (starts slow)
        self._last_event_at = time.perf_counter()
        self.attachment: Attachment | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # What one steady member has been written since the broadcast began: members derive
        # their own counters from these (see StreamConnection.totals).
        self.stream_events = 0
        self.stream_bytes = 0
        self.last_id: str | None = None
        self.closed = False

    # Bus sink ----------------------------------------------------------------------------------
    def deliver(self, event: Event) -> None:
        owner = self._owner
        if owner.window > 0:  # the pace of events only matters to the coalescing window
            now = time.perf_counter()
            self._gap += (now - self._last_event_at - self._gap) * GAP_WEIGHT
            self._last_event_at = now
        self.pending.append(event)
        if not self._scheduled:
            if len(self.members) <= AT_ONCE and owner.window == 0 and self._rest is None:
                # A chat's own stream: write it now, in the publisher's call (a loop turn
                # later, under load, is what a token's latency would be made of).
                self.flush()
                return
            self._scheduled = True
            if owner.window > 0 and self._slow_flush:
                self._handle = asyncio.get_running_loop().call_later(owner.window, self.flush)
            else:
                owner.flush_soon(self)

    def close(self, reason: str) -> None:
        """The bus ended the channel (expired, bus closing): end every member."""
        rest = self._rest
        if rest is not None:  # the fan-out under way: the rest of it at once, now
            self._rest = None
            for conn in rest.pending():
                self._write_one(conn, rest.events, rest.data, rest.ahead)
            rest.next = len(rest.members)
        self.flush()
        for conn in tuple(self.members.values()):
            conn.close(reason)
        self._owner.forget(self)

    # Writing -----------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what is pending to every member: once, the same bytes for all steady ones.

        A fan-out to more than :data:`SLICE` members is written a slice per loop turn, so that
        requests (a publisher's next event, new subscribers) are served in between instead of
        waiting for the whole fan-out; what arrives meanwhile goes out together in the next one.
        """
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._scheduled = False
        if self._rest is not None:
            return  # a sliced fan-out is under way: pending events follow it (see _write_rest)
        events, self.pending = self.pending, []
        if not events:
            return
        timed = self._owner.window > 0
        if timed:
            self._started = time.perf_counter()
        ahead = self._ahead
        if ahead:
            self._ahead = {cid: seq for cid, seq in ahead.items() if seq > events[-1].seq}
        members = tuple(self.members.values())
        last = events[-1]
        if self._owner.chaos.active:
            # Faults act per connection: every member takes the slow path.
            for conn in members:
                self._deliver_each(conn, events, ahead.get(conn.id))
            if timed:
                self._flushed()
            return
        frame = self.frame
        data = frame(last) if len(events) == 1 else b"".join(frame(e) for e in events)
        # Counted before writing: a member that leaves before its slice is written first
        # (remove), so every member's share of this count is what it was sent.
        self.stream_events += len(events)
        self.stream_bytes += len(data)
        self.last_id = last.id
        if len(members) > SLICE:
            self._rest = _FanOut(members, 0, events, data, ahead)
            self._write_rest()
            return
        for conn in members:  # the usual fan-out: all of it now
            self._write_one(conn, events, data, ahead)
        if timed:
            self._flushed()

    def _write_rest(self) -> None:
        """Write the next slice of the fan-out under way; schedule the one after, or finish."""
        rest = self._rest
        if rest is None:
            return
        members, stop = rest.members, min(rest.next + SLICE, len(rest.members))
        start, rest.next = rest.next, stop
        for i in range(start, stop):
            self._write_one(members[i], rest.events, rest.data, rest.ahead)
        if stop < len(members) and not self.closed:
            asyncio.get_running_loop().call_soon(self._write_rest)
            return
        self._rest = None
        if self._owner.window > 0:
            self._flushed()
        if self.pending and not self._scheduled and not self.closed:
            self._scheduled = True
            self._owner.flush_soon(self)

    def _write_one(
        self, conn: Member, events: list[Event], data: bytes, ahead: dict[int, int]
    ) -> None:
        if self.members.get(conn.id) is not conn:
            return  # it left (and was written its share then)
        last = events[-1]
        if conn.steady and conn.id not in ahead:
            transport = conn.socket
            if transport.is_closing():
                conn.lost()
                return
            transport.write(data)
            if transport.get_write_buffer_size() > conn.send_buffer:
                conn.last_id = last.id
                conn.overflow()
            elif last.type == END:
                conn.last_id = last.id
                conn.finish_stream(str(last.data.get("reason", "done")))
        else:
            self._deliver_each(conn, events, ahead.get(conn.id))
            # It counted these itself: none of this flush's shared count is its share.
            conn.rebase()

    def _flushed(self) -> None:
        elapsed = time.perf_counter() - self._started
        self._slow_flush = elapsed > self._owner.window and elapsed > self._gap

    @staticmethod
    def _deliver_each(conn: Member, events: list[Event], after_seq: int | None) -> None:
        for event in events:
            if after_seq is None or event.seq > after_seq:
                conn.deliver(event)

    # Membership --------------------------------------------------------------------------------
    def add(self, conn: Member, epoch: str | None, seq: int) -> bool:
        """Let ``conn``, which has every event up to ``<epoch>-<seq>``, follow the broadcast.

        Returns:
            ``False`` when the broadcast stands elsewhere (another channel life, or past
            ``seq``): attach the connection again from where it is, then retry.
        """
        own_epoch, own_seq = (None, 0) if self.attachment is None else self.attachment.position
        if own_epoch is not None and (epoch != own_epoch or seq < own_seq):
            return False
        if seq > own_seq or self.pending:
            self._ahead[conn.id] = seq
        self.members[conn.id] = conn
        conn.join(self)
        return True

    def remove(self, conn: Member) -> None:
        """Stop writing to ``conn``. Idempotent; the last one out detaches from the bus."""
        rest = self._rest
        if rest is not None and self.members.get(conn.id) is conn and conn in rest.pending():
            self._write_one(conn, rest.events, rest.data, rest.ahead)  # its share, before it goes
        if self.members.pop(conn.id, None) is not None:
            conn.leave(self)
            self._ahead.pop(conn.id, None)
        if not self.members:
            self._owner.forget(self)


class Broadcasts:
    """The broadcasts of one app: ``attach`` a streaming connection to a channel through them."""

    def __init__(self, bus: Bus, chaos: Chaos, coalesce_ms: float = 0.0) -> None:
        self.bus = bus
        self.chaos = chaos
        self.window = max(coalesce_ms, 0.0) / 1000.0
        self._groups: dict[tuple[str, str], Broadcast] = {}
        # Broadcasts with events to write at the next loop turn, flushed by one callback: a
        # pacer wake publishes to many chats at once, one loop handle serves them all.
        self._due: list[Broadcast] = []
        self._due_handle: asyncio.Handle | None = None

    def flush_soon(self, group: Broadcast) -> None:
        """Flush ``group`` at the next turn of the event loop, with every other one due then."""
        self._due.append(group)
        if self._due_handle is None:
            self._due_handle = asyncio.get_running_loop().call_soon(self._flush_due)

    def _flush_due(self) -> None:
        self._due_handle = None
        due, self._due = self._due, []
        for group in due:
            if group._scheduled and not group.closed:
                try:
                    group.flush()
                except Exception:
                    # One broken broadcast must not cost the others their flush.
                    log.exception("flushing %r failed", group.channel)

    def __len__(self) -> int:
        return len(self._groups)

    async def attach(
        self, conn: Member, channel: str, after: After, key: str, frame: Frame
    ) -> Broadcast:
        """Replay ``after`` to ``conn``, then make it a member of the channel's broadcast.

        The replay goes through ``conn.deliver`` (paced by the connection); the hub joins it to
        the live events, and the connection moves into the broadcast where it then stands.
        Call ``broadcast.remove(conn)`` when the connection ends.
        """
        for _ in range(MAX_JOIN_ROUNDS):
            group = await self._group(channel, key, frame)
            conn.start_replay()
            try:
                attachment = await self.bus.attach(channel, after, conn)
            except BaseException:
                if not group.members:
                    self.forget(group)
                raise
            finally:
                conn.end_replay()
            epoch, seq = attachment.position
            attachment.detach()
            if conn.done.done() or group.closed or group.add(conn, epoch, seq):
                return group
            if epoch is None:  # pragma: no cover - an attach always leaves a position
                break
            after = Cursor(epoch, seq)
        raise BusError(f"could not catch up with {channel!r}: it moves faster than replays")

    async def _group(self, channel: str, key: str, frame: Frame) -> Broadcast:
        group = self._groups.get((channel, key))
        if group is None:
            group = self._groups[(channel, key)] = Broadcast(self, channel, key, frame)
            try:
                group.attachment = await self.bus.attach(channel, LIVE, group)
            except BaseException as exc:
                self.forget(group)
                if not group.ready.done():
                    group.ready.set_exception(exc)
                    group.ready.exception()  # retrieved: the waiters below re-raise it
                raise
            group.ready.set_result(None)
        else:
            await asyncio.shield(group.ready)
        return group

    def forget(self, group: Broadcast) -> None:
        """Drop a broadcast that has no members (or whose channel ended). Idempotent."""
        if self._groups.get((group.channel, group.key)) is group:
            del self._groups[(group.channel, group.key)]
        if not group.closed:
            group.closed = True
            if group.attachment is not None:
                group.attachment.detach()
                group.attachment = None
            if group._handle is not None:
                group._handle.cancel()
                group._handle = None
            group._scheduled = False

    def close(self) -> None:
        """Forget every broadcast (at shutdown, after their members ended)."""
        for group in tuple(self._groups.values()):
            self.forget(group)
        if self._due_handle is not None:
            self._due_handle.cancel()
            self._due_handle = None
        self._due.clear()
