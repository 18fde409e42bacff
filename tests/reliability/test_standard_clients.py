"""The SSE endpoint (and the fetch stream) read by spec-following client libraries, not by our
own client.

``httpx-sse`` parses ``text/event-stream`` as the WHATWG spec says and leaves reconnecting to
its caller, which lets the test play the ``EventSource`` reconnection algorithm step by step:
read part of a chat, lose the connection, come back with ``Last-Event-ID`` set to the last id
seen, stop at the ``end`` event, and get ``204 No Content`` when coming back after it. It
yields an event for every block that sets a field, even one with no data (the spec dispatches
nothing then), which is why the stream's ``retry:`` rides in the first event's block: every
event it yields has JSON data.

``aiohttp-sse-client`` is an ``EventSource`` that reconnects by itself. A client that stops at
``end`` never reconnects and sees nothing more; one that keeps iterating reconnects after the
stream closes and gets the 204, which this library raises as ``ConnectionAbortedError`` (a
``ConnectionError``, which its documentation tells callers to catch): there is no answer a
server could give instead that it would take as "the stream is over".
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from realtime_lab.feed.llm import answer_tokens
from tests.conftest import StartServer
from tests.reliability.helpers import MAX_TOKENS, PROMPT, SEED

httpx = pytest.importorskip("httpx")
httpx_sse = pytest.importorskip("httpx_sse")
sse_client = pytest.importorskip("aiohttp_sse_client.client")

RETRY_MS = 250
TIMEOUT = httpx.Timeout(20.0)


async def test_httpx_sse_resumes_exactly_with_last_event_id(start_server: StartServer) -> None:
    server = await start_server(retry_ms=RETRY_MS)
    expected = answer_tokens(PROMPT, SEED, max_tokens=MAX_TOKENS)
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        created = await http.post(
            "/api/chats",
            json={"prompt": PROMPT, "seed": SEED, "max_tokens": MAX_TOKENS, "token_ms": 5},
        )
        assert created.status_code == 201
        url = f"/sse/{created.json()['channel']}"

        # First connection: read 20 tokens, then hang up (leaving the block closes it).
        first: list[Any] = []
        async with httpx_sse.aconnect_sse(http, "GET", url) as source:
            assert source.response.status_code == 200
            async for sse in source.aiter_sse():
                first.append(sse)
                if sse.json()["data"]["index"] == 19:  # every event is JSON, the first one too
                    break
        # The reconnection time arrives with the first event, not as an event of its own.
        assert [sse.retry for sse in first] == [RETRY_MS] + [None] * 19
        tokens = [sse.json() for sse in first]
        assert all(sse.event == "message" for sse in first)  # tokens are unnamed messages
        assert [t["data"]["index"] for t in tokens] == list(range(20))
        assert [sse.id for sse in first] == [t["id"] for t in tokens]
        last_id = first[-1].id

        # Second connection, as EventSource makes it: Last-Event-ID = the last id seen.
        rest: list[Any] = []
        async with httpx_sse.aconnect_sse(
            http, "GET", url, headers={"Last-Event-ID": last_id}
        ) as source:
            async for sse in source.aiter_sse():
                rest.append(sse)
                if sse.event == "end":
                    break  # the end event is the signal to stop: no reconnection
        assert [sse.event for sse in rest] == ["message"] * (len(expected) - 20) + ["end"]
        assert rest[0].retry == RETRY_MS  # each connection opens with it
        resumed = [sse.json() for sse in rest]
        assert [t["data"]["index"] for t in resumed[:-1]] == list(range(20, len(expected)))
        text = "".join(t["data"]["text"] for t in tokens + resumed[:-1])
        assert text == "".join(expected)
        end = resumed[-1]
        assert (end["type"], end["data"]["reason"]) == ("end", "done")
        assert rest[-1].id == end["id"]

        # Coming back after the end: 204, which tells an EventSource to stop for good.
        async with httpx_sse.aconnect_sse(
            http, "GET", url, headers={"Last-Event-ID": end["id"]}
        ) as source:
            assert source.response.status_code == 204
            assert await source.response.aread() == b""

    ids = [t["id"] for t in tokens + resumed]
    seqs = [int(i.rsplit("-", 1)[1]) for i in ids]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "ids must be consecutive"


async def test_httpx_sse_posts_a_fetch_stream_and_resumes_it_with_last_event_id(
    start_server: StartServer,
) -> None:
    """The fetch way, as ``@microsoft/fetch-event-source`` does it: POST the chat request, read
    the answer as SSE, and retry the same POST with ``Last-Event-ID`` after a cut."""
    server = await start_server(retry_ms=RETRY_MS)
    expected = answer_tokens(PROMPT, SEED, max_tokens=MAX_TOKENS)
    request = {"prompt": PROMPT, "seed": SEED, "max_tokens": MAX_TOKENS, "token_ms": 5}
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        first: list[Any] = []
        async with httpx_sse.aconnect_sse(
            http, "POST", "/api/chats/stream", json=request
        ) as source:
            assert source.response.status_code == 200
            async for sse in source.aiter_sse():
                first.append(sse)
                if sse.event != "chat" and sse.json()["data"]["index"] == 19:
                    break  # hang up mid-chat: within the abort grace, it waits for us
        opening, tokens = first[0], [sse.json() for sse in first[1:]]
        assert (opening.event, opening.id, opening.retry) == ("chat", "", RETRY_MS)
        chat = opening.json()["chat"]
        assert [t["data"]["index"] for t in tokens] == list(range(20))
        assert all(t["channel"] == chat["channel"] for t in tokens)

        rest: list[Any] = []
        async with httpx_sse.aconnect_sse(
            http,
            "POST",
            "/api/chats/stream",
            json=request,
            headers={"Last-Event-ID": first[-1].id},
        ) as source:
            assert source.response.status_code == 200
            async for sse in source.aiter_sse():
                rest.append(sse)
                if sse.event == "end":
                    break
        assert rest[0].event == "chat"
        assert rest[0].json()["chat"]["id"] == chat["id"]  # the same chat, not a new one
        resumed = [sse.json() for sse in rest[1:]]
        text = "".join(t["data"]["text"] for t in tokens + resumed[:-1])
        assert text == "".join(expected)
        assert resumed[-1]["data"]["reason"] == "done"
    ids = [t["id"] for t in tokens + resumed]
    assert ids == [f"{chat['id']}-{n}" for n in range(1, len(ids) + 1)]


async def _chat_url(http: aiohttp.ClientSession, base: str) -> str:
    async with http.post(
        f"{base}/api/chats",
        json={"prompt": PROMPT, "seed": SEED, "max_tokens": MAX_TOKENS, "token_ms": 2},
    ) as resp:
        assert resp.status == 201
        return f"{base}/sse/{(await resp.json())['channel']}"


async def test_aiohttp_sse_client_stops_cleanly_at_end(start_server: StartServer) -> None:
    server = await start_server(retry_ms=RETRY_MS)
    expected = answer_tokens(PROMPT, SEED, max_tokens=MAX_TOKENS)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        url = await _chat_url(http, server.url)
        messages: list[Any] = []
        async with sse_client.EventSource(url, session=http) as source:
            async for message in source:
                messages.append(message)
                if message.type == "end":
                    break  # the end event is the signal to stop: no reconnection, no 204
        assert source.ready_state == sse_client.READY_STATE_CLOSED
    # Every message has JSON data: tokens are unnamed (type None), the end is named.
    assert [m.type for m in messages] == [None] * len(expected) + ["end"]
    envelopes = [json.loads(m.data) for m in messages]
    assert "".join(e["data"]["text"] for e in envelopes[:-1]) == "".join(expected)
    assert envelopes[-1]["data"]["reason"] == "done"
    assert messages[-1].last_event_id == envelopes[-1]["id"]


async def test_aiohttp_sse_client_reading_past_end_raises_on_the_204(
    start_server: StartServer,
) -> None:
    server = await start_server(retry_ms=20)  # the reconnection comes quickly
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        url = await _chat_url(http, server.url)
        types: list[str | None] = []
        async with sse_client.EventSource(
            url, session=http, reconnection_time=timedelta(seconds=30)
        ) as source:
            # The stream's retry: replaced the 30 s: the reconnection (with Last-Event-Id = the
            # end's id) comes within the test's timeout, and its 204 is raised.
            with pytest.raises(ConnectionAbortedError, match="204"):
                await _read_types(source, types)
    assert types[-1] == "end"


async def _read_types(source: Any, types: list[str | None]) -> None:
    async for message in source:
        types.append(message.type)


async def test_httpx_sse_sees_no_empty_event_on_a_quiet_channel(start_server: StartServer) -> None:
    server = await start_server(retry_ms=RETRY_MS, heartbeat=0.2)
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:

        async def publish_after_two_heartbeats() -> dict[str, Any]:
            while (await http.get("/api/stats")).json()["transports"]["sse"]["heartbeats"] < 2:
                await asyncio.sleep(0.05)  # polling the condition; the test's timeout bounds it
            answer = await http.post(
                "/api/channels/room.quiet/events", json={"type": "note", "data": {"n": 1}}
            )
            assert answer.status_code == 201
            return dict(answer.json())

        async with (
            asyncio.timeout(10),
            httpx_sse.aconnect_sse(http, "GET", "/sse/room.quiet?after=now") as source,
        ):
            publisher = asyncio.ensure_future(publish_after_two_heartbeats())
            async for sse in source.aiter_sse():
                first = sse  # the first thing httpx-sse yields
                break
            published = await publisher
    # Two heartbeats came before it, and yet it is the event itself, JSON and all.
    assert first.json()["id"] == published["id"]
    assert first.retry == RETRY_MS
