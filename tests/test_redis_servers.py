"""Two server processes' worth of apps on one Redis: one feed, same ids, resumable across them."""

from __future__ import annotations

import aiohttp
import pytest

from realtime_lab.clients import open_stream
from realtime_lab.feed.llm import answer_text
from realtime_lab.protocol.envelope import Event
from tests.conftest import StartServer

pytestmark = pytest.mark.redis

PROMPT, SEED, TOKENS = "shared feeds", 7, 30


async def _collect(
    base: str, channel: str, transport: str, after: str | None = None
) -> list[Event]:
    events: list[Event] = []
    async with open_stream(base, channel, transport, after=after) as client:
        async for event in client:
            events.append(event)
    return events


@pytest.mark.parametrize("transport", ["poll", "longpoll", "sse", "ws"])
async def test_a_chat_started_on_one_server_streams_from_another(
    start_server: StartServer, redis_url: str, transport: str
) -> None:
    first = await start_server(bus=redis_url)
    second = await start_server(bus=redis_url)
    async with aiohttp.ClientSession() as session:
        body = {"prompt": PROMPT, "seed": SEED, "max_tokens": TOKENS}
        async with session.post(f"{first.url}/api/chats", json=body) as resp:
            assert resp.status == 201
            channel = (await resp.json())["channel"]

    on_second = await _collect(second.url, channel, transport)
    on_first = await _collect(first.url, channel, "sse")

    text = "".join(e.data["text"] for e in on_second if e.type == "token")
    assert text == answer_text(PROMPT, SEED, max_tokens=TOKENS)
    assert on_second[-1].type == "end"
    assert [(e.id, e.type, e.data) for e in on_second] == [(e.id, e.type, e.data) for e in on_first]

    # A client that read part of the stream from one server resumes exactly on the other.
    middle = on_first[len(on_first) // 2]
    rest = await _collect(second.url, channel, transport, after=middle.id)
    assert [e.id for e in rest] == [e.id for e in on_first if e.seq > middle.seq]


async def test_events_published_on_either_server_reach_subscribers_of_both(
    start_server: StartServer, redis_url: str
) -> None:
    first = await start_server(bus=redis_url)
    second = await start_server(bus=redis_url)
    async with aiohttp.ClientSession() as session:
        for n, server in enumerate([first, second, first, second]):
            url = f"{server.url}/api/channels/room.1/events"
            async with session.post(url, json={"type": "note", "data": {"n": n}}) as resp:
                assert resp.status == 201
        async with session.get(f"{second.url}/poll/room.1") as resp:
            on_second = (await resp.json())["events"]
        async with session.get(f"{first.url}/poll/room.1") as resp:
            on_first = (await resp.json())["events"]
    assert [e["data"]["n"] for e in on_second] == [0, 1, 2, 3]
    assert on_first == on_second
