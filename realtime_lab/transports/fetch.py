"""Fetch streaming, the ChatGPT way: ``POST /api/chats/stream`` answers with the chat as SSE.

The browser POSTs the prompt with ``fetch()`` (the body of ``POST /api/chats``) and reads the
answer from the same response's ``ReadableStream``: Server-Sent Events with the same envelope and
ids as ``/sse/chat.<id>``. The stream opens with ``retry:`` and one ``chat`` event without an id
(``{"chat": {...}}``: which chat this is, and where else it can be read), then the chat's events.

Resuming: a chat channel's epoch is the chat's id, so an event id names its chat. A retry of the
same request carrying ``Last-Event-ID`` (as ``@microsoft/fetch-event-source`` sends it)
continues that chat after that id instead of starting a new one. On a shared bus the retry may
reach any process: one that does not generate the chat finds its record in the bus backend and
streams the chat's channel from the cursor (history, then live, through the hub, as ``/sse``
does), up to the chat's ``end``. A chat no process knows is a 404.

Aborting: when the client goes away before the chat's ``end``, the chat is cancelled, after
``--fetch-abort-grace`` seconds unless a resume comes first (a cut connection and an abort look
the same to the server; the grace is what lets a cut stream resume). The generating process
counts the streams of its chats on every process (:mod:`realtime_lab.transports.abortgrace`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from realtime_lab.errors import BusError, UnknownChat
from realtime_lab.feed.chats import Chat
from realtime_lab.protocol.channels import chat_id_of
from realtime_lab.protocol.cursor import Cursor
from realtime_lab.protocol.envelope import dumps
from realtime_lab.protocol.sse import encode_event
from realtime_lab.transports.access import IDENTITY_KEY, Need
from realtime_lab.transports.accounting import Counters, MeteredResponse
from realtime_lab.transports.chatstart import start_chat
from realtime_lab.transports.keys import (
    ABORT_GRACE_KEY,
    ACCESS_KEY,
    CHAOS_KEY,
    CHATS_KEY,
    HUB_KEY,
    SLOTS_KEY,
)
from realtime_lab.transports.params import json_body
from realtime_lab.transports.preamble import after_param, client_tag, open_request
from realtime_lab.transports.problems import HTTPProblem
from realtime_lab.transports.sse import SSEConnection, stream_events, stream_is_over
from realtime_lab.transports.stream import CLEAN_ENDS


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
    hub = app[HUB_KEY]
    try:
        # Before anything is started: a refused request must not leave a chat behind.
        app[CHAOS_KEY].maybe_fail("fetch")
        identity = app[ACCESS_KEY].require(request, Need.USER)
        if identity is not None:
            request[IDENTITY_KEY] = identity
        key = identity.user if identity is not None else f"addr:{request.remote}"
        slot = app[SLOTS_KEY].claim(key)
    except web.HTTPException:
        hub.record("fetch", _client_of(request), Counters(requests=1, errors=1))
        raise
    grace = app[ABORT_GRACE_KEY]
    chat: Chat | None = None
    counted = False
    reason = "client-gone"
    try:
        try:
            chat = await _chat_for(request)
        except web.HTTPException:
            hub.record("fetch", _client_of(request), Counters(requests=1, errors=1))
            raise
        if chat.id in app[CHATS_KEY]:
            # At once, before any await: a resume may come before the old stream's end is seen.
            await grace.opened(chat)
            counted = True
        opening = await open_request(
            request, "fetch", channel=chat.channel, resume_header=True, inject_faults=False
        )
        if not counted:
            # Another process's chat: told only once this request may read it.
            try:
                await grace.opened(chat)
            except BusError as exc:
                problem = HTTPProblem(503, "bus-unavailable", str(exc))
                raise opening.refuse(request, problem) from None
            counted = True
        if await stream_is_over(request, opening):
            # Resumed from the end's own id: nothing more will come (as /sse answers it).
            reason = "done"
            counters = opening.counters
            return MeteredResponse(
                b"", "fetch", opening.client, counters, hub, status=204, content_type=None
            )
        response, reason = await stream_events(
            request, opening, FetchConnection, chat_header(request, chat)
        )
        return response
    finally:
        slot.release()
        if chat is not None and counted:
            grace.closed(chat, cleanly=reason in CLEAN_ENDS)


def _client_of(request: web.Request) -> str | None:
    try:
        return client_tag(request)
    except HTTPProblem:
        return None  # counted without a tag: the tag is what was wrong


async def _chat_for(request: web.Request) -> Chat:
    """The chat a fetch stream request names (``Last-Event-ID``) or starts (its body)."""
    header = request.headers.get("Last-Event-ID")
    if not header:
        return await start_chat(request, await json_body(request))
    cursor = after_param(header, "Last-Event-ID")
    if not isinstance(cursor, Cursor):
        raise HTTPProblem(400, "invalid-cursor", "Last-Event-ID must be an event id")
    return await _resumed_chat(request, cursor)


async def _resumed_chat(request: web.Request, cursor: Cursor) -> Chat:
    """The chat ``cursor`` names: this process's, or (on a shared bus) another's snapshot."""
    chats = request.app[CHATS_KEY]
    try:
        chat = await chats.find(cursor.epoch)
    except UnknownChat:
        raise HTTPProblem(
            404, "unknown-chat", "Last-Event-ID names no chat (expired, or never)"
        ) from None
    except BusError as exc:
        raise HTTPProblem(503, "bus-unavailable", str(exc)) from None
    assert chat_id_of(chat.channel) == chat.id
    return chat
