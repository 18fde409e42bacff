"""The Server-Sent Events client: ``GET /sse/{channel}`` parsed by the project's WHATWG decoder.

It behaves like a browser's ``EventSource``: it reconnects after the server's ``retry:`` delay
(the base of its backoff), resumes with ``Last-Event-ID``, and stops when a reconnect is answered
``204 No Content``. An ``error`` event with ``code: "overflow"`` (the server ended a client that
fell behind) is not yielded: the client counts it and resumes at once from the last id.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp

from realtime_lab.clients.base import (
    Finished,
    Received,
    Retry,
    StreamClient,
    decode_envelope,
    http_header_bytes,
    now_ms,
)
from realtime_lab.errors import ServerRefused
from realtime_lab.protocol.envelope import ERROR
from realtime_lab.protocol.sse import ServerSentEvent, SSEDecoder

OVERFLOW = "overflow"
LAST_CHUNK = len(b"0\r\n\r\n")


def _overflow(message: ServerSentEvent) -> dict[str, Any] | None:
    """The overflow notice ``message`` carries, if it is one (it is not an envelope: no id)."""
    if message.event != ERROR:
        return None
    try:
        value = json.loads(message.data)
    except ValueError:
        return None
    if isinstance(value, dict) and value.get("code") == OVERFLOW and "id" not in value:
        return value
    return None


class SSEClient(StreamClient):
    """A channel over Server-Sent Events (see the module docstring)."""

    transport = "sse"

    def __init__(self, base_url: str, channel: str, **options: Any) -> None:
        super().__init__(base_url, channel, **options)
        # One decoder for the client's life: like an EventSource, it keeps the reconnection
        # time and the last event id across connections.
        self.decoder = SSEDecoder()

    async def _connect(self, resume: str | None, first: bool) -> AsyncGenerator[Received, None]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if not first and resume:
            # As a browser does: the URL keeps the first ?after, the header says where we are.
            headers["Last-Event-ID"] = resume
        url = self.base_url / "sse" / self.channel
        params = self._params(after=self.after or None)
        async with asyncio.timeout(self.connect_timeout):
            response = await self.session.get(
                url, params=params, headers=headers, timeout=self._http_timeout(self.idle_timeout)
            )
        self._response = response
        try:
            self.stats.requests += 1
            self.stats.bytes_received += http_header_bytes(response)
            if response.status == 204:
                raise Finished
            if response.status != 200:
                body = await response.read()
                self.stats.bytes_received += len(body)
                self._http_error(response, body)
            if response.content_type != "text/event-stream":
                raise ServerRefused(
                    f"sse {response.url}: expected text/event-stream, got {response.content_type}",
                    response.status,
                    "unexpected-content-type",
                )
            self.stats.connections += 1
            async for received in self._read(response):
                yield received
        finally:
            self._response = None
            response.close()
            self.decoder.close()

    async def _read(self, response: aiohttp.ClientResponse) -> AsyncGenerator[Received, None]:
        stats, decoder = self.stats, self.decoder
        chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
        in_chunk = 0
        async for data, end_of_chunk in response.content.iter_chunks():
            stats.bytes_received += len(data)
            if chunked:
                # Count the chunked framing too ("<hex size>\r\n" ... "\r\n"): it is on the wire.
                in_chunk += len(data)
                if end_of_chunk and in_chunk:
                    stats.bytes_received += len(f"{in_chunk:x}") + 4
                    in_chunk = 0
            if not data:
                continue
            received = now_ms()
            messages = decoder.feed(data)
            if decoder.retry is not None:
                self._server_base = decoder.retry / 1000.0
            for message in messages:
                notice = _overflow(message)
                if notice is not None:
                    stats.overflows += 1
                    raise Retry(f"the server ended this slow client (overflow): {message.data}", 0)
                try:
                    value = json.loads(message.data)
                except ValueError:
                    continue  # not an envelope (a plain "message"): nothing a client of ours reads
                event = decode_envelope(value, f"sse {self.channel}")
                if event is not None:
                    yield event, received
        if chunked:
            stats.bytes_received += LAST_CHUNK
