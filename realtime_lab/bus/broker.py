"""What a bus backend is: a handful of broker calls, and nothing about seams or sinks.

A backend stores each channel's history and carries its live events between processes. Everything
else (joining history and live events without gap or duplicate, catching up after a lost live
feed, channel lives and ``reset``, fan-out to this process's sinks) is done once, for every
backend, by :class:`realtime_lab.bus.hub.Bus`. A new backend is a subclass of :class:`Broker`.

The contract, which the hub relies on:

- :meth:`Broker.publish` appends one event and returns it with its id; ids of one channel life are
  ``<epoch>-1``, ``<epoch>-2``, ... with no hole.
- :meth:`Broker.read` returns a consistent snapshot: the channel state and the events after a
  position (from the oldest retained one when the position is not served by this life's history).
- After :meth:`Broker.subscribe` returns, every event published to the channel reaches
  :meth:`LiveHandler.on_event`, in id order, until :meth:`Broker.unsubscribe`. When the broker
  may have lost some (a reconnect), it calls :meth:`LiveHandler.on_gap`, and the hub catches up
  from history. Events may repeat; the hub drops what it has already seen.
- When a channel life ends (expired after ``end``, evicted), :meth:`LiveHandler.on_expired`.

Bounds every backend keeps (refusals raise a :class:`~realtime_lab.errors.LimitReached` and are
counted in :attr:`Broker.limits` under their ``code``):

- History holds at most ``history`` events and ``history_bytes`` bytes of envelope JSON per
  channel; older events are trimmed to stay within both, and one event larger than
  ``history_bytes`` is refused (:class:`~realtime_lab.errors.EventTooLarge`).
- At most ``max_channels`` channels exist; publishing to (or reserving) a new one beyond that is
  refused (:class:`~realtime_lab.errors.TooManyChannels`).
- A channel that no process follows and nobody publishes to for ``ttl`` seconds is evicted, ended
  or not; its next life has a fresh epoch, as after an ``end`` expiry. A process keeps the
  channels it follows alive by calling :meth:`Broker.retain` at least every ``ttl / 3``.
- Tickets (:meth:`Broker.put_ticket`, :meth:`Broker.take_ticket`) expire after their ``ttl_s``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Collection
from typing import Any, Final, Protocol, TypeVar

from realtime_lab.bus.base import After, ChannelInfo, History
from realtime_lab.bus.chatstore import ChatStore
from realtime_lab.errors import LimitReached
from realtime_lab.protocol.envelope import Event

#: Bytes of envelope JSON a channel's history may hold (the ``history_bytes`` URL option).
DEFAULT_HISTORY_BYTES: Final = 1 << 20
#: Channels a bus may hold (the ``max_channels`` URL option).
DEFAULT_MAX_CHANNELS: Final = 10_000

_Refusal = TypeVar("_Refusal", bound=LimitReached)


class LiveHandler(Protocol):
    """Receiver of a broker's live events: the hub. Called on the event loop, must not block."""

    def on_event(self, channel: str, event: Event) -> None:
        """A live event of a subscribed channel."""

    def on_gap(self, channel: str) -> None:
        """Live events of ``channel`` may have been lost: catch up from history."""

    def on_expired(self, channel: str, epoch: str) -> None:
        """The channel life ``epoch`` is over: end whoever still follows it."""


class Broker(ABC):
    """One storage and transport of events (see the module docstring)."""

    url: str
    history: int
    ttl: float
    history_bytes: int
    max_channels: int
    #: Refusals so far, by ``code`` (what ``/metrics`` exports as ``realtime_lab_refusals_total``).
    limits: Counter[str]
    #: Whether :meth:`publish_now` and :meth:`declare_now` work: the broker stores and hands an
    #: event to the handler without awaiting (the embedded one), so a paced producer can publish
    #: from a plain callback instead of a task per producer.
    synchronous: bool = False

    def __init__(self) -> None:
        self.limits = Counter()

    def refused(self, exc: _Refusal) -> _Refusal:
        """Count a refusal under its ``code``; ``raise self.refused(TooManyChannels(...))``."""
        self.limits[exc.code] += 1
        return exc

    def bind(self, handler: LiveHandler) -> None:
        """Set who receives live events; the hub calls this once, before :meth:`start`."""
        self.handler = handler

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect to the backend (no-op for memory)."""

    def chat_store(self) -> ChatStore | None:
        """Where chats' records and leases are shared between processes, or ``None`` when the
        backend serves one process (the embedded one): then the chat registry keeps its chats
        to itself. See :mod:`realtime_lab.bus.chatstore`."""
        return None

    async def health(self) -> str | None:
        """``None`` while the backend answers, else why not (``/api/health`` answers 503 with it).

        Raises:
            BusClosed: the broker is closed.
        """
        return None

    @abstractmethod
    async def close(self) -> None:
        """Release the backend; no handler call after this returns."""

    @abstractmethod
    async def publish(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        """Append one event to the channel's history and send it live; return it with its id.

        Publishing ``end`` marks the channel finished: it expires ``ttl`` seconds later.

        Raises:
            EventTooLarge: the event's envelope is larger than ``history_bytes``; nothing changed.
            TooManyChannels: the channel is new and the bus holds ``max_channels`` already.
        """

    def publish_now(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        """:meth:`publish` without awaiting; only where :attr:`synchronous` is true.

        Raises:
            NotImplementedError: the broker needs the network; await :meth:`publish`.
        """
        raise NotImplementedError(f"{self.__class__.__name__} cannot publish without awaiting")

    def declare_now(self, channel: str, epoch: str | None = None) -> None:
        """:meth:`declare` without awaiting; only where :attr:`synchronous` is true."""
        raise NotImplementedError(f"{self.__class__.__name__} cannot declare without awaiting")

    @abstractmethod
    async def read(
        self, channel: str, after: After, limit: int | None, *, reserve: bool = False
    ) -> History:
        """The channel's state and up to ``limit`` events where ``after`` resumes.

        With ``reserve``, a channel that does not exist is created (empty, expiring if nobody
        publishes), so that the position handed out now stays valid when its first event comes;
        that raises :class:`~realtime_lab.errors.TooManyChannels` when the bus is full. An
        existing channel that is reserved is kept for at least ``ttl`` more seconds.
        """

    async def info(self, channel: str) -> ChannelInfo | None:
        """The channel's state, or ``None`` when it does not exist."""
        history = await self.read(channel, None, 0)
        return history.info if history.exists else None

    @abstractmethod
    async def declare(self, channel: str, epoch: str | None = None) -> None:
        """Make the channel known to every process before its first event (a chat's 201).

        As a reserving :meth:`read`; ``epoch`` is the life it gets if it does not exist yet (a
        chat's id, so that its event ids name the chat).
        """

    @abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Start sending the channel's live events to the handler; return once they flow."""

    @abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop sending the channel's live events."""

    @abstractmethod
    async def retain(self, channels: Collection[str]) -> None:
        """Keep these channels, which this process follows, from idle eviction for ``ttl`` more.

        The hub calls it every ``ttl / 3`` with every channel it follows. Finished channels are
        not extended: they still expire ``ttl`` after their ``end``. Channels that do not exist
        are skipped.
        """

    @abstractmethod
    async def put_ticket(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store ``value`` under ``key`` (replacing any), forgotten after ``ttl_s`` seconds.

        See :class:`realtime_lab.auth.tickets.TicketStore`.
        """

    @abstractmethod
    async def take_ticket(self, key: str) -> bytes | None:
        """Atomically read and delete ``key``: of concurrent callers, at most one gets it.

        Returns ``None`` when the key is absent or its ``ttl_s`` has passed.
        """
