"""Chats and the ticker on a memory bus: what they publish, and how they stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from realtime_lab.bus import Bus, create_bus
from realtime_lab.errors import UnknownChat
from realtime_lab.feed.chats import ChatRegistry
from realtime_lab.feed.llm import answer_text, answer_tokens
from realtime_lab.feed.ticker import TICKER_CHANNEL, Ticker
from realtime_lab.protocol.envelope import Event


@pytest.fixture
async def bus() -> AsyncIterator[Bus]:
    memory = create_bus("memory://")
    yield memory
    await memory.close()


@pytest.fixture
async def chats(bus: Bus) -> AsyncIterator[ChatRegistry]:
    registry = ChatRegistry(bus)
    yield registry
    await registry.close()


async def read_until_end(bus: Bus, channel: str, timeout: float = 10.0) -> list[Event]:
    events = []
    async with asyncio.timeout(timeout), bus.subscribe(channel) as sub:
        async for event in sub:
            events.append(event)
            if event.type == "end":
                return events
    raise AssertionError("the channel ended without an end event")


async def test_chat_publishes_its_answer_then_done(bus: Bus, chats: ChatRegistry) -> None:
    chat = chats.start("Why stream", seed=5, ttft_ms=5, token_ms=1, max_tokens=40)
    assert chat.status == "running"
    assert chat.channel == f"chat.{chat.id}"

    events = await read_until_end(bus, chat.channel)

    tokens, end = events[:-1], events[-1]
    assert [e.type for e in tokens] == ["token"] * len(tokens)
    assert [e.data["index"] for e in tokens] == list(range(len(tokens)))
    assert [e.data["text"] for e in tokens] == answer_tokens("Why stream", 5, max_tokens=40)
    assert "".join(e.data["text"] for e in tokens) == answer_text("Why stream", 5, max_tokens=40)
    assert end.data["reason"] == "done"
    assert end.data["tokens"] == len(tokens)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert chat.status == "done"
    assert chat.text == answer_text("Why stream", 5, max_tokens=40)
    assert chat.finished is not None
    assert chats.running == 0
    info = await bus.info(chat.channel)
    assert info is not None
    assert info.finished


async def test_cancel_ends_the_stream_with_cancelled(bus: Bus, chats: ChatRegistry) -> None:
    # 500 tokens at 20 ms would take 10 s: only the cancel can end it within the test.
    chat = chats.start("Cancel me", seed=1, ttft_ms=0, token_ms=20, max_tokens=500)
    events: list[Event] = []
    async with asyncio.timeout(10), bus.subscribe(chat.channel) as sub:
        async for event in sub:
            events.append(event)
            if len(events) == 3:
                assert chats.cancel(chat.id) is chat
            if event.type == "end":
                break
    assert events[-1].data["reason"] == "cancelled"
    assert 3 <= len(events) - 1 < 500
    assert chat.status == "cancelled"
    # The simulated chat on memory:// is a pacer job, not a task: nothing is left running.
    assert chat.task is None
    assert chat.job is not None
    assert chat.job.cancelled
    assert chat.done is not None
    assert chat.done.done()
    # Cancelling again, or a finished chat, changes nothing.
    chats.cancel(chat.id)
    assert chat.status == "cancelled"


async def test_unknown_chat(chats: ChatRegistry) -> None:
    with pytest.raises(UnknownChat):
        chats.get("nope")
    with pytest.raises(UnknownChat):
        chats.cancel("nope")
    assert "nope" not in chats


async def test_close_cancels_running_chats_and_ends_their_streams(bus: Bus) -> None:
    registry = ChatRegistry(bus)
    running = [registry.start(f"p{i}", ttft_ms=0, token_ms=50, max_tokens=500) for i in range(3)]
    assert registry.running == 3
    await asyncio.wait_for(registry.close(), timeout=10)
    assert registry.running == 0
    for chat in running:
        replay = await bus.replay(chat.channel, None)
        assert replay.events[-1].type == "end"
        assert replay.events[-1].data["reason"] == "cancelled"


async def test_ticker_publishes_at_roughly_its_rate(bus: Bus) -> None:
    ticker = Ticker(bus, rate=50.0)
    loop = asyncio.get_running_loop()
    async with bus.subscribe(TICKER_CHANNEL) as sub:
        started = loop.time()
        ticker.start()
        try:
            events = []
            async with asyncio.timeout(15):
                async for event in sub:
                    events.append(event)
                    if len(events) == 25:
                        break
            elapsed = loop.time() - started
        finally:
            await ticker.stop()
    assert [e.data["index"] for e in events] == list(range(25))
    assert all(e.type == "token" and e.data["text"] for e in events)
    # 25 tokens at 50/s is 0.5 s; the absolute schedule cannot run ahead of it. The upper bound
    # only catches a ticker that ignores its rate: a loaded machine may be slow.
    assert elapsed >= 24 / 50.0 * 0.9
    assert elapsed < 10


async def test_ticker_pauses_at_rate_zero_and_stops(bus: Bus) -> None:
    ticker = Ticker(bus, rate=0.0)
    ticker.start()
    try:
        async with bus.subscribe(TICKER_CHANNEL, "now") as sub:
            # Paused: nothing within a few of the ticker's 0.1 s idle checks ...
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.35):
                    await anext(sub)
            # ... then a rate change takes effect without a restart.
            ticker.rate = 100.0
            async with asyncio.timeout(10):
                first = await anext(sub)
            assert first.data["index"] == 0
    finally:
        await ticker.stop()
    await ticker.stop()  # idempotent
