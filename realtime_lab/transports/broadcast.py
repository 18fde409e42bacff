"""The fan-out hot path of the streaming transports: one bus sink per channel and framing.

Every SSE (or WebSocket) connection to a channel receives the same bytes. So instead of one bus
sink per connection, a :class:`Broadcast` is the channel's only sink for that framing: it frames
each event once, and writes the one byte string to every member's socket in a plain loop, with
no Python call per member beyond the transport's own ``write``. Accounting is aggregated too:
the broadcast counts what it wrote once per flush, and each member's share is derived from where
it joined (:meth:`StreamConnection.totals`), not paid per write.

Coalescing: events reaching the broadcast are written at the next turn of the event loop, all
that arrived by then in one write per member. At low load that is one event per write, as soon
as the loop is free, so latency is untouched; when the server falls behind (a fan-out takes
longer than the gap between events), several events share one write, which is what keeps the
kernel's per-write cost from growing with the backlog. ``coalesce_ms`` adds a bounded window on
top, used only while the server is behind: the previous flush took longer than the window *and*
longer than events are apart (a moving average), so that the next event would have queued behind
it anyway. A fan-out that finishes before the next event is due is never delayed, however many
members it has.

A member that is not *steady* (still replaying history, catching up a backlog, or under a chaos
fault) gets the events one by one through :meth:`StreamConnection.deliver`, which knows how to
pace, hold or delay them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from aiohttp import web

from realtime_lab.bus.base import Attachment, Bus
from realtime_lab.errors import BusError
from realtime_lab.protocol.cursor import LIVE, parse_id
from realtime_lab.protocol.envelope import END, Event
from realtime_lab.transports.faults import Chaos

if TYPE_CHECKING:
    from realtime_lab.bus.base import After
    from realtime_lab.transports.stream import StreamConnection

log = logging.getLogger("realtime_lab.server")

#: Events a broadcast remembers, so that a connection whose replay raced a publish can join.
RECENT: Final = 1024
MAX_JOIN_ROUNDS: Final = 5
#: Weight of the newest gap in the moving average of the time between events.
GAP_WEIGHT: Final = 0.125

Frame = Callable[[Event], bytes]


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
        self.members: dict[int, StreamConnection] = {}
        self.recent: deque[Event] = deque(maxlen=RECENT)
        self.pending: list[Event] = []
        self._fresh: dict[int, int] = {}  # joined while events were pending: id -> seq it has
        self._handle: asyncio.Handle | None = None
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
        now = time.perf_counter()
        self._gap += (now - self._last_event_at - self._gap) * GAP_WEIGHT
        self._last_event_at = now
        self.recent.append(event)
        self.pending.append(event)
        if self._handle is None:
            loop = asyncio.get_running_loop()
            window = self._owner.window
            if window > 0 and self._slow_flush:
                self._handle = loop.call_later(window, self.flush)
            else:
                self._handle = loop.call_soon(self.flush)

    def close(self, reason: str) -> None:
        """The bus ended the channel (expired, bus closing): end every member."""
        self.flush()
        for conn in tuple(self.members.values()):
            conn.close(reason)
        self._owner.forget(self)

    # Writing -----------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what is pending to every member: once, the same bytes for all steady ones."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        events, self.pending = self.pending, []
        if not events:
            return
        started = time.perf_counter()
        fresh, self._fresh = self._fresh, {}
        members = tuple(self.members.values())
        last = events[-1]
        if self._owner.chaos.active:
            # Faults act per connection: every member takes the slow path.
            for conn in members:
                self._deliver_each(conn, events, fresh.get(conn.id))
        else:
            frame = self.frame
            data = frame(last) if len(events) == 1 else b"".join(frame(e) for e in events)
            # Counted before writing: a member that leaves during the loop folds this flush in.
            self.stream_events += len(events)
            self.stream_bytes += len(data)
            self.last_id = last.id
            is_end = last.type == END
            for conn in members:
                if conn.steady and conn.id not in fresh:
                    transport = conn.transport_
                    if transport.is_closing():
                        conn.lost()
                        continue
                    transport.write(data)
                    if transport.get_write_buffer_size() > conn.limit:
                        conn.last_id = last.id
                        conn.overflow()
                    elif is_end:
                        conn.last_id = last.id
                        conn.finish_stream()
                else:
                    self._deliver_each(conn, events, fresh.get(conn.id))
                    # It counted these itself: none of this flush's shared count is its share.
                    conn.rebase()
        elapsed = time.perf_counter() - started
        self._slow_flush = elapsed > self._owner.window and elapsed > self._gap

    @staticmethod
    def _deliver_each(conn: StreamConnection, events: list[Event], after_seq: int | None) -> None:
        for event in events:
            if after_seq is None or event.seq > after_seq:
                conn.deliver(event)

    # Membership --------------------------------------------------------------------------------
    def add(self, conn: StreamConnection, epoch: str, seq: int) -> bool:
        """Let ``conn``, which has every event up to ``<epoch>-<seq>``, follow the broadcast.

        Returns:
            ``False`` when the broadcast cannot bridge the gap from that position (another
            epoch, or older than what it remembers): replay from the bus again, then retry.
        """
        recent = self.recent
        if recent:
            newest = recent[-1]
            if newest.id.rsplit("-", 1)[0] != epoch:
                return False
            if newest.seq > seq:
                if recent[0].seq > seq + 1:
                    return False
                for event in recent:
                    if event.seq > seq:
                        conn.deliver(event)
            seq = max(seq, newest.seq)
        if self.pending:
            self._fresh[conn.id] = seq
        self.members[conn.id] = conn
        conn.join(self)
        return True

    def remove(self, conn: StreamConnection) -> None:
        """Stop writing to ``conn``. Idempotent; the last one out detaches from the bus."""
        if self.members.pop(conn.id, None) is not None:
            conn.leave(self)
            self._fresh.pop(conn.id, None)
        if not self.members:
            self._owner.forget(self)


class Broadcasts:
    """The broadcasts of one app: ``attach`` a streaming connection to a channel through them."""

    def __init__(self, bus: Bus, chaos: Chaos, coalesce_ms: float = 0.0) -> None:
        self.bus = bus
        self.chaos = chaos
        self.window = max(coalesce_ms, 0.0) / 1000.0
        self._groups: dict[tuple[str, str], Broadcast] = {}

    def __len__(self) -> int:
        return len(self._groups)

    async def attach(
        self, conn: StreamConnection, channel: str, after: After, key: str, frame: Frame
    ) -> Broadcast:
        """Replay ``after`` to ``conn``, then make it a member of the channel's broadcast.

        The replay goes through ``conn.deliver`` (paced by the connection); the broadcast then
        bridges whatever was published meanwhile, so nothing is skipped or repeated at the seam.
        Call ``broadcast.remove(conn)`` when the connection ends.
        """
        group = await self._group(channel, key, frame)
        try:
            return await self._join(group, conn, channel, after)
        except BaseException:
            if not group.members:
                self.forget(group)
            raise

    async def _join(
        self, group: Broadcast, conn: StreamConnection, channel: str, after: After
    ) -> Broadcast:
        position: After = after
        for _ in range(MAX_JOIN_ROUNDS):
            if position == LIVE:
                # The group has everything from its own attach on; the client wants nothing older.
                newest = group.recent[-1] if group.recent else None
                info = None if newest is not None else await self.bus.info(channel)
                if newest is not None:
                    epoch, seq = newest.id.rsplit("-", 1)[0], newest.seq
                elif info is not None:
                    epoch, seq = info.epoch, info.last_seq
                else:
                    replay = await self.bus.replay(channel, LIVE)
                    cursor = parse_id(replay.cursor or "")
                    epoch, seq = cursor.epoch, cursor.seq
            else:
                replay = await self.bus.replay(channel, position)
                for event in replay.events:
                    conn.deliver(event)
                if replay.cursor is None:  # pragma: no cover - every backend gives a cursor
                    raise BusError(f"no position on {channel!r}")
                cursor = parse_id(replay.cursor)
                epoch, seq = cursor.epoch, cursor.seq
            if conn.done.done() or group.closed:
                return group
            if group.add(conn, epoch, seq):
                return group
            position = parse_id(f"{epoch}-{seq}")
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

    def close(self) -> None:
        """Forget every broadcast (at shutdown, after their members ended)."""
        for group in tuple(self._groups.values()):
            self.forget(group)


BROADCASTS_KEY: Final = web.AppKey("broadcasts", Broadcasts)
