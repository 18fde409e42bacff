"""The Server-Sent Events client: ``GET /sse/{channel}`` parsed by the project's WHATWG decoder.

It behaves like a browser's ``EventSource``: it reconnects after the server's ``retry:`` delay
(the base of its backoff), resumes with ``Last-Event-ID``, and stops when a reconnect is answered
``204 No Content``. An ``error`` event with ``code: "overflow"`` (the server ended a client that
fell behind) is not yielded: the client counts it and resumes at once from the last id.
With ``use_tickets`` each (re)connection opens ``?ticket=`` (a new one) plus ``Last-Event-ID``,
the credential an ``EventSource`` on another origin can carry.
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
from realtime_lab.protocol.envelope import ERROR, Event
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
        response = await self._request(resume, first)
        if response is None:
            return  # close() came while the request was being prepared
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
                    f"{self.transport} {response.url.with_query(None)}: expected "
                    f"text/event-stream, got {response.content_type}",
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

    async def _request(self, resume: str | None, first: bool) -> aiohttp.ClientResponse | None:
        """Send the request of one connection; its response (headers read), or ``None`` when
        the client was closed meanwhile."""
        auth, credentials = await self._credentials()
        if self._closed:
            return None  # close() came while the ticket was being taken
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache", **auth}
        if not first and resume:
            # As a browser does: the URL keeps the first ?after, the header says where we are.
            headers["Last-Event-ID"] = resume
        url = self.base_url / "sse" / self.channel
        params = self._params(after=self.after or None, **credentials)
        async with asyncio.timeout(self.connect_timeout):
            return await self.session.get(
                url, params=params, headers=headers, timeout=self._http_timeout(self.idle_timeout)
            )

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
                event = self._event_of(message)
                if event is not None:
                    yield event, received
        if chunked:
            stats.bytes_received += LAST_CHUNK

    def _event_of(self, message: ServerSentEvent) -> Event | None:
        """The envelope ``message`` carries, or ``None`` for a message that is not one.

        Raises:
            Retry: it is the overflow notice (resume at once from the last id).
        """
        notice = _overflow(message)
        if notice is not None:
            self.stats.overflows += 1
            raise Retry(f"the server ended this slow client (overflow): {message.data}", 0)
        try:
            value = json.loads(message.data)
        except ValueError:
            return None  # not an envelope (a plain "message"): nothing a client of ours reads
        return decode_envelope(value, f"{self.transport} {self.channel}")
