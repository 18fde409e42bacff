"""Bounded resources, on every backend: history caps, the channel cap, idle eviction, tickets.

The memory-only tests at the end drive :class:`MemoryBroker` with a fake clock and call
``sweep()`` themselves; the others run on both backends with small caps and a small ttl, and wait
on conditions (bounded), never on bare sleeps.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from realtime_lab.auth.tickets import Tickets, TicketStore
from realtime_lab.auth.tokens import Identity
from realtime_lab.bus import Bus, create_broker
from realtime_lab.bus.memory import MemoryBroker
from realtime_lab.errors import (
    EventTooLarge,
    LimitReached,
    TooManyChannels,
    Unauthenticated,
    UnknownBusBackend,
)
from realtime_lab.protocol.cursor import Cursor, parse_id
from realtime_lab.protocol.envelope import END, RESET, Event

from .conftest import MakeBus, Recorder, wait_until


def new_channel() -> str:
    return f"ch-{uuid.uuid4().hex[:8]}"


def pad(n: int) -> dict[str, str]:
    return {"pad": "x" * n}


def gone(bus: Bus, channel: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await bus.info(channel) is None

    return check


def expected_retained(published: list[Event], history: int, cap: int) -> list[str]:
    """The ids both caps keep: the longest suffix within ``history`` events and ``cap`` bytes."""
    kept: list[Event] = []
    total = 0
    for event in reversed(published):
        if len(kept) == history or total + len(event.json) > cap:
            break
        kept.append(event)
        total += len(event.json)
    return [e.id for e in reversed(kept)]


# History caps ------------------------------------------------------------------------------------
async def test_history_keeps_exactly_history_events(make_bus: MakeBus) -> None:
    bus = await make_bus(history=4)
    channel = new_channel()
    published = [await bus.publish(channel, "token", {"i": i}) for i in range(11)]
    info = await bus.info(channel)
    assert info is not None
    assert (info.first_seq, info.last_seq) == (8, 11)
    replay = await bus.replay(channel, None)
    assert [e.id for e in replay.events] == [e.id for e in published[-4:]]


async def test_history_byte_cap_trims_the_oldest_events(make_bus: MakeBus) -> None:
    cap = 1000
    bus = await make_bus(history=100, history_bytes=cap)
    channel = new_channel()
    published: list[Event] = []
    for i in range(12):
        published.append(await bus.publish(channel, "token", pad(100 + 37 * (i % 5))))
        replay = await bus.replay(channel, None)
        # After every publish: exactly the newest events that fit both caps.
        assert [e.id for e in replay.events] == expected_retained(published, 100, cap)
        assert sum(len(e.json) for e in replay.events) <= cap
    info = await bus.info(channel)
    assert info is not None
    assert info.last_seq == 12
    assert info.first_seq > 1  # the byte cap, not the count, trimmed

    # Both caps at once: the count binds when events are small.
    small = await make_bus(history=3, history_bytes=cap)
    other = new_channel()
    tiny = [await small.publish(other, "token", {"i": i}) for i in range(6)]
    assert [e.id for e in (await small.replay(other, None)).events] == [e.id for e in tiny[3:]]


async def test_both_caps_hold_after_the_channel_ended(make_bus: MakeBus) -> None:
    # A finished channel keeps its history in another form (memory://): the caps are the same.
    cap = 1000
    bus = await make_bus(history=6, history_bytes=cap)
    channel = new_channel()
    published = [await bus.publish(channel, "token", pad(10)), await bus.publish(channel, END, {})]
    for i in range(12):
        published.append(await bus.publish(channel, "note", pad(100 + 37 * (i % 5))))
        replay = await bus.replay(channel, None)
        assert [e.id for e in replay.events] == expected_retained(published, 6, cap)
        assert [e.json for e in replay.events] == [
            e.json for e in published if e.id in {r.id for r in replay.events}
        ]
    resumed = await bus.replay(channel, parse_id(published[-3].id))
    assert [e.id for e in resumed.events] == [e.id for e in published[-2:]]


async def test_an_event_larger_than_the_byte_cap_is_refused(make_bus: MakeBus) -> None:
    bus = await make_bus(history_bytes=400)
    channel = new_channel()
    first = await bus.publish(channel, "token", pad(10))
    with pytest.raises(EventTooLarge) as raised:
        await bus.publish(channel, "token", pad(400))
    assert isinstance(raised.value, LimitReached)
    assert (raised.value.code, raised.value.status) == ("event-too-large", 413)
    # Data under the cap, but not once the id and the rest of the envelope are counted.
    with pytest.raises(EventTooLarge):
        await bus.publish(channel, "token", pad(400 - len(first.json) + 10 + 6))
    # Nothing changed: no hole in the seqs, history intact.
    second = await bus.publish(channel, "token", pad(10))
    assert second.seq == 2
    assert [e.id for e in (await bus.replay(channel, None)).events] == [first.id, second.id]
    # On a new channel: the channel is not created either.
    fresh = new_channel()
    with pytest.raises(EventTooLarge):
        await bus.publish(fresh, "token", pad(1000))
    assert await bus.info(fresh) is None
    assert bus.limits["event-too-large"] == 3


async def test_byte_cap_boundaries_are_exact(
    make_bus: MakeBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fixed timestamp makes every envelope's size known in advance.
    import realtime_lab.bus.memory
    import realtime_lab.bus.redis

    for module in (realtime_lab.bus.memory, realtime_lab.bus.redis):
        monkeypatch.setattr(module, "now_ms", lambda: 1_700_000_000_000.5)
    probe = await make_bus()
    size = len((await probe.publish(new_channel(), "token", pad(50))).json)

    exact = await make_bus(history_bytes=size)
    assert len((await exact.publish(new_channel(), "token", pad(50))).json) == size  # fits
    with pytest.raises(EventTooLarge):
        await exact.publish(new_channel(), "token", pad(51))  # one byte over

    two = await make_bus(history_bytes=2 * size)
    channel = new_channel()
    events = [await two.publish(channel, "token", pad(50)) for _ in range(3)]
    assert {len(e.json) for e in events} == {size}
    kept = (await two.replay(channel, None)).events
    assert [e.seq for e in kept] == [2, 3]  # exactly the cap: both stay


# Channel cap -------------------------------------------------------------------------------------
async def test_new_channels_beyond_the_cap_are_refused(make_bus: MakeBus) -> None:
    bus = await make_bus(max_channels=3, ttl=60)
    names = [new_channel() for _ in range(3)]
    for name in names:
        await bus.publish(name, "token", {})
    extra = new_channel()
    with pytest.raises(TooManyChannels) as raised:
        await bus.publish(extra, "token", {})
    refusal = raised.value
    assert (refusal.code, refusal.status) == ("too-many-channels", 507)
    assert refusal.retry_after is not None
    assert 0 < refusal.retry_after <= 60  # when the oldest idle channel expires
    # Existing channels go on; reading a new one creates nothing, so it is not refused.
    assert (await bus.publish(names[0], "token", {})).seq == 2
    assert (await bus.replay(extra, None)).events == []
    # Reserving one is creating it: refused, for attach and declare alike.
    with pytest.raises(TooManyChannels):
        await bus.attach(extra, None, Recorder())
    with pytest.raises(TooManyChannels):
        await bus.declare(extra)
    with pytest.raises(TooManyChannels):
        async with bus.subscribe(extra):
            pass
    assert await bus.info(extra) is None
    assert bus.limits["too-many-channels"] == 4
    # A followed existing channel still works at the cap.
    rec = Recorder()
    attachment = await bus.attach(names[1], None, rec)
    await bus.publish(names[1], "token", {})
    await rec.wait_for(lambda r: len(r.events) == 2)
    attachment.detach()


async def test_idle_eviction_frees_room_under_the_cap(make_bus: MakeBus) -> None:
    bus = await make_bus(max_channels=2, ttl=0.3)
    await bus.publish(new_channel(), "token", {})
    await bus.publish(new_channel(), "token", {})
    late = new_channel()
    with pytest.raises(TooManyChannels):
        await bus.publish(late, "token", {})

    async def admitted() -> bool:
        try:
            await bus.publish(late, "token", {})
        except TooManyChannels:
            return False
        return True

    await wait_until(admitted, timeout=5)


# Idle eviction -----------------------------------------------------------------------------------
async def test_an_idle_channel_is_evicted_and_comes_back_with_a_fresh_epoch(
    make_bus: MakeBus,
) -> None:
    bus = await make_bus(ttl=0.3)
    channel = new_channel()
    events = [await bus.publish(channel, "token", {"i": i}) for i in range(3)]  # never ended
    await wait_until(gone(bus, channel), timeout=5)

    stale = await bus.replay(channel, parse_id(events[-1].id))
    assert stale.reset is not None
    assert stale.reset.data["reason"] == "unknown-epoch"
    reborn = await bus.publish(channel, "token", {})
    assert reborn.seq == 1
    assert parse_id(reborn.id).epoch != parse_id(events[0].id).epoch
    resumed = await bus.replay(channel, parse_id(events[-1].id))
    assert [e.type for e in resumed.events] == [RESET, "token"]


async def test_a_followed_channel_is_not_evicted_until_nobody_follows_it(
    make_bus: MakeBus,
) -> None:
    bus = await make_bus(ttl=0.3)
    followed = new_channel()
    rec = Recorder()
    attachment = await bus.attach(followed, None, rec)
    first = await bus.publish(followed, "token", {})
    # Two channels published to after it expire one after the other: more than 2 ttl pass.
    for _ in range(2):
        idle = new_channel()
        await bus.publish(idle, "token", {})
        await wait_until(gone(bus, idle), timeout=5)
    info = await bus.info(followed)
    assert info is not None
    assert info.epoch == parse_id(first.id).epoch
    second = await bus.publish(followed, "token", {})
    assert second.id == f"{info.epoch}-2"
    await rec.wait_for(lambda r: len(r.events) == 2)
    assert rec.closed is None

    attachment.detach()
    await wait_until(gone(bus, followed), timeout=5)


async def test_a_finished_channel_expires_even_when_followed(make_bus: MakeBus) -> None:
    bus = await make_bus(ttl=0.3)
    channel = new_channel()
    rec = Recorder()
    await bus.attach(channel, None, rec)
    await bus.publish(channel, END, {})
    await rec.wait_for(lambda r: r.closed is not None, timeout=5)
    assert rec.closed == "channel expired"
    await wait_until(gone(bus, channel), timeout=5)


# Tickets -----------------------------------------------------------------------------------------
async def test_tickets_are_taken_once(make_bus: MakeBus) -> None:
    bus = await make_bus()
    key = uuid.uuid4().hex * 2
    assert await bus.take_ticket(key) is None
    await bus.put_ticket(key, b"first", 30)
    await bus.put_ticket(key, b"second", 30)  # replaces
    takers = await asyncio.gather(*(bus.take_ticket(key) for _ in range(20)))
    assert sorted(takers, key=lambda v: v is None) == [b"second"] + [None] * 19
    await bus.put_ticket(key, b"gone at once", 0)
    assert await bus.take_ticket(key) is None


async def test_tickets_expire(make_bus: MakeBus) -> None:
    bus = await make_bus()
    # A ticket taken well within its lifetime is there. The put and take are timed rather than
    # assumed quick, so a loaded machine retries instead of failing.
    for _ in range(50):
        key = uuid.uuid4().hex * 2
        started = time.monotonic()
        await bus.put_ticket(key, b"v", 1.0)
        value = await bus.take_ticket(key)
        if time.monotonic() - started < 0.5:
            assert value == b"v"
            break
    else:
        pytest.fail("no put and take finished within 0.5 s")
    # Tickets put with a short lifetime are gone once it has passed. Each key is taken once, so
    # a None can only mean that it expired.
    keys = [uuid.uuid4().hex * 2 for _ in range(400)]
    for key in keys:
        await bus.put_ticket(key, b"v", 0.2)
    taken = iter(keys)

    async def one_has_expired() -> bool:
        return await bus.take_ticket(next(taken)) is None

    await wait_until(one_has_expired, timeout=5, interval=0.01)


# Memory only: a fake clock -----------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def clocked() -> AsyncIterator[tuple[Bus, MemoryBroker, FakeClock]]:
    clock = FakeClock()
    broker = MemoryBroker(history=5, ttl=10.0, max_channels=3, max_tickets=3, clock=clock)
    bus = Bus(broker)
    await bus.start()
    yield bus, broker, clock
    await bus.close()


async def test_memory_history_holds_exactly_history_events(
    clocked: tuple[Bus, MemoryBroker, FakeClock],
) -> None:
    bus, broker, _ = clocked
    for i in range(23):
        await bus.publish("c", "token", {"i": i})
        # Never more event objects than history keeps (no dead slots before a compaction).
        assert len(broker._channels["c"].events) == min(i + 1, 5)
    replay = await bus.replay("c", Cursor(broker.epoch, 20))
    assert [e.seq for e in replay.events] == [21, 22, 23]
    limited = await bus.replay("c", Cursor(broker.epoch, 18), limit=2)
    assert [e.seq for e in limited.events] == [19, 20]


async def test_memory_idle_deadlines_follow_the_clock(
    clocked: tuple[Bus, MemoryBroker, FakeClock],
) -> None:
    bus, broker, clock = clocked
    await bus.publish("a", "token", {})
    clock.now += 4
    await bus.publish("b", "token", {})
    clock.now += 5.9
    await bus.publish("b", "token", {})  # activity pushes b's deadline back
    assert broker.sweep() == 0
    clock.now += 0.1  # a: 10 s idle
    assert broker.sweep() == 1
    assert broker.channel_names() == ["b"]
    clock.now += 9.9
    assert broker.sweep() == 1  # b: 10 s after its last event
    assert broker.channel_names() == []


async def test_memory_followed_channels_wait_for_their_last_follower(
    clocked: tuple[Bus, MemoryBroker, FakeClock],
) -> None:
    bus, broker, clock = clocked
    rec = Recorder()
    attachment = await bus.attach("f", None, rec)
    await bus.publish("f", "token", {})
    clock.now += 100
    assert broker.sweep() == 0
    attachment.detach()

    async def released() -> bool:
        return "f" not in broker._subscribed

    await wait_until(released)
    clock.now += 9.9  # idle from the moment its last follower left
    assert broker.sweep() == 0
    clock.now += 0.1
    assert broker.sweep() == 1
    assert rec.closed is None  # nobody followed it any more: nobody to tell


async def test_memory_finished_channel_expires_ttl_after_end(
    clocked: tuple[Bus, MemoryBroker, FakeClock],
) -> None:
    bus, broker, clock = clocked
    rec = Recorder()
    await bus.attach("e", None, rec)
    end = await bus.publish("e", END, {})
    clock.now += 5
    await bus.publish("e", "token", {})  # after end: same life, same expiry
    clock.now += 5
    assert broker.sweep() == 1
    assert rec.closed == "channel expired"
    reborn = await bus.publish("e", "token", {})
    assert reborn.seq == 1
    assert parse_id(reborn.id).epoch != parse_id(end.id).epoch


async def test_memory_channel_cap_says_when_to_retry(
    clocked: tuple[Bus, MemoryBroker, FakeClock],
) -> None:
    bus, broker, clock = clocked
    await bus.publish("a", "token", {})
    clock.now += 4
    await bus.publish("b", "token", {})
    await bus.declare("c")  # a reservation counts too
    clock.now += 2
    with pytest.raises(TooManyChannels) as raised:
        await bus.publish("d", "token", {})
    assert raised.value.retry_after == pytest.approx(4.0)  # a expires at 10
    clock.now += 4
    # The cap check sweeps what is due before refusing: no timer needed.
    assert (await bus.publish("d", "token", {})).seq == 1
    assert sorted(broker.channel_names()) == ["b", "c", "d"]


async def test_memory_reserved_channel_keeps_its_epoch_when_evicted(
    clocked: tuple[Bus, MemoryBroker, FakeClock],
) -> None:
    bus, broker, clock = clocked
    await bus.declare("r")
    before = await bus.replay("r", None)
    clock.now += 10
    assert broker.sweep() == 1
    # It never had an event: nothing was missed, so its position stays valid.
    first = await bus.publish("r", "token", {})
    assert before.cursor == f"{parse_id(first.id).epoch}-0"


async def test_memory_sweep_timer_evicts_without_a_caller() -> None:
    broker = MemoryBroker(ttl=0.05)
    bus = Bus(broker)
    await bus.start()
    try:
        await bus.publish("t", "token", {})

        async def swept() -> bool:
            return broker.channel_names() == []

        await wait_until(swept, timeout=5)
    finally:
        await bus.close()


async def test_memory_tickets_are_bounded_and_expire(
    clocked: tuple[Bus, MemoryBroker, FakeClock],
) -> None:
    bus, broker, clock = clocked
    for i, ttl in enumerate((5.0, 3.0, 8.0)):
        await bus.put_ticket(f"k{i}", b"v", ttl)
    await bus.put_ticket("k0", b"replaced", 5.0)  # not a new ticket: allowed at the bound
    with pytest.raises(LimitReached) as raised:
        await bus.put_ticket("k3", b"v", 5.0)
    assert (raised.value.code, raised.value.status) == ("too-many-tickets", 429)
    assert raised.value.retry_after == pytest.approx(3.0)
    assert bus.limits["too-many-tickets"] == 1
    clock.now += 3
    assert await bus.take_ticket("k1") is None  # expired
    await bus.put_ticket("k3", b"v", 5.0)  # k1's room
    assert broker.ticket_count() == 3
    assert await bus.take_ticket("k0") == b"replaced"
    clock.now += 100
    await bus.put_ticket("k4", b"v", 1.0)  # the sweep drops every expired ticket
    assert broker.ticket_count() == 1


def test_memory_bound_options_come_from_the_url() -> None:
    broker = create_broker("memory://?history_bytes=512&max_channels=7&ttl=2")
    assert isinstance(broker, MemoryBroker)
    assert (broker.history_bytes, broker.max_channels, broker.ttl) == (512, 7, 2.0)
    default = create_broker("memory://")
    assert (default.history_bytes, default.max_channels) == (1 << 20, 10_000)
    with pytest.raises(UnknownBusBackend, match="max_channels"):
        create_broker("memory://?max_channels=lots")
    with pytest.raises(ValueError, match="history_bytes"):
        create_broker("memory://?history_bytes=0")


async def test_the_bus_is_the_ticket_store_of_auth(make_bus: MakeBus) -> None:
    first, second = await make_bus(), await make_bus()
    store: TicketStore = first  # the hub satisfies the auth layer's protocol
    tickets = Tickets(store)
    ticket, expires_in = await tickets.issue(Identity("alice", frozenset({"read"})), "news")
    assert expires_in == 30
    if first.url.startswith("redis"):
        # Issued by one process, redeemed by another.
        identity = await Tickets(second).redeem(ticket, "news")
    else:
        identity = await tickets.redeem(ticket, "news")
    assert (identity.user, identity.scopes) == ("alice", frozenset({"read"}))
    with pytest.raises(Unauthenticated) as raised:
        await tickets.redeem(ticket, "news")
    assert raised.value.code == "ticket-used"


async def test_memory_a_finished_channel_keeps_no_event_objects(
    clocked: tuple[Bus, MemoryBroker, FakeClock],
) -> None:
    bus, _, _ = clocked
    token = await bus.publish("c", "token", {"text": "a"})
    token.cache["sse"] = b"written once"  # what a transport leaves on it
    end = await bus.publish("c", END, {"reason": "done"})
    published = [(e.id, e.type, e.data, e.ts, e.seq, e.json) for e in (token, end)]
    del token, end
    gc.collect()
    # What the collector would walk on every pass for as long as the channel is kept.
    assert not [o for o in gc.get_objects() if isinstance(o, Event) and o.channel == "c"]
    replayed = (await bus.replay("c", None)).events
    assert [(e.id, e.type, e.data, e.ts, e.seq, e.json) for e in replayed] == published
    # Made again from what was kept: its JSON (not encoded again), none of its frames.
    assert [e.cache["json"] for e in replayed] == [p[5] for p in published]
    assert all(e.cache["json"] is p[5] for e, p in zip(replayed, published, strict=True))
    assert all(e.cache.keys() == {"json"} for e in replayed)
