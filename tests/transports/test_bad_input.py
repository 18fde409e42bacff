"""Bad requests get a 4xx with ``{"error": {"code", "message"}}``, and nobody else notices."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningServer
from tests.transports.collect import publish, running, sse, start_chat, until_count

STREAMS = ("poll", "longpoll", "sse", "ws")
POLLS = ("poll", "longpoll")
JSON_POSTS = (
    "/api/chats",
    "/api/chats/stream",
    "/api/channels/room.x/events",
    "/v1/chat/completions",
)
BIG = json.dumps({"prompt": "x" * (70 * 1024)})
JSON = "application/json"


def get(path: str, status: int, code: str, name: str, **headers: str) -> Any:
    return pytest.param("GET", path, headers, None, status, code, id=name)


def send(
    method: str, path: str, status: int, code: str, body: Any, name: str, ctype: str = JSON
) -> Any:
    raw = body if isinstance(body, str | bytes) else json.dumps(body)
    return pytest.param(method, path, {"Content-Type": ctype}, raw, status, code, id=name)


EVENTS = "/api/channels/room.x/events"
CURSOR, PARAM, CHANNEL = "invalid-cursor", "invalid-parameter", "invalid-channel"

CASES = [
    *(get(f"/{t}/room.x?after=nope", 400, CURSOR, f"after-{t}") for t in STREAMS),
    *(get(f"/{t}/room.x?after=ab-01", 400, CURSOR, f"after-zero-{t}") for t in STREAMS),
    get("/sse/room.x", 400, CURSOR, "last-event-id", **{"Last-Event-ID": "x-y"}),
    get("/sse/room.x?after=now", 400, CURSOR, "header-beats-query", **{"Last-Event-ID": "1-2-3"}),
    *(get(f"/{t}/chat.doesnotexist", 404, "unknown-channel", f"chat-{t}") for t in STREAMS),
    *(get(f"/{t}/bad!name", 400, CHANNEL, f"channel-{t}") for t in STREAMS),
    *(get(f"/{t}/{'a' * 65}", 400, CHANNEL, f"long-channel-{t}") for t in STREAMS),
    *(get(f"/{t}/room.x?client=a%20b", 400, PARAM, f"client-{t}") for t in STREAMS),
    *(
        get(f"/{t}/room.x?limit={v}", 400, PARAM, f"limit-{v}-{t}")
        for t in POLLS
        for v in ("0", "abc", "1.5", "100000", "-3")
    ),
    *(
        get(f"/longpoll/room.x?timeout={v}", 400, PARAM, f"timeout-{v}")
        for v in ("-1", "abc", "nan", "1e9", "inf")
    ),
    *(send("POST", p, 400, "invalid-json", "{not json", f"json-{p}") for p in JSON_POSTS),
    *(send("POST", p, 400, "invalid-json", "[1]", f"array-{p}") for p in JSON_POSTS),
    send("PATCH", "/api/config", 400, "invalid-json", "nul", "json-config"),
    *(
        send("POST", p, 415, "unsupported-media-type", "{}", f"type-{p}", "text/plain")
        for p in JSON_POSTS
    ),
    send("PATCH", "/api/config", 415, "unsupported-media-type", "{}", "type-config", "text/plain"),
    *(send("POST", p, 413, "body-too-large", BIG, f"big-{p}") for p in JSON_POSTS),
    get("/api/chats/nope", 404, "unknown-chat", "get-chat"),
    send("DELETE", "/api/chats/nope", 404, "unknown-chat", b"", "delete-chat"),
    get("/no/such/route", 404, "not-found", "route"),
    send("PUT", "/poll/room.x", 405, "method-not-allowed", b"", "put-poll"),
    send("POST", "/sse/room.x", 405, "method-not-allowed", b"", "post-sse"),
    send("DELETE", "/api/stats", 405, "method-not-allowed", b"", "delete-stats"),
    get("/api/chats", 405, "method-not-allowed", "get-chats"),
    *(
        send("POST", EVENTS, 400, "reserved-type", {"type": t}, f"reserved-type-{t}")
        for t in ("token", "end", "error", "reset")
    ),
    send("POST", EVENTS, 400, "invalid-type", {"type": "Bad Type"}, "invalid-type"),
    send("POST", EVENTS, 400, "invalid-data", {"type": "note", "data": [1]}, "invalid-data"),
    *(
        send("POST", f"/api/channels/{c}/events", 403, "reserved-channel", {"type": "note"}, c)
        for c in ("ticker", "chat.abc")
    ),
    send("POST", "/api/channels/bad!/events", 400, CHANNEL, {"type": "n"}, "publish-channel"),
    send("POST", "/api/chats", 400, PARAM, {"prompt": ""}, "empty-prompt"),
    send("POST", "/api/chats", 400, PARAM, {"prompt": "hi", "max_tokens": 0}, "max-tokens"),
    send("POST", "/api/chats", 400, PARAM, {"prompt": "hi", "seed": True}, "seed-bool"),
    send("POST", "/api/chats/stream", 400, PARAM, {"prompt": ""}, "stream-empty-prompt"),
    send("POST", "/api/chats/stream", 400, PARAM, {"prompt": "hi", "seed": 0.5}, "stream-seed"),
    pytest.param(
        "POST",
        "/api/chats/stream",
        {"Content-Type": JSON, "Last-Event-ID": "x-y"},
        json.dumps({"prompt": "hi"}),
        400,
        CURSOR,
        id="stream-last-event-id",
    ),
    send("PATCH", "/api/config", 400, PARAM, {"history": 5}, "config-not-tunable"),
    send("PATCH", "/api/config", 400, PARAM, {"heartbeat": 0}, "config-range"),
    send("POST", "/v1/chat/completions", 400, PARAM, {"messages": []}, "openai-messages"),
]


@pytest.mark.parametrize(("method", "path", "headers", "body", "status", "code"), CASES)
async def test_bad_request_is_a_json_error_and_streams_carry_on(
    method: str,
    path: str,
    headers: dict[str, str],
    body: str | bytes | None,
    status: int,
    code: str,
    server: RunningServer,
    session: aiohttp.ClientSession,
) -> None:
    # A stream open across the bad request must not lose a single event.
    before = await publish(session, server.url, "room.watch", "note", {"n": 0})
    async with running(
        sse(session, server.url, "room.watch", stop=until_count(2), read_to_eof=False)
    ) as watcher:
        async with session.request(
            method, server.url + path, headers=headers, data=body, allow_redirects=False
        ) as resp:
            raw = await resp.read()
            assert resp.status == status, raw
            assert resp.content_type == "application/json"
            error = json.loads(raw)["error"]
            if status == 405:
                assert resp.headers["Allow"]
        if path.startswith("/v1/"):
            # OpenAI's shape there: snake_case codes, with a type and a param.
            assert error["code"] == code.replace("-", "_")
            assert error["type"] == "invalid_request_error"
            assert "param" in error
        else:
            assert error["code"] == code
        assert isinstance(error["message"], str)
        assert error["message"]

        after = await publish(session, server.url, "room.watch", "note", {"n": 1})
        watched = await asyncio.wait_for(watcher, timeout=10)
    assert watched.events == [before, after]


async def test_ws_handshake_with_bad_input_is_refused(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    for path, status in [
        ("/ws/room.x?after=bad", 400),
        ("/ws/chat.nope", 404),
        ("/ws/bad!name", 400),
    ]:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await session.ws_connect(server.ws_url + path)
        assert caught.value.status == status, path


async def test_errors_are_counted(server: RunningServer, session: aiohttp.ClientSession) -> None:
    for transport in STREAMS:
        async with session.get(f"{server.url}/{transport}/room.x?after=bad&client=bad") as resp:
            assert resp.status == 400
    async with session.get(f"{server.url}/api/stats?client=bad") as resp:
        body = await resp.json()
    for transport in STREAMS:
        assert body["transports"][transport]["errors"] == 1, transport
        assert body["transports"][transport]["requests"] == 1, transport
    assert body["client"]["errors"] == 4


async def test_fetch_errors_are_counted(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    stream = f"{server.url}/api/chats/stream?client=bad"
    for request, headers in [({"prompt": ""}, {}), ({"prompt": "hi"}, {"Last-Event-ID": "x"})]:
        async with session.post(stream, json=request, headers=headers) as resp:
            assert resp.status == 400
    async with session.get(f"{server.url}/api/stats?client=bad") as resp:
        body = await resp.json()
    assert body["transports"]["fetch"]["errors"] == 2
    assert body["transports"]["fetch"]["requests"] == 2
    assert body["client"]["errors"] == 2


async def test_unknown_chat_becomes_known_when_created(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    chat = await start_chat(session, server.url, "exists", max_tokens=3)
    async with session.get(f"{server.url}/poll/{chat['channel']}") as resp:
        assert resp.status == 200
