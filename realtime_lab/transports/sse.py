"""Server-Sent Events: ``GET /sse/{channel}``, resuming from ``Last-Event-ID`` or ``?after=ID``.

Each event is one SSE message: ``id:`` and the JSON envelope in ``data:``. ``token`` events carry
no ``event:`` field so a browser's ``onmessage`` receives them; every other type is a named event
(``end``, ``error``, ``reset``, application types) for ``addEventListener``. The stream opens
with ``retry:``, carries a ``: ping`` comment every heartbeat interval, and is closed by the server
after ``end``. A client that comes back after the end (``Last-Event-ID`` = the end's id) gets
``204 No Content``, which the WHATWG spec defines as "stop reconnecting".

Why not ``aiohttp_sse.EventSourceResponse`` here: its ``send()`` formats every message per
subscriber and awaits a drain per write, i.e. one coroutine per subscriber per event. This
handler writes bytes that are SSE-formatted and chunk-framed once per event, for all subscribers,
directly to each socket. (``aiohttp-sse`` serves the one-subscriber OpenAI-compatible endpoint,
where its API is the right fit: see :mod:`realtime_lab.openai_api`.)
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from realtime_lab.errors import BusError, LimitReached
from realtime_lab.protocol.cursor import Cursor
from realtime_lab.protocol.envelope import TOKEN, Event, dumps
from realtime_lab.protocol.sse import encode_comment, encode_event, encode_retry
from realtime_lab.transports.accounting import Counters, MeteredResponse
from realtime_lab.transports.compression import StreamEncoder, stream_encoder, stream_headers
from realtime_lab.transports.keys import (
    BROADCASTS_KEY,
    BUS_KEY,
    CHAOS_KEY,
    HUB_KEY,
    SETTINGS_KEY,
)
from realtime_lab.transports.preamble import Opening, open_request
from realtime_lab.transports.problems import bus_problem
from realtime_lab.transports.stream import (
    CLEAN_ENDS,
    UNAVAILABLE,
    StreamConnection,
    schedule_timeout,
    timeout_envelope,
)

SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each write through, do not buffer the stream
}


def chunked(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk carrying ``payload``."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def sse_frame(event: Event) -> bytes:
    """``event`` as one SSE message (cached on the event)."""
    frame = event.cache.get("sse")
    if frame is None:
        if event.type == TOKEN and _plain_id(event.id):
            # What encode_event writes for it, without its checks and splitting: compact JSON
            # has no CR or LF (it escapes them), so the envelope is always one data line.
            frame = b"id: %s\ndata: %s\n\n" % (event.id.encode(), event.json)
        else:
            name = None if event.type == TOKEN else event.type
            frame = encode_event(event.json.decode(), event=name, id=event.id)
        event.cache["sse"] = frame
    return frame


def _plain_id(event_id: str) -> bool:
    return "\n" not in event_id and "\r" not in event_id and "\0" not in event_id


def sse_chunk(event: Event) -> bytes:
    """``event`` as one SSE message inside one HTTP chunk (cached on the event)."""
    frame = event.cache.get("sse.c")
    if frame is None:
        if event.type == TOKEN and _plain_id(event.id):
            # sse_frame's token message inside its chunk in one step (a chat's every token).
            ident, body = event.id.encode(), event.json
            size = len(ident) + len(body) + 13  # "id: " ident "\ndata: " body "\n\n"
            frame = b"%x\r\nid: %s\ndata: %s\n\n\r\n" % (size, ident, body)
        else:
            frame = chunked(sse_frame(event))
        event.cache["sse.c"] = frame
    return frame


PING: Final = encode_comment("ping")
PING_CHUNK: Final = chunked(PING)
# Before the first event: a comment line that does not end the block the opening ``retry:``
# began (a block of its own would be an empty event to httpx-sse and openai's decoder).
PING_LINE: Final = b": ping\n"
PING_LINE_CHUNK: Final = chunked(PING_LINE)


class SSEConnection(StreamConnection):
    """One open event stream."""

    __slots__ = ("encoder", "is_chunked")
    transport = "sse"

    def __init__(self, request: web.Request, *args: object, **kwargs: object) -> None:
        super().__init__(request, *args, **kwargs)  # type: ignore[arg-type]
        # HTTP/1.0 clients get a close-delimited body, everyone else chunked encoding.
        self.is_chunked = request.version >= (1, 1)
        # A compressed body (--compression connection): every write goes through it, in order.
        self.encoder: StreamEncoder | None = None

    def frame(self, event: Event) -> bytes:
        return sse_chunk(event) if self.is_chunked else sse_frame(event)

    def wire(self, event: Event) -> bytes:
        if self.encoder is not None:
            return self.raw(sse_frame(event))
        return sse_chunk(event) if self.is_chunked else sse_frame(event)

    def raw(self, payload: bytes) -> bytes:
        """``payload`` as the body carries it: compressed (now: call it in write order), chunked."""
        if self.encoder is not None:
            payload = self.encoder.encode(payload)
            if not payload:
                return b""  # an empty chunk would end the body
        return chunked(payload) if self.is_chunked else payload

    def update_steady(self) -> None:
        # A compressed body is this connection's own: the broadcast's shared bytes are not it.
        if self.encoder is None:
            super().update_steady()

    def heartbeat(self) -> None:
        if not self.done.done():
            self.counters.heartbeats += 1
            if self.encoder is not None:
                self.write(self.raw(PING if self.totals().events else PING_LINE))
            elif self.totals().events:
                self.write(PING_CHUNK if self.is_chunked else PING)
            else:
                self.write(PING_LINE_CHUNK if self.is_chunked else PING_LINE)

    def timeout_notice(self) -> bytes:
        return self.raw(encode_event(dumps(timeout_envelope(self)).decode(), event="end"))

    def overflow_signal(self) -> bytes:
        return self.problem_signal(
            "overflow", "this client fell too far behind; reconnect with Last-Event-ID to resume"
        )

    def problem_signal(self, code: str, message: str) -> bytes:
        body = dumps({"code": code, "message": message, "last_id": self.last_id})
        return self.raw(encode_event(body.decode(), event="error"))


async def sse(request: web.Request) -> web.StreamResponse:
    """``GET /sse/{channel}``: the event stream (see the module docstring)."""
    opening = await open_request(request, "sse", resume_header=True, stream=True)
    try:
        try:
            over = await stream_is_over(request, opening)
        except (BusError, LimitReached) as exc:
            raise opening.refuse(request, bus_problem(exc)) from None
        if over:
            # 204 tells an EventSource to stop reconnecting: the stream is over.
            hub, counters = request.app[HUB_KEY], opening.counters
            return MeteredResponse(
                b"", "sse", opening.client, counters, hub, status=204, content_type=None
            )
        response, _ = await stream_events(request, opening, SSEConnection)
        return response
    finally:
        opening.release()


async def stream_is_over(request: web.Request, opening: Opening) -> bool:
    """Whether ``opening`` resumes from its channel's ``end`` itself: nothing more will come.

    Only the end's own id: a later seq was never issued and is answered with a reset.
    """
    after = opening.after
    if not isinstance(after, Cursor):
        return False
    info = await request.app[BUS_KEY].info(opening.channel)
    return (
        info is not None
        and info.finished
        and after.epoch == info.epoch
        and after.seq == info.last_seq
    )


async def stream_events(
    request: web.Request,
    opening: Opening,
    kind: type[SSEConnection],
    preface: bytes = b"",
) -> tuple[web.StreamResponse, str]:
    """Answer ``request`` with the event stream ``opening`` asks for, until it ends.

    ``preface``: an SSE block written after ``retry:`` and before the first event (the fetch
    stream names its chat there). Returns the response and why the stream ended.
    """
    app = request.app
    hub, settings, chaos = app[HUB_KEY], app[SETTINGS_KEY], app[CHAOS_KEY]
    channel, client, counters = opening.channel, opening.client, opening.counters
    encoder = stream_encoder(request, settings)
    response = web.StreamResponse(headers={**SSE_HEADERS, **stream_headers(encoder)})
    await response.prepare(request)
    conn = kind(request, channel, client, chaos, settings.send_buffer)
    conn.encoder = encoder
    conn.counters = counters
    writer = request._payload_writer  # headers as aiohttp wrote them
    counters.bytes += writer.output_size
    hub.register(conn)
    timer = schedule_timeout(conn, settings.stream_timeout)
    group = None
    key, frame = ("sse.c", sse_chunk) if conn.is_chunked else ("sse", sse_frame)
    try:
        # Without its blank line the retry: field joins the next block (the preface or the first
        # event): the same to an EventSource (a field applies when its line ends), while a block
        # of its own is an empty event to httpx-sse and openai's decoder (event.json() raises).
        conn.write(conn.raw(encode_retry(settings.retry_ms)[:-1] + preface))
        try:
            group = await app[BROADCASTS_KEY].attach(conn, channel, opening.after, key, frame)
        except (BusError, LimitReached) as exc:  # the 200 is sent: say why in the stream
            problem = bus_problem(exc)
            conn.fail(problem.code, problem.message)
        reason = await conn.done
    finally:
        if timer is not None:
            timer.cancel()
        conn.discard()
        if group is not None:
            group.remove(conn)
        hub.unregister(conn)
    transport = request.transport
    clean = reason in CLEAN_ENDS or reason == UNAVAILABLE  # the client was told why, then EOF
    if clean and transport is not None and not transport.is_closing():
        before = writer.output_size
        tail = b""
        if encoder is not None:  # the compressed stream's end (gzip's checksum), then the body's
            tail = encoder.finish()
            tail = chunked(tail) if conn.is_chunked and tail else tail
            transport.write(tail)
        await response.write_eof()
        hub.record(kind.transport, client, Counters(bytes=len(tail) + writer.output_size - before))
    # After an overflow, a chaos drop or a lost client the socket is already closing: aiohttp's
    # own write_eof then fails quietly with a ConnectionError it expects.
    return response, reason
