"""Python clients for the five transports, behind one async-iterator interface.

::

    from realtime_lab.clients import open_stream

    async with open_stream("http://127.0.0.1:8080", "ticker", "sse") as client:
        async for event in client:  # each event once, in order; stops after "end"
            print(event.type, event.data)
    print(client.stats.summary())

A fetch stream (``POST /api/chats/stream``, the ChatGPT way) creates the chat it streams, so it
takes the chat's request instead of a channel::

    async with open_stream(url, None, "fetch", chat={"prompt": "Hi", "seed": 1}) as client:
        async for event in client:
            ...
    print(client.chat)  # the chat the stream named: id, channel, ...

Every client reconnects by itself (exponential backoff with full jitter) and resumes after the
last event it yielded; a ``reset`` event tells the caller that history was lost meanwhile.

Against a server with auth on, pass ``token=`` (a user token, ``realtime-lab token``); add
``use_tickets=True`` to open each stream with a single-use ticket instead, as a browser-like
component does::

    open_stream(url, "chat.ab12", "ws", token=token, use_tickets=True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from realtime_lab.clients.base import RETRY_AFTER_MAX_S, Sequencer, StreamClient
from realtime_lab.clients.fetch import FetchClient
from realtime_lab.clients.longpoll import LongPollClient
from realtime_lab.clients.poll import PollClient
from realtime_lab.clients.sse import SSEClient
from realtime_lab.clients.stats import ClientStats
from realtime_lab.clients.ws import WSClient
from realtime_lab.errors import ClientError, ReconnectsExhausted, ServerRefused

#: Transport names, in the order of the comparison: short poll, long poll, SSE, WebSocket,
#: fetch streaming.
TRANSPORTS: Final = ("poll", "longpoll", "sse", "ws", "fetch")
#: The transports that read a channel by name (``fetch`` streams the chat it creates).
CHANNEL_TRANSPORTS: Final = ("poll", "longpoll", "sse", "ws")

CLIENTS: Final[dict[str, type[StreamClient]]] = {
    "poll": PollClient,
    "longpoll": LongPollClient,
    "sse": SSEClient,
    "ws": WSClient,
    "fetch": FetchClient,
}


def open_stream(
    base_url: str,
    channel: str | None,
    transport: str,
    *,
    chat: Mapping[str, Any] | None = None,
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
    token: str | None = None,
    use_tickets: bool = False,
    retry_after_max: float = RETRY_AFTER_MAX_S,
) -> StreamClient:
    """A client for ``channel`` on the server at ``base_url`` over ``transport``, or (``fetch``)
    for the chat ``chat`` asks for.

    Nothing connects yet: use the result as ``async with client:`` and ``async for event in
    client:``. Iteration yields each event once and in order (``reset`` included), yields ``end``
    and stops; it raises :class:`~realtime_lab.errors.ServerRefused` on a 4xx answer and
    :class:`~realtime_lab.errors.ReconnectsExhausted` once ``max_reconnects`` attempts in a row
    failed (``None``: never give up).

    Refusals: a 401 (no, an invalid or an expired credential) or a 403 (another user's chat, a
    missing scope) raises ``ServerRefused`` with its ``status`` and ``code`` at once: mint a new
    token, or use the right one, and open a new stream with ``after=client.last_id``. A 429
    (the server's bound of open streams) is not final: the client waits at least its
    ``Retry-After`` (up to ``retry_after_max``), counts it in ``stats.throttled`` and the log,
    and tries again; so does a WebSocket closed with 1013 for any reason but ``overflow: ...``
    (which carries no delay: the client waits its longest backoff, ``backoff_max``). Each of
    those counts toward ``max_reconnects``, and ``ReconnectsExhausted`` says they were refusals.

    Args:
        base_url: the server's root, e.g. ``http://127.0.0.1:8080`` (a path prefix is kept).
        channel: the channel name, e.g. ``ticker`` or ``chat.<id>``; ``None`` for ``fetch``,
            whose stream creates its chat (and names its channel: read ``client.channel`` and
            ``client.chat`` once the first event arrived).
        transport: ``poll``, ``longpoll``, ``sse``, ``ws`` or ``fetch``.
        chat: ``fetch`` only, and required there: the chat's request, the JSON body of
            ``POST /api/chats`` (``{"prompt", "seed", "ttft_ms", "token_ms",
            "max_tokens"}``), sent as is with every POST, resumes included.
        after: where to start: ``None`` for all retained history, ``"now"`` for new events
            only, or an event id to resume after. ``fetch``: ``None`` starts a new chat; an
            event id resumes the chat it names after it (``"now"`` is refused with a 400).
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
        token: a user token, sent as ``Authorization: Bearer`` on every request (each poll, the
            SSE request, the WebSocket handshake, each fetch POST, ``cancel()``); ``None``
            sends none (the session's own cookie, e.g. ``rtl_session``, still goes).
        use_tickets: before each stream request (each (re)connection; for the polling
            transports each request) ``POST /api/tickets {"channel"}`` with the bearer token,
            then open the stream with ``?ticket=`` and the last id (``?after=``, or
            ``Last-Event-ID`` for SSE) and no ``Authorization`` header, as a browser's
            ``EventSource``/``WebSocket`` must. A server with auth off answers ``auth-off``:
            the client then streams without tickets. Each ticket is counted in
            ``stats.tickets`` (and ``stats.requests``). Not for ``fetch``: its POST creates
            the chat, so there is no channel to take a ticket for, and a ``fetch()`` can send
            headers anyway; it always sends the bearer token (and logs that once).
        retry_after_max: the longest server-requested delay (``Retry-After``,
            ``retry_after_ms``) honoured, in seconds; a longer one is cut to this. It is not
            ``backoff_max`` on purpose: a server refusing for load asks for more than a
            client's own backoff would wait, and should get it.

    Raises:
        ClientError: ``transport`` is not one of :data:`TRANSPORTS`; or ``fetch`` without
            ``chat``, or with a ``channel``; or another transport with ``chat`` (start the chat
            with ``POST /api/chats`` and stream its ``channel``), or without a ``channel``.
    """
    try:
        cls = CLIENTS[transport]
    except KeyError:
        raise ClientError(
            f"unknown transport {transport!r}: choose one of {', '.join(TRANSPORTS)}"
        ) from None
    options: dict[str, Any] = {
        "after": after,
        "session": session,
        "client_tag": client_tag,
        "poll_interval": poll_interval,
        "longpoll_timeout": longpoll_timeout,
        "backoff_initial": backoff_initial,
        "backoff_max": backoff_max,
        "max_reconnects": max_reconnects,
        "connect_timeout": connect_timeout,
        "idle_timeout": idle_timeout,
        "token": token,
        "use_tickets": use_tickets,
        "retry_after_max": retry_after_max,
    }
    if cls is FetchClient:
        if chat is None:
            raise ClientError("fetch creates the chat it streams: pass chat={'prompt': ...}")
        if channel is not None:
            raise ClientError(
                "fetch streams the chat it creates, not a channel: pass channel=None (to resume "
                "a chat over fetch, pass after=<one of its event ids>)"
            )
        return FetchClient(base_url, chat, **options)
    if chat is not None:
        raise ClientError(
            f"{transport} reads a channel: POST /api/chats first and stream its channel, or use "
            "fetch to start and stream a chat in one request"
        )
    if channel is None:
        raise ClientError(f"{transport} needs a channel")
    return cls(base_url, channel, **options)


__all__ = [
    "CHANNEL_TRANSPORTS",
    "CLIENTS",
    "TRANSPORTS",
    "ClientError",
    "ClientStats",
    "FetchClient",
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
