"""Resuming from an event id, on every transport and every way a transport can resume."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import RunningServer, StartServer
from tests.transports.collect import (
    Envelope,
    collect,
    fetch,
    longpoll,
    sse,
    start_chat,
    ws,
)

#: Every way of resuming: the polls, SSE by query and by header, WebSocket by query and by the
#: ``resume`` message on an open socket, and the fetch stream's retry of its POST with
#: ``Last-Event-ID`` (which names the chat: its channel's epoch is the chat's id).
WAYS = (
    "poll",
    "longpoll",
    "sse-after",
    "sse-header",
    "ws-after",
    "ws-message",
    "fetch",
)
CASES = ("history-trimmed", "future-id", "unknown-epoch")
#: The unservable ids, each way; not an unknown epoch for fetch: an id of no chat names
#: nothing to resume (404, see test_fetch.py).
UNSERVABLE = [
    pytest.param(way, case, id=f"{case}-{way}")
    for case in CASES
    for way in WAYS
    if (way, case) != ("fetch", "unknown-epoch")
]


async def resume(
    way: str, session: aiohttp.ClientSession, base: str, channel: str, after: str
) -> list[Envelope]:
    """The events after ``after`` up to ``end``, resuming the way ``way`` says."""
    if way in ("poll", "longpoll"):
        return await collect(way, session, base, channel, after=after)
    if way == "sse-after":
        result = await sse(session, base, channel, after=after)
    elif way == "sse-header":
        # The header wins over the URL's ?after (which a browser keeps from the first open).
        result = await sse(session, base, channel, after="now", last_event_id=after)
    elif way == "fetch":
        # The retry of a request whose body is not looked at again: the id names the chat.
        fetched = await fetch(session, base, {"prompt": "any"}, last_event_id=after)
        assert fetched.status == 200, fetched.error
        assert fetched.chat is not None
        assert fetched.chat["channel"] == channel
        assert fetched.closed_by_server
        return fetched.events
    elif way == "ws-after":
        ws_result = await ws(session, base, channel, after=after)
        assert ws_result.controls == []
        return ws_result.events
    else:
        # Opened at "now" on a finished channel: nothing arrives until the resume message.
        ws_result = await ws(
            session, base, channel, after="now", send=[{"type": "resume", "after": after}]
        )
        assert ws_result.controls == []
        return ws_result.events
    assert result.status == 200
    assert result.closed_by_server
    return result.events


async def finished_chat(
    server: RunningServer, session: aiohttp.ClientSession, max_tokens: int
) -> tuple[str, list[Envelope]]:
    chat = await start_chat(session, server.url, "resume me", seed=11, max_tokens=max_tokens)
    events = await longpoll(session, server.url, chat["channel"])
    return chat["channel"], events


@pytest.mark.parametrize("way", WAYS)
async def test_resume_mid_stream_yields_exactly_the_rest(
    way: str, server: RunningServer, session: aiohttp.ClientSession
) -> None:
    channel, events = await finished_chat(server, session, max_tokens=30)
    assert len(events) == 31
    for cut in (0, 12, 29):
        rest = await resume(way, session, server.url, channel, events[cut]["id"])
        assert rest == events[cut + 1 :], cut


@pytest.mark.parametrize(("way", "case"), UNSERVABLE)
async def test_unservable_id_yields_reset_then_oldest_retained(
    way: str, case: str, start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(history=5)
    channel, _ = await finished_chat(server, session, max_tokens=20)
    # 21 events were published (20 tokens and end); history keeps seqs 17..21.
    retained = await longpoll(session, server.url, channel)  # "all history": no reset
    epoch = retained[-1]["id"].split("-")[0]
    assert [e["id"] for e in retained] == [f"{epoch}-{n}" for n in range(17, 22)]
    requested = {
        "history-trimmed": f"{epoch}-3",
        "future-id": f"{epoch}-999",
        "unknown-epoch": "zz99-3",
    }[case]

    got = await resume(way, session, server.url, channel, requested)

    reset, rest = got[0], got[1:]
    assert reset["type"] == "reset"
    assert reset["data"]["reason"] == case
    assert reset["data"]["requested"] == requested
    assert reset["data"]["oldest"] == f"{epoch}-17"
    assert reset["id"] == f"{epoch}-16"  # just before the oldest retained event
    assert [e["id"] for e in rest] == [f"{epoch}-{n}" for n in range(17, 22)]
    assert rest[-1]["type"] == "end"

    # Resuming from the reset's own id gives exactly the retained history, without a reset.
    again = await resume(way, session, server.url, channel, reset["id"])
    assert again == rest
