"""A restarted server with the memory bus has lost every channel's history: clients must say so.

Clients on the four channel transports follow one application channel (a fetch stream reads
only the chat it started: it takes part where a chat is lost). The server stops mid-stream and
a new one starts on the same port with an empty memory bus (a new epoch). Each client must
yield a ``reset`` (it cannot know what it missed) and then every event published on the new
server, in order: none hangs, none silently carries on as if nothing happened.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from realtime_lab.errors import ServerRefused
from realtime_lab.feed.llm import answer_tokens
from realtime_lab.protocol.envelope import Event
from realtime_lab.transports.keys import CHATS_KEY
from tests.conftest import RunningServer, StartServer
from tests.reliability.helpers import (
    CHANNEL_TRANSPORTS,
    Reader,
    fetch_reader,
    post,
    reader,
    start_chat,
)

CHANNEL = "news"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def publish(session: aiohttp.ClientSession, server: RunningServer, n: int) -> Event:
    answer = await post(
        session,
        f"{server.url}/api/channels/{CHANNEL}/events",
        {"type": "note", "data": {"n": n}},
        status=201,
    )
    return Event.from_dict(answer)


def notes(events: list[Event]) -> list[int]:
    return [e.data["n"] for e in events if e.type == "note"]


async def wait_all(readers: list[Reader], test: Callable[[Reader], bool]) -> None:
    """Wait until ``test(reader)`` holds for every reader (each within its own deadline)."""
    for r in readers:
        await r.wait_for(functools.partial(test, r))


@pytest.mark.parametrize("publish_first", [True, False], ids=["news-waiting", "clients-first"])
async def test_every_client_surfaces_the_reset_and_carries_on(
    start_server: StartServer, session: aiohttp.ClientSession, publish_first: bool
) -> None:
    """``news-waiting``: the new server has events before the clients come back (the reset
    names the position before them); ``clients-first``: they come back to an empty channel
    (the reset names ``<epoch>-0``) and the new events arrive live."""
    server = await start_server()
    old = [await publish(session, server, n) for n in range(1, 4)]
    readers = [reader(server, CHANNEL, t) for t in CHANNEL_TRANSPORTS]
    for r in readers:
        await r.__aenter__()
    try:
        await wait_all(readers, lambda r: len(r.events) >= 3)
        # Mid-stream: one more event on the old server, which the clients now follow live.
        old.append(await publish(session, server, 4))
        await wait_all(readers, lambda r: len(r.events) >= 4)

        await server.stop()
        restarted = await start_server(port=server.port)
        new: list[Event] = []
        if publish_first:
            new = [await publish(session, restarted, n) for n in range(101, 104)]
        await wait_all(readers, lambda r: any(e.type == "reset" for e in r.events))
        new += [await publish(session, restarted, n) for n in range(104, 107)]
        await wait_all(readers, lambda r: len(r.events) >= 4 + 1 + len(new))
    finally:
        for r in readers:
            await r.__aexit__(None, None, None)

    new_epoch = new[0].id.split("-")[0]
    assert new_epoch != old[0].id.split("-")[0]
    for r in readers:
        where = f"{r.client.transport}: {[(e.type, e.id) for e in r.events]}"
        assert r.error is None, where
        assert [e.id for e in r.events[:4]] == [e.id for e in old], where
        reset = r.events[4]
        assert reset.type == "reset", where
        assert reset.data["reason"] == "unknown-epoch", where
        assert reset.data["requested"] == old[-1].id, where
        # Resuming from the reset's id gives exactly the new server's history.
        assert reset.id == f"{new_epoch}-0", where
        assert [e.id for e in r.events[5:]] == [e.id for e in new], where
        assert notes(r.events[5:]) == [e.data["n"] for e in new], where
        stats = r.client.stats
        assert (stats.resets, stats.gaps, stats.duplicates, stats.out_of_order) == (1, 0, 0, 0)
        if r.client.transport in ("sse", "ws"):
            # The open stream ended with the server; a short poll may just find the new one.
            assert stats.reconnects >= 1, stats.summary()


async def test_a_chat_lost_with_its_server_ends_every_client_loudly(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    """The chat itself is gone after a restart: every client stops with a 404, none hangs and
    none takes the new server's silence for the rest of the answer."""
    server = await start_server()
    chat = await start_chat(session, server, token_ms=20)
    readers = [reader(server, chat["channel"], t) for t in CHANNEL_TRANSPORTS]
    # The same request over fetch: its POST starts a chat of its own, lost the same way.
    readers.append(fetch_reader(server, token_ms=20))
    for r in readers:
        await r.__aenter__()
    try:
        for r in readers:
            await r.wait_tokens(10)
        await server.stop()
        restarted = await start_server(port=server.port)
        async with asyncio.timeout(20):
            for r in readers:
                with pytest.raises(ServerRefused) as refused:
                    await r.finished()
                assert refused.value.status == 404, r.client.transport
        # Not one client took the new server's silence for a new start: no chat was created.
        assert restarted.app[CHATS_KEY].running == 0
    finally:
        for r in readers:
            await r.__aexit__(None, None, None)

    tokens = answer_tokens(chat["prompt"], chat["seed"], max_tokens=118)
    for r in readers:
        got = [e.data["index"] for e in r.events if e.type == "token"]
        # What arrived before the restart is a clean prefix of the answer, and no end came.
        assert got == list(range(len(got))), r.client.transport
        assert "".join(e.data["text"] for e in r.tokens) == "".join(tokens[: len(got)])
        assert all(e.type == "token" for e in r.events), r.client.transport
        assert r.client.stats.gaps == r.client.stats.duplicates == 0
