"""ChatRegistry bounds: running chats in total and per owner, O(1) creation and forgetting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from realtime_lab.bus import Bus, create_bus
from realtime_lab.errors import LimitReached, TooManyChats, UnknownChat
from realtime_lab.feed.chats import Chat, ChatRegistry
from realtime_lab.protocol.envelope import END


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def bus() -> AsyncIterator[Bus]:
    memory = create_bus("memory://")
    yield memory
    await memory.close()


def slow(registry: ChatRegistry, owner: str | None = None) -> Chat:
    """A chat that only a cancel ends within the test (500 tokens at 50 ms)."""
    return registry.start("p", ttft_ms=0, token_ms=50, max_tokens=500, owner=owner)


async def finished(chat: Chat) -> None:
    assert chat.done is not None
    await asyncio.wait({chat.done}, timeout=10)
    assert chat.done.done()


async def test_max_running_in_total(bus: Bus) -> None:
    registry = ChatRegistry(bus, max_running=3)
    try:
        chats = [slow(registry) for _ in range(3)]
        assert registry.running == 3
        with pytest.raises(TooManyChats) as raised:
            slow(registry)
        refusal = raised.value
        assert isinstance(refusal, LimitReached)
        assert (refusal.code, refusal.status) == ("too-many-chats", 429)
        assert refusal.retry_after is not None
        assert registry.limits["too-many-chats"] == 1
        assert registry.running == 3  # the refused one was not started

        registry.cancel(chats[0].id)
        await finished(chats[0])
        assert registry.running == 2
        slow(registry)  # the freed slot
        assert registry.running == 3
    finally:
        await registry.close()
    assert registry.running == 0


async def test_max_running_per_owner(bus: Bus) -> None:
    registry = ChatRegistry(bus, max_running=10, max_running_per_owner=2)
    try:
        alice = [slow(registry, "alice"), slow(registry, "alice")]
        assert all(chat.owner == "alice" for chat in alice)
        with pytest.raises(TooManyChats) as raised:
            slow(registry, "alice")
        assert raised.value.code == "too-many-chats-per-owner"
        assert registry.limits == {"too-many-chats": 0, "too-many-chats-per-owner": 1}
        slow(registry, "bob")
        anonymous = [slow(registry) for _ in range(3)]  # no owner: only the total bound
        assert anonymous[0].owner is None
        assert (registry.running_for("alice"), registry.running_for("bob")) == (2, 1)
        assert registry.running == 6

        registry.cancel(alice[1].id)
        await finished(alice[1])
        assert registry.running_for("alice") == 1
        slow(registry, "alice")
    finally:
        await registry.close()
    assert (registry.running, registry.running_for("alice")) == (0, 0)


async def test_a_chat_that_finishes_frees_its_slot(bus: Bus) -> None:
    registry = ChatRegistry(bus, max_running=1, max_running_per_owner=1)
    try:
        quick = registry.start("q", ttft_ms=0, token_ms=0, max_tokens=3, owner="alice")
        await finished(quick)
        assert quick.status == "done"
        assert registry.running == 0
        again = registry.start("q", ttft_ms=0, token_ms=0, max_tokens=3, owner="alice")
        await finished(again)
    finally:
        await registry.close()


async def test_a_chat_cancelled_before_it_ran_is_settled_and_ended(bus: Bus) -> None:
    registry = ChatRegistry(bus, max_running=1)
    chat = slow(registry, "alice")
    registry.cancel(chat.id)  # before its task took a single step
    await finished(chat)
    assert chat.status == "cancelled"
    assert (registry.running, registry.running_for("alice")) == (0, 0)
    await registry.close()  # waits for the end it still publishes
    replay = await bus.replay(chat.channel, None)
    assert [e.type for e in replay.events] == [END]
    assert replay.events[0].data["reason"] == "cancelled"


async def test_finished_chats_are_forgotten_after_ttl(bus: Bus) -> None:
    clock = FakeClock()
    registry = ChatRegistry(bus, ttl=10, clock=clock)
    try:
        old = registry.start("a", ttft_ms=0, token_ms=0, max_tokens=2)
        await finished(old)
        clock.now += 5
        newer = registry.start("b", ttft_ms=0, token_ms=0, max_tokens=2)
        await finished(newer)
        clock.now += 5  # old finished 10 s ago
        assert registry.get(newer.id) is newer
        with pytest.raises(UnknownChat):
            registry.get(old.id)
        assert old.id not in registry
        clock.now += 5
        assert newer.id in registry  # only lookups and starts forget
        registry.start("c", ttft_ms=0, token_ms=0, max_tokens=1)
        assert newer.id not in registry
    finally:
        await registry.close()


class NoScan(dict[str, Chat]):
    """The registry's chat table, failing the test if anything walks through it."""

    def _scan(self, *args: Any) -> Any:
        raise AssertionError("the chat table was scanned")

    __iter__ = items = values = keys = _scan


async def test_start_and_running_never_scan_the_chats(bus: Bus) -> None:
    clock = FakeClock()
    registry = ChatRegistry(bus, ttl=10, max_running=10_000, clock=clock)
    registry._chats = NoScan()
    chats = [registry.start("p", ttft_ms=0, token_ms=0, max_tokens=1) for _ in range(200)]
    for chat in chats:
        await finished(chat)
    clock.now += 11
    registry.start("p", ttft_ms=0, token_ms=0, max_tokens=1)  # forgets 200 chats: no scan
    assert registry.running == 1
    assert dict.__len__(registry._chats) == 1
    registry._chats = dict(dict.items(registry._chats))  # close() may walk it
    await registry.close()


async def test_bus_refusal_ends_the_chat_with_error(caplog: pytest.LogCaptureFixture) -> None:
    full = create_bus("memory://?max_channels=1")
    await full.publish("taken", "token", {})
    registry = ChatRegistry(full)
    try:
        chat = registry.start("p", ttft_ms=0, token_ms=0, max_tokens=2)
        await finished(chat)
        assert chat.status == "error"
        assert registry.running == 0
        assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no traceback spam
        assert full.limits["too-many-channels"] == 2  # the token, then the end
    finally:
        await registry.close()
        await full.close()


def test_constructor_stays_backwards_compatible() -> None:
    registry = ChatRegistry(create_bus("memory://"), ttl=5.0, max_running=7)
    assert registry.running == 0
    chat = Chat("id", "prompt", 1, 2.0, 3.0, 4)  # positional fields unchanged
    assert chat.owner is None
    assert "owner" not in chat.to_dict()
