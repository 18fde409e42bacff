"""The fetch client against scripted servers: the chat it learns, and how it resumes.

Each test serves ``POST /api/chats/stream`` from a small aiohttp app that answers each request
with exactly the SSE the test wrote and records what the client sent (body and headers). Against
the real server the same client is tested in ``test_transports.py``, ``test_auth.py`` and the
reliability matrix.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from realtime_lab.clients import ClientError, FetchClient, ServerRefused, open_stream
from realtime_lab.protocol.sse import encode_event, encode_retry
from tests.clients.helpers import FAST, collect, next_event

AiohttpServer = Callable[[web.Application], Awaitable[TestServer]]
Script = Callable[[int, web.StreamResponse], Awaitable[None]]
REQUEST = {"prompt": "Resume me", "seed": 2, "max_tokens": 3}


def chat_event(chat_id: str = "ab12", **extra: Any) -> bytes:
    chat = {"id": chat_id, "channel": f"chat.{chat_id}", "status": "running", **extra}
    return encode_event(json.dumps({"chat": chat}), event="chat")


def event(seq: int, kind: str = "token", chat_id: str = "ab12", **data: Any) -> bytes:
    value = {
        "channel": f"chat.{chat_id}",
        "id": f"{chat_id}-{seq}",
        "type": kind,
        "data": data or {"text": f"t{seq}", "index": seq - 1},
        "ts": time.time() * 1000,
    }
    return encode_event(json.dumps(value), event=None if kind == "token" else kind, id=value["id"])


@dataclass
class Seen:
    """One request the scripted server got."""

    body: Any
    headers: dict[str, str]


@dataclass
class Scripted:
    """The scripted server: its URL and what it was sent."""

    url: str
    seen: list[Seen] = field(default_factory=list)
    deletes: list[Seen] = field(default_factory=list)
    deleted: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
def scripted(aiohttp_server: AiohttpServer) -> Callable[[Script], Awaitable[Scripted]]:
    async def start(script: Script) -> Scripted:
        state = Scripted("")

        async def stream(request: web.Request) -> web.StreamResponse:
            state.seen.append(Seen(await request.json(), dict(request.headers)))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(encode_retry(10))
            await script(len(state.seen), response)
            await response.write_eof()
            return response

        async def delete(request: web.Request) -> web.Response:
            state.deletes.append(Seen(request.match_info["chat_id"], dict(request.headers)))
            state.deleted.set()
            return web.json_response({"id": request.match_info["chat_id"]})

        app = web.Application()
        app.router.add_post("/api/chats/stream", stream)
        app.router.add_delete("/api/chats/{chat_id}", delete)
        server = await aiohttp_server(app)
        state.url = str(server.make_url("")).rstrip("/")
        return state

    return start


def fetch_client(url: str, **options: Any) -> FetchClient:
    client = open_stream(url, None, "fetch", chat=REQUEST, **{**FAST, **options})
    assert isinstance(client, FetchClient)
    return client


async def test_a_cut_stream_resumes_the_same_chat_with_the_same_post(
    scripted: Callable[[Script], Awaitable[Scripted]],
) -> None:
    async def script(n: int, response: web.StreamResponse) -> None:
        await response.write(chat_event(tokens=n))
        if n == 1:
            await response.write(event(1) + event(2))  # then the connection ends: a cut
        else:
            await response.write(event(2) + event(3, "end", reason="done"))  # 2 again

    server = await scripted(script)
    async with fetch_client(server.url, token="tok", client_tag="pane-f") as client:
        events = await collect(client)

    assert [e.id for e in events] == ["ab12-1", "ab12-2", "ab12-3"]
    assert client.chat == {"id": "ab12", "channel": "chat.ab12", "status": "running", "tokens": 2}
    assert (client.channel, client.chat_id) == ("chat.ab12", "ab12")
    assert [s.body for s in server.seen] == [REQUEST, REQUEST]  # the same request, retried
    first, second = (s.headers for s in server.seen)
    assert "Last-Event-ID" not in first  # a new chat
    assert second["Last-Event-ID"] == "ab12-2"  # the same chat, after what was read
    assert first["Authorization"] == second["Authorization"] == "Bearer tok"
    assert first["Accept"] == "text/event-stream"
    stats = client.stats
    assert (stats.requests, stats.connections, stats.reconnects) == (2, 2, 1)
    assert (stats.duplicates, stats.gaps, stats.events) == (1, 0, 3)
    assert client.backoff_base == pytest.approx(0.01)  # the server's retry: 10
    assert stats.bytes_received > 2 * len(chat_event())


async def test_a_cut_before_the_first_event_resumes_from_the_chats_start(
    scripted: Callable[[Script], Awaitable[Scripted]],
) -> None:
    async def script(n: int, response: web.StreamResponse) -> None:
        await response.write(chat_event())
        if n == 2:
            await response.write(event(1) + event(2, "end", reason="done"))

    server = await scripted(script)
    async with fetch_client(server.url) as client:
        events = await collect(client)

    assert [e.id for e in events] == ["ab12-1", "ab12-2"]
    # The chat id is its channel's epoch: <id>-0 is the position before its first event.
    assert server.seen[1].headers["Last-Event-ID"] == "ab12-0"
    assert client.stats.reconnects == 1


async def test_a_cut_before_the_chat_is_named_starts_over(
    scripted: Callable[[Script], Awaitable[Scripted]],
) -> None:
    """Nothing names the first chat: the retry is a new chat (the server's abort grace cancels
    the one nobody reads)."""

    async def script(n: int, response: web.StreamResponse) -> None:
        if n == 2:
            await response.write(chat_event("cd34") + event(1, "end", "cd34", reason="done"))

    server = await scripted(script)
    async with fetch_client(server.url) as client:
        events = await collect(client)

    assert [e.id for e in events] == ["cd34-1"]
    assert ["Last-Event-ID" in s.headers for s in server.seen] == [False, False]
    assert client.chat_id == "cd34"


async def test_a_resume_answered_with_another_chat_is_an_error(
    scripted: Callable[[Script], Awaitable[Scripted]],
) -> None:
    async def script(n: int, response: web.StreamResponse) -> None:
        if n == 1:
            await response.write(chat_event("ab12") + event(1))
        else:
            await response.write(chat_event("cd34") + event(2, chat_id="cd34"))

    server = await scripted(script)
    async with fetch_client(server.url) as client:
        with pytest.raises(ClientError, match=r"resuming chat ab12.*chat cd34"):
            await collect(client)
    assert len(server.seen) == 2  # not retried: that would only resume the wrong chat again
    assert client.stats.events == 1


@pytest.mark.parametrize(
    "opening",
    [
        encode_event("not json", event="chat"),
        encode_event('{"chat": null}', event="chat"),
        encode_event('{"chat": {"id": "ab12", "channel": "chat.cd34"}}', event="chat"),
        encode_event('{"chat": {"id": 7, "channel": "chat.7"}}', event="chat"),
    ],
    ids=["not-json", "null", "wrong-channel", "number"],
)
async def test_a_chat_event_that_names_no_chat_is_an_error(
    opening: bytes, scripted: Callable[[Script], Awaitable[Scripted]]
) -> None:
    async def script(n: int, response: web.StreamResponse) -> None:
        await response.write(opening + event(1, "end", reason="done"))

    server = await scripted(script)
    async with fetch_client(server.url) as client:
        with pytest.raises(ClientError, match="names no chat"):
            await collect(client)
    assert len(server.seen) == 1
    assert client.stats.events == 0


async def test_cancel_deletes_the_chat_the_stream_named(
    scripted: Callable[[Script], Awaitable[Scripted]],
) -> None:
    async def script(n: int, response: web.StreamResponse) -> None:
        await response.write(chat_event() + event(1))
        await asyncio.wait_for(server.deleted.wait(), 10)
        await response.write(event(2, "end", reason="cancelled"))

    server = await scripted(script)
    async with fetch_client(server.url, token="tok") as client:
        iterator = aiter(client)
        assert (await next_event(iterator)).id == "ab12-1"
        await client.cancel()
        end = await next_event(iterator)
    assert end.data == {"reason": "cancelled"}
    assert [d.body for d in server.deletes] == ["ab12"]
    assert server.deletes[0].headers["Authorization"] == "Bearer tok"


async def test_a_refusal_is_final_and_names_its_code(aiohttp_server: AiohttpServer) -> None:
    async def refuse(request: web.Request) -> web.Response:
        body = {"error": {"code": "unauthenticated", "message": "sign in"}}
        return web.json_response(body, status=401)

    app = web.Application()
    app.router.add_post("/api/chats/stream", refuse)
    fake = await aiohttp_server(app)
    async with fetch_client(str(fake.make_url("")).rstrip("/")) as client:
        with pytest.raises(ServerRefused) as info:
            await collect(client)
    assert (info.value.status, info.value.code) == (401, "unauthenticated")
    assert (client.stats.requests, client.stats.reconnects) == (1, 0)
