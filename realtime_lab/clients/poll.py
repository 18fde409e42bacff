"""Short polling: ``GET /poll/{channel}?after=CURSOR`` every ``poll_interval`` seconds.

Each answer is ``{"events": [...], "cursor": ID, "more": bool}``; the next request sends
``cursor`` back as ``after``. When ``more`` is true the client asks again at once, else it waits
``poll_interval``. The long-polling client (:mod:`realtime_lab.clients.longpoll`) is the same
loop with a server-side wait and no pause.

Each request is a connection of its own: with ``token`` it carries the bearer header, with
``use_tickets`` a ticket of its own (``POST /api/tickets`` first, so a ticketed poll costs two
requests; prefer the bearer token for polling where the client can send headers).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import ClassVar

import aiohttp

from realtime_lab.clients.base import (
    Received,
    Retry,
    StreamClient,
    decode_envelope,
    http_header_bytes,
    now_ms,
)


def send_once(session: aiohttp.ClientSession) -> tuple[aiohttp.ClientMiddlewareType, ...]:
    """Per-request middlewares: the session's own, then one that lets the request go out once.

    aiohttp re-sends an idempotent request at once, unseen, when its connection breaks before
    the answer (RFC 9112 section 9.3.1). A poll whose connection broke is a failed request the
    reconnect loop must see: to count it (``requests``, ``reconnects``) and to back off.
    """

    sent = False

    async def once(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        nonlocal sent
        if sent:
            raise aiohttp.ServerDisconnectedError("the connection broke before the answer")
        sent = True
        return await handler(request)

    # Per-request middlewares replace the session's: keep those (aiohttp has no public getter).
    own: tuple[aiohttp.ClientMiddlewareType, ...] = tuple(getattr(session, "_middlewares", ()))
    return (*own, once)


class PollClient(StreamClient):
    """A channel over short polling (see the module docstring)."""

    transport = "poll"
    path: ClassVar[str] = "poll"

    def _extra_params(self) -> dict[str, str | None]:
        return {}

    def _read_timeout(self) -> float:
        return self.idle_timeout if self.idle_timeout is not None else 30.0

    def _pause(self) -> float:
        return self.poll_interval

    async def _connect(self, resume: str | None, first: bool) -> AsyncGenerator[Received, None]:
        stats = self.stats
        url = self.base_url / self.path / self.channel
        position = resume
        established = False
        while True:
            headers, credentials = await self._credentials()
            if self._closed:
                return  # close() came while the ticket was being taken
            params = self._params(after=position or None, **self._extra_params(), **credentials)
            timeout = self._http_timeout(self._read_timeout())
            session = self.session
            async with session.get(
                url,
                params=params,
                headers=headers,
                timeout=timeout,
                middlewares=send_once(session),
            ) as response:
                self._response = response  # so close() can cut a waiting long-poll short
                try:
                    body = await response.read()
                finally:
                    self._response = None
                stats.requests += 1
                stats.bytes_received += http_header_bytes(response) + len(body)
                if response.status != 200:
                    self._http_error(response, body)
            try:
                answer = json.loads(body)
                raw_events, cursor, more = answer["events"], answer["cursor"], answer["more"]
                if not isinstance(raw_events, list):
                    raise TypeError("events is not a list")
            except (ValueError, KeyError, TypeError) as exc:
                raise Retry(f"{self.transport}: malformed answer: {exc}") from exc
            if not established:
                established = True
                stats.connections += 1
            self._delivered()
            received = now_ms()
            for raw in raw_events:
                event = decode_envelope(raw, f"{self.transport} {self.channel}")
                if event is not None:
                    yield event, received
            if isinstance(cursor, str) and cursor:
                # The cursor, not the last event's id: it also moves past an empty answer
                # ("now"), so the next request misses nothing.
                position = self._resume = cursor
            elif cursor is None:
                # The channel holds nothing yet (any reset named a throwaway epoch): ask for
                # all of its history next time, and take its first event's epoch as it comes.
                position = self._resume = None
                self._sequencer.forget()
            if not more and not await self._sleep(self._pause()):
                return
