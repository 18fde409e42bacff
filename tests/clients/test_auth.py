"""The clients against a server with auth on: bearer tokens, tickets, refusals, the stream bound.

Every transport's client is run against the real app (``make_app`` with an ``auth_secret``); the
requests the client sends are recorded on its session (an aiohttp trace) to check what carried
which credential. The fetch client starts its own chat with its POST, which always carries the
bearer token: tickets do not apply to it. ``tail`` and ``chat`` are run as a user runs them,
against ``realtime-lab serve --auth-secret`` in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

from realtime_lab.auth import TokenAuthority
from realtime_lab.clients import (
    CHANNEL_TRANSPORTS,
    TRANSPORTS,
    ReconnectsExhausted,
    ServerRefused,
    StreamClient,
    open_stream,
)
from realtime_lab.clients.base import redact, retry_after_seconds
from realtime_lab.feed.llm import answer_text
from realtime_lab.protocol.envelope import Event
from realtime_lab.transports.keys import CHATS_KEY
from tests.clients.helpers import (
    FAST,
    TIMEOUT,
    chat_stream,
    collect,
    served,
    start_chat,
    text_of,
)
from tests.conftest import RunningServer, StartServer

SECRET = "a test secret that is at least 32 bytes long"
AUTHORITY = TokenAuthority(SECRET)
ALICE = AUTHORITY.mint("alice")
BOB = AUTHORITY.mint("bob")
ROOT = AUTHORITY.mint("root", ["admin"])
PROMPT = "Who may read this stream 谁能读"
STREAMING = ("longpoll", "sse", "ws", "fetch")  # the transports that hold a stream slot

Release = Callable[[], Awaitable[None]]
Hold = Callable[[RunningServer, str], Awaitable[Release]]
AiohttpServer = Callable[[web.Application], Awaitable[TestServer]]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# What the client sent ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One request as the client's session sent it."""

    method: str
    url: URL
    headers: CIMultiDict[str]


@dataclass
class Recorder:
    """A client session that records every request it sends."""

    session: aiohttp.ClientSession
    sent: list[Sent] = field(default_factory=list)

    def stream_requests(self, transport: str) -> list[Sent]:
        if transport == "fetch":
            return [s for s in self.sent if s.url.path == "/api/chats/stream"]
        return [s for s in self.sent if s.url.path.startswith(f"/{transport}/")]

    def ticket_requests(self) -> list[Sent]:
        return [s for s in self.sent if s.method == "POST" and s.url.path == "/api/tickets"]


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    sent: list[Sent] = []

    async def on_start(
        _session: aiohttp.ClientSession, _context: Any, params: aiohttp.TraceRequestStartParams
    ) -> None:
        sent.append(Sent(params.method, params.url, CIMultiDict(params.headers)))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        yield Recorder(session, sent)


async def until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Return once ``condition()`` holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)  # polling the condition, within the deadline above


async def auth_server(start_server: StartServer, **settings: Any) -> RunningServer:
    return await start_server(auth_secret=SECRET, **settings)


# Bearer tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_bearer_token_reads_the_users_chat(
    transport: str, start_server: StartServer, recorder: Recorder
) -> None:
    server = await auth_server(start_server)
    options = {"token": ALICE, "session": recorder.session, **FAST}
    client = await chat_stream(
        server.url, transport, PROMPT, owner=ALICE, seed=1, max_tokens=40, client=options
    )
    async with client:
        events = await collect(client)

    assert text_of(events) == answer_text(PROMPT, 1, max_tokens=40)
    assert events[-1].type == "end"
    streams = recorder.stream_requests(transport)
    assert streams
    assert all(s.headers.get("Authorization") == f"Bearer {ALICE}" for s in streams)
    assert all("ticket" not in s.url.query for s in streams)
    assert recorder.ticket_requests() == []
    assert client.stats.tickets == 0
    assert ALICE not in repr(client)
    if transport == "fetch":
        # The chat the POST started is the token's user's.
        assert server.app[CHATS_KEY].get(client.channel[len("chat.") :]).owner == "alice"


@pytest.mark.parametrize("use_tickets", [False, True], ids=["bearer", "tickets"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_no_token_is_refused_with_401_at_once(
    transport: str, use_tickets: bool, start_server: StartServer, recorder: Recorder
) -> None:
    server = await auth_server(start_server)
    options = {"use_tickets": use_tickets, "session": recorder.session, **FAST}
    client = await chat_stream(
        server.url, transport, PROMPT, owner=ALICE, max_tokens=5, client=options
    )
    async with client:
        with pytest.raises(ServerRefused) as info:
            await collect(client)
    assert info.value.status == 401
    if use_tickets or transport != "ws":
        # A refused WebSocket handshake's body is not readable: it has the status only.
        assert info.value.code == "unauthenticated"
    assert client.stats.reconnects == 0
    assert client.stats.throttled == 0
    if transport == "fetch":
        # No ticket is asked for the POST that would create the chat, and none was created.
        assert recorder.ticket_requests() == []
        assert server.app[CHATS_KEY].running == 0


async def an_event_id_of(server: RunningServer, chat: dict[str, Any]) -> str:
    """The id of the first event of ``chat`` (alice's), read as alice."""
    async with open_stream(server.url, chat["channel"], "sse", token=ALICE, **FAST) as reader:
        return (await anext(aiter(reader))).id


@pytest.mark.parametrize("use_tickets", [False, True], ids=["bearer", "tickets"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_another_users_chat_is_refused_with_403(
    transport: str, use_tickets: bool, start_server: StartServer
) -> None:
    server = await auth_server(start_server)
    chat = await start_chat(server.url, PROMPT, bearer=ALICE, max_tokens=5)
    if transport == "fetch":
        # Bob's POST names alice's chat by one of its ids: a resume of someone else's chat.
        client = open_stream(
            server.url,
            None,
            "fetch",
            chat={"prompt": PROMPT},
            after=await an_event_id_of(server, chat),
            token=BOB,
            use_tickets=use_tickets,
            **FAST,
        )
    else:
        client = open_stream(
            server.url, chat["channel"], transport, token=BOB, use_tickets=use_tickets, **FAST
        )
    async with client:
        with pytest.raises(ServerRefused) as info:
            await collect(client)
    assert info.value.status == 403
    if use_tickets or transport != "ws":
        assert info.value.code == "forbidden"
    assert client.stats.reconnects == 0
    assert client.stats.events == 0


# Tickets ----------------------------------------------------------------------------------------


async def drop_all(session: aiohttp.ClientSession, server: RunningServer) -> int:
    """``POST /api/chaos/drop {"transport": "all"}`` as an admin; how many were cut."""
    async with session.post(
        f"{server.url}/api/chaos/drop", json={"transport": "all"}, headers=bearer(ROOT)
    ) as response:
        assert response.status == 200, await response.text()
        return int((await response.json())["dropped"])


@dataclass
class Reading:
    """A client iterated by a task of its own, its events gathered as they come."""

    client: StreamClient
    events: list[Event] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        async def read() -> None:
            async for event in self.client:
                self.events.append(event)

        self.task = asyncio.create_task(read())

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()

    async def finished(self) -> list[Event]:
        assert self.task is not None
        await asyncio.wait_for(self.task, TIMEOUT)
        return self.events

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.wait([self.task])
        await self.client.close()


@pytest.mark.parametrize("transport", CHANNEL_TRANSPORTS)
async def test_tickets_survive_a_chaos_drop_with_a_new_ticket_and_no_gap(
    transport: str, start_server: StartServer, recorder: Recorder
) -> None:
    server = await auth_server(start_server, chaos=True)
    chat = await start_chat(
        server.url, PROMPT, bearer=ALICE, seed=7, ttft_ms=0, token_ms=20, max_tokens=120
    )
    reading = Reading(
        open_stream(
            server.url,
            chat["channel"],
            transport,
            token=ALICE,
            use_tickets=True,
            session=recorder.session,
            **FAST,
        )
    )
    reading.start()
    try:
        await until(lambda: len(reading.events) >= 3)
        if transport == "poll":
            # A short poll holds no connection between requests: nothing to cut.
            assert await drop_all(recorder.session, server) == 0
        else:
            async with asyncio.timeout(TIMEOUT):
                while not await drop_all(recorder.session, server):
                    # A long poll between two requests has nothing open to cut: again.
                    assert not reading.done, "the stream ended before the drop landed"
                    await asyncio.sleep(0.005)
        events = await reading.finished()
    finally:
        await reading.stop()

    stats = reading.client.stats
    assert text_of(events) == answer_text(PROMPT, 7, max_tokens=120)
    assert events[-1].type == "end"
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids)
    assert (stats.gaps, stats.duplicates, stats.resets) == (0, 0, 0)

    # Every stream request carried a ticket of its own, and no token.
    streams = recorder.stream_requests(transport)
    tickets = [s.url.query.get("ticket") for s in streams]
    assert None not in tickets
    assert len(set(tickets)) == len(tickets) == stats.tickets
    assert all("Authorization" not in s.headers for s in streams)
    posts = recorder.ticket_requests()
    assert len(posts) == stats.tickets
    assert all(p.headers.get("Authorization") == f"Bearer {ALICE}" for p in posts)
    if transport != "poll":
        assert stats.reconnects >= 1
        assert stats.tickets >= 2
        # Each reconnection resumed from where the last one stopped.
        for s in streams[1:]:
            assert s.url.query.get("after") or s.headers.get("Last-Event-ID"), s


async def test_fetch_with_tickets_sends_its_token_on_every_post_and_survives_a_drop(
    start_server: StartServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    server = await auth_server(start_server, chaos=True)
    reading = Reading(
        open_stream(
            server.url,
            None,
            "fetch",
            chat={"prompt": PROMPT, "seed": 7, "ttft_ms": 0, "token_ms": 20, "max_tokens": 120},
            token=ALICE,
            use_tickets=True,
            session=recorder.session,
            **FAST,
        )
    )
    with caplog.at_level(logging.INFO, logger="realtime_lab.client"):
        reading.start()
        try:
            await until(lambda: len(reading.events) >= 3)
            async with asyncio.timeout(TIMEOUT):
                while not await drop_all(recorder.session, server):
                    assert not reading.done, "the stream ended before the drop landed"
                    await asyncio.sleep(0.005)
            events = await reading.finished()
        finally:
            await reading.stop()

    stats = reading.client.stats
    assert text_of(events) == answer_text(PROMPT, 7, max_tokens=120)
    assert (stats.gaps, stats.duplicates, stats.resets, stats.tickets) == (0, 0, 0, 0)
    assert stats.reconnects >= 1
    posts = recorder.stream_requests("fetch")
    assert len(posts) == stats.requests >= 2
    assert all(p.headers.get("Authorization") == f"Bearer {ALICE}" for p in posts)
    assert all("ticket" not in p.url.query for p in posts)
    assert recorder.ticket_requests() == []
    # The first POST started the chat; every retry resumed it.
    assert "Last-Event-ID" not in posts[0].headers
    assert all(p.headers.get("Last-Event-ID") for p in posts[1:])
    assert server.app[CHATS_KEY].running == 0
    assert any("tickets do not apply" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tickets_are_skipped_when_the_server_has_auth_off(
    transport: str, start_server: StartServer, recorder: Recorder
) -> None:
    server = await start_server()
    options = {"use_tickets": True, "session": recorder.session, **FAST}
    client = await chat_stream(server.url, transport, PROMPT, seed=2, max_tokens=20, client=options)
    async with client:
        events = await collect(client)

    assert text_of(events) == answer_text(PROMPT, 2, max_tokens=20)
    # Answered 404 auth-off, never asked again; fetch never asks (its POST creates the chat).
    assert len(recorder.ticket_requests()) == (0 if transport == "fetch" else 1)
    assert client.stats.tickets == 0
    assert all("ticket" not in s.url.query for s in recorder.stream_requests(transport))


# The stream bound (429) ------------------------------------------------------------------------


@pytest.fixture
async def hold_a_stream() -> AsyncIterator[Hold]:
    """Factory: open an SSE stream as ``token``'s user (taking its one slot); close it with the
    returned coroutine function (the fixture closes it anyway)."""
    session = aiohttp.ClientSession()
    responses: list[aiohttp.ClientResponse] = []

    async def hold(server: RunningServer, token: str) -> Release:
        response = await session.get(f"{server.url}/sse/quiet", headers=bearer(token))
        assert response.status == 200, await response.text()
        responses.append(response)

        async def release() -> None:
            response.close()

        return release

    try:
        yield hold
    finally:
        for response in responses:
            response.close()
        await session.close()


@pytest.mark.parametrize("transport", STREAMING)
async def test_429_is_retried_after_retry_after_and_succeeds_once_a_slot_is_free(
    transport: str,
    start_server: StartServer,
    hold_a_stream: Hold,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await auth_server(start_server, max_streams_per_client=1)
    # The server asks for 5 s; the bound cuts that to 1 s, still five times our longest backoff.
    bound = 1.0
    assert bound > FAST["backoff_max"]
    options = {"token": ALICE, "retry_after_max": bound, **FAST}
    client = await chat_stream(
        server.url, transport, PROMPT, owner=ALICE, seed=3, max_tokens=30, client=options
    )
    release = await hold_a_stream(server, ALICE)
    reading = Reading(client)
    with caplog.at_level(logging.INFO, logger="realtime_lab.client"):
        reading.start()
        try:
            await until(lambda: reading.client.stats.throttled >= 1)
            refused_at = time.monotonic()
            await release()
            events = await reading.finished()
        finally:
            await reading.stop()

    stats = reading.client.stats
    assert text_of(events) == answer_text(PROMPT, 3, max_tokens=30)
    assert stats.throttled >= 1
    assert stats.events == len(events)
    first_delay = stats.reconnect_delays_s[0]
    if transport == "ws":
        # Closed 1013 after the upgrade: no Retry-After to read, so the longest backoff.
        assert first_delay >= FAST["backoff_max"]
        assert stats.connections == 1  # the refused upgrade is not counted as a stream
    else:
        assert first_delay >= bound  # Retry-After (5 s), up to the bound
        assert time.monotonic() - refused_at >= bound * 0.9
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("refused for load" in w for w in warnings), warnings
    assert any(("429" if transport != "ws" else "1013") in w for w in warnings), warnings


@pytest.mark.parametrize("transport", STREAMING)
async def test_the_reconnect_budget_names_the_429(
    transport: str, start_server: StartServer, hold_a_stream: Hold
) -> None:
    server = await auth_server(start_server, max_streams_per_client=1)
    options = {"token": ALICE, "max_reconnects": 1, "retry_after_max": 0.05, **FAST}
    client = await chat_stream(
        server.url, transport, PROMPT, owner=ALICE, max_tokens=5, client=options
    )
    await hold_a_stream(server, ALICE)
    async with client:
        with pytest.raises(ReconnectsExhausted) as info:
            await collect(client)
    message = str(info.value)
    assert "refused for load" in message
    assert ("too-many-streams" if transport != "ws" else "1013") in message
    assert client.stats.throttled == 2
    assert client.stats.reconnects == 1


async def test_a_short_poll_honours_retry_after(aiohttp_server: AiohttpServer) -> None:
    # A short poll holds no stream slot, so the real server never answers it 429: a scripted one.
    free = asyncio.Event()
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if not free.is_set():
            body = {"error": {"code": "too-many-streams", "message": "close one first"}}
            return web.json_response(body, status=429, headers={"Retry-After": "1"})
        end = {"channel": "c", "id": "ab-1", "type": "end", "data": {}, "ts": time.time() * 1000}
        return web.json_response({"events": [end], "cursor": "ab-1", "more": False})

    app = web.Application()
    app.router.add_get("/poll/{channel}", handler)
    fake = await aiohttp_server(app)
    url = str(fake.make_url("")).rstrip("/")
    async with open_stream(url, "c", "poll", token=ALICE, **FAST) as client:
        reading = Reading(client)
        reading.start()
        try:
            await until(lambda: client.stats.throttled >= 1)
            free.set()
            events = await reading.finished()
        finally:
            await reading.stop()
    assert [e.type for e in events] == ["end"]
    assert client.stats.throttled == 1
    # The server's 1 s, not our backoff (at most 0.2 s), nor the 60 s bound.
    assert 1.0 <= client.stats.reconnect_delays_s[0] <= 1.0 + FAST["backoff_max"]
    assert seen == [f"Bearer {ALICE}"] * 2


def test_retry_after_takes_seconds_and_http_dates() -> None:
    assert retry_after_seconds("5") == 5.0
    assert retry_after_seconds(" 0 ") == 0.0
    soon = datetime.now(UTC) + timedelta(seconds=30)
    assert 25.0 <= (retry_after_seconds(format_datetime(soon, usegmt=True)) or 0.0) <= 30.0
    past = datetime.now(UTC) - timedelta(seconds=30)
    assert retry_after_seconds(format_datetime(past, usegmt=True)) == 0.0
    for bad in (None, "", "-1", "nan", "inf", "soon"):
        assert retry_after_seconds(bad) is None, bad


def test_tickets_are_cut_out_of_messages() -> None:
    text = "sse http://h/sse/c?after=ab-1&ticket=S3cr-et_x&client=t: HTTP 401"
    assert redact(text) == "sse http://h/sse/c?after=ab-1&ticket=...&client=t: HTTP 401"


# tail and chat ----------------------------------------------------------------------------------

ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}
ENV.pop("REALTIME_LAB_TOKEN", None)


@pytest.fixture(scope="module")
def auth_server_url() -> Iterator[str]:
    """``realtime-lab serve`` with auth on, in a subprocess, stopped afterwards."""
    with served({**ENV, "REALTIME_LAB_AUTH_SECRET": SECRET}) as url:
        yield url


def run_cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(ENV) if token is None else {**ENV, "REALTIME_LAB_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "realtime_lab", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("tickets", [False, True], ids=["bearer", "tickets"])
def test_chat_takes_a_token_and_tail_reads_it_from_the_environment(
    auth_server_url: str, tickets: bool
) -> None:
    extra = ["--tickets"] if tickets else []
    chat = run_cli(
        "chat", PROMPT, "--url", auth_server_url, "--token", ALICE, "-t", "ws", "--seed", "4",
        "--ttft-ms", "0", "--token-ms", "1", *extra,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.startswith(answer_text(PROMPT, 4) + "\n[end ")
    channel = chat.stderr.split()[3]  # "chat <id> on <channel> over ws"

    tail = run_cli("tail", f"{auth_server_url}/sse/{channel}", "--json", *extra, token=ALICE)
    assert tail.returncode == 0, tail.stderr
    envelopes = [json.loads(line) for line in tail.stdout.splitlines()]
    assert "".join(e["data"].get("text", "") for e in envelopes) == answer_text(PROMPT, 4)
    assert envelopes[-1]["type"] == "end"
    summary = tail.stderr.strip().splitlines()[-1]
    assert ('"tickets": 1' if tickets else '"tickets": 0') in summary

    refused = run_cli("tail", f"{auth_server_url}/sse/{channel}", *extra, token=BOB)
    assert refused.returncode == 1
    assert "403" in refused.stderr


def test_chat_over_fetch_takes_a_token(auth_server_url: str) -> None:
    chat = run_cli(
        "chat", PROMPT, "--url", auth_server_url, "-t", "fetch", "--seed", "4",
        "--ttft-ms", "0", "--token-ms", "1", "--tickets", token=ALICE,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.startswith(answer_text(PROMPT, 4) + "\n[end ")
    _, chat_id, _, channel, _, transport = chat.stderr.splitlines()[0].split()
    assert (channel, transport) == (f"chat.{chat_id}", "fetch")
    assert "fetch: " in chat.stderr  # the statistics
    # Its chat is alice's: bob may not read it.
    refused = run_cli("tail", f"{auth_server_url}/sse/{channel}", token=BOB)
    assert refused.returncode == 1
    assert "403" in refused.stderr


@pytest.mark.parametrize("transport", ["sse", "fetch"])
def test_chat_without_a_token_says_how_to_sign_in(auth_server_url: str, transport: str) -> None:
    result = run_cli("chat", PROMPT, "--url", auth_server_url, "-t", transport)
    assert result.returncode == 1
    assert "HTTP 401" in result.stderr
    assert "REALTIME_LAB_TOKEN" in result.stderr
