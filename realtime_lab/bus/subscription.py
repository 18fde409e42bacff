"""A bounded-queue sink exposed as an async iterator: how Python code reads a channel."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from realtime_lab.bus.base import After, Attachment, Sink
from realtime_lab.errors import BusClosed, SubscriberOverflow
from realtime_lab.protocol.cursor import Cursor
from realtime_lab.protocol.envelope import Event


class Attacher(Protocol):
    """What a subscription needs of the bus: attaching a sink."""

    async def attach(self, channel: str, after: After, sink: Sink) -> Attachment:
        """Deliver the replay after ``after`` to ``sink``, then every live event."""
        ...


class Subscription:
    """A bounded-queue sink exposed as an async iterator (see ``Bus.subscribe``)."""

    def __init__(self, bus: Attacher, channel: str, after: After, maxsize: int) -> None:
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
