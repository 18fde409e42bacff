"""The values every layer of the bus shares: sinks, replays, channel state, resets.

A channel has a bounded history of events and, in each process, a set of live *sinks*. Fan-out
(:mod:`realtime_lab.bus.hub`) calls ``sink.deliver(event)`` synchronously for every sink of the
channel: a sink must never block or await; it either writes pre-encoded bytes straight to a socket
(the SSE and WebSocket transports), wakes a waiter (long polling), or appends to a bounded queue
(:class:`~realtime_lab.bus.subscription.Subscription`). That is how one slow subscriber can never
slow the others: the bus never waits on any of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final, Protocol

from realtime_lab.protocol.cursor import LIVE, Cursor, format_id
from realtime_lab.protocol.envelope import END, RESET, Event

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
    #: The newest seq of this life whose event a backend failover lost (0: none was lost).
    #: Redis replicates asynchronously: a replica promoted without the last acknowledged
    #: events. The life goes on after it (no id is ever reused) and a resume position before
    #: it gets a ``reset`` with reason ``events-lost``.
    lost: int = 0

    @property
    def last_id(self) -> str:
        """The id of the newest event (``<epoch>-0`` before the first)."""
        return format_id(self.epoch, self.last_seq)


_RESET_MESSAGES: Final = {
    "events-lost": "a failover of the bus backend lost events after the requested id; "
    "continuing from the oldest retained event",
}
_RESET_MESSAGE: Final = (
    "history no longer reaches back to the requested id; "
    "events may have been missed, continuing from the oldest retained event"
)


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
            "message": _RESET_MESSAGES.get(reason, _RESET_MESSAGE),
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
        return "events-lost" if after.seq < info.lost else "history-trimmed"
    return None


class Attachment(Protocol):
    """Handle of a sink attached to a channel."""

    def detach(self) -> None:
        """Stop delivering to the sink. Idempotent."""


@dataclass(slots=True)
class History:
    """What a broker read of one channel returns: its state and a slice of its history.

    Attributes:
        info: the channel's state at the read (for a channel that does not exist: an empty one,
            of the epoch its next life will have).
        exists: ``False`` when the broker has no such channel (never published, or expired).
        events: the retained events from where the requested position resumes (the oldest
            retained one when the position needs a ``reset``), oldest first, at most ``limit``.
    """

    info: ChannelInfo
    exists: bool
    events: list[Event]


def build_replay(history: History, after: After, limit: int | None) -> Replay:
    """The :class:`Replay` for ``after`` from a broker read: a ``reset`` first when needed.

    The one place where "what a resume position gets" is decided; every backend's read feeds it.
    """
    info = history.info
    if is_live(after):
        return Replay([], format_id(info.epoch, info.last_seq))
    out: list[Event] = []
    reason = reset_reason(info, after)
    if reason is not None:
        out.append(make_reset(info, after, reason))
        from_seq = info.first_seq
    elif isinstance(after, Cursor):
        from_seq = after.seq + 1
    else:
        from_seq = info.first_seq
    events = history.events
    available = info.last_seq - from_seq + 1
    more = False
    if limit is not None:
        room = max(limit - len(out), 0)
        if available > room:
            more = True
            events = events[:room]
    out.extend(events)
    cursor = out[-1].id if out else format_id(info.epoch, from_seq - 1)
    return Replay(out, cursor, more)


def epoch_of(event_id: str) -> str:
    """The channel life of an event id (``<epoch>-<seq>``)."""
    return event_id.rpartition("-")[0]


def is_live(after: After) -> bool:
    """``True`` when ``after`` asks for live events only."""
    return after == LIVE


__all__ = [
    "END",
    "After",
    "Attachment",
    "ChannelInfo",
    "History",
    "Replay",
    "Sink",
    "build_replay",
    "epoch_of",
    "is_live",
    "make_reset",
    "now_ms",
    "reset_reason",
]
