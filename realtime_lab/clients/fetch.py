"""Fetch streaming, the ChatGPT way: ``POST /api/chats/stream`` starts a chat and streams it back.

The request body is the one of ``POST /api/chats`` (``{"prompt", "seed", "ttft_ms", "token_ms",
"max_tokens"}``); the answer is Server-Sent Events in the same response, as a page reads them
from a ``fetch()`` body: ``retry:``, one ``chat`` event without an id (``{"chat": {...}}``: which
chat this stream is), then the chat's events with the envelopes and ids of ``/sse/chat.<id>``.
The client learns the chat from that event: :attr:`FetchClient.chat` holds its JSON and
:attr:`~realtime_lab.clients.base.StreamClient.channel` becomes ``chat.<id>`` (``""`` until then).

Resuming: a chat channel's epoch is the chat's id, so an event id names its chat. After a cut the
client sends the same POST again with ``Last-Event-ID`` (as ``@microsoft/fetch-event-source``
does) and the server continues that chat after that id instead of starting another one; cut
before the chat's first event, it resumes from ``<chat id>-0``, the chat's start. A stream
that is gone longer than the server's ``--fetch-abort-grace`` (3 s by default) is an abort: the
server cancels the chat, and a late resume reads its ``end`` with ``reason: "cancelled"``. So
:meth:`~realtime_lab.clients.base.StreamClient.close` before the end cancels the chat after
the grace; :meth:`~realtime_lab.clients.base.StreamClient.cancel` does it at once.

Everything else is the SSE client's (:mod:`realtime_lab.clients.sse`): the server's ``retry:``
as the backoff base, the overflow notice, the byte count, the refusals (401/403 final, 429
retried after its ``Retry-After``). Why not ``httpx-sse``, which can POST: it parses, and leaves
reconnecting, resuming and de-duplicating to its caller, which is what this module is; the SSE
client already does all of it over the session every client here shares.

Credentials: a ``fetch()`` can send headers, and this POST creates the chat, so there is no
channel yet to take a ticket for: ``token`` goes as ``Authorization: Bearer`` on every POST,
resumes included, and ``use_tickets`` changes nothing (the client logs that once).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from realtime_lab.clients.base import log
from realtime_lab.clients.sse import SSEClient
from realtime_lab.errors import ClientError, InvalidCursor
from realtime_lab.protocol.channels import chat_id_of
from realtime_lab.protocol.cursor import format_id, parse_id
from realtime_lab.protocol.envelope import Event
from realtime_lab.protocol.sse import ServerSentEvent

#: The name of the stream's opening event, the one that says which chat it is.
CHAT_EVENT: Final = "chat"


class FetchClient(SSEClient):
    """A chat started and streamed by ``POST /api/chats/stream`` (see the module docstring).

    Create it with ``open_stream(base_url, None, "fetch", chat={"prompt": ...})``.

    Attributes:
        request: the JSON body every POST of this client sends.
        chat: the chat as the stream's last ``chat`` event described it, ``None`` before the
            first one arrived.
    """

    transport = "fetch"

    def __init__(self, base_url: str, chat: Mapping[str, Any], **options: Any) -> None:
        super().__init__(base_url, "", **options)
        self.request: dict[str, Any] = dict(chat)
        self.chat: dict[str, Any] | None = None
        self._tickets_noted = False

    def __repr__(self) -> str:
        # Never the token: a repr ends up in logs and tracebacks.
        auth = "token" if self.token else "none"
        return f"<{type(self).__name__} {self.base_url} {self.channel or 'new chat'} auth={auth}>"

    @property
    def chat_id(self) -> str | None:
        """The id of the chat this client streams; ``None`` until the stream named it."""
        return chat_id_of(self.channel)

    async def _request(self, resume: str | None, first: bool) -> aiohttp.ClientResponse | None:
        if self.use_tickets and not self._tickets_noted:
            self._tickets_noted = True
            log.info(
                "fetch: tickets do not apply to the POST that creates the chat; "
                "sending the bearer token instead"
            )
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache", **self._bearer()}
        position = resume or self._chat_start()
        if position is not None:
            headers["Last-Event-ID"] = position
        url = self.base_url / "api" / "chats" / "stream"
        async with asyncio.timeout(self.connect_timeout):
            return await self.session.post(
                url,
                json=self.request,
                params=self._params(),
                headers=headers,
                timeout=self._http_timeout(self.idle_timeout),
            )

    def _chat_start(self) -> str | None:
        """``<chat id>-0`` once the chat is known: where to resume it before its first event."""
        chat_id = self.chat_id
        if chat_id is None:
            return None
        try:
            return str(parse_id(format_id(chat_id, 0)))
        except InvalidCursor:
            return None  # an id that is no epoch: only a resume after an event can name it

    def _event_of(self, message: ServerSentEvent) -> Event | None:
        if message.event == CHAT_EVENT:
            self._learn(message.data)
            return None
        return super()._event_of(message)

    def _learn(self, data: str) -> None:
        """Take the chat a ``chat`` event names (every connection opens with one).

        Raises:
            ClientError: the event names no chat, or another chat than the one this client
                streams: reconnecting would only start or resume the wrong one.
        """
        try:
            chat = json.loads(data)["chat"]
            chat_id, channel = chat["id"], chat["channel"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ClientError(f"fetch: a chat event that names no chat: {data[:200]!r}") from exc
        if not isinstance(chat_id, str) or chat_id_of(channel) != chat_id:
            raise ClientError(f"fetch: a chat event that names no chat: {data[:200]!r}")
        known = self.chat_id
        if known is not None and known != chat_id:
            raise ClientError(f"fetch: resuming chat {known}, the server answered chat {chat_id}")
        self.chat = chat
        self.channel = channel

    def _chat_id(self) -> str:
        chat_id = self.chat_id
        if chat_id is None:
            raise ClientError("fetch: the chat is not known yet; it is named by the first event")
        return chat_id
