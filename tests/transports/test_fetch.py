"""Fetch streaming: ``POST /api/chats/stream`` starts a chat and answers with it as SSE.

Read with raw requests (:func:`tests.transports.collect.fetch`): the opening ``chat`` event, the
envelopes and ids (those of ``/sse/chat.<id>``), the accounting as transport ``fetch``, the
abort grace (a stream gone before the end cancels its chat, unless it resumes in time),
resuming with ``Last-Event-ID``, the refusals, and who may start or resume a chat with auth on.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest

from realtime_lab.auth import TokenAuthority
from realtime_lab.feed.llm import answer_text
from realtime_lab.transports.keys import CHATS_KEY
from tests.conftest import RunningServer, StartServer
from tests.transports.collect import (
    Envelope,
    fetch,
    longpoll,
    sse,
    stats,
    text_of,
    until_count,
    wait_for,
)

PROMPT = "Stream it back in the same response 同一个响应"
SECRET = "a test secret that is at least 32 bytes long"
AUTHORITY = TokenAuthority(SECRET)
ALICE = AUTHORITY.mint("alice")
BOB = AUTHORITY.mint("bob")


def body(**extra: Any) -> Envelope:
    return {"prompt": PROMPT, "seed": 5, "max_tokens": 40, **extra}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def chat_status(
    session: aiohttp.ClientSession, server: RunningServer, chat_id: str, token: str | None = None
) -> tuple[int, Envelope]:
    headers = bearer(token) if token else {}
    async with session.get(f"{server.url}/api/chats/{chat_id}", headers=headers) as resp:
        answer: Envelope = await resp.json()
        return resp.status, answer


# The stream ---------------------------------------------------------------------------------------


async def test_the_first_event_names_the_chat_and_the_chat_follows(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    result = await fetch(session, server.url, body())

    assert result.status == 200
    assert result.headers["Content-Type"].startswith("text/event-stream")
    assert result.first_field.startswith(b"retry: ")
    opening = result.messages[0]
    assert opening.event == "chat"
    assert opening.id == ""  # not one of the chat's events: nothing to resume after
    chat = result.chat
    assert chat is not None
    assert chat["channel"] == f"chat.{chat['id']}"
    assert (chat["prompt"], chat["seed"], chat["status"]) == (PROMPT, 5, "running")
    assert chat["stream"] == "/api/chats/stream"
    # The chat is a chat like any other: its resource and channel are there.
    status, resource = await chat_status(session, server, chat["id"])
    assert status == 200
    assert resource["channel"] == chat["channel"]

    assert text_of(result.events) == answer_text(PROMPT, 5, max_tokens=40)
    assert result.events[-1]["type"] == "end"
    assert result.events[-1]["data"]["reason"] == "done"
    assert all(e["channel"] == chat["channel"] for e in result.events)
    assert result.closed_by_server  # after the end, as /sse does
    assert resource["status"] in ("running", "done")
    assert (await chat_status(session, server, chat["id"]))[1]["status"] == "done"


async def test_the_events_are_those_of_sse_envelope_and_id(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    streamed = await fetch(session, server.url, body())
    assert streamed.chat is not None
    replayed = await sse(session, server.url, streamed.chat["channel"])

    assert replayed.status == 200
    assert streamed.events == replayed.events  # the same envelopes, ts included
    pairs = zip(streamed.messages[1:], replayed.messages, strict=True)
    for ours, theirs in pairs:
        assert (ours.event, ours.id, ours.data) == (theirs.event, theirs.id, theirs.data)
    assert [m.id for m in streamed.messages[1:]] == [e["id"] for e in streamed.events]
    assert streamed.decoder.retry == replayed.decoder.retry


async def test_the_stream_is_counted_as_fetch(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    result = await fetch(session, server.url, body())
    assert result.status == 200
    async with session.post(
        f"{server.url}/api/chats/stream", params={"client": "pane-f"}, json=body(max_tokens=5)
    ) as resp:
        raw = await resp.read()
    counted = (await stats(session, server.url))["transports"]["fetch"]
    assert counted["requests"] == 2
    assert counted["bytes"] >= len(raw)
    assert counted["open"] == 0
    tagged = (await stats(session, server.url, "pane-f"))["client"]
    assert (tagged["requests"], tagged["open"]) == (1, 0)
    assert tagged["bytes"] >= len(raw)


# Aborting ---------------------------------------------------------------------------------------


async def test_an_abort_cancels_the_chat_after_the_grace(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    grace = 0.5
    server = await start_server(fetch_abort_grace=grace)
    slow = body(ttft_ms=0, token_ms=30, max_tokens=500)
    result = await fetch(session, server.url, slow, stop=until_count(3), read_to_eof=False)
    left = time.monotonic()
    assert result.chat is not None
    chat_id = result.chat["id"]

    async def cancelled() -> bool:
        return (await chat_status(session, server, chat_id))[1]["status"] == "cancelled"

    await wait_for(cancelled, timeout=20)
    assert time.monotonic() - left >= grace
    # Its readers (if any) get the end, which says why.
    rest = await longpoll(
        session, server.url, result.chat["channel"], after=result.events[-1]["id"]
    )
    assert rest[-1]["type"] == "end"
    assert rest[-1]["data"]["reason"] == "cancelled"
    assert len([e for e in result.events + rest if e["type"] == "token"]) < 500


async def test_a_cut_and_resume_within_the_grace_continues_the_same_chat(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(fetch_abort_grace=10.0)
    request = body(ttft_ms=0, token_ms=10, max_tokens=80)
    first = await fetch(session, server.url, request, stop=until_count(12), read_to_eof=False)
    assert first.chat is not None
    last = first.events[-1]["id"]

    # The retry of the same request, as @microsoft/fetch-event-source sends it.
    second = await fetch(session, server.url, request, last_event_id=last)

    assert second.status == 200, second.error
    assert second.chat is not None
    assert second.chat["id"] == first.chat["id"]  # the same chat, not a new one
    events = first.events + second.events
    ids = [e["id"] for e in events]
    assert len(set(ids)) == len(ids)
    epoch = ids[0].split("-")[0]
    assert ids == [f"{epoch}-{n}" for n in range(1, len(ids) + 1)]
    assert text_of(events) == answer_text(PROMPT, 5, max_tokens=80)
    assert events[-1]["data"]["reason"] == "done"
    assert server.app[CHATS_KEY].get(first.chat["id"]).status == "done"
    assert server.app[CHATS_KEY].running == 0


async def test_a_cut_before_the_first_event_resumes_from_the_chats_start(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(fetch_abort_grace=10.0)
    request = body(ttft_ms=300)
    first = await fetch(session, server.url, request, stop=lambda _: True, read_to_eof=False)
    assert first.chat is not None
    assert first.events == []
    # The chat id is the epoch of its channel: <id>-0 is the position before its first event.
    second = await fetch(session, server.url, request, last_event_id=f"{first.chat['id']}-0")
    assert second.status == 200, second.error
    assert second.chat is not None
    assert second.chat["id"] == first.chat["id"]
    assert text_of(second.events) == answer_text(PROMPT, 5, max_tokens=40)
    assert second.events[0]["id"] == f"{first.chat['id']}-1"


async def test_resuming_after_the_end_answers_at_once(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    done = await fetch(session, server.url, body(max_tokens=5))
    again = await fetch(
        session, server.url, body(max_tokens=5), last_event_id=done.events[-1]["id"], timeout=10
    )
    # 204 (as /sse answers an EventSource) or an empty stream the server closes: never a hang.
    assert again.status in (200, 204), again.error
    assert again.events == []
    assert again.status == 204 or again.closed_by_server


# Refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["bad", "now", "ab12", "-3", "ab12-03"])
async def test_a_bad_last_event_id_is_400_and_starts_nothing(
    value: str, server: RunningServer, session: aiohttp.ClientSession
) -> None:
    result = await fetch(session, server.url, body(), last_event_id=value)
    assert result.status == 400
    assert result.error is not None
    assert result.error["code"] == "invalid-cursor"
    assert server.app[CHATS_KEY].running == 0


async def test_an_unknown_chat_is_404(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    result = await fetch(session, server.url, body(), last_event_id="zzzz9-3")
    assert result.status == 404
    assert result.error is not None
    assert result.error["code"] == "unknown-chat"
    assert server.app[CHATS_KEY].running == 0


@pytest.mark.parametrize(
    ("request_body", "code"),
    [
        ({"prompt": ""}, "invalid-parameter"),
        ({"prompt": "x", "max_tokens": 0}, "invalid-parameter"),
        ({"prompt": "x", "seed": "one"}, "invalid-parameter"),
    ],
)
async def test_a_bad_chat_request_is_400(
    request_body: Envelope, code: str, server: RunningServer, session: aiohttp.ClientSession
) -> None:
    result = await fetch(session, server.url, request_body)
    assert result.status == 400
    assert result.error is not None
    assert result.error["code"] == code


async def test_a_body_that_is_not_json_is_400(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{server.url}/api/chats/stream",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"]
    assert server.app[CHATS_KEY].running == 0


async def test_a_stream_refused_for_load_leaves_no_chat_behind(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(max_streams_per_client=1, fetch_abort_grace=0.05)
    held = await session.get(f"{server.url}/sse/quiet")
    try:
        assert held.status == 200
        result = await fetch(session, server.url, body(ttft_ms=0, token_ms=1000))
        assert result.status == 429
        assert result.error is not None
        assert result.error["code"] == "too-many-streams"
        assert "Retry-After" in result.headers
    finally:
        held.close()
    # A chat started for the refused stream would run for 40 s: it must be gone by the grace.
    await wait_for(lambda: server.app[CHATS_KEY].running == 0, timeout=5)


# With auth on -----------------------------------------------------------------------------------


async def test_with_auth_on_the_post_needs_a_user_and_the_chat_is_theirs(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(auth_secret=SECRET)

    anonymous = await fetch(session, server.url, body())
    assert anonymous.status == 401
    assert anonymous.error is not None
    assert anonymous.error["code"] == "unauthenticated"
    assert server.app[CHATS_KEY].running == 0

    forged = await fetch(session, server.url, body(), headers=bearer("not.a.token"))
    assert forged.status == 401
    assert forged.error is not None
    assert forged.error["code"] == "invalid-token"

    mine = await fetch(session, server.url, body(), headers=bearer(ALICE))
    assert mine.status == 200
    assert mine.chat is not None
    assert text_of(mine.events) == answer_text(PROMPT, 5, max_tokens=40)
    assert (await chat_status(session, server, mine.chat["id"], ALICE))[0] == 200
    assert (await chat_status(session, server, mine.chat["id"], BOB))[0] == 403
    replay = await sse(session, server.url, mine.chat["channel"], after=None)
    assert replay.status == 401  # the channel is alice's too: not readable anonymously


async def test_resuming_another_users_chat_is_403(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(auth_secret=SECRET, fetch_abort_grace=10.0)
    request = body(ttft_ms=0, token_ms=10, max_tokens=80)
    alices = await fetch(
        session, server.url, request, headers=bearer(ALICE), stop=until_count(5), read_to_eof=False
    )
    assert alices.chat is not None
    last = alices.events[-1]["id"]

    bobs = await fetch(session, server.url, request, headers=bearer(BOB), last_event_id=last)
    assert bobs.status == 403
    assert bobs.error is not None
    assert bobs.error["code"] == "forbidden"
    nobody = await fetch(session, server.url, request, last_event_id=last)
    assert nobody.status == 401

    # Alice herself may resume it, and reads the rest of her answer.
    again = await fetch(session, server.url, request, headers=bearer(ALICE), last_event_id=last)
    assert again.status == 200, again.error
    assert text_of(alices.events + again.events) == answer_text(PROMPT, 5, max_tokens=80)


async def test_a_fetch_stream_reads_no_ticket(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    """A ticket is for one channel, and this POST has none yet: only the bearer counts."""
    server = await start_server(auth_secret=SECRET)
    async with session.post(
        f"{server.url}/api/tickets", json={"channel": "news"}, headers=bearer(ALICE)
    ) as resp:
        assert resp.status == 201
        ticket = (await resp.json())["ticket"]
    async with session.post(
        f"{server.url}/api/chats/stream", params={"ticket": ticket}, json=body()
    ) as resp:
        assert resp.status == 401
        assert json.loads(await resp.read())["error"]["code"] == "unauthenticated"
