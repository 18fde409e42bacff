"""Fetch streaming, the ChatGPT way: ``POST /api/chats/stream`` answers with the chat as SSE.

The browser POSTs the prompt with ``fetch()`` (the body of ``POST /api/chats``) and reads the
answer from the same response's ``ReadableStream``: Server-Sent Events with the same envelope and
ids as ``/sse/chat.<id>``. The stream opens with ``retry:`` and one ``chat`` event without an id
(``{"chat": {...}}``: which chat this is, and where else it can be read), then the chat's events.

Resuming: a chat channel's epoch is the chat's id, so an event id names its chat. A retry of the
same request carrying ``Last-Event-ID`` (as ``@microsoft/fetch-event-source`` sends it)
continues that chat after that id instead of starting a new one.

Aborting: when the client goes away before the chat's ``end``, the chat is cancelled, after
``--fetch-abort-grace`` seconds unless a resume comes first (a cut connection and an abort look
the same to the server; the grace is what lets a cut stream resume).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from realtime_lab.errors import UnknownChat
from realtime_lab.feed.chats import Chat
from realtime_lab.protocol.channels import chat_id_of
from realtime_lab.protocol.cursor import Cursor
from realtime_lab.protocol.envelope import dumps
from realtime_lab.protocol.sse import encode_event
from realtime_lab.transports.access import IDENTITY_KEY, Need
from realtime_lab.transports.accounting import Counters
from realtime_lab.transports.chatstart import start_chat
from realtime_lab.transports.keys import ABORT_GRACE_KEY, ACCESS_KEY, CHAOS_KEY, CHATS_KEY, HUB_KEY
from realtime_lab.transports.params import json_body
from realtime_lab.transports.preamble import after_param, client_tag, open_request
from realtime_lab.transports.problems import HTTPProblem
from realtime_lab.transports.sse import SSEConnection, stream_events
from realtime_lab.transports.stream import END_OF_STREAM, SHUTDOWN


class FetchConnection(SSEConnection):
    """One fetch stream: an SSE stream counted as its own transport."""

    __slots__ = ()
    transport = "fetch"


def chat_header(request: web.Request, chat: Chat) -> bytes:
    """The opening ``chat`` event: which chat this stream is, no id (not one of its events)."""
    value: dict[str, Any] = {"chat": {**chat.to_dict(), "stream": "/api/chats/stream"}}
    return encode_event(dumps(value).decode(), event="chat")


async def fetch_stream(request: web.Request) -> web.StreamResponse:
    """``POST /api/chats/stream``: start a chat (or resume one) and stream it back as SSE."""
    app = request.app
    try:
        # Before anything is started: an injected failure must not leave a chat behind.
        app[CHAOS_KEY].maybe_fail("fetch")
    except HTTPProblem:
        app[HUB_KEY].record("fetch", client_tag(request), Counters(requests=1, errors=1))
        raise
    access = app[ACCESS_KEY]
    identity = access.require(request, Need.USER)
    if identity is not None:
        request[IDENTITY_KEY] = identity
    header = request.headers.get("Last-Event-ID")
    if header:
        cursor = after_param(header, "Last-Event-ID")
        if not isinstance(cursor, Cursor):
            raise HTTPProblem(400, "invalid-cursor", "Last-Event-ID must be an event id")
        chat = _resumed_chat(request, cursor)
    else:
        chat = await start_chat(request, await json_body(request))
    grace = app[ABORT_GRACE_KEY]
    grace.resumed(chat.id)
    opening = await open_request(
        request,
        "fetch",
        channel=chat.channel,
        resume_header=True,
        stream=True,
        inject_faults=False,
    )
    reason = "client-gone"
    try:
        response, reason = await stream_events(
            request, opening, FetchConnection, chat_header(request, chat)
        )
        return response
    finally:
        opening.release()
        if reason not in (END_OF_STREAM, SHUTDOWN):
            grace.client_gone(chat)


def _resumed_chat(request: web.Request, cursor: Cursor) -> Chat:
    chats = request.app[CHATS_KEY]
    try:
        chat = chats.get(cursor.epoch)
    except UnknownChat:
        raise HTTPProblem(
            404, "unknown-chat", "Last-Event-ID names no chat here (expired, or never)"
        ) from None
    assert chat_id_of(chat.channel) == chat.id
    return chat
