"""WebSocket: ``GET /ws/{channel}?after=ID``.

Server to client: one text frame per event, carrying the JSON envelope. The frame (header and
payload) is built once per event and written as-is to every subscriber's socket: server frames
are unmasked and compression is off, so the bytes are the same for everyone.

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
import struct
from typing import Any, Final

from aiohttp import WSCloseCode, WSMsgType, web

from realtime_lab.bus.base import After, Bus
from realtime_lab.errors import UnknownChat
from realtime_lab.feed.chats import CHAT_PREFIX
from realtime_lab.protocol.cursor import Cursor
from realtime_lab.protocol.envelope import ERROR, Event, dumps
from realtime_lab.transports.broadcast import BROADCASTS_KEY, Broadcast
from realtime_lab.transports.common import (
    BUS_KEY,
    CHATS_KEY,
    HUB_KEY,
    SETTINGS_KEY,
    Counters,
    HTTPProblem,
    after_param,
    client_tag,
    existing_channel,
)
from realtime_lab.transports.faults import CHAOS_KEY
from realtime_lab.transports.stream import (
    DROPPED,
    END_OF_STREAM,
    LOST,
    OVERFLOW,
    SHUTDOWN,
    StreamConnection,
)

log = logging.getLogger("realtime_lab.server")

PING_FRAME: Final = b"\x89\x00"
TRY_AGAIN_LATER: Final = 1013


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final WebSocket text frame (RFC 6455 section 5.2)."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


def ws_frame(event: Event) -> bytes:
    """``event`` as one text frame (cached on the event)."""
    frame = event.cache.get("ws")
    if frame is None:
        frame = event.cache["ws"] = text_frame(event.json)
    return frame


class WSConnection(StreamConnection):
    """One open WebSocket subscription."""

    __slots__ = ("awaiting_pong",)
    transport = "ws"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.awaiting_pong = False

    def frame(self, event: Event) -> bytes:
        return ws_frame(event)

    def heartbeat(self) -> None:
        if self.done.done():
            return
        if self.awaiting_pong:
            log.info(
                "ws connection %d sent no pong within a heartbeat interval; dropping it", self.id
            )
            self.finish(LOST)
            self._transport.abort()
            return
        self.awaiting_pong = True
        self.counters.heartbeats += 1
        self.write(PING_FRAME)

    def overflow_signal(self) -> bytes:
        # A close frame written raw: it queues behind the unsent data, like everything else.
        reason = f"overflow: resume after {self.last_id}".encode()[:120]
        payload = struct.pack("!H", TRY_AGAIN_LATER) + reason
        return struct.pack("!BB", 0x88, len(payload)) + payload

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
    client = client_tag(request)
    counters = Counters(requests=1)
    try:
        chaos.maybe_fail("ws")
        channel = await existing_channel(request)
        after = after_param(request.query.get("after"))
    except (HTTPProblem, web.HTTPException):
        counters.errors += 1
        hub.record("ws", client, counters)
        raise
    if isinstance(after, Cursor):
        counters.reconnects += 1

    sock = web.WebSocketResponse(
        autoping=False, max_msg_size=settings.ws_max_message, compress=False
    )
    await sock.prepare(request)
    counters.bytes += request._payload_writer.output_size  # the 101 handshake answer
    conn = WSConnection(request, channel, client, hub, chaos, settings.send_buffer)
    conn.counters = counters
    hub.register(conn)
    session = _Session(request, sock, conn, bus, channel)
    reader = asyncio.create_task(session.read(), name=f"ws-reader-{conn.id}")
    try:
        await session.attach(after)
        await asyncio.wait((reader, conn.done), return_when=asyncio.FIRST_COMPLETED)
        reason = conn.done.result() if conn.done.done() else LOST
        if reason == END_OF_STREAM:
            await _close(sock, WSCloseCode.OK, "end", conn)
        elif reason == SHUTDOWN:
            await _close(sock, WSCloseCode.GOING_AWAY, "server shutting down", conn)
        elif reason not in (OVERFLOW, DROPPED):
            await _close(sock, WSCloseCode.OK, "", conn)
    finally:
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
                await sock.close(code=code, message=message.encode())


def close_frame_size(message: str = "") -> int:
    """Bytes of a server close frame: 2 header bytes, the 2-byte code, the reason."""
    return 4 + len(message.encode())


class _Session:
    """The reading half of one WebSocket, and its current bus attachment."""

    def __init__(
        self,
        request: web.Request,
        sock: web.WebSocketResponse,
        conn: WSConnection,
        bus: Bus,
        channel: str,
    ) -> None:
        self.request = request
        self.sock = sock
        self.conn = conn
        self.bus = bus
        self.channel = channel
        self.group: Broadcast | None = None

    async def attach(self, after: After) -> None:
        self.detach()
        self.conn.start_replay()
        try:
            self.group = await self.request.app[BROADCASTS_KEY].attach(
                self.conn, self.channel, after, "ws", ws_frame
            )
        finally:
            self.conn.end_replay()

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
            try:
                self.request.app[CHATS_KEY].cancel(self.channel[len(CHAT_PREFIX) :])
            except UnknownChat as exc:
                return self._refuse("unknown-chat", str(exc))
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
        self.conn.send_control(_problem(self.channel, code, message))
