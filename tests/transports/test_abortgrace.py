"""The abort grace on the generator's side: streams other processes tell it about, by process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from realtime_lab.bus import create_bus
from realtime_lab.feed.chats import Chat, ChatRegistry
from realtime_lab.transports.abortgrace import AbortGrace

GRACE = 0.05


@pytest.fixture
async def registry() -> AsyncIterator[ChatRegistry]:
    bus = create_bus("memory://")
    chats = ChatRegistry(bus)
    yield chats
    await chats.close()
    await bus.close()


def slow(registry: ChatRegistry) -> Chat:
    """A chat that only a cancel ends within the test (500 tokens at 50 ms)."""
    return registry.start("p", ttft_ms=0, token_ms=50, max_tokens=500)


async def ended(chat: Chat) -> str:
    assert chat.done is not None
    await asyncio.wait_for(asyncio.shield(chat.done), timeout=10)
    return chat.status


async def test_a_process_that_went_away_has_its_streams_count_as_cut(
    registry: ChatRegistry,
) -> None:
    grace = AbortGrace(registry, GRACE)
    assert registry.stream_watch is grace
    chat, other = slow(registry), slow(registry)
    grace.told(chat.id, opened=True, cleanly=False, process="b")
    grace.told(chat.id, opened=True, cleanly=False, process="b")
    grace.told(other.id, opened=True, cleanly=False, process="c")
    assert sorted(grace.holders()) == ["b", "c"]

    grace.gone(["b"])  # both of b's streams end with it

    assert await ended(chat) == "cancelled"
    assert other.status == "running"  # c still holds its stream
    assert not grace.cancelling(other.id)
    assert list(grace.holders()) == ["c"]
    # b's own word that a stream ended, arriving late (after an outage), counts for nothing.
    grace.told(chat.id, opened=False, cleanly=False, process="b")
    grace.told(other.id, opened=False, cleanly=True, process="c")
    assert list(grace.holders()) == []
    assert not grace.cancelling(other.id)  # c's stream saw the end: no cancel
    assert not grace.cancelling(chat.id)  # cancelled already, not twice


async def test_a_stream_still_held_elsewhere_keeps_the_chat(registry: ChatRegistry) -> None:
    grace = AbortGrace(registry, GRACE)
    chat = slow(registry)
    grace.told(chat.id, opened=True, cleanly=False, process="b")
    grace.told(chat.id, opened=True, cleanly=False, process="c")
    grace.gone(["b", "nobody"])
    assert not grace.cancelling(chat.id)
    # b's word, late, that its stream ended: counted at gone() already, so c's is the last.
    grace.told(chat.id, opened=False, cleanly=False, process="b")
    assert not grace.cancelling(chat.id)
    assert chat.status == "running"
    grace.told(chat.id, opened=False, cleanly=False, process="c")
    assert grace.cancelling(chat.id)
    assert await ended(chat) == "cancelled"
