"""The bus interface every backend implements, and the pieces they share.

A bus keeps, per channel, a bounded history of events and a set of live *sinks*. Fan-out calls
``sink.deliver(event)`` synchronously for every sink of the channel: a sink must never block or
await; it either writes pre-encoded bytes straight to a socket (the SSE and WebSocket transports),
wakes a waiter (long polling), or appends to a bounded queue (:class:`Subscription`). That is
how one slow subscriber can never slow the others: the bus never waits on any of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from realtime_lab.errors import BusClosed, SubscriberOverflow
from realtime_lab.protocol.cursor import LIVE, Cursor, format_id
from realtime_lab.protocol.envelope import END, RESET, Event

log = logging.getLogger(__name__)

#: What ``after`` may be: ``None`` (all retained history), :data:`LIVE`, or a cursor.
After = Cursor | str | None

DEFAULT_QUEUE_SIZE: Final = 1024


def now_ms() -> float:
    """Wall-clock time in milliseconds, as carried in ``Event.ts``."""
    return time.time() * 1000.0


class Sink(Protocol):
    """Receiver of a channel's events, called synchronously by the bus."""

    def deliver(self, event: Event) -> None:
        """Take one event. Must not block; raise nothing the bus should care about."""

    def close(self, reason: str) -> None:
        """The bus ends this sink (bus closing, channel expired). Must not block."""


@dataclass(slots=True)
class Replay:
    """What history holds after a resume position.

    Attributes:
        events: the events, oldest first; a ``reset`` event comes first when history could not
            reach back to the requested position.
        cursor: the id to resume from after consuming ``events`` (``None`` when the channel has
            no position yet and nothing was requested).
        more: ``True`` when ``limit`` cut the list short and more history is waiting.
    """

    events: list[Event]
    cursor: str | None
    more: bool = False

    @property
    def reset(self) -> Event | None:
        """The ``reset`` event that opens the replay, if any."""
        if self.events and self.events[0].type == RESET:
            return self.events[0]
        return None


@dataclass(slots=True)
class ChannelInfo:
    """What the bus knows of one channel."""

    name: str
    epoch: str
    first_seq: int  # seq of the oldest retained event (last_seq + 1 when empty)
    last_seq: int  # seq of the newest event (0 before the first)
    finished: bool  # an ``end`` event was published
    subscribers: int

    @property
    def last_id(self) -> str:
        """The id of the newest event (``<epoch>-0`` before the first)."""
        return format_id(self.epoch, self.last_seq)


def make_reset(info: ChannelInfo, requested: After, reason: str) -> Event:
    """The ``reset`` event for a resume position history cannot serve.

    Its id is the position just before the oldest retained event, so a client that resumes
    from it gets exactly the retained history, without another reset.
    """
    oldest = format_id(info.epoch, info.first_seq) if info.first_seq <= info.last_seq else None
    seq = info.first_seq - 1
    return Event(
        channel=info.name,
        id=format_id(info.epoch, seq),
        type=RESET,
        data={
            "reason": reason,
            "requested": None if requested is None else str(requested),
            "oldest": oldest,
            "message": "history no longer reaches back to the requested id; "
            "events may have been missed, continuing from the oldest retained event",
        },
        ts=now_ms(),
        seq=seq,
    )


def reset_reason(info: ChannelInfo, after: After) -> str | None:
    """Why ``after`` cannot be served exactly from this channel's history, or ``None``."""
    if not isinstance(after, Cursor):
        return None
    if after.epoch != info.epoch:
        return "unknown-epoch"
    if after.seq > info.last_seq:
        return "future-id"
    if after.seq < info.first_seq - 1:
        return "history-trimmed"
    return None


class Attachment(Protocol):
    """Handle of a sink attached to a channel."""

    def detach(self) -> None:
        """Stop delivering to the sink. Idempotent."""


class Bus(ABC):
    """One event bus: publish, replay history, attach live sinks.

    Create one with :func:`realtime_lab.bus.create_bus` from a URL, ``await bus.start()`` it,
    and ``await bus.close()`` it on shutdown.
    """

    url: str

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect to the backend (no-op for the memory bus)."""

    @abstractmethod
    async def close(self) -> None:
        """Close every sink (``close("bus closed")``) and release the backend."""

    @abstractmethod
    async def publish(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        """Append an event to the channel's history and fan it out to the live sinks.

        Returns:
            The stored event, with its id and timestamp. Publishing ``end`` marks the channel
            finished: it expires ``ttl`` seconds later.
        """

    @abstractmethod
    async def replay(self, channel: str, after: After, limit: int | None = None) -> Replay:
        """The retained events after ``after``, a ``reset`` first when history cannot serve it."""

    @abstractmethod
    async def attach(self, channel: str, after: After, sink: Sink) -> Attachment:
        """Deliver the replay after ``after`` to ``sink``, then every live event, seamlessly.

        No event is skipped or delivered twice at the seam between history and live events.
        Call ``detach()`` on the result when done.
        """

    async def declare(self, channel: str) -> None:  # noqa: B027 - optional hook
        """Make the channel known to every process before its first event.

        A chat is announced (201) before its first token; a subscriber that reaches another
        server process first must still find the channel. The memory bus lives in one process,
        where the chat registry already knows it, so this is a no-op there.
        """

    @abstractmethod
    async def info(self, channel: str) -> ChannelInfo | None:
        """The channel's state, or ``None`` when the bus has never seen it (or it expired)."""

    def subscribe(
        self, channel: str, after: After = None, *, maxsize: int = DEFAULT_QUEUE_SIZE
    ) -> Subscription:
        """An async iterator of the channel's events after ``after``.

        Use as ``async with bus.subscribe(ch, after) as sub: async for event in sub: ...``.
        A subscriber that falls more than ``maxsize`` events behind is ended: iteration raises
        :class:`SubscriberOverflow`, whose ``last_id`` is where to resume from.
        """
        return Subscription(self, channel, after, maxsize)


class Subscription:
    """A bounded-queue sink exposed as an async iterator (see :meth:`Bus.subscribe`)."""

    def __init__(self, bus: Bus, channel: str, after: After, maxsize: int) -> None:
        self._bus = bus
        self._channel = channel
        self._after = after
        self._maxsize = maxsize
        self._queue: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._attachment: Attachment | None = None
        self._ended: BaseException | None = None
        self.last_id: str | None = str(after) if isinstance(after, Cursor) else None

    async def __aenter__(self) -> Subscription:
        self._attachment = await self._bus.attach(self._channel, self._after, self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.detach()

    def detach(self) -> None:
        """Stop receiving events. Idempotent."""
        if self._attachment is not None:
            self._attachment.detach()
            self._attachment = None

    # Sink protocol -----------------------------------------------------------------------------
    def deliver(self, event: Event) -> None:
        if self._ended is not None:
            return
        if len(self._queue) >= self._maxsize:
            # Overflow policy: end this subscriber rather than grow or block the bus.
            self._queue.clear()
            self._ended = SubscriberOverflow(
                f"subscriber fell more than {self._maxsize} events behind on {self._channel!r}",
                self.last_id,
            )
            self.detach()
        else:
            self._queue.append(event)
        self._wake()

    def close(self, reason: str) -> None:
        if self._ended is None:
            self._ended = BusClosed(reason)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # Async iterator ----------------------------------------------------------------------------
    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while not self._queue:
            if self._ended is not None:
                if isinstance(self._ended, BusClosed):
                    raise StopAsyncIteration
                raise self._ended
            if self._attachment is None:
                raise RuntimeError("use 'async with bus.subscribe(...)' before iterating")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        event = self._queue.popleft()
        self.last_id = event.id
        return event

    @property
    def pending(self) -> int:
        """Events queued and not yet consumed."""
        return len(self._queue)


@dataclass(slots=True)
class FanOut:
    """The live sinks of one channel, delivered to in attach order."""

    sinks: dict[int, Sink] = field(default_factory=dict)
    _next: int = 0

    def add(self, sink: Sink) -> int:
        self._next += 1
        self.sinks[self._next] = sink
        return self._next

    def remove(self, key: int) -> None:
        self.sinks.pop(key, None)

    def deliver(self, event: Event) -> None:
        # A copy, because a sink may detach itself (on ``end``) while we iterate.
        for sink in tuple(self.sinks.values()):
            try:
                sink.deliver(event)
            except Exception:
                # One broken sink must not cost the others their event.
                log.exception("sink %r failed; it is detached", sink)
                self._drop(sink, "sink failed")

    def close_all(self, reason: str) -> None:
        for sink in tuple(self.sinks.values()):
            try:
                sink.close(reason)
            except Exception:
                log.exception("closing sink %r failed", sink)
        self.sinks.clear()

    def _drop(self, sink: Sink, reason: str) -> None:
        for key, value in tuple(self.sinks.items()):
            if value is sink:
                del self.sinks[key]
        try:
            sink.close(reason)
        except Exception:
            log.exception("closing sink %r failed", sink)


def is_live(after: After) -> bool:
    """``True`` when ``after`` asks for live events only."""
    return after == LIVE


__all__ = [
    "END",
    "After",
    "Attachment",
    "Bus",
    "ChannelInfo",
    "FanOut",
    "Replay",
    "Sink",
    "Subscription",
    "is_live",
    "make_reset",
    "now_ms",
    "reset_reason",
]
