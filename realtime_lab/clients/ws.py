"""The WebSocket client: ``GET /ws/{channel}?after=ID``, one JSON envelope per text frame.

It answers the server's pings itself (to count their bytes), resumes with ``?after=`` on each
reconnect, and treats close code 1013 with an ``overflow: ...`` reason (the server ended a
client that fell behind) as "resume now". Any other 1013 is the server at its bound of open
streams (upgraded only to be told so, as a browser would see it): the HTTP 429 case, retried
after the longest backoff. The handshake carries ``Authorization: Bearer`` with ``token``, or a
fresh ``?ticket=`` with ``use_tickets``; a handshake refused with 401 or 403 is final (the
refused handshake's body is not available, so the error's ``code`` is ``handshake-refused``).
:meth:`WSClient.cancel` sends ``{"type": "cancel"}`` on the open socket.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any, Final

import aiohttp
from aiohttp import WSMsgType

from realtime_lab.clients.base import (
    RETRYABLE_4XX,
    TOO_MANY_REQUESTS,
    Received,
    Retry,
    StreamClient,
    decode_envelope,
    http_header_bytes,
    log,
    now_ms,
    retry_after_seconds,
)
from realtime_lab.errors import ServerRefused

TRY_AGAIN_LATER: Final = 1013
#: How the server's reason starts when its 1013 ends a client that fell behind.
OVERFLOW_REASON: Final = "overflow"
#: Close codes that say this client broke the protocol: reconnecting would only repeat it.
CLIENT_FAULT_CODES: Final = frozenset({1003, 1007, 1008, 1009, 1010})
CLOSE_TIMEOUT: Final = 2.0


def frame_size(payload: int) -> int:
    """Bytes on the wire of an unmasked server frame with a ``payload``-byte payload (RFC 6455)."""
    if payload < 126:
        return 2 + payload
    if payload < 1 << 16:
        return 4 + payload
    return 10 + payload


class WSClient(StreamClient):
    """A channel over a WebSocket (see the module docstring)."""

    transport = "ws"

    def __init__(self, base_url: str, channel: str, **options: Any) -> None:
        super().__init__(base_url, channel, **options)
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def cancel(self) -> None:
        """Cancel the chat this client streams, over the open socket when there is one.

        Keep iterating to receive the chat's ``end`` (``reason: "cancelled"``).

        Raises:
            ClientError: the channel is not a chat.
        """
        self._chat_id()
        ws = self._ws
        if ws is not None and not ws.closed:
            await ws.send_str('{"type":"cancel"}')
        else:
            await super().cancel()

    async def _abort(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    def _url(self) -> Any:
        scheme = {"http": "ws", "https": "wss"}.get(self.base_url.scheme, self.base_url.scheme)
        return self.base_url.with_scheme(scheme) / "ws" / self.channel

    async def _connect(self, resume: str | None, first: bool) -> AsyncGenerator[Received, None]:
        stats = self.stats
        headers, credentials = await self._credentials()
        if self._closed:
            return  # close() came while the ticket was being taken
        try:
            async with asyncio.timeout(self.connect_timeout):
                ws = await self.session.ws_connect(
                    self._url(),
                    params=self._params(after=resume or None, **credentials),
                    headers=headers,
                    autoping=False,  # we answer pings ourselves, to count them
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                )
        except aiohttp.WSServerHandshakeError as exc:
            stats.requests += 1
            text = f"ws {self._url()}: handshake answered {exc.status} {exc.message}"
            if 400 <= exc.status < 500 and exc.status not in RETRYABLE_4XX:
                raise ServerRefused(text, exc.status, "handshake-refused") from exc
            delay = retry_after_seconds(
                exc.headers.get("Retry-After") if exc.headers is not None else None
            )
            raise Retry(text, delay, throttled=exc.status == TOO_MANY_REQUESTS) from exc
        self._ws = ws
        try:
            stats.requests += 1
            stats.connections += 1
            handshake = getattr(ws, "_response", None)  # aiohttp keeps the 101 answer privately
            if isinstance(handshake, aiohttp.ClientResponse):
                stats.bytes_received += http_header_bytes(handshake)
            while True:
                msg = await ws.receive(timeout=self.idle_timeout)
                kind = msg.type
                if kind == WSMsgType.TEXT:
                    payload: str = msg.data
                    stats.bytes_received += frame_size(len(payload.encode()))
                    received = now_ms()
                    event = self._decode(payload)
                    if event is not None:
                        yield event, received
                elif kind == WSMsgType.PING:
                    stats.bytes_received += frame_size(len(msg.data))
                    await ws.pong(msg.data)
                elif kind in (WSMsgType.PONG, WSMsgType.BINARY):
                    stats.bytes_received += frame_size(len(msg.data))
                elif kind == WSMsgType.CLOSE:
                    reason = str(msg.extra or "")
                    stats.bytes_received += frame_size(2 + len(reason.encode()))
                    self._closed_by_server(int(msg.data), reason)
                elif kind == WSMsgType.ERROR:
                    raise Retry(f"ws error: {msg.data}")
                else:  # CLOSING, CLOSED
                    raise Retry("the server closed the WebSocket")
        finally:
            self._ws = None
            await ws.close()

    def _decode(self, text: str) -> Any:
        try:
            value = json.loads(text)
        except ValueError:
            log.warning("ws %s: ignoring a frame that is not JSON", self.channel)
            return None
        if isinstance(value, dict) and value.get("id") is None and value.get("type") == "error":
            # The server's answer to a message of ours it refused, not a channel event.
            log.warning("ws %s: the server refused a client message: %s", self.channel, value)
            return None
        return decode_envelope(value, f"ws {self.channel}")

    def _closed_by_server(self, code: int, reason: str) -> None:
        if code == TRY_AGAIN_LATER and reason.startswith(OVERFLOW_REASON):
            self.stats.overflows += 1
            raise Retry(f"the server ended this slow client (close 1013 {reason!r})", 0)
        if code == TRY_AGAIN_LATER:
            # Upgraded only to be refused: not a stream established.
            self.stats.connections -= 1
            raise Retry(
                f"ws {self._url()}: the server refused another stream (close 1013 {reason!r})",
                throttled=True,
            )
        if code in CLIENT_FAULT_CODES:
            raise ServerRefused(f"ws {self.channel}: closed {code} {reason!r}", code, "ws-close")
        raise Retry(f"the server closed the WebSocket ({code} {reason!r}) before the end event")
