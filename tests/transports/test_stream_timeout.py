"""--stream-timeout: a stream open too long ends with end/timeout, and resuming loses nothing."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from realtime_lab.clients import open_stream
from realtime_lab.feed.llm import answer_text
from realtime_lab.protocol.sse import SSEDecoder
from tests.conftest import StartServer


async def test_a_timed_out_stream_says_so_and_resumes_without_loss(
    start_server: StartServer,
) -> None:
    server = await start_server(stream_timeout=0.5, ticker_rate=50)
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(10):
            async with session.get(f"{server.url}/sse/ticker?after=now") as resp:
                body = await resp.read()  # the server ends it
        messages = SSEDecoder().feed(body)
        *events, last = messages
        assert last.event == "end"
        notice = json.loads(last.data)
        assert notice["id"] is None
        ids = [json.loads(m.data)["id"] for m in events]
        assert last.id == ids[-1]  # no id: the client's Last-Event-ID stays the last event's
        assert notice["data"]["reason"] == "timeout"
        assert ids
        assert notice["data"]["resume_after"] == ids[-1]
        # Resuming from the last id continues exactly after it.
        headers = {"Last-Event-ID": ids[-1]}
        url = f"{server.url}/longpoll/ticker?after={ids[-1]}&timeout=5"
        async with session.get(url, headers=headers) as r:
            nxt = (await r.json())["events"][0]["id"]
        epoch, seq = ids[-1].rsplit("-", 1)
        assert nxt == f"{epoch}-{int(seq) + 1}"

        sock = await session.ws_connect(f"{server.ws_url}/ws/ticker?after=now")
        got = []
        async with asyncio.timeout(10):
            async for message in sock:
                got.append(json.loads(message.data))
        assert sock.close_code == 1000
        assert got[-1]["type"] == "end"
        assert got[-1]["data"]["reason"] == "timeout"
        async with session.get(f"{server.url}/metrics") as r:
            text = await r.text()
    assert 'realtime_lab_stream_outcomes_total{outcome="timeout",transport="sse"} 1.0' in text
    assert 'realtime_lab_stream_outcomes_total{outcome="timeout",transport="ws"} 1.0' in text


@pytest.mark.parametrize("transport", ["sse", "ws", "longpoll", "fetch"])
async def test_python_clients_resume_across_stream_timeouts_without_loss(
    transport: str, start_server: StartServer
) -> None:
    server = await start_server(stream_timeout=0.3)
    prompt, seed, tokens = "a longer answer", 3, 60
    chat = {"prompt": prompt, "seed": seed, "max_tokens": tokens, "token_ms": 15, "ttft_ms": 0}
    if transport == "fetch":
        client = open_stream(server.url, None, "fetch", chat=chat, backoff_initial=0.01)
    else:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{server.url}/api/chats", json=chat) as resp,
        ):
            channel = (await resp.json())["channel"]
        client = open_stream(server.url, channel, transport, backoff_initial=0.01)
    text = []
    async with asyncio.timeout(30), client:
        async for event in client:
            if event.type == "token":
                text.append(event.data["text"])
    assert "".join(text) == answer_text(prompt, seed, max_tokens=tokens)
    assert client.stats.gaps == client.stats.duplicates == client.stats.resets == 0
    if transport != "longpoll":  # a long poll answers long before its stream could time out
        assert client.stats.reconnects >= 1
