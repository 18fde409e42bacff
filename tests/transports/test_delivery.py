"""Every transport delivers the same channel, event for event.

The fetch stream reads no channel by name: it streams the chat its POST creates. It takes part
where a chat is streamed (the whole chat; the same chat read by every transport at once) and
not where an application channel is (``room.same``).
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from realtime_lab.feed.llm import answer_text
from tests.conftest import RunningServer, StartServer
from tests.transports.collect import (
    CHANNEL_TRANSPORTS,
    TRANSPORTS,
    Envelope,
    collect,
    comparable,
    fetch,
    publish,
    running,
    start_chat,
    text_of,
    until_count,
)

PROMPT = "Explain streaming 流式 to me"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_whole_chat_arrives(
    transport: str, start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server()
    if transport == "fetch":
        streamed = await fetch(session, server.url, {"prompt": PROMPT, "seed": 7, "max_tokens": 60})
        assert streamed.status == 200, streamed.error
        assert streamed.chat is not None
        chat, events = streamed.chat, streamed.events
    else:
        chat = await start_chat(session, server.url, PROMPT, seed=7, max_tokens=60)
        # Subscribed while the chat is generating: history and live events must join seamlessly.
        events = await collect(transport, session, server.url, chat["channel"])

    assert text_of(events) == answer_text(PROMPT, 7, max_tokens=60)
    tokens = events[:-1]
    assert [e["type"] for e in tokens] == ["token"] * len(tokens)
    assert [e["data"]["index"] for e in tokens] == list(range(len(tokens)))
    assert events[-1]["type"] == "end"
    assert events[-1]["data"]["reason"] == "done"
    epoch = events[0]["id"].split("-")[0]
    assert [e["id"] for e in events] == [f"{epoch}-{n}" for n in range(1, len(events) + 1)]
    assert all(e["channel"] == chat["channel"] for e in events)


async def test_transports_deliver_identical_sequences(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    channel = "room.same"
    published = [
        await publish(session, server.url, channel, "note", {"n": n, "text": f"héllo {n} 你好"})
        for n in range(5)
    ]
    # Subscribers of every transport, following the channel while it is fed ...
    live_count = 5

    async def follow_all() -> list[list[Envelope]]:
        return await asyncio.gather(
            *(
                collect(
                    t,
                    session,
                    server.url,
                    channel,
                    after=published[-1]["id"],
                    stop=until_count(live_count),
                )
                for t in CHANNEL_TRANSPORTS
            )
        )

    async with running(follow_all()) as live:
        for n in range(5, 5 + live_count):
            await publish(session, server.url, channel, "note", {"n": n})
        live_results = await asyncio.wait_for(live, timeout=30)
    # ... and replays of the whole history by every transport afterwards.
    replays = await asyncio.gather(
        *(
            collect(t, session, server.url, channel, stop=until_count(10))
            for t in CHANNEL_TRANSPORTS
        )
    )
    expected = comparable(published) + comparable(live_results[0])
    assert [e["data"]["n"] for e in live_results[0]] == list(range(5, 10))
    for transport, events in zip(CHANNEL_TRANSPORTS, live_results, strict=True):
        assert comparable(events) == expected[5:], transport
    for transport, events in zip(CHANNEL_TRANSPORTS, replays, strict=True):
        assert comparable(events) == expected, transport
        # ts is the publish time, carried unchanged by every transport.
        assert [e["ts"] for e in events[:5]] == [e["ts"] for e in published], transport


async def test_chat_sequences_identical_across_transports(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    # The fetch stream starts the chat; every other transport reads it while it generates.
    named: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()

    async def learn(chat: Envelope) -> None:
        named.set_result(chat)

    request = {"prompt": PROMPT, "seed": 3, "max_tokens": 40, "token_ms": 5}
    async with running(fetch(session, server.url, request, on_chat=learn)) as streaming:
        chat = await asyncio.wait_for(named, timeout=20)
        results = await asyncio.gather(
            *(collect(t, session, server.url, chat["channel"]) for t in CHANNEL_TRANSPORTS)
        )
        streamed = await asyncio.wait_for(streaming, timeout=20)
    assert streamed.events == results[0]
    first = [{**e} for e in results[0]]
    assert text_of(first) == answer_text(PROMPT, 3, max_tokens=40)
    for transport, events in zip(CHANNEL_TRANSPORTS, results, strict=True):
        assert events == first, transport
