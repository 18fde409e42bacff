"""``memory://``: the embedded broker, one process, no dependencies.

URL options: ``memory://?history=1000&ttl=300&history_bytes=1048576&max_channels=10000`` (events
and bytes of envelope JSON kept per channel; seconds an idle or finished channel is kept before
it expires; channels held at most).

Everything here runs on the event loop thread and never awaits, so a read and the live events
around it can never interleave: the hub's seam is exact by construction on this backend.

Expiry is one timer for the whole broker, not one per channel: channels that nobody follows and
that have not finished wait in an insertion-ordered dict by last activity, finished ones in
another by ``end`` time. Every deadline is ``ttl`` after the moment a channel entered its dict
(entering again moves it to the back), so each dict is sorted by deadline and a sweep pops from
the front until the first channel still alive: O(expired), never O(all).
"""

from __future__ import annotations

import asyncio
import heapq
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from itertools import islice
from typing import Any, Final

from realtime_lab.bus.base import After, ChannelInfo, History, now_ms, reset_reason
from realtime_lab.bus.broker import DEFAULT_HISTORY_BYTES, DEFAULT_MAX_CHANNELS, Broker
from realtime_lab.errors import BusClosed, EventTooLarge, LimitReached, TooManyChannels
from realtime_lab.protocol.cursor import Cursor, format_id
from realtime_lab.protocol.envelope import END, Event

MAX_EXPIRED_NAMES: Final = 100_000
#: Unexpired tickets the memory bus holds at most (each lives ``ttl_s``, 90 s by default).
DEFAULT_MAX_TICKETS: Final = 100_000
#: Longest the sweep timer waits past a deadline, and shortest between two sweeps.
SWEEP_GRANULARITY_S: Final = 1.0


def new_epoch() -> str:
    """A fresh channel-life tag: 8 hex digits."""
    return secrets.token_hex(4)


#: A finished channel's ``events``: empty for good (a deque of maxlen 0 keeps nothing).
_DRAINED: Final[deque[Event]] = deque(maxlen=0)


class _Channel:
    """History of one channel life: exactly the retained events, oldest first.

    A live channel keeps its :class:`Event` objects, shared by every reader and carrying each
    transport's frames, encoded once. A finished one (from its first ``end``) keeps only their
    JSON, a tuple of bytes, and makes the events again for each read (see :meth:`finish`).
    """

    __slots__ = ("bytes", "epoch", "events", "finished", "kept", "last_seq", "name")

    def __init__(self, name: str, epoch: str) -> None:
        self.name = name
        self.epoch = epoch
        self.events: deque[Event] = deque()  # while live
        self.kept: tuple[bytes, ...] = ()  # once finished: each event's JSON
        self.bytes = 0  # sum of the envelopes' JSON sizes over what is retained
        self.last_seq = 0
        self.finished = False

    @property
    def first_seq(self) -> int:
        return self.last_seq - len(self.events) - len(self.kept) + 1

    def append(self, event: Event, size: int, maxlen: int, maxbytes: int) -> None:
        """Store ``event`` (``size`` bytes, at most ``maxbytes``), trimming the oldest to fit."""
        self.last_seq = event.seq
        self.bytes += size
        if self.finished:  # rare: an event after the end
            kept = (*self.kept, event.json)
            drop = 0
            while len(kept) - drop > maxlen or self.bytes > maxbytes:
                self.bytes -= len(kept[drop])
                drop += 1
            self.kept = kept[drop:]
            return
        events = self.events
        events.append(event)
        while len(events) > maxlen or self.bytes > maxbytes:
            self.bytes -= len(events.popleft().json)

    def finish(self) -> None:
        """The channel's first ``end`` is stored: from now on its history is kept as JSON.

        A finished chat's history mostly waits out the ttl, and each :class:`Event` in it was an
        object every pass of the garbage collector walked: counted with ``gc.get_objects`` at a
        thousand chatting users (``bench --workload chats --chats 1000``), 54% of the oldest
        generation and 42% of the middle one. A tuple of bytes is not tracked at all. Measured
        at 400 and 1,000 users, A-B-A-B: the collector's time down by a third to nearly half
        (34-47%), the server's RSS halved (the transports' frames go too: written once, a late
        resume encodes again).
        """
        self.finished = True
        self.kept = tuple([event.json for event in self.events])
        self.events = _DRAINED

    def info(self) -> ChannelInfo:
        return ChannelInfo(self.name, self.epoch, self.first_seq, self.last_seq, self.finished, 0)

    def since(self, after: After, limit: int | None) -> list[Event]:
        """The retained events where ``after`` resumes (see :meth:`Broker.read`)."""
        info = self.info()
        if isinstance(after, Cursor) and reset_reason(info, after) is None:
            from_seq = after.seq + 1
        else:
            from_seq = info.first_seq
        begin = from_seq - info.first_seq
        if self.finished:
            kept = self.kept
            end = len(kept) if limit is None else min(len(kept), begin + limit)
            restore, first = Event.restore, info.first_seq
            return [restore(kept[i], first + i) for i in range(begin, end)]
        events = self.events
        count = len(events)
        end = count if limit is None else min(count, begin + limit)
        if begin >= end:
            return []
        if begin > count // 2:
            # Resumes near the newest (a live feed catching up): walk from that end.
            tail = list(islice(reversed(events), count - end, count - begin))
            tail.reverse()
            return tail
        return list(islice(events, begin, end))


class MemoryBroker(Broker):
    """The in-process broker (see the module docstring).

    ``clock`` (monotonic seconds) drives channel and ticket expiry; tests inject one and call
    :meth:`sweep` themselves.
    """

    def __init__(
        self,
        history: int = 1000,
        ttl: float = 300.0,
        url: str = "memory://",
        *,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        max_channels: int = DEFAULT_MAX_CHANNELS,
        max_tickets: int = DEFAULT_MAX_TICKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if history < 1:
            raise ValueError("history must keep at least one event")
        if history_bytes < 1:
            raise ValueError("history_bytes must be at least 1")
        if max_channels < 1 or max_tickets < 1:
            raise ValueError("max_channels and max_tickets must be at least 1")
        if ttl < 0:
            raise ValueError("ttl must not be negative")
        self.url = url
        self.history = history
        self.history_bytes = history_bytes
        self.max_channels = max_channels
        self.max_tickets = max_tickets
        self.ttl = ttl
        for kind in ("too-many-channels", "event-too-large", "too-many-tickets"):
            self.limits[kind] = 0  # exported at 0 before the first refusal
        self._clock = clock
        self._channels: dict[str, _Channel] = {}
        self._subscribed: set[str] = set()
        # Deadlines (clock time) of the channels that may expire: see the module docstring.
        self._idle: OrderedDict[str, float] = OrderedDict()
        self._ending: OrderedDict[str, float] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None
        self._granularity = min(SWEEP_GRANULARITY_S, max(ttl / 10, 0.01))
        self._tickets: dict[str, tuple[bytes, float]] = {}
        self._ticket_expiry: list[tuple[float, str]] = []  # heap; stale entries skipped
        self._closed = False
        # A channel's first life takes the broker's epoch, so that a position taken on a
        # channel nobody has published to yet (``<epoch>-0``) stays valid when its first event
        # comes. Only a channel that expired (or was evicted) and comes back needs a fresh epoch;
        # those names are remembered, at most MAX_EXPIRED_NAMES of them, the oldest forgotten.
        self.epoch = new_epoch()
        self._expired: OrderedDict[str, None] = OrderedDict()

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed("the bus is closed")

    # Channel lives -----------------------------------------------------------------------------
    def _epoch_for(self, name: str) -> str:
        return new_epoch() if name in self._expired else self.epoch

    def _create(self, name: str, epoch: str) -> _Channel:
        """A new channel life, counted against ``max_channels``."""
        if len(self._channels) >= self.max_channels:
            self.sweep()
            if len(self._channels) >= self.max_channels:
                raise self.refused(
                    TooManyChannels(
                        f"the bus holds {self.max_channels} channels, its maximum",
                        "too-many-channels",
                        507,
                        self._next_deadline_in(),
                    )
                )
        chan = self._channels[name] = _Channel(name, epoch)
        self._touch(name)
        return chan

    def _touch(self, name: str) -> None:
        """Activity on an unfinished channel: it is idle from now on, unless followed."""
        if name in self._subscribed:
            return
        self._idle[name] = self._clock() + self.ttl
        self._idle.move_to_end(name)
        self._arm()

    def _drop(self, chan: _Channel) -> None:
        """End the channel life: forget it, and give its next life a fresh epoch."""
        name = chan.name
        if self._channels.get(name) is chan:
            del self._channels[name]
        self._idle.pop(name, None)
        self._ending.pop(name, None)
        if chan.last_seq > 0 or name in self._expired:
            self._expired[name] = None
            self._expired.move_to_end(name)
            if len(self._expired) > MAX_EXPIRED_NAMES:
                self._expired.popitem(last=False)
        if name in self._subscribed:
            self.handler.on_expired(name, chan.epoch)

    # Expiry ------------------------------------------------------------------------------------
    def sweep(self) -> int:
        """Expire the channels whose deadline has passed; how many. O(expired)."""
        now = self._clock()
        expired = 0
        for queue in (self._ending, self._idle):
            while queue:
                name, deadline = next(iter(queue.items()))
                if deadline > now:
                    break
                del queue[name]
                chan = self._channels.get(name)
                if chan is not None:
                    self._drop(chan)
                    expired += 1
        return expired

    def _next_deadline(self) -> float | None:
        fronts = [next(iter(q.values())) for q in (self._ending, self._idle) if q]
        return min(fronts) if fronts else None

    def _next_deadline_in(self) -> float | None:
        """Seconds until the next channel expires (``None``: every channel is followed)."""
        deadline = self._next_deadline()
        return None if deadline is None else max(deadline - self._clock(), 0.0)

    def _arm(self) -> None:
        # New deadlines always go to the back of their queue, so a timer already set for the
        # front is never late; the timer re-arms itself after each sweep.
        if self._timer is not None or self._closed:
            return
        deadline = self._next_deadline()
        if deadline is None:
            return
        delay = max(deadline - self._clock(), 0.0) + self._granularity
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.sweep()
        self._arm()

    # Broker API --------------------------------------------------------------------------------
    synchronous = True

    async def publish(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        return self.publish_now(channel, type, data)

    def publish_now(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        self._check_open()
        chan = self._channels.get(channel)
        epoch = self._epoch_for(channel) if chan is None else chan.epoch
        seq = 1 if chan is None else chan.last_seq + 1
        event = Event(channel, format_id(epoch, seq), type, data, now_ms(), seq)
        size = len(event.json)  # encoded once here: fan-out reuses it
        if size > self.history_bytes:
            raise self.refused(
                EventTooLarge(
                    f"an event of {size} bytes is over the {self.history_bytes}-byte history cap",
                    "event-too-large",
                    413,
                )
            )
        if chan is None:
            chan = self._create(channel, epoch)
        elif not chan.finished:
            self._touch(channel)
        chan.append(event, size, self.history, self.history_bytes)
        if channel in self._subscribed:
            self.handler.on_event(channel, event)
        if type == END and not chan.finished:
            chan.finish()
            # Followed or not, a finished channel expires ``ttl`` after its first ``end``.
            self._idle.pop(channel, None)
            self._ending[channel] = self._clock() + self.ttl
            self._arm()
        return event

    async def declare(self, channel: str, epoch: str | None = None) -> None:
        self.declare_now(channel, epoch)

    def declare_now(self, channel: str, epoch: str | None = None) -> None:
        self._check_open()
        chan = self._channels.get(channel)
        if chan is None:
            self._create(channel, epoch or self._epoch_for(channel))
        elif not chan.finished:
            self._touch(channel)

    async def read(
        self, channel: str, after: After, limit: int | None, *, reserve: bool = False
    ) -> History:
        self._check_open()
        chan = self._channels.get(channel)
        if chan is None:
            if not reserve:
                return History(_Channel(channel, self._epoch_for(channel)).info(), False, [])
            chan = self._create(channel, self._epoch_for(channel))
        elif reserve and not chan.finished:
            self._touch(channel)
        return History(chan.info(), True, chan.since(after, limit))

    async def subscribe(self, channel: str) -> None:
        self._check_open()
        self._subscribed.add(channel)
        self._idle.pop(channel, None)  # followed: never idle

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)
        chan = self._channels.get(channel)
        if chan is None or chan.finished:
            return
        if chan.last_seq == 0 and chan.epoch == self.epoch:
            # Nobody publishes to it and nobody follows it: it must not leave state behind
            # (it would come back as it is). One whose life was named (a declared chat, a life
            # after an expiry) is kept like any idle channel, so the ids handed out stay valid.
            del self._channels[channel]
            self._idle.pop(channel, None)
        else:
            self._touch(channel)

    async def retain(self, channels: Collection[str]) -> None:
        # Nothing to do: this broker knows which channels are subscribed, and never evicts them.
        return None

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._channels.clear()
        self._subscribed.clear()
        self._idle.clear()
        self._ending.clear()
        self._tickets.clear()
        self._ticket_expiry.clear()

    def channel_names(self) -> list[str]:
        """Names of the channels currently held."""
        return list(self._channels)

    # Tickets -----------------------------------------------------------------------------------
    async def put_ticket(self, key: str, value: bytes, ttl_s: float) -> None:
        self._check_open()
        now = self._clock()
        if ttl_s <= 0:
            self._tickets.pop(key, None)
            return
        self._sweep_tickets(now)
        if key not in self._tickets and len(self._tickets) >= self.max_tickets:
            retry = max(self._ticket_expiry[0][0] - now, 0.0) if self._ticket_expiry else None
            raise self.refused(
                LimitReached(
                    f"the bus holds {self.max_tickets} tickets, its maximum",
                    "too-many-tickets",
                    429,
                    retry,
                )
            )
        expires = now + ttl_s
        self._tickets[key] = (value, expires)
        heapq.heappush(self._ticket_expiry, (expires, key))
        if len(self._ticket_expiry) > 2 * len(self._tickets) + 64:
            # Replaced keys left stale heap entries: rebuild from what is alive.
            self._ticket_expiry = [(exp, k) for k, (_, exp) in self._tickets.items()]
            heapq.heapify(self._ticket_expiry)

    async def take_ticket(self, key: str) -> bytes | None:
        self._check_open()
        # No await before the pop: on one event loop this is atomic.
        entry = self._tickets.pop(key, None)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    def _sweep_tickets(self, now: float) -> None:
        heap = self._ticket_expiry
        while heap and heap[0][0] <= now:
            expires, key = heapq.heappop(heap)
            entry = self._tickets.get(key)
            if entry is not None and entry[1] == expires:
                del self._tickets[key]

    def ticket_count(self) -> int:
        """Tickets held now (expired ones included until the next sweep)."""
        return len(self._tickets)


__all__ = ["MemoryBroker", "new_epoch"]
