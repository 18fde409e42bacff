"""The chats workload's rounds, run by the native load client against real servers.

Each test serves the lab's application (or the naive baseline) in this process on port 0,
counts the requests that start a chat with a middleware, and lets a few users of the C client
chat until enough rounds have started: a user asks for its next chat only once it has read the
last one to its end, so ``started - users`` chats were read whole.
"""

from __future__ import annotations

import asyncio
import shutil
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from realtime_lab.app import make_app
from realtime_lab.bench import naive, native
from realtime_lab.bench.loadgen import NativeClients
from realtime_lab.httpserver import HardenedAppRunner
from tests.conftest import test_settings

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="no C compiler: the chats workload's openai and naive rounds need the native client",
)

WAIT = 20.0
TOKENS = 5  # the simulated answer to "bench chat" has at least 8: every chat has exactly 5
USERS = 3
#: The request that starts a chat, per transport.
STARTS = {
    "sse": "/api/chats",
    "ws": "/api/chats",
    "fetch": "/api/chats/stream",
    "openai": "/v1/chat/completions",
    "naive": "/chat",
}


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return native.build(directory=tmp_path_factory.mktemp("native")).path


class Started:
    """Counts the requests whose path is ``path``, and wakes whoever waits for a number."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.count = 0
        self.peers: set[Any] = set()  # the connections they came on
        self.statuses: list[int] = []
        self.changed = asyncio.Event()

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path != self.path:
            return await handler(request)
        self.count += 1
        self.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        self.changed.set()
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            self.statuses.append(exc.status)
            raise
        self.statuses.append(response.status)
        return response

    async def reach(self, count: int) -> None:
        while self.count < count:
            self.changed.clear()
            await self.changed.wait()


@asynccontextmanager
async def serving(app: web.Application, header_timeout: float) -> AsyncIterator[int]:
    runner = HardenedAppRunner(
        app, header_timeout=header_timeout, handler_cancellation=True, shutdown_timeout=2.0
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sockets = site._server.sockets if site._server is not None else ()  # type: ignore[union-attr]
    try:
        yield int(sockets[0].getsockname()[1])
    finally:
        await asyncio.wait_for(runner.cleanup(), 15)


async def chat_rounds(
    binary: Path, transport: str, rounds: int = 3, ttft_ms: float = 0.0, **settings: Any
) -> tuple[dict[str, Any], dict[str, Any], Started]:
    """``USERS`` users chatting until ``rounds`` chats each have started: the opening reply, the
    window's tally, and what the server saw."""
    started = Started(STARTS[transport])
    if transport == "naive":
        app = naive.make_app()
    else:
        # token_ms and ttft_ms: the OpenAI endpoint's pace (the others' is in their request).
        app = make_app(test_settings(ttft_ms=0.0, token_ms=2.0, **settings))
    app.middlewares.append(started.middleware)
    async with serving(app, settings.get("header_timeout", 10.0)) as port:
        spec = {
            "workload": "chats",
            "transport": transport,
            "host": "127.0.0.1",
            "port": port,
            "host_header": f"127.0.0.1:{port}",
            "tag": "bench-test",
            "chat_tokens": TOKENS,
            "token_ms": 2.0,
            "ttft_ms": ttft_ms,
        }
        clients, opened = await NativeClients.open(str(binary), spec, USERS)
        try:
            async with asyncio.timeout(WAIT):
                await clients.start()
                first = started.count
                await started.reach(first + USERS * rounds)
                window = await clients.stop()
        finally:
            await clients.close()
    for key in ("latency", "ttft", "gaps"):
        values = array("d")
        values.frombytes(window[key])
        window[key] = values
    window["asked"] = started.count - first
    return opened, window, started


@pytest.mark.parametrize("transport", ["sse", "ws", "fetch", "openai", "naive"])
async def test_users_chat_round_after_round(binary: Path, transport: str) -> None:
    opened, window, started = await chat_rounds(binary, transport)
    assert opened == {"op": "opened", "clients": USERS, "failures": 0, "errors": []}
    assert window["errors"] == [], window["errors"]
    assert (window["lost"], window["dup"], window["reordered"]) == (0, 0, 0)
    assert (window["failures"], window["disconnects"], window["incomplete"]) == (0, 0, 0)
    chats, events = window["chats"], window["events"]
    # Each user asked its next chat after reading the last to its end ...
    assert window["asked"] - USERS <= chats <= window["asked"], window
    # ... of exactly TOKENS tokens; the first chats began before the window, the last go on.
    assert TOKENS * (chats - USERS) <= events <= TOKENS * (chats + USERS), window
    # A chat's time to first token, each gap between two of its tokens.
    assert len(window["ttft"]) >= chats - USERS
    assert all(0 <= v < WAIT * 1000 for v in window["ttft"])
    assert len(window["gaps"]) >= (TOKENS - 1) * (chats - USERS)
    if transport == "openai":  # chunks carry no timestamp
        assert len(window["latency"]) == 0
    else:
        assert len(window["latency"]) == events
        assert all(-50 < v < WAIT * 1000 for v in window["latency"])
    # Requests: a POST and a stream per chat on sse and ws, the one that streams it otherwise.
    per_chat = 2 if transport in ("sse", "ws") else 1
    assert per_chat * (chats - USERS) <= window["requests"] <= per_chat * (chats + USERS)
    if transport in ("sse", "ws"):  # every user POSTs its chats on one kept-alive connection
        assert len(started.peers) == USERS, started.peers
    else:  # the stream is the request: one connection per chat
        assert len(started.peers) == started.count


async def test_a_refused_chat_is_counted_and_asked_again(binary: Path) -> None:
    # One chat at a time for everyone: two of the three users' first POSTs are refused (429).
    opened, window, started = await chat_rounds(binary, "sse", rounds=2, max_chats=1)
    assert 429 in started.statuses
    assert opened["clients"] + opened["failures"] == USERS
    assert opened["failures"] >= 1
    assert "SSEClient: POST /api/chats: HTTP 429" in opened["errors"]
    assert window["failures"] >= opened["failures"]
    assert window["chats"] >= 1  # whoever got the chat read it, and the others asked again
    assert (window["lost"], window["dup"], window["incomplete"]) == (0, 0, 0)


async def test_kept_alive_posts_survive_the_servers_idle_timeout(binary: Path) -> None:
    # Each chat waits 300 ms for its first token; the server gives an idle connection 100 ms
    # to send its next request (then answers 408 and closes): every user's kept-alive POST
    # connection is timed out while it reads its stream, and the next POST goes on a new one.
    opened, window, started = await chat_rounds(
        binary, "sse", rounds=2, ttft_ms=300.0, header_timeout=0.1
    )
    assert opened["failures"] == 0
    assert window["errors"] == [], window["errors"]
    assert (window["failures"], window["lost"], window["incomplete"]) == (0, 0, 0)
    assert window["chats"] >= USERS
    assert len(started.peers) > USERS  # new connections, not refused chats
    assert set(started.statuses) == {201}
