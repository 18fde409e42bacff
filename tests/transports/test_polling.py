"""Short and long polling: the answer's shape, ``limit``/``more``, and how a long poll waits."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import RunningServer
from tests.transports.collect import publish, running, start_chat, stats, wait_for


async def get(session: aiohttp.ClientSession, url: str, **params: object) -> dict:
    query = {k: str(v) for k, v in params.items()}
    async with session.get(url, params=query) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Cache-Control"] == "no-store"
        value: dict = await resp.json()
        return value


async def waiting_longpolls(session: aiohttp.ClientSession, server: RunningServer) -> int:
    value: int = (await stats(session, server.url))["transports"]["longpoll"]["open"]
    return value


async def test_longpoll_answers_when_an_event_is_published(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    first = await publish(session, server.url, "room.lp", "note", {"n": 0})
    # timeout=30: only the publish can answer it within the test's bounds, not a timer.
    async with running(
        get(session, f"{server.url}/longpoll/room.lp", after=first["id"], timeout=30)
    ) as waiting:
        await wait_for(lambda: waiting_longpolls(session, server))
        assert not waiting.done()
        sent = await publish(session, server.url, "room.lp", "note", {"n": 1})
        body = await asyncio.wait_for(waiting, timeout=5)
    assert body == {"events": [sent], "cursor": sent["id"], "more": False}


async def test_longpoll_from_now_waits_for_the_next_event(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    await publish(session, server.url, "room.now", "note", {"n": 0})
    async with running(
        get(session, f"{server.url}/longpoll/room.now", after="now", timeout=30)
    ) as waiting:
        await wait_for(lambda: waiting_longpolls(session, server))
        sent = await publish(session, server.url, "room.now", "note", {"n": 1})
        body = await asyncio.wait_for(waiting, timeout=5)
    assert body["events"] == [sent]


async def test_longpoll_on_a_chat_before_its_first_token(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    # The chat's channel has no event yet (ttft 1 s): the long poll waits for the first token
    # and gets it, instead of a reset (the bus has no position for the channel yet).
    chat = await start_chat(session, server.url, "slow start", ttft_ms=1000, max_tokens=5)
    body = await get(session, f"{server.url}/longpoll/{chat['channel']}", timeout=30)
    assert [e["type"] for e in body["events"]][:1] == ["token"]
    assert body["events"][0]["data"]["index"] == 0


async def test_longpoll_times_out_with_an_empty_answer(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    sent = await publish(session, server.url, "room.idle", "note", {})
    body = await get(session, f"{server.url}/longpoll/room.idle", after=sent["id"], timeout=0.3)
    assert body == {"events": [], "cursor": sent["id"], "more": False}
    # timeout=0 answers at once, like a short poll.
    body = await get(session, f"{server.url}/longpoll/room.idle", after=sent["id"], timeout=0)
    assert body == {"events": [], "cursor": sent["id"], "more": False}


@pytest.mark.parametrize("transport", ["poll", "longpoll"])
async def test_limit_and_more(
    transport: str, server: RunningServer, session: aiohttp.ClientSession
) -> None:
    sent = [await publish(session, server.url, "room.limit", "note", {"n": n}) for n in range(5)]
    url = f"{server.url}/{transport}/room.limit"
    pages = []
    body = await get(session, url, limit=2)
    pages.append(body)
    while body["more"]:
        body = await get(session, url, limit=2, after=body["cursor"], timeout=0)
        pages.append(body)
    assert [len(p["events"]) for p in pages] == [2, 2, 1]
    assert [p["more"] for p in pages] == [True, True, False]
    assert [p["cursor"] for p in pages] == [sent[1]["id"], sent[3]["id"], sent[4]["id"]]
    assert [e for p in pages for e in p["events"]] == sent


async def test_poll_of_an_unknown_channel_is_empty_and_stable(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    # Nothing was ever published: every poll is empty, with no reset, and its cursor stays valid
    # until the first event, which the next poll then returns.
    body = await get(session, f"{server.url}/poll/room.empty")
    for _ in range(3):
        assert body["events"] == []
        assert isinstance(body["cursor"], str)
        body = await get(session, f"{server.url}/poll/room.empty", after=body["cursor"])
    assert body["events"] == []
    sent = await publish(session, server.url, "room.empty", "note", {})
    body = await get(session, f"{server.url}/poll/room.empty", after=body["cursor"])
    assert body["events"] == [sent]


async def test_longpoll_with_a_stale_id_on_an_empty_channel_resets_once_then_waits(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    # An id from another life of a channel nobody has published to since (a server restart):
    # one reset, and resuming from it waits for the first event instead of answering with
    # another reset (a busy loop).
    url = f"{server.url}/longpoll/room.restarted"
    body = await get(session, url, after="0ld-42", timeout=5)
    (reset,) = body["events"]
    assert reset["type"] == "reset"
    assert reset["data"]["reason"] == "unknown-epoch"
    assert body["cursor"] == reset["id"]
    async with running(get(session, url, after=body["cursor"], timeout=30)) as waiting:
        await wait_for(lambda: waiting_longpolls(session, server))
        sent = await publish(session, server.url, "room.restarted", "note", {})
        again = await asyncio.wait_for(waiting, timeout=5)
    assert again["events"] == [sent]
