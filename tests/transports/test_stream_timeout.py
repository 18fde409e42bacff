"""--stream-timeout: a stream open too long ends with end/timeout, and resuming loses nothing."""

from __future__ import annotations

import asyncio
import json

import aiohttp

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
