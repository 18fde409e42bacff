"""``memory://``: the embedded bus, one process, no dependencies.

URL options: ``memory://?history=1000&ttl=300`` (events kept per channel; seconds a finished
channel is kept before it expires).

Everything here runs on the event loop thread without awaiting between reading history and
attaching a sink, so the seam between replay and live events is exact by construction.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from typing import Any, Final

from realtime_lab.bus.base import (
    After,
    Bus,
    ChannelInfo,
    FanOut,
    Replay,
    Sink,
    is_live,
    make_reset,
    now_ms,
    reset_reason,
)
from realtime_lab.errors import BusClosed
from realtime_lab.protocol.cursor import Cursor, format_id
from realtime_lab.protocol.envelope import END, Event

log = logging.getLogger(__name__)

MAX_EXPIRED_NAMES: Final = 100_000


def new_epoch() -> str:
    """A fresh channel-life tag: 8 base-36-safe hex digits."""
    return secrets.token_hex(4)


class _Channel:
    """History ring and live sinks of one channel."""

    __slots__ = ("_events", "_start", "epoch", "fanout", "finished", "last_seq", "maxlen", "name")

    def __init__(self, name: str, maxlen: int, epoch: str) -> None:
        self.name = name
        self.epoch = epoch
        self.maxlen = maxlen
        # A list with a moving start index: O(1) append, O(1) trim (amortised) and O(1)
        # lookup by seq, because seqs are consecutive.
        self._events: list[Event] = []
        self._start = 0
        self.last_seq = 0
        self.finished = False
        self.fanout = FanOut()

    @property
    def first_seq(self) -> int:
        return self.last_seq - (len(self._events) - self._start) + 1

    def append(self, type_: str, data: dict[str, Any]) -> Event:
        self.last_seq += 1
        event = Event(
            self.name, format_id(self.epoch, self.last_seq), type_, data, now_ms(), self.last_seq
        )
        self._events.append(event)
        if len(self._events) - self._start > self.maxlen:
            self._start += 1
            if self._start >= self.maxlen:
                del self._events[: self._start]
                self._start = 0
        return event

    def info(self) -> ChannelInfo:
        return ChannelInfo(
            self.name,
            self.epoch,
            self.first_seq,
            self.last_seq,
            self.finished,
            len(self.fanout.sinks),
        )

    def replay(self, after: After, limit: int | None) -> Replay:
        if is_live(after):
            return Replay([], format_id(self.epoch, self.last_seq))
        info = self.info()
        events: list[Event] = []
        reason = reset_reason(info, after)
        if reason is not None:
            events.append(make_reset(info, after, reason))
            from_seq = info.first_seq
        elif isinstance(after, Cursor):
            from_seq = after.seq + 1
        else:
            from_seq = info.first_seq
        begin = self._start + (from_seq - info.first_seq)
        end = len(self._events)
        more = False
        if limit is not None:
            room = max(limit - len(events), 0)
            if end - begin > room:
                end, more = begin + room, True
        events.extend(self._events[begin:end])
        cursor = events[-1].id if events else format_id(self.epoch, from_seq - 1)
        return Replay(events, cursor, more)


class _Attachment:
    __slots__ = ("_bus", "_channel", "_key")

    def __init__(self, bus: MemoryBus, channel: _Channel, key: int) -> None:
        self._bus, self._channel, self._key = bus, channel, key

    def detach(self) -> None:
        if self._key:
            self._channel.fanout.remove(self._key)
            self._key = 0
            self._bus._forget_if_idle(self._channel)


class MemoryBus(Bus):
    """The in-process bus (see the module docstring)."""

    def __init__(self, history: int = 1000, ttl: float = 300.0, url: str = "memory://") -> None:
        if history < 1:
            raise ValueError("history must keep at least one event")
        self.url = url
        self.history = history
        self.ttl = ttl
        self._channels: dict[str, _Channel] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._closed = False
        # A channel's first life in this bus takes the bus's epoch, so that a position taken on
        # a channel nobody has published to yet (``<epoch>-0``) stays valid when its first event
        # comes. Only a channel that expired and comes back needs a fresh epoch; those names are
        # remembered (a bounded set: chat channels, the ones that expire, are never reused).
        self.epoch = new_epoch()
        self._expired: OrderedDict[str, None] = OrderedDict()

    def _channel(self, name: str) -> _Channel:
        if self._closed:
            raise BusClosed("the bus is closed")
        channel = self._channels.get(name)
        if channel is None:
            epoch = new_epoch() if name in self._expired else self.epoch
            channel = self._channels[name] = _Channel(name, self.history, epoch)
        return channel

    def _forget_if_idle(self, channel: _Channel) -> None:
        # Subscribing to a channel nobody publishes to must not leave state behind.
        idle = channel.last_seq == 0 and not channel.fanout.sinks
        if idle and self._channels.get(channel.name) is channel:
            del self._channels[channel.name]

    async def publish(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        return self.publish_nowait(channel, type, data)

    def publish_nowait(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        """Synchronous :meth:`publish`, for producers that already run on the loop."""
        chan = self._channel(channel)
        event = chan.append(type, data)
        chan.fanout.deliver(event)
        if type == END and not chan.finished:
            chan.finished = True
            self._schedule_expiry(chan)
        return event

    def _schedule_expiry(self, chan: _Channel) -> None:
        loop = asyncio.get_running_loop()
        self._expiry[chan.name] = loop.call_later(self.ttl, self._expire, chan)

    def _expire(self, chan: _Channel) -> None:
        self._expiry.pop(chan.name, None)
        if self._channels.get(chan.name) is chan:
            del self._channels[chan.name]
        self._expired[chan.name] = None
        if len(self._expired) > MAX_EXPIRED_NAMES:
            self._expired.popitem(last=False)
        chan.fanout.close_all("channel expired")

    async def replay(self, channel: str, after: After, limit: int | None = None) -> Replay:
        chan = self._channels.get(channel)
        if chan is None:
            chan = self._channel(channel)
            try:
                return chan.replay(after, limit)
            finally:
                self._forget_if_idle(chan)
        return chan.replay(after, limit)

    async def attach(self, channel: str, after: After, sink: Sink) -> _Attachment:
        chan = self._channel(channel)
        for event in chan.replay(after, None).events:
            sink.deliver(event)
        return _Attachment(self, chan, chan.fanout.add(sink))

    async def info(self, channel: str) -> ChannelInfo | None:
        chan = self._channels.get(channel)
        return None if chan is None else chan.info()

    async def close(self) -> None:
        self._closed = True
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        for chan in self._channels.values():
            chan.fanout.close_all("bus closed")
        self._channels.clear()

    def channel_names(self) -> list[str]:
        """Names of the channels currently held."""
        return list(self._channels)
