"""The JSON API: chats, publishing, stats (checked against raw socket bytes), config, and the
OpenAI-compatible endpoint."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from realtime_lab.feed.llm import answer_text, answer_tokens
from realtime_lab.protocol.sse import SSEDecoder
from tests.conftest import RunningServer, StartServer
from tests.transports.collect import (
    WS_UPGRADE,
    longpoll,
    poll,
    publish,
    raw_get,
    start_chat,
    stats,
    until_count,
    wait_for,
    ws_frames,
)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def get_json(session: aiohttp.ClientSession, url: str, status: int = 200) -> dict:
    async with session.get(url) as resp:
        assert resp.status == status, await resp.text()
        value: dict = await resp.json()
        return value


# Chats ------------------------------------------------------------------------------------------


async def test_create_chat_then_follow_it_to_done(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{server.url}/api/chats", json={"prompt": "Hello there", "seed": 4, "max_tokens": 30}
    ) as resp:
        assert resp.status == 201
        chat = await resp.json()
        assert resp.headers["Location"] == f"/api/chats/{chat['id']}"
    assert chat["channel"] == f"chat.{chat['id']}"
    assert chat["status"] == "running"
    assert chat["prompt"] == "Hello there"
    host = server.url.split("//")[1]
    assert chat["urls"] == {
        "poll": f"http://{host}/poll/{chat['channel']}",
        "longpoll": f"http://{host}/longpoll/{chat['channel']}",
        "sse": f"http://{host}/sse/{chat['channel']}",
        "ws": f"ws://{host}/ws/{chat['channel']}",
    }

    events = await longpoll(session, server.url, chat["channel"])
    state = await get_json(session, f"{server.url}/api/chats/{chat['id']}")
    expected = answer_text("Hello there", 4, max_tokens=30)
    assert state["status"] == "done"
    assert state["text"] == expected
    assert state["tokens"] == len(events) - 1
    assert state["finished"] is not None

    info = await get_json(session, f"{server.url}/api/channels/{chat['channel']}")
    assert info["finished"] is True
    assert info["last_id"] == events[-1]["id"]
    assert info["oldest_id"] == events[0]["id"]
    assert info["retained"] == len(events)


async def test_chat_defaults_come_from_the_settings(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(ttft_ms=7.0, token_ms=3.0, max_tokens=9)
    chat = await start_chat(session, server.url, "defaults please", seed=2)
    assert chat["ttft_ms"] == 7.0
    assert chat["token_ms"] == 3.0
    events = await poll(session, server.url, chat["channel"])
    assert len(events) - 1 == len(answer_tokens("defaults please", 2, max_tokens=9))


async def test_delete_cancels_a_running_chat(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    chat = await start_chat(session, server.url, "long one", max_tokens=1000, token_ms=50)
    async with session.delete(f"{server.url}/api/chats/{chat['id']}") as resp:
        assert resp.status == 200
        state = await resp.json()
    assert state["status"] == "cancelled"
    events = await poll(session, server.url, chat["channel"])
    assert events[-1]["data"]["reason"] == "cancelled"
    assert state["tokens"] == len(events) - 1
    # Deleting a finished chat is harmless and reports its final state.
    async with session.delete(f"{server.url}/api/chats/{chat['id']}") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "cancelled"


# Publishing ------------------------------------------------------------------------------------


async def test_published_event_is_201_and_shows_on_poll(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{server.url}/api/channels/room.api/events",
        json={"type": "chat.message", "data": {"user": "ada", "text": "héllo 你好"}},
    ) as resp:
        assert resp.status == 201
        event = await resp.json()
    assert event["channel"] == "room.api"
    assert event["type"] == "chat.message"
    assert event["data"] == {"user": "ada", "text": "héllo 你好"}
    assert event["id"].endswith("-1")
    assert isinstance(event["ts"], float)
    body = await get_json(session, f"{server.url}/poll/room.api")
    assert body == {"events": [event], "cursor": event["id"], "more": False}
    # data is optional and defaults to {}.
    async with session.post(
        f"{server.url}/api/channels/room.api/events", json={"type": "ping"}
    ) as resp:
        assert resp.status == 201
        assert (await resp.json())["data"] == {}


# Stats -----------------------------------------------------------------------------------------


async def test_poll_bytes_are_every_byte_on_the_wire(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    for n in range(3):
        await publish(session, server.url, "room.bytes", "note", {"n": n})
    first = await raw_get(server.port, "/poll/room.bytes?client=raw-poll")
    second = await raw_get(server.port, "/longpoll/room.bytes?client=raw-lp&timeout=0")
    empty = await raw_get(server.port, "/longpoll/room.bytes?client=raw-lp&timeout=0.05&after=now")
    assert first.status == second.status == empty.status == 200
    assert len(json.loads(first.body)["events"]) == 3

    mine = (await stats(session, server.url, "raw-poll"))["client"]
    # Status line, headers and body: everything the socket carried.
    assert mine["bytes"] == len(first.raw)
    assert mine["requests"] == 1
    assert mine["events"] == 3
    lp = (await stats(session, server.url, "raw-lp"))["client"]
    assert lp["bytes"] == len(second.raw) + len(empty.raw)
    assert lp["requests"] == 2
    assert lp["events"] == 3
    totals = (await stats(session, server.url))["transports"]
    assert totals["poll"]["bytes"] == len(first.raw)
    assert totals["longpoll"]["bytes"] == len(second.raw) + len(empty.raw)
    assert totals["longpoll"]["open"] == 0


async def test_sse_bytes_are_every_byte_on_the_wire(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    chat = await start_chat(session, server.url, "count my bytes", max_tokens=25)
    events = await poll(session, server.url, chat["channel"])
    # Read to the server's close: headers, retry, every chunk, and the final zero chunk.
    got = await raw_get(server.port, f"/sse/{chat['channel']}?client=raw-sse")
    assert got.raw.endswith(b"0\r\n\r\n")
    assert len(SSEDecoder().feed(got.body)) == len(events)

    mine = await wait_for(lambda: _closed(session, server, "raw-sse"))
    assert mine["bytes"] == len(got.raw)
    assert mine["events"] == len(events)
    assert mine["requests"] == mine["connections"] == 1
    assert (await stats(session, server.url))["transports"]["sse"]["bytes"] == len(got.raw)


async def test_websocket_bytes_are_every_byte_on_the_wire(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    chat = await start_chat(session, server.url, "count my frames", max_tokens=25)
    events = await poll(session, server.url, chat["channel"])
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = f"GET /ws/{chat['channel']}?client=raw-ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in WS_UPGRADE.items())
    writer.write(head.encode() + b"\r\n")
    raw = b""
    async with asyncio.timeout(20):
        # Handshake, one frame per event, then the server's close frame (1000 "end").
        while not raw.endswith(b"\x88\x05\x03\xe8end"):
            chunk = await reader.read(1 << 16)
            assert chunk, "the server closed before its close frame"
            raw += chunk
    # The server writes nothing after its close frame: closing our side ends the handshake.
    writer.close()
    await writer.wait_closed()
    head_end = raw.index(b"\r\n\r\n") + 4
    frames = ws_frames(raw[head_end:])
    assert [op for op, _ in frames] == [1] * len(events) + [8]

    mine = await wait_for(lambda: _closed(session, server, "raw-ws"))
    assert mine["bytes"] == len(raw)
    assert mine["events"] == len(events)


async def _closed(session: aiohttp.ClientSession, server: RunningServer, tag: str) -> dict | None:
    mine: dict = (await stats(session, server.url, tag))["client"]
    return mine if mine["open"] == 0 else None


async def test_stats_count_per_transport(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    sent = [await publish(session, server.url, "room.count", "note", {"n": n}) for n in range(4)]
    await poll(session, server.url, "room.count", stop=until_count(4))
    await poll(session, server.url, "room.count", after=sent[1]["id"], stop=until_count(2))
    async with session.ws_connect(f"{server.ws_url}/ws/room.count?client=w") as sock:
        for _ in range(4):
            await sock.receive_json()
    body = await stats(session, server.url)
    assert body["transports"]["poll"]["requests"] == 2
    assert body["transports"]["poll"]["events"] == 6
    assert body["transports"]["poll"]["reconnects"] == 1
    assert body["transports"]["ws"]["requests"] == 1
    assert body["transports"]["ws"]["events"] == 4
    assert body["transports"]["ws"]["bytes"] > sum(len(json.dumps(e)) for e in sent) * 0.9
    for name in ("poll", "longpoll", "sse", "ws"):
        assert set(body["transports"][name]) >= {"requests", "bytes", "events", "open", "errors"}
    assert isinstance(body["server_time_ms"], float)
    assert body["chats_running"] == 0


# Config ----------------------------------------------------------------------------------------


async def test_patch_config_changes_live_settings(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    before = await get_json(session, f"{server.url}/api/config")
    assert before["ticker_rate"] == 0.0
    assert before["bus"] == "memory://"
    async with session.patch(
        f"{server.url}/api/config",
        json={"ticker_rate": 100, "ttft_ms": 1, "heartbeat": 5.5},
    ) as resp:
        assert resp.status == 200
        after = await resp.json()
    assert after["ticker_rate"] == 100.0
    assert after["ttft_ms"] == 1.0
    assert after["heartbeat"] == 5.5
    assert after["longpoll_timeout"] == before["longpoll_timeout"]
    assert await get_json(session, f"{server.url}/api/config") | {"server_time_ms": 0} == after | {
        "server_time_ms": 0
    }
    # The ticker picked the new rate up: it publishes now.
    ticks = await longpoll(session, server.url, "ticker", stop=until_count(3))
    assert [e["type"] for e in ticks[:3]] == ["token"] * 3
    # And new chats use the new default time to first token.
    chat = await start_chat(session, server.url, "after patch", max_tokens=2)
    assert chat["ttft_ms"] == 1.0


async def test_health(server: RunningServer, session: aiohttp.ClientSession) -> None:
    assert await get_json(session, f"{server.url}/api/health") == {"ok": True}


# OpenAI-compatible endpoint --------------------------------------------------------------------


async def test_openai_streaming(server: RunningServer, session: aiohttp.ClientSession) -> None:
    prompt = "Summarise SSE"
    async with session.post(
        f"{server.url}/v1/chat/completions",
        json={
            "model": "m",
            "stream": True,
            "seed": 6,
            "max_tokens": 40,
            "messages": [{"role": "user", "content": prompt}],
        },
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        decoder = SSEDecoder()
        messages = []
        async for chunk in resp.content.iter_any():
            messages.extend(decoder.feed(chunk))
    assert messages[-1].data == "[DONE]"
    chunks = [json.loads(m.data) for m in messages[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"][0]["delta"] == {}
    deltas = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert deltas == answer_text(prompt, 6, max_tokens=40)


async def test_openai_non_streaming(server: RunningServer, session: aiohttp.ClientSession) -> None:
    prompt = "Summarise polling"
    async with session.post(
        f"{server.url}/v1/chat/completions",
        json={"seed": 1, "max_tokens": 30, "messages": [{"role": "user", "content": prompt}]},
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": answer_text(prompt, 1, max_tokens=30),
    }
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == len(answer_tokens(prompt, 1, max_tokens=30))


async def test_the_page_and_config_say_which_generator_writes_the_answers(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    plain = await start_server()
    relay = await start_server(upstream="http://127.0.0.1:9/v1", upstream_model="m1")
    for server, name in ((plain, "simulated"), (relay, "upstream:m1")):
        async with session.get(server.url + "/") as resp:
            assert f"answers from: <b>{name}</b>" in await resp.text()
        assert (await get_json(session, server.url + "/api/config"))["generator"] == name
