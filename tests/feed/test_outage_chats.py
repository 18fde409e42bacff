"""Chats during a Redis outage: the generator waits (bounded), then goes on or ends with error.

A lost Redis is played, as in :mod:`tests.test_outages`, by a TCP proxy between process A (the
generator) and its own redis-server: cutting it drops and refuses A's connections while Redis
keeps its data. Process B reaches Redis directly (a partition: it sees A's lease pass). Readers
are SSE streams on both processes, heartbeats on, kept open through the outage.

- Back within the window: every token once, in order, the chat ends ``done`` on both.
- Away longer than A's window: A's readers get ``end`` ``error`` during the outage; B's get the
  same ``end`` once Redis is back for A, and both count it (``realtime_lab_chats_failed``).
- Away longer than A's lease, window longer still: B's lease watcher ends the chat (``orphan``),
  and A, back, stops the chat without a second ``end``.
- Redis killed and started again empty (no persistence): the chat's history is gone, A ends it
  with ``error``, and no reader is left hanging.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from realtime_lab.bus.chatstore import LEASE_RENEW_S, LEASE_TTL_S
from realtime_lab.feed.llm import answer_text
from realtime_lab.transports.keys import BUS_KEY, CHATS_KEY
from tests.conftest import RunningServer, StartServer
from tests.redis_server import RedisServer
from tests.test_outages import CuttableProxy

pytestmark = pytest.mark.redis

PROMPT = "Through the outage 穿过停机"
SEED = 3
WAIT = 20.0  # generous: two shared cores
HEARTBEAT = 0.2


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[CuttableProxy]:
    cut = await CuttableProxy(redis_server.port).start()
    yield cut
    await cut.close()


_readers: list[asyncio.Task[None]] = []


@pytest.fixture(autouse=True)
async def _stop_readers() -> AsyncIterator[None]:
    yield
    for task in _readers:
        task.cancel()
    if _readers:
        await asyncio.wait(_readers)
    _readers.clear()


@dataclass
class Reader:
    """One SSE stream of a chat channel: its envelopes and heartbeat comments."""

    events: list[dict[str, Any]] = field(default_factory=list)
    beats: int = 0
    task: asyncio.Task[None] | None = None

    @property
    def ended(self) -> bool:
        return any(e["type"] == "end" for e in self.events)

    @property
    def text(self) -> str:
        return "".join(e["data"]["text"] for e in self.events if e["type"] == "token")

    @property
    def tokens(self) -> int:
        return sum(1 for e in self.events if e["type"] == "token")


async def _read(http: aiohttp.ClientSession, url: str, into: Reader) -> None:
    async with http.get(url) as response:
        assert response.status == 200
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data:"):
                into.events.append(json.loads(line[5:]))
            elif line.startswith(":"):
                into.beats += 1


def read(http: aiohttp.ClientSession, server: RunningServer, channel: str) -> Reader:
    reader = Reader()
    reader.task = asyncio.create_task(_read(http, f"{server.url}/sse/{channel}", reader))
    _readers.append(reader.task)
    return reader


async def until(check: Any, timeout: float = WAIT) -> float:
    """Wait (bounded) until ``check()`` holds; the seconds it took."""
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)
    return time.monotonic() - start


async def processes(
    start_server: StartServer, proxy: CuttableProxy, redis_server: RedisServer
) -> tuple[RunningServer, RunningServer]:
    prefix = f"chatout{os.getpid()}x{id(proxy) % 100000}"
    a = await start_server(bus=proxy.url(prefix=prefix), heartbeat=HEARTBEAT)
    b = await start_server(bus=redis_server.url(prefix=prefix), heartbeat=HEARTBEAT)
    return a, b


async def start_chat(
    http: aiohttp.ClientSession, server: RunningServer, max_tokens: int
) -> dict[str, Any]:
    body = {"prompt": PROMPT, "seed": SEED, "ttft_ms": 0, "token_ms": 30, "max_tokens": max_tokens}
    async with http.post(f"{server.url}/api/chats", json=body) as response:
        assert response.status == 201
        chat: dict[str, Any] = await response.json()
        return chat


def assert_seamless(reader: Reader, chat_id: str) -> None:
    ids = [e["id"] for e in reader.events]
    assert ids == [f"{chat_id}-{n}" for n in range(1, len(ids) + 1)]  # no gap, none twice
    assert [e["type"] for e in reader.events].count("end") == 1
    assert reader.events[-1]["type"] == "end"


async def failed(http: aiohttp.ClientSession, server: RunningServer) -> dict[str, float]:
    """``realtime_lab_chats_failed_total`` by cause, from ``/metrics``."""
    async with http.get(f"{server.url}/metrics") as response:
        text = await response.text()
    counts = {}
    for line in text.splitlines():
        if line.startswith("realtime_lab_chats_failed_total{"):
            cause = line.split('cause="', 1)[1].split('"', 1)[0]
            counts[cause] = float(line.rsplit(" ", 1)[1])
    return counts


async def test_a_chat_rides_out_a_short_outage_with_every_token_once(
    start_server: StartServer, proxy: CuttableProxy, redis_server: RedisServer
) -> None:
    a, b = await processes(start_server, proxy, redis_server)
    a.app[CHATS_KEY].outage_s = WAIT  # the lease bounds it here, not the window
    async with aiohttp.ClientSession() as http:
        chat = await start_chat(http, a, max_tokens=100)
        here, there = read(http, a, chat["channel"]), read(http, b, chat["channel"])
        await until(lambda: here.tokens >= 5 and there.tokens >= 5)
        generated = a.app[CHATS_KEY].get(chat["id"])

        proxy.cut()
        await until(lambda: generated.stalled)
        stalled_at = len(generated.parts)
        beats = here.beats
        await until(lambda: here.beats >= beats + 2)  # A's readers stay, heartbeats on
        assert len(generated.parts) == stalled_at  # its source waits: one unstored token
        assert generated.status == "running"
        assert not here.ended
        proxy.restore()

        await until(lambda: here.ended and there.ended)
    answer = answer_text(PROMPT, SEED, max_tokens=100)
    for reader in (here, there):
        assert_seamless(reader, chat["id"])
        assert reader.text == answer
        assert reader.events[-1]["data"] == {"reason": "done", "tokens": 100}
    assert generated.status == "done"
    assert not generated.stalled
    async with aiohttp.ClientSession() as http:
        assert (await failed(http, a)).get("outage") == 0


async def test_an_outage_longer_than_the_window_ends_the_chat_with_error_everywhere(
    start_server: StartServer, proxy: CuttableProxy, redis_server: RedisServer
) -> None:
    a, b = await processes(start_server, proxy, redis_server)
    window = 1.0
    a.app[CHATS_KEY].outage_s = window
    async with aiohttp.ClientSession() as http:
        chat = await start_chat(http, a, max_tokens=2000)
        here, there = read(http, a, chat["channel"]), read(http, b, chat["channel"])
        await until(lambda: here.tokens >= 5 and there.tokens >= 5)
        generated = a.app[CHATS_KEY].get(chat["id"])

        proxy.cut()
        took = await until(lambda: here.ended)
        # A's readers got their end from A while Redis is still away from it.
        assert not proxy.up
        assert took >= window * 0.9
        assert generated.status == "error"
        assert a.app[CHATS_KEY].running == 0
        assert (await failed(http, a))["outage"] == 1
        proxy.restore()

        await until(lambda: there.ended)
        async with http.get(f"{b.url}/api/chats/{chat['id']}") as response:
            seen = await response.json()
    for reader in (here, there):
        assert_seamless(reader, chat["id"])
        assert reader.events[-1]["data"]["reason"] == "error"
    assert there.text == here.text == generated.text
    assert here.events[-1]["data"]["tokens"] == len(generated.parts) == here.tokens
    assert there.events[-1]["data"]["tokens"] == here.tokens
    assert seen["status"] == "error"
    assert seen["text"] == generated.text


async def test_an_outage_past_the_lease_has_the_chat_ended_once_by_another_process(
    start_server: StartServer, proxy: CuttableProxy, redis_server: RedisServer
) -> None:
    a, b = await processes(start_server, proxy, redis_server)
    a.app[CHATS_KEY].outage_s = 60.0  # longer than the lease: B's watcher ends it first
    async with aiohttp.ClientSession() as http:
        chat = await start_chat(http, a, max_tokens=2000)
        here, there = read(http, a, chat["channel"]), read(http, b, chat["channel"])
        await until(lambda: here.tokens >= 5 and there.tokens >= 5)
        generated = a.app[CHATS_KEY].get(chat["id"])

        proxy.cut()
        await until(lambda: generated.stalled)
        # B's readers get the end within A's lease plus a renewal (and slack).
        took = await until(lambda: there.ended, timeout=LEASE_TTL_S + LEASE_RENEW_S + WAIT)
        assert took < LEASE_TTL_S + LEASE_RENEW_S + 10.0
        # B counts it once its script's answer is in: that may come after its readers' end,
        # which reaches them on the pub/sub connection.
        await until(lambda: b.app[CHATS_KEY].sharing.orphans_ended >= 1)
        assert (await failed(http, b))["orphan"] == 1
        assert generated.status == "running"  # A cannot know yet
        proxy.restore()

        await until(lambda: here.ended)
        await until(lambda: generated.status != "running")
    assert generated.status == "error"
    assert generated.ended_elsewhere
    for reader in (here, there):
        assert_seamless(reader, chat["id"])
        assert reader.events[-1]["data"]["reason"] == "error"
    assert here.events == there.events
    replay = await b.app[BUS_KEY].replay(chat["channel"], None)
    assert [e.type for e in replay.events].count("end") == 1  # A published none of its own
    async with aiohttp.ClientSession() as http:
        assert (await failed(http, a))["outage"] == 0


async def test_a_redis_that_comes_back_empty_ends_the_chat_with_error(
    start_server: StartServer,
) -> None:
    with RedisServer() as redis:
        a = await start_server(bus=redis.url(prefix="empty"), heartbeat=HEARTBEAT)
        b = await start_server(bus=redis.url(prefix="empty"), heartbeat=HEARTBEAT)
        async with aiohttp.ClientSession() as http:
            chat = await start_chat(http, a, max_tokens=2000)
            here, there = read(http, a, chat["channel"]), read(http, b, chat["channel"])
            await until(lambda: here.tokens >= 5 and there.tokens >= 5)
            generated = a.app[CHATS_KEY].get(chat["id"])

            redis._kill()  # the process is gone, and with it every key
            await until(lambda: generated.stalled)
            await asyncio.to_thread(redis.restart)

            await until(lambda: generated.status != "running")
            assert generated.status == "error"
            assert (await failed(http, a))["outage"] == 1
            # Every stream of the chat is over: closed for its lost life (the hub, catching up,
            # finds the channel gone), or an end with error (the generator's, if it came first).
            assert here.task is not None
            assert there.task is not None
            await asyncio.wait_for(asyncio.gather(here.task, there.task), WAIT)
        for reader in (here, there):
            ends = [e for e in reader.events if e["type"] == "end"]
            assert all(e["data"]["reason"] == "error" for e in ends)
            assert reader.text == generated.text[: len(reader.text)]
