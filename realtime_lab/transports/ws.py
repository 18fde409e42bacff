"""WebSocket: ``GET /ws/{channel}?after=ID``.

Server to client: one text frame per event, carrying the JSON envelope. The frame (header and
payload) is built once per event and written as-is to every subscriber's socket: server frames
are unmasked, so the bytes are the same for everyone.

Compression (``--compression``, see :mod:`realtime_lab.transports.compression`): when the client
offers ``permessage-deflate`` (browsers and the ``websockets`` package do), ``message`` mode
answers ``server_no_context_takeover`` and sends each event deflated once, one cached frame for
every compressing subscriber (a second broadcast beside the plain one); ``connection`` mode keeps
a deflate context per connection, so the connection writes its own frames, never the shared
ones. Client messages may be compressed either way; aiohttp's reader inflates them, bounded by
``--ws-max-message``.

Client to server (JSON text frames):

- ``{"type": "cancel"}`` cancels the chat the channel belongs to;
- ``{"type": "resume", "after": ID}`` restarts delivery after ``ID`` (a reset comes first when
  history cannot reach back that far).

A malformed message is answered with ``{"type": "error", "id": null, "data": {...}}`` and the
connection carries on; a binary message closes with 1003, an oversized one with 1009. Heartbeat:
a protocol-level ping every interval; no pong by the next one and the connection is dropped.
After ``end`` the server closes with 1000; on shutdown with 1001; an overflowing subscriber with
1013 ("try again later") and the id to resume from in the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, Final

from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from multidict import CIMultiDict

from realtime_lab.auth import Identity
from realtime_lab.bus import After, Bus
from realtime_lab.errors import BusError, LimitReached, UnknownChat
from realtime_lab.protocol.channels import CHAT_PREFIX
from realtime_lab.protocol.deflate import Agreement, ConnectionDeflater, deflate_message, negotiate
from realtime_lab.protocol.envelope import ERROR, Event, dumps
from realtime_lab.protocol.websocket import (
    PING_FRAME,
    close_frame,
    close_frame_size,
    close_reason,
    deflated_text_frame,
    text_frame,
)
from realtime_lab.transports.accounting import Hub
from realtime_lab.transports.broadcast import Broadcast
from realtime_lab.transports.chaos import Chaos
from realtime_lab.transports.keys import (
    ACCESS_KEY,
    BROADCASTS_KEY,
    BUS_KEY,
    CHAOS_KEY,
    CHATS_KEY,
    HUB_KEY,
    SETTINGS_KEY,
)
from realtime_lab.transports.preamble import Opening, after_param, open_request
from realtime_lab.transports.problems import HTTPProblem, bus_problem
from realtime_lab.transports.stream import (
    DROPPED,
    END_OF_STREAM,
    LOST,
    OVERFLOW,
    SHUTDOWN,
    TIMEOUT,
    UNAVAILABLE,
    StreamConnection,
    schedule_timeout,
    timeout_envelope,
)

log = logging.getLogger("realtime_lab.server")

TRY_AGAIN_LATER: Final = 1013
#: Invalid client messages answered before the connection is closed with 1008.
MAX_REFUSED: Final = 10


def ws_frame(event: Event) -> bytes:
    """``event`` as one text frame (cached on the event)."""
    frame = event.cache.get("ws")
    if frame is None:
        frame = event.cache["ws"] = text_frame(event.json)
    return frame


def ws_deflated_frame(event: Event) -> bytes:
    """``event`` as one text frame deflated on its own (``message`` mode; cached on the event).

    A plain frame when deflating does not make it smaller (the RFC allows either at any time).
    """
    frame = event.cache.get("ws.d")
    if frame is None:
        payload = deflate_message(event.json)
        frame = ws_frame(event) if payload is None else deflated_text_frame(payload)
        event.cache["ws.d"] = frame
    return frame


class WSConnection(StreamConnection):
    """One open WebSocket subscription."""

    __slots__ = ("_deflater", "awaiting_pong", "group_frame", "group_key")
    transport = "ws"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.awaiting_pong = False
        # The broadcast it joins: the plain frames, or the shared deflated ones.
        self.group_key, self.group_frame = "ws", ws_frame
        self._deflater: ConnectionDeflater | None = None

    def use_compression(self, agreement: Agreement | None) -> None:
        """Frame events as the handshake agreed (call before attaching)."""
        if agreement is None:
            return
        if agreement.context_takeover:
            # Its frames are its own: it stays in the plain broadcast as a member the broadcast
            # never writes for (not steady), which hands it each event to frame itself.
            self._deflater = ConnectionDeflater(agreement.window_bits)
        else:
            self.group_key, self.group_frame = "ws.d", ws_deflated_frame

    def frame(self, event: Event) -> bytes:
        return self.group_frame(event)

    def wire(self, event: Event) -> bytes:
        deflater = self._deflater
        if deflater is not None:
            # Compressed at send time, in write order (what follows is FIFO: faults, socket).
            return deflated_text_frame(deflater.message(event.json))
        return self.group_frame(event)

    def update_steady(self) -> None:
        if self._deflater is None:
            super().update_steady()
        # else: never steady, the shared frames are not what its client's inflater expects

    def heartbeat(self) -> None:
        if self.done.done():
            return
        if self.awaiting_pong:
            log.info(
                "ws connection %d sent no pong within a heartbeat interval; dropping it", self.id
            )
            self.finish(LOST)
            self.socket.abort()
            return
        self.awaiting_pong = True
        self.counters.heartbeats += 1
        self.write(PING_FRAME)

    def timeout_notice(self) -> bytes:
        return text_frame(dumps(timeout_envelope(self)))

    def overflow_signal(self) -> bytes:
        # A close frame written raw: it queues behind the unsent data, like everything else.
        return close_frame(TRY_AGAIN_LATER, f"overflow: resume after {self.last_id}")

    def send_control(self, value: dict[str, Any]) -> None:
        """Send a message that is not a bus event (errors about the client's own messages)."""
        if not self.done.done():
            self.write(text_frame(dumps(value)))


def _problem(channel: str, code: str, message: str) -> dict[str, Any]:
    return {
        "channel": channel,
        "id": None,
        "type": ERROR,
        "data": {"code": code, "message": message},
        "ts": None,
    }


async def ws(request: web.Request) -> web.StreamResponse:
    """``GET /ws/{channel}``: the WebSocket endpoint (see the module docstring)."""
    app = request.app
    hub, bus, settings, chaos = app[HUB_KEY], app[BUS_KEY], app[SETTINGS_KEY], app[CHAOS_KEY]
    try:
        opening = await open_request(request, "ws", stream=True, browser_origin=True)
    except HTTPProblem as exc:
        if exc.status != 429:
            raise
        # A browser's WebSocket never sees a refused handshake's status: say it with a close
        # code it does see (1013, try again later) and the reason.
        wait = exc.headers.get("Retry-After", "5")
        why = f"{exc.code}: {exc.message} (retry after {wait} s)"
        return await _refuse_upgrade(request, settings.ws_max_message, why)
    try:
        return await _serve(request, opening, hub, bus, settings.ws_max_message, chaos)
    finally:
        opening.release()


class _WebSocketResponse(web.WebSocketResponse):
    """aiohttp's WebSocket with this server's ``permessage-deflate`` answer.

    aiohttp negotiates the extension its own way (it would answer with context takeover and no
    window limit, and compress what aiohttp itself sends); here its negotiation stays off
    (``compress=False``) and the handshake adds :func:`negotiate`'s answer instead, telling
    aiohttp's reader that client frames may be compressed. aiohttp itself only ever sends
    control frames on this socket (pong, close), which are never compressed.
    """

    def __init__(self, agreement: Agreement | None, max_msg: int) -> None:
        super().__init__(autoping=False, max_msg_size=max_msg, compress=False)
        self.agreement = agreement

    def _handshake(self, request: Any) -> tuple[CIMultiDict[str], str | None, int, bool]:
        headers, protocol, _, _ = super()._handshake(request)
        if self.agreement is None:
            return headers, protocol, 0, False
        headers[hdrs.SEC_WEBSOCKET_EXTENSIONS] = self.agreement.header()
        # 15: aiohttp's reader inflates client messages (with a window that takes any).
        return headers, protocol, 15, False


async def _refuse_upgrade(request: web.Request, max_msg: int, why: str) -> web.WebSocketResponse:
    sock = web.WebSocketResponse(autoping=False, max_msg_size=max_msg, compress=False)
    await sock.prepare(request)
    await _close(sock, TRY_AGAIN_LATER, why[:120])
    return sock


async def _serve(
    request: web.Request,
    opening: Opening,
    hub: Hub,
    bus: Bus,
    max_msg: int,
    chaos: Chaos,
) -> web.StreamResponse:
    channel, after = opening.channel, opening.after
    client, counters = opening.client, opening.counters
    settings = request.app[SETTINGS_KEY]
    offers = request.headers.getall(hdrs.SEC_WEBSOCKET_EXTENSIONS, ())
    agreement = negotiate(offers, settings.compression) if offers else None
    sock = _WebSocketResponse(agreement, max_msg)
    await sock.prepare(request)
    counters.bytes += request._payload_writer.output_size  # the 101 handshake answer
    conn = WSConnection(request, channel, client, chaos, settings.send_buffer)
    conn.use_compression(agreement)
    conn.counters = counters
    hub.register(conn)
    timer = schedule_timeout(conn, settings.stream_timeout)
    session = _Session(request, sock, conn, bus, channel, opening.identity)
    reader = asyncio.create_task(session.read(), name=f"ws-reader-{conn.id}")
    try:
        await session.attach(after)
        await asyncio.wait((reader, conn.done), return_when=asyncio.FIRST_COMPLETED)
        reason = conn.done.result() if conn.done.done() else LOST
        if not reader.done():
            # Stop reading before closing: with a receive() pending, aiohttp's close() drops the
            # TCP connection right after its close frame, the client's answering close frame
            # meets a closed socket and the kernel resets the connection (RST, no FIN) - what
            # standard clients (websockets, aiohttp, browsers) saw. Without one, close() waits
            # for the client's close frame, as RFC 6455 section 7.1.1 wants.
            reader.cancel()
            await asyncio.wait((reader,))
        if reason == END_OF_STREAM:
            await _close(sock, WSCloseCode.OK, "end", conn)
        elif reason == SHUTDOWN:
            await _close(sock, WSCloseCode.GOING_AWAY, "server shutting down", conn)
        elif reason == TIMEOUT:
            await _close(sock, WSCloseCode.OK, "timeout: resume on a new connection", conn)
        elif reason == UNAVAILABLE:
            await _close(sock, TRY_AGAIN_LATER, conn.problem, conn)
        elif reason not in (OVERFLOW, DROPPED):
            await _close(sock, WSCloseCode.OK, "", conn)
    finally:
        if timer is not None:
            timer.cancel()
        session.detach()
        conn.discard()
        reader.cancel()
        try:
            # Waits for the reader without swallowing a cancellation of this handler itself
            # (aiohttp cancels it when the client goes away, possibly right here).
            await asyncio.wait((reader,))
        finally:
            hub.unregister(conn)
        if not reader.cancelled() and reader.exception() is not None:
            log.error("ws %d: reader failed", conn.id, exc_info=reader.exception())
    return sock


async def _close(
    sock: web.WebSocketResponse, code: int, message: str, conn: WSConnection | None = None
) -> None:
    if not sock.closed:
        if conn is not None:
            conn.counters.bytes += close_frame_size(message)
        # Bounded: a client that never answers the close frame must not hold the handler.
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(2.0):
                await sock.close(code=code, message=close_reason(message))


class _Session:
    """The reading half of one WebSocket, and its current bus attachment."""

    def __init__(
        self,
        request: web.Request,
        sock: web.WebSocketResponse,
        conn: WSConnection,
        bus: Bus,
        channel: str,
        identity: Identity | None,
    ) -> None:
        self.request = request
        self.sock = sock
        self.conn = conn
        self.bus = bus
        self.channel = channel
        self.identity = identity
        self.group: Broadcast | None = None
        self.refused = 0  # invalid messages so far

    async def attach(self, after: After) -> None:
        """Serve the channel from ``after``; a bus that cannot closes with 1013 and why."""
        self.detach()
        conn = self.conn
        try:
            self.group = await self.request.app[BROADCASTS_KEY].attach(
                conn, self.channel, after, conn.group_key, conn.group_frame
            )
        except (BusError, LimitReached) as exc:
            problem = bus_problem(exc)
            conn.fail(problem.code, problem.message)

    def detach(self) -> None:
        if self.group is not None:
            self.group.remove(self.conn)
            self.group = None

    async def read(self) -> None:
        sock, conn = self.sock, self.conn
        while True:
            msg = await sock.receive()
            if msg.type == WSMsgType.TEXT:
                await self.on_text(msg.data)
                if self.refused >= MAX_REFUSED:
                    # A client that keeps sending junk is not a client to keep answering.
                    log.warning("ws %d: %d invalid messages; closing", conn.id, self.refused)
                    await _close(
                        sock, WSCloseCode.POLICY_VIOLATION, "too many invalid messages", conn
                    )
                    return
            elif msg.type == WSMsgType.PING:
                await sock.pong(msg.data)
            elif msg.type == WSMsgType.PONG:
                conn.awaiting_pong = False
            elif msg.type == WSMsgType.BINARY:
                log.warning("ws %d: binary message refused", conn.id)
                conn.counters.errors += 1
                await _close(
                    sock, WSCloseCode.UNSUPPORTED_DATA, "binary messages are not supported", conn
                )
                return
            else:  # CLOSE, CLOSING, CLOSED, ERROR (an oversized message closes with 1009)
                if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    # aiohttp answered with a close frame of its own: code only, no reason.
                    conn.counters.bytes += close_frame_size()
                if msg.type == WSMsgType.ERROR:
                    log.warning("ws %d: %s", conn.id, msg.data)
                    conn.counters.errors += 1
                return

    async def on_text(self, text: str) -> None:
        conn = self.conn
        try:
            message = json.loads(text)
        except ValueError:
            return self._refuse("invalid-json", "messages are JSON objects")
        if not isinstance(message, dict):
            return self._refuse("invalid-message", "messages are JSON objects")
        kind = message.get("type")
        if kind == "cancel":
            if not self.channel.startswith(CHAT_PREFIX):
                return self._refuse("not-a-chat", "only chat channels can be cancelled")
            chats, chat_id = self.request.app[CHATS_KEY], self.channel[len(CHAT_PREFIX) :]
            try:
                await self.request.app[ACCESS_KEY].check_chat(self.identity, chat_id, chats)
                await chats.cancel_anywhere(chat_id)  # on whichever process generates it
            except HTTPProblem as exc:
                return self._refuse(exc.code, exc.message)
            except UnknownChat as exc:
                return self._refuse("unknown-chat", str(exc))
            except BusError as exc:
                return self._refuse("bus-unavailable", str(exc))
        elif kind == "resume":
            raw = message.get("after")
            if raw is not None and not isinstance(raw, str):
                return self._refuse("invalid-cursor", "after is a string")
            try:
                after = after_param(raw)
            except HTTPProblem as exc:
                return self._refuse(exc.code, exc.message)
            conn.counters.reconnects += 1
            await self.attach(after)
        else:
            return self._refuse("unknown-type", f"unknown message type {kind!r}")
        return None

    def _refuse(self, code: str, message: str) -> None:
        log.warning("ws %d: refused a client message: %s", self.conn.id, message)
        self.conn.counters.errors += 1
        self.refused += 1
        if self.refused >= MAX_REFUSED:
            return  # read() closes the connection
        self.conn.send_control(_problem(self.channel, code, message))
