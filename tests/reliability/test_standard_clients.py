"""The SSE endpoint read by a spec-following client library, not by our own client.

``httpx-sse`` parses ``text/event-stream`` as the WHATWG spec says and leaves reconnecting to
its caller, which lets the test play the ``EventSource`` reconnection algorithm step by step:
read part of a chat, lose the connection, come back with ``Last-Event-ID`` set to the last id
seen, stop at the ``end`` event, and get ``204 No Content`` when coming back after it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from realtime_lab.feed.llm import answer_tokens
from tests.conftest import StartServer
from tests.reliability.helpers import MAX_TOKENS, PROMPT, SEED

httpx = pytest.importorskip("httpx")
httpx_sse = pytest.importorskip("httpx_sse")

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
                if sse.data and json.loads(sse.data)["data"]["index"] == 19:
                    break
        # The stream opens with the reconnection time, in a block of its own.
        assert first[0].retry == RETRY_MS
        assert first[0].data == ""
        tokens = [json.loads(sse.data) for sse in first[1:]]
        assert all(sse.event == "message" for sse in first[1:])  # tokens are unnamed messages
        assert [t["data"]["index"] for t in tokens] == list(range(20))
        assert [sse.id for sse in first[1:]] == [t["id"] for t in tokens]
        last_id = first[-1].id

        # Second connection, as EventSource makes it: Last-Event-ID = the last id seen.
        rest: list[Any] = []
        async with httpx_sse.aconnect_sse(
            http, "GET", url, headers={"Last-Event-ID": last_id}
        ) as source:
            async for sse in source.aiter_sse():
                if sse.data:
                    rest.append(sse)
                if sse.event == "end":
                    break  # the end event is the signal to stop: no reconnection
        assert [sse.event for sse in rest] == ["message"] * (len(expected) - 20) + ["end"]
        resumed = [json.loads(sse.data) for sse in rest]
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
