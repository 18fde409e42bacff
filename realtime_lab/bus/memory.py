"""``memory://``: the embedded broker, one process, no dependencies.

URL options: ``memory://?history=1000&ttl=300`` (events kept per channel; seconds a finished
channel is kept before it expires).

Everything here runs on the event loop thread and never awaits, so a read and the live events
around it can never interleave: the hub's seam is exact by construction on this backend.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from typing import Any, Final

from realtime_lab.bus.base import After, ChannelInfo, History, now_ms, reset_reason
from realtime_lab.bus.broker import Broker
from realtime_lab.errors import BusClosed
from realtime_lab.protocol.cursor import Cursor, format_id
from realtime_lab.protocol.envelope import END, Event

MAX_EXPIRED_NAMES: Final = 100_000


def new_epoch() -> str:
    """A fresh channel-life tag: 8 hex digits."""
    return secrets.token_hex(4)


class _Channel:
    """History ring of one channel life."""

    __slots__ = ("_events", "_start", "epoch", "finished", "last_seq", "maxlen", "name")

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
        return ChannelInfo(self.name, self.epoch, self.first_seq, self.last_seq, self.finished, 0)

    def since(self, after: After, limit: int | None) -> list[Event]:
        """The retained events where ``after`` resumes (see :meth:`Broker.read`)."""
        info = self.info()
        if isinstance(after, Cursor) and reset_reason(info, after) is None:
            from_seq = after.seq + 1
        else:
            from_seq = info.first_seq
        begin = self._start + (from_seq - info.first_seq)
        end = len(self._events) if limit is None else min(len(self._events), begin + limit)
        return self._events[begin:end]


class MemoryBroker(Broker):
    """The in-process broker (see the module docstring)."""

    def __init__(self, history: int = 1000, ttl: float = 300.0, url: str = "memory://") -> None:
        if history < 1:
            raise ValueError("history must keep at least one event")
        self.url = url
        self.history = history
        self.ttl = ttl
        self._channels: dict[str, _Channel] = {}
        self._subscribed: set[str] = set()
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._closed = False
        # A channel's first life takes the broker's epoch, so that a position taken on a
        # channel nobody has published to yet (``<epoch>-0``) stays valid when its first event
        # comes. Only a channel that expired and comes back needs a fresh epoch; those names are
        # remembered (a bounded set: chat channels, the ones that expire, are never reused).
        self.epoch = new_epoch()
        self._expired: OrderedDict[str, None] = OrderedDict()

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed("the bus is closed")

    def _new(self, name: str) -> _Channel:
        epoch = new_epoch() if name in self._expired else self.epoch
        return _Channel(name, self.history, epoch)

    def _forget_if_idle(self, name: str) -> None:
        # A channel nobody publishes to and nobody follows must not leave state behind.
        channel = self._channels.get(name)
        if channel is not None and channel.last_seq == 0 and name not in self._subscribed:
            del self._channels[name]

    async def publish(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        self._check_open()
        chan = self._channels.get(channel)
        if chan is None:
            chan = self._channels[channel] = self._new(channel)
        event = chan.append(type, data)
        if channel in self._subscribed:
            self.handler.on_event(channel, event)
        if type == END and not chan.finished:
            chan.finished = True
            loop = asyncio.get_running_loop()
            self._expiry[channel] = loop.call_later(self.ttl, self._expire, chan)
        return event

    def _expire(self, chan: _Channel) -> None:
        self._expiry.pop(chan.name, None)
        if self._channels.get(chan.name) is chan:
            del self._channels[chan.name]
        self._expired[chan.name] = None
        if len(self._expired) > MAX_EXPIRED_NAMES:
            self._expired.popitem(last=False)
        if chan.name in self._subscribed:
            self.handler.on_expired(chan.name, chan.epoch)

    async def read(
        self, channel: str, after: After, limit: int | None, *, reserve: bool = False
    ) -> History:
        self._check_open()
        chan = self._channels.get(channel)
        if chan is None:
            chan = self._new(channel)
            if not reserve:
                return History(chan.info(), False, [])
            self._channels[channel] = chan
        return History(chan.info(), True, chan.since(after, limit))

    async def subscribe(self, channel: str) -> None:
        self._check_open()
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)
        self._forget_if_idle(channel)

    async def close(self) -> None:
        self._closed = True
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        self._channels.clear()
        self._subscribed.clear()

    def channel_names(self) -> list[str]:
        """Names of the channels currently held."""
        return list(self._channels)
