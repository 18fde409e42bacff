"""Fetch streams behind a load balancer: a resume (``Last-Event-ID``) reaches any process.

Two apps on one private Redis stand for two server processes. A chat started on A, cut, and
resumed on B streams on from the cursor (history, then live) up to its end, with every token
once; the abort grace holds across them (the chat runs while B streams it, and is cancelled
after the grace once B's stream is cut too, or once B dies holding it); a chat no process knows
is a 404 on either.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import pytest

from realtime_lab.bus.chatstore import LEASE_TTL_S
from realtime_lab.feed.chats import Chat
from realtime_lab.feed.llm import answer_text
from realtime_lab.transports.keys import CHATS_KEY
from tests.conftest import RunningServer, StartServer
from tests.transports.collect import Envelope, FetchResult, fetch, text_of, until_count, wait_for

pytestmark = pytest.mark.redis

PROMPT = "Resumed on another process 在另一个进程上继续"
#: Short against the chat's length: a grace the generator did not hold would cut the chat.
GRACE = 1.0
WAIT = 30.0  # generous: two shared cores


def body(**extra: Any) -> Envelope:
    # About 5 s of tokens: several graces long.
    return {"prompt": PROMPT, "seed": 7, "ttft_ms": 0, "token_ms": 40, "max_tokens": 120, **extra}


async def two(start_server: StartServer, url: str) -> tuple[RunningServer, RunningServer]:
    a = await start_server(bus=url, fetch_abort_grace=GRACE)
    b = await start_server(bus=url, fetch_abort_grace=GRACE)
    return a, b


async def cut_after(
    session: aiohttp.ClientSession, url: str, chat: Envelope, count: int, after: str | None = None
) -> FetchResult:
    """Read ``count`` events of the fetch stream (resuming ``after`` that id), then cut it."""
    return await fetch(
        session, url, chat, last_event_id=after, stop=until_count(count), read_to_eof=False
    )


def assert_seamless(events: list[Envelope], chat_id: str) -> None:
    ids = [e["id"] for e in events]
    assert ids == [f"{chat_id}-{n}" for n in range(1, len(ids) + 1)]  # no gap, none twice


async def test_a_chat_cut_on_one_process_resumes_on_another_to_its_end(
    start_server: StartServer, session: aiohttp.ClientSession, redis_url: str
) -> None:
    a, b = await two(start_server, redis_url)
    first = await cut_after(session, a.url, body(), 10)
    assert first.chat is not None
    chat_id = first.chat["id"]
    assert first.chat["process"] == a.app[CHATS_KEY].process

    second = await fetch(session, b.url, body(), last_event_id=first.events[-1]["id"], timeout=WAIT)

    assert second.status == 200, second.error
    assert second.chat is not None
    assert second.chat["id"] == chat_id  # the same chat, read where it is not generated
    assert chat_id not in b.app[CHATS_KEY]
    assert second.closed_by_server
    events = first.events + second.events
    assert_seamless(events, chat_id)
    assert text_of(events) == answer_text(PROMPT, 7, max_tokens=120)
    # Graces passed while B streamed it: A knew a stream was open and let the chat run.
    assert events[-1]["type"] == "end"
    assert events[-1]["data"]["reason"] == "done"
    assert a.app[CHATS_KEY].get(chat_id).status == "done"


async def test_a_resume_elsewhere_cut_again_cancels_the_chat_after_the_grace(
    start_server: StartServer, session: aiohttp.ClientSession, redis_url: str
) -> None:
    a, b = await two(start_server, redis_url)
    long = body(max_tokens=2000)
    first = await cut_after(session, a.url, long, 5)
    assert first.chat is not None
    chat_id = first.chat["id"]
    second = await cut_after(session, b.url, long, 10, after=first.events[-1]["id"])
    assert second.status == 200, second.error
    left = time.monotonic()
    generated = a.app[CHATS_KEY].get(chat_id)

    await wait_for(lambda: generated.status != "running", timeout=WAIT)
    assert generated.status == "cancelled"
    assert time.monotonic() - left >= GRACE * 0.9  # not before the grace (timer slack aside)
    assert_seamless(first.events + second.events, chat_id)
    # A third resume, on B again, reads the rest and the end that says why.
    rest = await fetch(session, b.url, long, last_event_id=second.events[-1]["id"], timeout=WAIT)
    assert rest.status == 200, rest.error
    assert_seamless(first.events + second.events + rest.events, chat_id)
    assert rest.events[-1]["type"] == "end"
    assert rest.events[-1]["data"]["reason"] == "cancelled"


async def test_a_stream_held_by_a_process_that_died_counts_as_cut(
    start_server: StartServer,
    session: aiohttp.ClientSession,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = await two(start_server, redis_url)
    long = body(token_ms=600)  # 40 tokens, about 24 s: only a cancel ends it within 15 s
    first = await cut_after(session, a.url, long, 2)
    assert first.chat is not None
    chat_id = first.chat["id"]
    sharing = b.app[CHATS_KEY].sharing
    assert sharing is not None
    tell = sharing.stream_changed

    async def dying(chat: Chat, *, opened: bool, cleanly: bool) -> None:
        if opened:  # B dies before it can say the stream ended
            await tell(chat, opened=opened, cleanly=cleanly)

    monkeypatch.setattr(sharing, "stream_changed", dying)
    second = await cut_after(session, b.url, long, 4, after=first.events[-1]["id"])
    assert second.status == 200, second.error
    await sharing.stop()  # and stops renewing its lease, as a dead process does
    left = time.monotonic()
    generated = a.app[CHATS_KEY].get(chat_id)

    with caplog.at_level(logging.WARNING, logger="realtime_lab.transports.abortgrace"):
        await wait_for(lambda: generated.status != "running", timeout=15)
    assert generated.status == "cancelled"
    # Not before B's lease passed and the grace after it (timer slack aside).
    assert time.monotonic() - left >= (LEASE_TTL_S + GRACE) * 0.9
    gone = [r for r in caplog.records if "went away holding 1 fetch stream" in r.getMessage()]
    assert len(gone) == 1, caplog.text
    assert_seamless(first.events + second.events, chat_id)


async def test_resuming_a_finished_chat_elsewhere_reads_the_rest(
    start_server: StartServer, session: aiohttp.ClientSession, redis_url: str
) -> None:
    a, b = await two(start_server, redis_url)
    done = await fetch(session, a.url, body(max_tokens=12, token_ms=5), timeout=WAIT)
    assert done.chat is not None
    again = await fetch(session, b.url, body(), last_event_id=done.events[3]["id"], timeout=WAIT)
    assert again.status == 200, again.error
    assert again.events == done.events[4:]
    # From the end itself: nothing more will come, as on the generating process.
    over = await fetch(session, b.url, body(), last_event_id=done.events[-1]["id"])
    assert over.status == 204


async def test_a_chat_no_process_knows_is_404_everywhere(
    start_server: StartServer, session: aiohttp.ClientSession, redis_url: str
) -> None:
    a, b = await two(start_server, redis_url)
    for server in (a, b):
        result = await fetch(session, server.url, body(), last_event_id="zzzz9-3")
        assert result.status == 404
        assert result.error is not None
        assert result.error["code"] == "unknown-chat"
        assert server.app[CHATS_KEY].running == 0
