"""Python clients for the four transports, behind one async-iterator interface.

::

    from realtime_lab.clients import open_stream

    async with open_stream("http://127.0.0.1:8080", "ticker", "sse") as client:
        async for event in client:  # each event once, in order; stops after "end"
            print(event.type, event.data)
    print(client.stats.summary())

Every client reconnects by itself (exponential backoff with full jitter) and resumes after the
last event it yielded; a ``reset`` event tells the caller that history was lost meanwhile.
"""

from __future__ import annotations

from typing import Final

import aiohttp

from realtime_lab.clients.base import Sequencer, StreamClient
from realtime_lab.clients.longpoll import LongPollClient
from realtime_lab.clients.poll import PollClient
from realtime_lab.clients.sse import SSEClient
from realtime_lab.clients.stats import ClientStats
from realtime_lab.clients.ws import WSClient
from realtime_lab.errors import ClientError, ReconnectsExhausted, ServerRefused

#: Transport names, in the order of the comparison: short poll, long poll, SSE, WebSocket.
TRANSPORTS: Final = ("poll", "longpoll", "sse", "ws")

CLIENTS: Final[dict[str, type[StreamClient]]] = {
    "poll": PollClient,
    "longpoll": LongPollClient,
    "sse": SSEClient,
    "ws": WSClient,
}


def open_stream(
    base_url: str,
    channel: str,
    transport: str,
    *,
    after: str | None = None,
    session: aiohttp.ClientSession | None = None,
    client_tag: str | None = None,
    poll_interval: float = 0.25,
    longpoll_timeout: float = 25.0,
    backoff_initial: float = 0.1,
    backoff_max: float = 5.0,
    max_reconnects: int | None = None,
    connect_timeout: float = 10.0,
    idle_timeout: float | None = None,
) -> StreamClient:
    """A client for ``channel`` on the server at ``base_url`` over ``transport``.

    Nothing connects yet: use the result as ``async with client:`` and ``async for event in
    client:``. Iteration yields each event once and in order (``reset`` included), yields ``end``
    and stops; it raises :class:`~realtime_lab.errors.ServerRefused` on a 4xx answer and
    :class:`~realtime_lab.errors.ReconnectsExhausted` once ``max_reconnects`` attempts in a row
    failed (``None``: never give up).

    Args:
        base_url: the server's root, e.g. ``http://127.0.0.1:8080`` (a path prefix is kept).
        channel: the channel name, e.g. ``ticker`` or ``chat.<id>``.
        transport: ``poll``, ``longpoll``, ``sse`` or ``ws``.
        after: where to start: ``None`` for all retained history, ``"now"`` for new events
            only, or an event id to resume after.
        session: an aiohttp session to use; the client makes (and closes) its own if ``None``.
        client_tag: sent as ``?client=`` so ``GET /api/stats?client=TAG`` reports this client.
        poll_interval: seconds between short polls (when the server has nothing more).
        longpoll_timeout: seconds a long-poll asks the server to wait.
        backoff_initial: base reconnection delay in seconds (SSE: until the server's
            ``retry:`` replaces it).
        backoff_max: cap of the reconnection delay in seconds.
        max_reconnects: failed reconnection attempts in a row before giving up.
        connect_timeout: seconds to establish a connection (and, for SSE and WebSocket, to get
            the answer's headers).
        idle_timeout: seconds without a byte before a streaming connection is deemed dead (set
            it above the server's heartbeat); for polls, the wait for an answer beyond the
            requested one. ``None``: SSE/WebSocket wait for ever, polls 30 s / 10 s.

    Raises:
        ClientError: ``transport`` is not one of :data:`TRANSPORTS`.
    """
    try:
        cls = CLIENTS[transport]
    except KeyError:
        raise ClientError(
            f"unknown transport {transport!r}: choose one of {', '.join(TRANSPORTS)}"
        ) from None
    return cls(
        base_url,
        channel,
        after=after,
        session=session,
        client_tag=client_tag,
        poll_interval=poll_interval,
        longpoll_timeout=longpoll_timeout,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        max_reconnects=max_reconnects,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout,
    )


__all__ = [
    "CLIENTS",
    "TRANSPORTS",
    "ClientError",
    "ClientStats",
    "LongPollClient",
    "PollClient",
    "ReconnectsExhausted",
    "SSEClient",
    "Sequencer",
    "ServerRefused",
    "StreamClient",
    "WSClient",
    "open_stream",
]
