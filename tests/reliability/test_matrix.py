"""The reliability matrix: every transport under every fault streams the exact answer.

Each case streams one chat (118 tokens) through the project's own client and injects the fault
mid-stream, once the client holds some tokens. Whatever the fault, the client ends with the
generator's answer: every token once, in order, then ``end`` (no gap, no duplicate, no reorder).
What differs is how the client got there, and the reconnect count says it:

========  ===================================  ==========================================
fault     SSE / WebSocket / fetch              long poll / short poll
========  ===================================  ==========================================
drop      3 cuts, 3+ reconnects                long poll: 3 cuts, 3+ reconnects;
                                               short poll: nothing is open to cut, 0
pause     held, then delivered; 0 reconnects   same: answers wait (long) or come back
                                               empty with an unchanged cursor (short)
fail      cut + 3 refused reconnects: 4        each 503 is one retried request: 3
overflow  held past ``send_buffer``: ended     no queue to overflow; the equivalent, a
          with the overflow signal, resumes    client far behind, pages through history
========  ===================================  ==========================================

The fetch client starts its chat with its own POST (the same request as the others' chat) and
resumes it by retrying that POST with ``Last-Event-ID``, well within the server's abort grace.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import aiohttp
import pytest

from realtime_lab.transports.keys import CHATS_KEY
from tests.conftest import RunningServer, StartServer
from tests.reliability.helpers import (
    STREAMING,
    TRANSPORTS,
    Reader,
    assert_exact_answer,
    chaos,
    drop_until_cut,
    fetch_reader,
    get,
    reader,
    start_chat,
    wait_chat_finished,
)

TOKEN_MS = 8.0  # ~1 s per chat: long enough to fault mid-stream three times
FAULTS = ("drop", "pause", "fail", "overflow")
FAIL_COUNT = 3
RETRY_MS = 50  # the SSE retry: the browser-like client reconnects within it
SMALL_BUFFER = 2048  # bytes: a dozen held token frames overflow it


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def sse_ws_overflow(server: RunningServer, session: aiohttp.ClientSession, r: Reader) -> None:
    """Pause delivery until the held bytes pass ``send_buffer``: the server ends the client
    with the overflow signal. Every reconnection made during the pause overflows again on its
    replay; ending the pause lets the next one resume."""
    await r.wait_tokens(15)
    await chaos(session, server, "pause", seconds=30)
    async with asyncio.timeout(20):
        while r.client.stats.overflows < 1:
            await asyncio.sleep(0.01)  # polling the condition, with the deadline above
    await chaos(session, server, "reset")


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_fault_on_every_transport_loses_nothing(
    start_server: StartServer, session: aiohttp.ClientSession, transport: str, fault: str
) -> None:
    streaming = transport in STREAMING
    overrides: dict[str, object] = {"chaos": True, "retry_ms": RETRY_MS}
    if fault == "overflow":
        overrides.update(send_buffer=SMALL_BUFFER, poll_limit=4)
    server = await start_server(**overrides)
    options: dict[str, object] = {}
    if transport == "fetch":
        # Its own POST starts the chat (the same request): the reader names it once it runs.
        streamer = fetch_reader(server, token_ms=TOKEN_MS)
    else:
        chat = await start_chat(session, server, token_ms=TOKEN_MS)
        if fault == "overflow" and not streaming:
            # The poll equivalent of a subscriber that fell behind: it comes late, with the
            # whole chat in history, and must page through it (limit 4, "more": true) at once.
            # A client that waited its 5 s interval between pages would need minutes.
            await wait_chat_finished(session, server, chat["id"])
            options["poll_interval"] = 5.0
        streamer = reader(server, chat["channel"], transport, **options)

    async with streamer as r:
        if fault == "drop":
            cuts = []
            for at in (10, 30, 50):
                await r.wait_tokens(at)
                if transport == "poll":
                    answer = await chaos(session, server, "drop", transport=transport)
                    cuts.append(answer["dropped"])
                else:
                    cuts.append(await drop_until_cut(session, server, transport, r))
        elif fault == "pause":
            await r.wait_tokens(20)
            await chaos(session, server, "pause", seconds=30)
            # Everything published from here on is held back.
            published = (await get(session, f"{server.url}/api/chats/{r.chat_id}"))["tokens"]
            await wait_chat_finished(session, server, r.chat_id)
            held_back = len(r.tokens)
            ended_early = r.done
            await chaos(session, server, "reset")  # ends the pause, releases what it held
        elif fault == "fail":
            await r.wait_tokens(20)
            await chaos(session, server, "fail", transport=transport, count=FAIL_COUNT)
            if streaming:
                # The next connection attempts are what fails: cut the open one.
                await drop_until_cut(session, server, transport, r)
        elif streaming:
            await sse_ws_overflow(server, session, r)
        events = await r.finished()

    stats = r.client.stats
    assert_exact_answer(events, r.client, context=f"under {fault}")
    summary = stats.summary()
    if fault == "drop":
        if transport == "poll":
            # A short poll holds no connection between requests: nothing to cut.
            assert cuts == [0, 0, 0]
            assert stats.reconnects == 0, summary
        else:
            assert cuts == [1, 1, 1]
            assert stats.reconnects >= 3, summary
            if streaming:
                assert stats.connections == stats.reconnects + 1, summary
    elif fault == "pause":
        # Delivery was held, not failed: nobody reconnected, and the tail of the answer came
        # only once the pause ended.
        assert not ended_early
        assert held_back <= published < len(events) - 1, (held_back, published)
        assert (stats.reconnects, stats.connections) == (0, 1), summary
    elif fault == "fail":
        if streaming:
            assert stats.reconnects == FAIL_COUNT + 1, summary
            assert stats.connections == 2, summary
        else:
            # Each refused request was retried once, after the server's retry_after_ms.
            assert stats.reconnects == FAIL_COUNT, summary
            assert min(stats.reconnect_delays_s) >= 0.1, summary
        assert (await get(session, f"{server.url}/api/chaos"))["fail_next"][transport] == 0
    elif streaming:
        assert stats.overflows >= 1, summary
        assert stats.reconnects >= stats.overflows, summary
        server_side = (await get(session, f"{server.url}/api/stats"))["transports"][transport]
        assert server_side["overflows"] >= stats.overflows, server_side
    else:
        assert stats.overflows == 0, summary
        assert stats.reconnects == 0, summary
        # Every answer carried at most `limit` events, back to back.
        assert stats.requests >= math.ceil(len(events) / 4), summary
    # The server agrees: the chat ran to its end undisturbed by the faults (for fetch: its
    # cut streams came back within the abort grace, and no retry started another chat).
    assert server.app[CHATS_KEY].get(r.chat_id).status == "done"
    assert server.app[CHATS_KEY].running == 0
