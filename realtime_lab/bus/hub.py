"""The channel hub: one per process, over any broker; the only place the seam is built.

:class:`Bus` is what everything above the bus layer uses: ``publish``, ``replay``, ``attach``,
``subscribe``. It holds, per channel that has local sinks, one broker subscription and one
:class:`_Local`, which

- follows the channel's live feed: it checks that live events come one after the other (a hole
  means the broker lost some: it holds live events, reads the missing ones from history, and goes
  on), drops repeats, and notices a new channel life (an epoch change);
- fans each event out, synchronously, to its members (broadcast groups, long-poll waiters,
  subscriptions), each of which knows where it stands (``last``), so a member that joined with
  history reaching past the live feed skips what it already has;
- joins a new member without gap or duplicate: the member is added *held* (live events are
  buffered for it), its history is read, delivered, and the buffer is released after it.

No code here knows which broker runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any, Final

from realtime_lab.bus.base import (
    DEFAULT_QUEUE_SIZE,
    After,
    ChannelInfo,
    Replay,
    Sink,
    build_replay,
    epoch_of,
    is_live,
)
from realtime_lab.bus.broker import Broker
from realtime_lab.bus.subscription import Subscription
from realtime_lab.bus.tasks import Background
from realtime_lab.errors import BusClosed, BusError
from realtime_lab.protocol.cursor import Cursor, parse_id
from realtime_lab.protocol.envelope import Event

log = logging.getLogger(__name__)

#: Longest wait, in ``publish``, for this process's live feed to bring the new event back.
SETTLE_TIMEOUT: Final = 1.0
#: First and longest pause between attempts to catch a channel up from history.
RETRY_FIRST_S: Final = 0.05
RETRY_MAX_S: Final = 2.0
EXPIRED: Final = "channel expired"
#: Shortest pause between two ``retain`` calls, whatever the ttl.
RETAIN_MIN_S: Final = 0.05


class _Member:
    """One sink of a channel and where it stands in the channel's life."""

    __slots__ = ("buffer", "key", "last", "prefix", "sent", "sink")

    def __init__(self, sink: Sink, key: int) -> None:
        self.sink = sink
        self.key = key
        self.prefix = ""  # "<epoch>-" of the life it follows
        self.last = 0  # seq of the newest event it has (been given or skipped past)
        self.sent = False  # given any event yet
        self.buffer: list[Event] | None = []  # live events held while its history is read

    @property
    def epoch(self) -> str | None:
        return self.prefix[:-1] if self.prefix else None


class _Local:
    """This process's view of one channel (see the module docstring)."""

    __slots__ = (
        "holding",
        "members",
        "name",
        "next_key",
        "prefix",
        "ready",
        "release_task",
        "resync_task",
        "seen",
        "waiters",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: dict[int, _Member] = {}
        self.next_key = 0
        self.prefix = ""  # "<epoch>-" of the life followed; "" while unknown
        self.seen = 0  # seq of the newest live event fanned out
        # Live events held while the feed is caught up from history (or not set up yet).
        self.holding: list[Event] | None = []
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters: list[tuple[str, int, asyncio.Future[None]]] = []
        self.resync_task: asyncio.Task[None] | None = None
        self.release_task: asyncio.Task[None] | None = None

    @property
    def epoch(self) -> str | None:
        return self.prefix[:-1] if self.prefix else None

    def wake(self, epoch: str | None = None, seq: int = 0) -> None:
        """Resolve the publish waiters the feed has gone past (all of them without ``epoch``)."""
        keep = []
        for waiter in self.waiters:
            w_epoch, w_seq, future = waiter
            if epoch is None or w_epoch != epoch or w_seq <= seq:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append(waiter)
        self.waiters = keep


class Attachment:
    """A sink attached to a channel; :meth:`detach` it when done."""

    __slots__ = ("_bus", "_local", "_member")

    def __init__(self, bus: Bus, local: _Local, member: _Member) -> None:
        self._bus, self._local, self._member = bus, local, member

    @property
    def position(self) -> tuple[str | None, int]:
        """``(epoch, seq)`` of the newest event the sink has: where it stands now."""
        return self._member.epoch, self._member.last

    def detach(self) -> None:
        """Stop delivering to the sink (it is not told). Idempotent."""
        if self._local.members.pop(self._member.key, None) is not None:
            self._bus._release_soon(self._local)


class Bus:
    """The bus of one process: a broker and the channel hub over it (see the module docstring).

    Create one with :func:`realtime_lab.bus.create_bus`, ``await bus.start()`` it, and
    ``await bus.close()`` it on shutdown.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        broker.bind(self)
        self._locals: dict[str, _Local] = {}
        self._sub_lock = asyncio.Lock()
        self._background = Background()
        self._retainer: asyncio.Task[None] | None = None  # in _tasks: close() stops it
        self._closed = False

    @property
    def url(self) -> str:
        return self.broker.url

    async def start(self) -> None:
        """Connect the broker."""
        await self.broker.start()
        if self._retainer is None and not self._closed:
            self._retainer = self._background.spawn(self._retain_followed(), "bus-retain")

    async def _retain_followed(self) -> None:
        """Every ttl/3, tell the broker which channels this process follows: none is idle."""
        interval = max(self.broker.ttl / 3, RETAIN_MIN_S)
        while True:
            await asyncio.sleep(interval)
            if not self._locals:
                continue
            try:
                await self.broker.retain(tuple(self._locals))
            except (BusError, OSError) as exc:
                log.warning("keeping followed channels alive failed (%s); retrying", exc)

    @property
    def limits(self) -> Counter[str]:
        """Refusals so far by ``code`` (``too-many-channels``, ...): the broker's count."""
        return self.broker.limits

    async def put_ticket(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store a ticket record in the broker (:class:`~realtime_lab.auth.TicketStore`)."""
        self._check_open()
        await self.broker.put_ticket(key, value, ttl_s)

    async def take_ticket(self, key: str) -> bytes | None:
        """Atomically read and delete a ticket record; ``None`` when absent or expired."""
        self._check_open()
        return await self.broker.take_ticket(key)

    async def close(self) -> None:
        """End every sink (``close("bus closed")``) and release the broker."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._background.cancel_all()
        finally:
            for local in self._locals.values():
                local.wake()
                if not local.ready.done():
                    local.ready.cancel()
                self._end(local, tuple(local.members.values()), "bus closed")
            self._locals.clear()
            await self.broker.close()

    # Publish and read --------------------------------------------------------------------------
    async def publish(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        """Append an event to the channel's history and fan it out to the live sinks.

        Returns:
            The stored event, with its id and timestamp, once this process's sinks have it.
            Publishing ``end`` marks the channel finished: it expires ``ttl`` seconds later.
        """
        self._check_open()
        # Only a live feed set up before the broker call is sure to bring the event back.
        local = self._locals.get(channel)
        if local is not None and not local.ready.done():
            local = None
        event = await self.broker.publish(channel, type, data)
        if local is not None and self._locals.get(channel) is local:
            await self._settle(local, epoch_of(event.id), event.seq)
        return event

    @property
    def synchronous(self) -> bool:
        """Whether :meth:`publish_now` and :meth:`declare_now` work (the embedded broker)."""
        return self.broker.synchronous

    def publish_now(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        """:meth:`publish` from a plain callback, where :attr:`synchronous` is true.

        The broker hands the event to the live feed before it returns, so local sinks have it
        when this returns, as after :meth:`publish`.
        """
        self._check_open()
        return self.broker.publish_now(channel, type, data)

    def declare_now(self, channel: str, epoch: str | None = None) -> None:
        """:meth:`declare` from a plain callback, where :attr:`synchronous` is true."""
        self._check_open()
        self.broker.declare_now(channel, epoch)

    async def _settle(self, local: _Local, epoch: str, seq: int) -> None:
        """Wait (briefly) until the live feed has fanned event ``seq`` out to local sinks."""
        if local.epoch == epoch and local.seen >= seq:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        local.waiters.append((epoch, seq, future))
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):
                await future
        except TimeoutError:
            log.warning(
                "event %s-%s of %r not seen on the live feed in time", epoch, seq, local.name
            )
        finally:
            local.waiters = [w for w in local.waiters if w[2] is not future]

    async def replay(self, channel: str, after: After, limit: int | None = None) -> Replay:
        """The retained events after ``after``, a ``reset`` first when history cannot serve it."""
        self._check_open()
        history = await self.broker.read(channel, after, limit)
        return build_replay(history, after, limit)

    async def info(self, channel: str) -> ChannelInfo | None:
        """The channel's state, or ``None`` when the bus has never seen it (or it expired)."""
        if self._closed:
            return None
        info = await self.broker.info(channel)
        local = self._locals.get(channel)
        if info is not None and local is not None:
            info.subscribers = len(local.members)
        return info

    async def declare(self, channel: str, epoch: str | None = None) -> None:
        """Make the channel known to every process before its first event.

        A chat is announced (201) before its first token; a subscriber that reaches another
        server process first must still find the channel. ``epoch``: the life it gets if it
        does not exist yet (a chat's id: then every event id names its chat).
        """
        self._check_open()
        await self.broker.declare(channel, epoch)

    def subscribe(
        self, channel: str, after: After = None, *, maxsize: int = DEFAULT_QUEUE_SIZE
    ) -> Subscription:
        """An async iterator of the channel's events after ``after``.

        Use as ``async with bus.subscribe(ch, after) as sub: async for event in sub: ...``.
        A subscriber that falls more than ``maxsize`` events behind is ended: iteration raises
        :class:`~realtime_lab.errors.SubscriberOverflow`, whose ``last_id`` is where to resume.
        """
        return Subscription(self, channel, after, maxsize)

    # Attach ------------------------------------------------------------------------------------
    async def attach(self, channel: str, after: After, sink: Sink) -> Attachment:
        """Deliver the replay after ``after`` to ``sink``, then every live event, seamlessly.

        No event is skipped or delivered twice at the seam between history and live events.
        Call ``detach()`` on the result when done.
        """
        self._check_open()
        local = self._locals.get(channel)
        if local is None:
            local = self._locals[channel] = _Local(channel)
            self._background.spawn(self._setup(local), f"bus-setup {channel}")
        # Joined (held) before anything is awaited: the channel is not released under us.
        member = _Member(sink, local.next_key + 1)
        local.next_key = member.key
        local.members[member.key] = member
        attachment = Attachment(self, local, member)
        try:
            await asyncio.shield(local.ready)
            self._check_open()
            if is_live(after) and local.holding is None:
                member.prefix, member.last, member.buffer = local.prefix, local.seen, None
                return attachment
            # A missing channel is created (reserved until its first event): the ids handed
            # out now are the ones to come.
            history = await self.broker.read(channel, after, None, reserve=True)
        except BaseException:
            attachment.detach()
            raise
        replay = build_replay(history, after, None)
        assert replay.cursor is not None
        self._release(local, member, replay.events, history.info.epoch, parse_id(replay.cursor).seq)
        return attachment

    def _release(
        self, local: _Local, member: _Member, events: list[Event], epoch: str, last: int
    ) -> None:
        """Give ``member`` its history (ending at ``<epoch>-<last>``), then what it held."""
        buffered = member.buffer or []
        member.buffer = None
        member.prefix = epoch + "-"
        try:
            for event in events:
                if member.key not in local.members:
                    return
                member.sent = True
                member.sink.deliver(event)
            member.last = max(member.last, last)
            for event in buffered:
                if member.key not in local.members:
                    return
                self._give(local, member, event)
        except Exception:
            log.exception("sink %r failed; it is detached", member.sink)
            self._end(local, (member,), "sink failed")

    async def _setup(self, local: _Local) -> None:
        """Subscribe to the channel's live feed and learn where it stands."""
        subscribed = False
        try:
            async with self._sub_lock:
                self._check_open()
                await self.broker.subscribe(local.name)
                subscribed = True
            history = await self.broker.read(local.name, None, 0, reserve=True)
        except BaseException as exc:
            if self._locals.get(local.name) is local:
                del self._locals[local.name]
            if not local.ready.done():
                failure = exc if isinstance(exc, Exception) else BusClosed("the bus is closed")
                local.ready.set_exception(failure)
                local.ready.exception()  # retrieved here: the waiting attaches re-raise it
            if subscribed and not self._closed:
                self._background.spawn(
                    self._unsubscribe(local.name), f"bus-unsubscribe {local.name}"
                )
            raise
        local.prefix = history.info.epoch + "-" if history.exists else ""
        local.seen = history.info.last_seq if history.exists else 0
        local.ready.set_result(None)
        self._let_through(local, [])
        self._release_soon(local)  # every attach that waited may have been cancelled

    # Live feed (the broker calls these) --------------------------------------------------------
    def on_event(self, channel: str, event: Event) -> None:
        local = self._locals.get(channel)
        if local is None:
            return
        if local.holding is not None:
            local.holding.append(event)
            return
        seq = event.seq
        if not local.prefix or not event.id.startswith(local.prefix):
            if seq != 1:
                # Somewhere inside a life we have not followed from its start: read it.
                local.holding = [event]
                self._resync(local)
                return
            self._new_life(local, epoch_of(event.id))
        elif seq <= local.seen:
            return  # a repeat: the feed already brought it
        elif seq != local.seen + 1:
            local.holding = [event]
            self._resync(local)
            return
        local.seen = seq
        prefix = local.prefix
        for member in tuple(local.members.values()):
            if member.buffer is not None:
                member.buffer.append(event)
                continue
            try:
                if member.prefix != prefix:
                    self._give(local, member, event)
                elif seq > member.last:
                    member.last = seq
                    member.sent = True
                    member.sink.deliver(event)
            except Exception:
                # One broken sink must not cost the others their event.
                log.exception("sink %r failed; it is detached", member.sink)
                self._end(local, (member,), "sink failed")
        if local.waiters:
            local.wake(local.epoch, seq)

    def _give(self, local: _Local, member: _Member, event: Event) -> None:
        """Deliver one event to a member that has every event before it (or skip it)."""
        if not event.id.startswith(member.prefix) or not member.prefix:
            if member.sent or member.last > 0:
                self._end(local, (member,), EXPIRED)
                return
            # Standing at the start of a life that never began: it follows the one that did.
            member.prefix, member.last = epoch_of(event.id) + "-", 0
        if event.seq > member.last:
            member.last = event.seq
            member.sent = True
            member.sink.deliver(event)

    def _new_life(self, local: _Local, epoch: str) -> None:
        """A new life of the channel began: whoever was given events of the old one is ended."""
        local.prefix, local.seen = epoch + "-", 0
        prefix = local.prefix
        ended = [
            m
            for m in local.members.values()
            if (m.sent or m.last > 0) and m.buffer is None and m.prefix != prefix
        ]
        self._end(local, ended, EXPIRED)

    def on_gap(self, channel: str) -> None:
        local = self._locals.get(channel)
        if local is not None and local.ready.done():
            local.wake()
            if local.holding is None:
                local.holding = []
            self._resync(local)

    def on_expired(self, channel: str, epoch: str) -> None:
        local = self._locals.get(channel)
        if local is not None:
            prefix = epoch + "-"
            self._end(local, [m for m in local.members.values() if m.prefix == prefix], EXPIRED)

    def _end(self, local: _Local, members: Any, reason: str) -> None:
        """Remove ``members`` from the channel and close their sinks with ``reason``."""
        for member in tuple(members):
            local.members.pop(member.key, None)
            member.buffer = None
            try:
                member.sink.close(reason)
            except Exception:
                log.exception("closing sink %r failed", member.sink)
        if members:
            self._release_soon(local)

    # Catch-up ----------------------------------------------------------------------------------
    def _resync(self, local: _Local) -> None:
        if local.resync_task is None and not self._closed:
            local.resync_task = self._background.spawn(
                self._catch_up(local), f"bus-resync {local.name}"
            )

    async def _catch_up(self, local: _Local) -> None:
        """Read what the live feed missed from history, then let the held events through."""
        delay = RETRY_FIRST_S
        try:
            while local.holding is not None and not self._closed:
                epoch = local.epoch
                after: After = Cursor(epoch, local.seen) if epoch is not None else None
                try:
                    history = await self.broker.read(local.name, after, None)
                except (BusError, OSError) as exc:
                    log.warning("catching %r up failed (%s); retrying", local.name, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                if self._locals.get(local.name) is not local:
                    return
                held, local.holding = local.holding, None
                if not history.exists:
                    # The channel is gone (a flushed or restarted Redis): so is its life, and
                    # what the feed held of it.
                    self._end(local, [m for m in local.members.values() if m.sent], EXPIRED)
                    local.prefix, local.seen = "", 0
                    held = [e for e in held if e.seq == 1]
                    self._let_through(local, held)
                    continue
                if history.info.epoch != epoch:
                    self._new_life(local, history.info.epoch)
                    after = None
                replay = build_replay(history, after, None)
                reset = replay.reset
                if reset is not None:
                    # History no longer reaches back to where the feed stood: say so.
                    self._fan_out_reset(local, reset)
                self._let_through(local, replay.events[1:] if reset is not None else replay.events)
                if local.holding is None:
                    self._let_through(local, held)
                else:
                    local.holding.extend(held)
        finally:
            local.resync_task = None

    def _let_through(self, local: _Local, events: list[Event]) -> None:
        """Feed events to :meth:`on_event` (then what it held meanwhile) until one is missing."""
        queue = list(events)
        if local.holding:
            queue.extend(local.holding)
        local.holding = None
        for index, event in enumerate(queue):
            self.on_event(local.name, event)
            if local.holding is not None:
                local.holding.extend(queue[index + 1 :])
                return

    def _fan_out_reset(self, local: _Local, reset: Event) -> None:
        local.prefix, local.seen = epoch_of(reset.id) + "-", reset.seq
        for member in tuple(local.members.values()):
            if member.buffer is not None:
                continue  # its own history read, still to come, tells it
            member.prefix, member.last, member.sent = local.prefix, reset.seq, True
            try:
                member.sink.deliver(reset)
            except Exception:
                log.exception("sink %r failed; it is detached", member.sink)
                self._end(local, (member,), "sink failed")

    # Housekeeping ------------------------------------------------------------------------------
    def _release_soon(self, local: _Local) -> None:
        """Unsubscribe from a channel that has no local sink left (in a task: it awaits)."""
        if local.members or local.release_task is not None or self._closed:
            return
        if not local.ready.done():
            return  # _setup calls again once it is done
        local.release_task = self._background.spawn(
            self._release_local(local), f"bus-release {local.name}"
        )

    async def _release_local(self, local: _Local) -> None:
        try:
            async with self._sub_lock:
                if local.members or self._locals.get(local.name) is not local:
                    return
                del self._locals[local.name]
                local.wake()
                if local.resync_task is not None:
                    local.resync_task.cancel()
                await self.broker.unsubscribe(local.name)
        finally:
            local.release_task = None

    async def _unsubscribe(self, channel: str) -> None:
        async with self._sub_lock:
            if channel not in self._locals and not self._closed:
                await self.broker.unsubscribe(channel)

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed("the bus is closed")
