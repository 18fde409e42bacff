"""The hub's seam, on a scripted broker: no Redis, and every race made to happen on purpose.

:class:`ScriptedBroker` stores history like a real broker but delivers live events only when the
test says so (``flow``), can lose them (``lose``), repeat them, and makes every read wait until
the test lets it finish (``gate``), so publishes can land between a read and the live feed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

import pytest

from realtime_lab.bus import Bus
from realtime_lab.bus.base import After, ChannelInfo, History
from realtime_lab.bus.broker import Broker
from realtime_lab.protocol.cursor import Cursor, format_id
from realtime_lab.protocol.envelope import END, RESET, Event

from .conftest import Recorder, wait_until


class ScriptedBroker(Broker):
    def __init__(self, history: int = 1000, ttl: float = 300.0) -> None:
        super().__init__()
        self.url = "scripted://"
        self.history = history
        self.ttl = ttl
        self.retained: list[tuple[str, ...]] = []
        self.retain_called = asyncio.Event()
        self.tickets: dict[str, tuple[bytes, float]] = {}
        self.epoch = "e1"
        self.events: list[Event] = []
        self.queued: list[Event] = []  # published, not yet sent live
        self.subscribed: set[str] = set()
        self.gate: asyncio.Event | None = None
        self.reads = 0
        self.reserved: set[str] = set()

    async def close(self) -> None:
        pass

    async def publish(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        seq = len(self.events) + 1 if not self.events else self.events[-1].seq + 1
        event = Event(channel, format_id(self.epoch, seq), type, data, 0.0, seq)
        self.events.append(event)
        del self.events[: -self.history]
        self.queued.append(event)
        return event

    def new_life(self, epoch: str) -> None:
        self.epoch = epoch
        self.events = []

    def flow(self, channel: str = "c", *, lose: int = 0, repeat: bool = False) -> None:
        """Send the queued events live, the first ``lose`` of them lost on the way."""
        queued, self.queued = self.queued, []
        for index, event in enumerate(queued):
            if index < lose or channel not in self.subscribed:
                continue
            self.handler.on_event(channel, event)
            if repeat:
                self.handler.on_event(channel, event)

    async def read(
        self, channel: str, after: After, limit: int | None, *, reserve: bool = False
    ) -> History:
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        last = self.events[-1].seq if self.events else 0
        first = self.events[0].seq if self.events else last + 1
        info = ChannelInfo(channel, self.epoch, first, last, False, 0)
        if isinstance(after, Cursor) and after.epoch == self.epoch and first - 1 <= after.seq:
            events = [e for e in self.events if e.seq > after.seq]
        else:
            events = list(self.events)
        if limit is not None:
            events = events[:limit]
        if reserve:
            self.reserved.add(channel)
        return History(info, bool(self.events) or channel in self.reserved, events)

    async def declare(self, channel: str, epoch: str | None = None) -> None:
        await self.read(channel, None, 0, reserve=True)

    async def subscribe(self, channel: str) -> None:
        self.subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self.subscribed.discard(channel)

    async def retain(self, channels: Collection[str]) -> None:
        self.retained.append(tuple(channels))
        self.retain_called.set()

    async def put_ticket(self, key: str, value: bytes, ttl_s: float) -> None:
        self.tickets[key] = (value, ttl_s)

    async def take_ticket(self, key: str) -> bytes | None:
        entry = self.tickets.pop(key, None)
        return None if entry is None else entry[0]


@pytest.fixture
async def hub() -> Any:
    broker = ScriptedBroker()
    bus = Bus(broker)
    await bus.start()
    yield bus, broker
    await bus.close()


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_publishes_during_the_history_read_are_neither_lost_nor_doubled(hub: Any) -> None:
    bus, broker = hub
    await bus.attach("c", None, Recorder())  # the live feed is set up and following
    for i in range(3):
        await broker.publish("c", "token", {"i": i})
    broker.flow()
    broker.gate = asyncio.Event()
    rec = Recorder()
    attach = asyncio.create_task(bus.attach("c", None, rec))
    await settle()
    # While the attach's read waits: two more events, only the first of them live yet.
    await broker.publish("c", "token", {"i": 3})
    broker.flow()
    await broker.publish("c", "token", {"i": 4})
    broker.gate.set()
    await attach
    assert rec.seqs == [1, 2, 3, 4, 5]  # the read reached past the live feed
    broker.flow()  # 5 arrives live after the read already gave it
    await settle()
    assert rec.seqs == [1, 2, 3, 4, 5]


async def test_a_lost_live_event_is_read_from_history(hub: Any) -> None:
    bus, broker = hub
    rec = Recorder()
    await bus.attach("c", None, rec)
    for i in range(4):
        await broker.publish("c", "token", {"i": i})
    broker.flow(lose=2)  # 1 and 2 vanish on the way: 3 shows the hole
    await rec.wait_for(lambda r: len(r.events) == 4)
    assert rec.seqs == [1, 2, 3, 4]
    await broker.publish("c", "token", {})
    broker.flow(repeat=True)
    await settle()
    assert rec.seqs == [1, 2, 3, 4, 5]


async def test_gap_then_reconnect_signal_catches_everyone_up_once(hub: Any) -> None:
    bus, broker = hub
    one, two = Recorder(), Recorder()
    await bus.attach("c", None, one)
    await bus.attach("c", None, two)
    for i in range(3):
        await broker.publish("c", "token", {"i": i})
    broker.queued.clear()  # all lost: only the broker's reconnect tells
    bus.on_gap("c")
    await one.wait_for(lambda r: len(r.events) == 3)
    await two.wait_for(lambda r: len(r.events) == 3)
    assert one.seqs == two.seqs == [1, 2, 3]


async def test_history_trimmed_under_a_gap_gives_a_reset(hub: Any) -> None:
    bus, broker = hub
    broker.history = 2
    rec = Recorder()
    await bus.attach("c", None, rec)
    for i in range(6):
        await broker.publish("c", "token", {"i": i})
    broker.flow(lose=5)  # only 6 arrives; history kept 5 and 6
    await rec.wait_for(lambda r: len(r.events) == 3)
    assert [e.type for e in rec.events] == [RESET, "token", "token"]
    assert rec.events[0].data["reason"] == "history-trimmed"
    assert rec.seqs == [4, 5, 6]


async def test_a_new_channel_life_ends_followers_of_the_old_one(hub: Any) -> None:
    bus, broker = hub
    old, idle = Recorder(), Recorder()
    await bus.attach("c", None, old)
    await broker.publish("c", "token", {})
    broker.flow()
    await bus.attach("c", Cursor("e1", 1), idle)  # has the one event: given nothing, stands at 1
    broker.new_life("e2")
    await broker.publish("c", "token", {})
    broker.flow()
    await old.wait_for(lambda r: r.closed is not None)
    assert old.closed == "channel expired"
    assert idle.closed == "channel expired"
    fresh = Recorder()
    await bus.attach("c", None, fresh)
    assert [e.id for e in fresh.events] == ["e2-1"]


async def test_a_member_given_nothing_follows_the_life_that_starts(hub: Any) -> None:
    bus, broker = hub
    rec = Recorder()
    await bus.attach("c", None, rec)  # reserved life e1, nothing in it
    broker.new_life("e2")
    await broker.publish("c", "token", {})
    broker.flow()
    await settle()
    assert [e.id for e in rec.events] == ["e2-1"]
    assert rec.closed is None


async def test_detach_during_the_read_gives_nothing_and_releases(hub: Any) -> None:
    bus, broker = hub
    broker.gate = asyncio.Event()
    rec = Recorder()
    task = asyncio.create_task(bus.attach("c", None, rec))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    broker.gate.set()
    await broker.publish("c", END, {})
    broker.flow()

    async def released() -> bool:
        return "c" not in broker.subscribed

    await wait_until(released)
    assert rec.events == []


async def test_one_subscription_per_channel_whatever_the_sinks(hub: Any) -> None:
    bus, broker = hub
    attachments = [await bus.attach("c", None, Recorder()) for _ in range(5)]
    assert broker.subscribed == {"c"}
    info = await bus.info("c")
    assert info is not None
    assert info.subscribers == 5
    for attachment in attachments:
        attachment.detach()

    async def released() -> bool:
        return not broker.subscribed

    await wait_until(released)


async def test_followed_channels_are_retained_periodically() -> None:
    broker = ScriptedBroker(ttl=0.15)  # retain every 0.05 s
    bus = Bus(broker)
    await bus.start()
    try:
        attachment = await bus.attach("c", None, Recorder())
        await bus.attach("d", None, Recorder())

        async def retained(expected: set[str]) -> bool:
            return any(set(call) == expected for call in broker.retained)

        await wait_until(lambda: retained({"c", "d"}))
        attachment.detach()

        async def released() -> bool:
            return "c" not in broker.subscribed

        await wait_until(released)
        broker.retained.clear()
        await wait_until(lambda: retained({"d"}))
    finally:
        await bus.close()
    # Stopped with the bus: no call after close.
    calls = len(broker.retained)
    broker.retain_called.clear()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await broker.retain_called.wait()
    assert len(broker.retained) == calls


async def test_tickets_and_limits_pass_through_to_the_broker(hub: Any) -> None:
    bus, broker = hub
    await bus.put_ticket("k" * 64, b"v", 5.0)
    assert broker.tickets == {"k" * 64: (b"v", 5.0)}
    assert await bus.take_ticket("k" * 64) == b"v"
    assert await bus.take_ticket("k" * 64) is None
    broker.limits["too-many-channels"] += 2
    assert bus.limits["too-many-channels"] == 2
