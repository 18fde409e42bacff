"""SSE and WebSocket specifics: the server's retry delay, 204, overflow signals, close codes.

The overflow and close-code cases use a small scripted server: the real one only overflows a
client that stops reading, which is slow and racy to provoke.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import WSCloseCode, web
from aiohttp.test_utils import TestServer

from realtime_lab.clients import ServerRefused, open_stream
from realtime_lab.protocol.sse import encode_event, encode_retry
from realtime_lab.transports.keys import BUS_KEY, HUB_KEY
from tests.clients.helpers import FAST, collect, next_event, start_chat
from tests.conftest import StartServer

AiohttpServer = Callable[[web.Application], Awaitable[TestServer]]


async def test_sse_uses_the_servers_retry_as_its_reconnection_delay(
    start_server: StartServer,
) -> None:
    server = await start_server(retry_ms=50)
    await server.app[BUS_KEY].publish("news", "note", {"n": 1})
    # Our own base would be 3 s: only the server's 50 ms explains a short delay.
    client = open_stream(server.url, "news", "sse", backoff_initial=3.0, backoff_max=5.0)
    async with client:
        iterator = aiter(client)
        assert (await next_event(iterator)).data == {"n": 1}
        assert client.backoff_base == pytest.approx(0.05)
        for conn in server.app[HUB_KEY].connections("sse"):
            conn.drop()  # a network cut
        await server.app[BUS_KEY].publish("news", "note", {"n": 2})
        assert (await next_event(iterator)).data == {"n": 2}
    assert client.stats.reconnects == 1
    assert client.stats.reconnect_delays_s
    assert max(client.stats.reconnect_delays_s) <= 0.05
    assert client.stats.duplicates == 0


async def test_sse_stops_on_204_after_the_end(start_server: StartServer) -> None:
    server = await start_server()
    chat = await start_chat(server.url, "short", max_tokens=5)
    async with open_stream(server.url, chat["channel"], "sse") as first:
        events = await collect(first)
    end = events[-1]
    assert end.type == "end"
    async with open_stream(server.url, chat["channel"], "sse", after=end.id, **FAST) as client:
        assert await collect(client) == []
    assert client.stats.requests == 1
    assert client.stats.reconnects == 0


def envelope(event_id: str, type_: str = "token", **data: Any) -> dict[str, Any]:
    return {"channel": "c", "id": event_id, "type": type_, "data": data, "ts": time.time() * 1000}


def sse_message(value: dict[str, Any]) -> bytes:
    kind = None if value["type"] == "token" else value["type"]
    return encode_event(json.dumps(value), event=kind, id=value["id"])


async def test_sse_overflow_notice_resumes_from_the_last_id(aiohttp_server: AiohttpServer) -> None:
    requests: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        requests.append(request.headers.get("Last-Event-ID"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(encode_retry(10))
        if len(requests) == 1:
            await response.write(sse_message(envelope("ab-1", text="a")))
            notice = {"code": "overflow", "message": "too slow", "last_id": "ab-1"}
            await response.write(encode_event(json.dumps(notice), event="error"))
        elif len(requests) == 2:
            # Closed without an end: the client must come back once more.
            await response.write(sse_message(envelope("ab-2", text="b")))
        else:
            await response.write(sse_message(envelope("ab-3", "end", reason="done")))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/sse/{channel}", handler)
    fake = await aiohttp_server(app)
    url = str(fake.make_url("")).rstrip("/")
    async with open_stream(url, "c", "sse", backoff_initial=5.0) as client:
        events = await collect(client)

    assert [e.id for e in events] == ["ab-1", "ab-2", "ab-3"]
    assert requests == [None, "ab-1", "ab-2"]
    assert client.stats.overflows == 1
    assert client.stats.reconnects == 2
    assert client.backoff_base == pytest.approx(0.01)  # the fake server's retry: 10
    assert max(client.stats.reconnect_delays_s) <= 0.01


async def test_ws_close_1013_resumes_from_the_last_id(aiohttp_server: AiohttpServer) -> None:
    afters: list[str | None] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        afters.append(request.query.get("after"))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if len(afters) == 1:
            await ws.send_str(json.dumps(envelope("ab-1", text="a")))
            await ws.send_str(json.dumps(envelope("ab-1", text="a")))  # a duplicate
            await ws.close(code=1013, message=b"overflow: resume after ab-1")
        else:
            await ws.send_str(json.dumps(envelope("ab-2", "end", reason="done")))
            await ws.close(code=WSCloseCode.OK, message=b"end")
        return ws

    app = web.Application()
    app.router.add_get("/ws/{channel}", handler)
    fake = await aiohttp_server(app)
    url = str(fake.make_url("")).rstrip("/")
    async with open_stream(url, "c", "ws", **FAST) as client:
        events = await collect(client)

    assert [e.id for e in events] == ["ab-1", "ab-2"]
    assert afters == [None, "ab-1"]
    assert client.stats.overflows == 1
    assert client.stats.duplicates == 1
    assert client.stats.reconnects == 1


async def test_ws_close_for_a_client_fault_raises(aiohttp_server: AiohttpServer) -> None:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"no")
        return ws

    app = web.Application()
    app.router.add_get("/ws/{channel}", handler)
    fake = await aiohttp_server(app)
    url = str(fake.make_url("")).rstrip("/")
    async with open_stream(url, "c", "ws", **FAST) as client:
        with pytest.raises(ServerRefused):
            await collect(client)
    assert client.stats.reconnects == 0


async def test_503_is_retried_with_the_servers_delay(aiohttp_server: AiohttpServer) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            body = {"error": {"code": "busy", "message": "later", "retry_after_ms": 30}}
            return web.json_response(body, status=503)
        end = envelope("ab-1", "end", reason="done")
        return web.json_response({"events": [end], "cursor": "ab-1", "more": False})

    app = web.Application()
    app.router.add_get("/poll/{channel}", handler)
    fake = await aiohttp_server(app)
    url = str(fake.make_url("")).rstrip("/")
    async with open_stream(url, "c", "poll", backoff_initial=0.001) as client:
        events = await collect(client)
    assert [e.type for e in events] == ["end"]
    assert client.stats.reconnects == 1
    assert client.stats.requests == 2
    assert client.stats.reconnect_delays_s[0] >= 0.03  # the server's retry_after_ms won
