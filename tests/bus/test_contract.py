"""The bus contract, run against every backend (``memory`` and ``redis``)."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from realtime_lab.bus import Bus, create_bus
from realtime_lab.errors import BusClosed, SubscriberOverflow
from realtime_lab.protocol.cursor import LIVE, Cursor, parse_id
from realtime_lab.protocol.envelope import END, RESET, Event, dumps

from .conftest import MakeBus, Recorder, wait_until


def new_channel() -> str:
    return f"ch-{uuid.uuid4().hex[:8]}"


async def publish_n(bus: Bus, channel: str, n: int, start: int = 1) -> list[Event]:
    return [await bus.publish(channel, "token", {"i": i}) for i in range(start, start + n)]


def epoch_of(event: Event) -> str:
    return parse_id(event.id).epoch


def ids(events: list[Event]) -> list[str]:
    return [event.id for event in events]


def at_least(count: int) -> Callable[[Recorder], bool]:
    return lambda rec: len(rec.events) >= count


# Publish -----------------------------------------------------------------------------------------
async def test_publish_returns_consecutive_ids(bus: Bus) -> None:
    channel, other = new_channel(), new_channel()
    events = await publish_n(bus, channel, 5)
    epoch = epoch_of(events[0])
    assert ids(events) == [f"{epoch}-{seq}" for seq in range(1, 6)]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert all(e.channel == channel and e.type == "token" for e in events)
    assert [e.data for e in events] == [{"i": i} for i in range(1, 6)]
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(events))
    for event in events:
        assert event.json == dumps(event.to_dict())
        assert Event.from_json(event.json).to_dict() == event.to_dict()
    first_other = await bus.publish(other, "token", {})
    assert first_other.seq == 1


async def test_publish_delivers_to_local_sinks_before_returning(bus: Bus) -> None:
    channel = new_channel()
    async with bus.subscribe(channel) as sub:
        event = await bus.publish(channel, "token", {"x": "é/\u2028"})
        assert sub.pending == 1
        got = await anext(sub)
    assert got.id == event.id
    assert got.to_dict() == event.to_dict()
    assert got.json == event.json


async def test_info(bus: Bus) -> None:
    channel = new_channel()
    assert await bus.info(channel) is None
    events = await publish_n(bus, channel, 3)
    info = await bus.info(channel)
    assert info is not None
    assert (info.name, info.epoch, info.first_seq, info.last_seq) == (
        channel,
        epoch_of(events[0]),
        1,
        3,
    )
    assert not info.finished
    assert info.subscribers == 0
    assert info.last_id == events[-1].id
    async with bus.subscribe(channel, LIVE):
        info = await bus.info(channel)
        assert info is not None
        assert info.subscribers == 1


# Replay ------------------------------------------------------------------------------------------
async def test_replay_all_live_and_cursor(bus: Bus) -> None:
    channel = new_channel()
    events = await publish_n(bus, channel, 10)
    epoch = epoch_of(events[0])

    everything = await bus.replay(channel, None)
    assert ids(everything.events) == ids(events)
    assert (everything.cursor, everything.more, everything.reset) == (events[-1].id, False, None)

    live = await bus.replay(channel, LIVE)
    assert (live.events, live.cursor, live.more) == ([], events[-1].id, False)

    rest = await bus.replay(channel, Cursor(epoch, 4))
    assert ids(rest.events) == ids(events[4:])
    assert rest.cursor == events[-1].id

    nothing = await bus.replay(channel, Cursor(epoch, 10))
    assert (nothing.events, nothing.cursor, nothing.more) == ([], events[-1].id, False)

    from_start = await bus.replay(channel, Cursor(epoch, 0))
    assert ids(from_start.events) == ids(events)
    assert from_start.reset is None


async def test_replay_limit_pages_through_history(bus: Bus) -> None:
    channel = new_channel()
    events = await publish_n(bus, channel, 10)
    epoch = epoch_of(events[0])

    empty = await bus.replay(channel, None, limit=0)
    assert (empty.events, empty.cursor, empty.more) == ([], f"{epoch}-0", True)

    pages: list[list[int]] = []
    after: Cursor | None = None
    while True:
        page = await bus.replay(channel, after, limit=3)
        pages.append([e.seq for e in page.events])
        assert page.cursor is not None
        after = parse_id(page.cursor)
        if not page.more:
            break
    assert pages == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]
    assert after == Cursor(epoch, 10)

    exact = await bus.replay(channel, Cursor(epoch, 7), limit=3)
    assert ([e.seq for e in exact.events], exact.more) == ([8, 9, 10], False)


async def test_reset_for_unknown_epoch(bus: Bus) -> None:
    channel = new_channel()
    events = await publish_n(bus, channel, 10)
    epoch = epoch_of(events[0])

    replay = await bus.replay(channel, Cursor("zzzz", 1))
    reset = replay.reset
    assert reset is not None
    assert reset.type == RESET
    assert reset.id == f"{epoch}-0"
    assert reset.data["reason"] == "unknown-epoch"
    assert reset.data["requested"] == "zzzz-1"
    assert reset.data["oldest"] == events[0].id
    assert ids(replay.events[1:]) == ids(events)
    assert replay.cursor == events[-1].id

    resumed = await bus.replay(channel, parse_id(reset.id))
    assert resumed.reset is None
    assert ids(resumed.events) == ids(events)


async def test_reset_for_future_id(bus: Bus) -> None:
    channel = new_channel()
    events = await publish_n(bus, channel, 10)
    epoch = epoch_of(events[0])

    replay = await bus.replay(channel, Cursor(epoch, 11))
    assert replay.reset is not None
    assert replay.reset.data["reason"] == "future-id"
    assert ids(replay.events[1:]) == ids(events)


async def test_reset_for_trimmed_history(make_bus: MakeBus) -> None:
    bus = await make_bus(history=5)
    channel = new_channel()
    events = await publish_n(bus, channel, 20)
    epoch = epoch_of(events[0])
    kept = ids(events[15:])

    info = await bus.info(channel)
    assert info is not None
    assert (info.first_seq, info.last_seq) == (16, 20)

    everything = await bus.replay(channel, None)
    assert (ids(everything.events), everything.reset) == (kept, None)

    trimmed = await bus.replay(channel, Cursor(epoch, 3))
    reset = trimmed.reset
    assert reset is not None
    assert (reset.id, reset.seq) == (f"{epoch}-15", 15)
    assert reset.data["reason"] == "history-trimmed"
    assert reset.data["oldest"] == f"{epoch}-16"
    assert ids(trimmed.events[1:]) == kept

    # The reset's id resumes exactly at the oldest retained event, without a second reset.
    resumed = await bus.replay(channel, parse_id(reset.id))
    assert (ids(resumed.events), resumed.reset) == (kept, None)
    assert (await bus.replay(channel, Cursor(epoch, 14))).reset is not None

    limited = await bus.replay(channel, Cursor(epoch, 3), limit=2)
    assert [e.type for e in limited.events] == [RESET, "token"]
    assert (limited.events[1].seq, limited.cursor, limited.more) == (16, f"{epoch}-16", True)


async def test_unknown_channel(bus: Bus) -> None:
    channel = new_channel()
    replay = await bus.replay(channel, None)
    assert replay.events == []
    assert not replay.more
    assert replay.cursor is not None
    assert replay.cursor.endswith("-0")
    live = await bus.replay(channel, LIVE)
    assert live.events == []
    assert live.cursor is not None

    stale = await bus.replay(channel, Cursor("abcd", 7))
    assert stale.reset is not None
    assert stale.reset.data["reason"] == "unknown-epoch"
    assert stale.reset.data["oldest"] is None
    assert len(stale.events) == 1
    assert stale.reset.id == replay.cursor
    assert await bus.info(channel) is None  # replay leaves nothing behind


async def test_position_before_the_first_event_stays_valid(bus: Bus) -> None:
    channel = new_channel()
    before = await bus.replay(channel, None)
    live = await bus.replay(channel, LIVE)
    assert before.cursor is not None
    assert live.cursor == before.cursor
    events = await publish_n(bus, channel, 2)
    assert before.cursor == f"{epoch_of(events[0])}-0"
    resumed = await bus.replay(channel, parse_id(before.cursor))
    assert resumed.reset is None
    assert ids(resumed.events) == ids(events)


async def test_restarted_memory_bus_resets_old_cursor() -> None:
    channel = new_channel()
    first = create_bus("memory://")
    events = [await first.publish(channel, "token", {"i": i}) for i in range(3)]
    await first.close()

    second = create_bus("memory://")
    try:
        fresh = await second.publish(channel, "token", {})
        replay = await second.replay(channel, parse_id(events[-1].id))
        assert replay.reset is not None
        assert replay.reset.data["reason"] == "unknown-epoch"
        assert ids(replay.events[1:]) == [fresh.id]
        assert epoch_of(fresh) != epoch_of(events[0])
    finally:
        await second.close()


# Attach ------------------------------------------------------------------------------------------
async def test_attach_replays_then_goes_live(bus: Bus) -> None:
    channel = new_channel()
    events = await publish_n(bus, channel, 3)
    everything, live, resumed = Recorder(), Recorder(), Recorder()
    attachments = [
        await bus.attach(channel, None, everything),
        await bus.attach(channel, LIVE, live),
        await bus.attach(channel, parse_id(events[0].id), resumed),
    ]
    assert everything.seqs == [1, 2, 3]
    assert live.seqs == []
    assert resumed.seqs == [2, 3]

    events += await publish_n(bus, channel, 2, start=4)
    for rec, expected in ((everything, [1, 2, 3, 4, 5]), (live, [4, 5]), (resumed, [2, 3, 4, 5])):
        await rec.wait_for(at_least(len(expected)))
        assert rec.seqs == expected
        assert [e.id for e in rec.events] == ids(events[expected[0] - 1 :])

    for attachment in attachments:
        attachment.detach()
        attachment.detach()  # idempotent
    await bus.publish(channel, "token", {})
    info = await bus.info(channel)
    assert info is not None
    assert info.subscribers == 0
    assert everything.seqs == [1, 2, 3, 4, 5]
    assert everything.closed is None


async def test_attach_with_reset(make_bus: MakeBus) -> None:
    bus = await make_bus(history=5)
    channel = new_channel()
    events = await publish_n(bus, channel, 10)
    rec = Recorder()
    attachment = await bus.attach(channel, Cursor(epoch_of(events[0]), 2), rec)
    assert [e.type for e in rec.events] == [RESET] + ["token"] * 5
    assert rec.seqs == [5, 6, 7, 8, 9, 10]
    await bus.publish(channel, "token", {})
    await rec.wait_for(lambda r: len(r.events) == 7)
    assert rec.seqs[-1] == 11
    attachment.detach()


async def test_attach_seam_under_concurrent_publishing(bus: Bus) -> None:
    """Sinks attached while 200 events are being published see every event once, in order."""
    channel = new_channel()
    total = 200
    published: list[Event] = []

    async def producer() -> None:
        for i in range(1, total + 1):
            published.append(await bus.publish(channel, "token", {"i": i}))
            await asyncio.sleep(0.001 if i % 10 == 0 else 0)

    async def attach(after: Any) -> tuple[Any, Recorder]:
        rec = Recorder()
        await bus.attach(channel, after, rec)
        return after, rec

    task = asyncio.create_task(producer())
    sinks: list[tuple[Any, Recorder]] = []
    for round_ in range(6):
        seen = len(published)  # attach once the producer has moved on: at another position
        await wait_until(lambda seen=seen: len(published) > seen or task.done())
        middle = parse_id(published[len(published) // 2].id) if published else None
        # Several attaches at once, at different resume positions.
        sinks += await asyncio.gather(attach(None), attach(LIVE), attach(middle))
        assert not task.done() or round_ > 0, "the producer finished before any attach"
    await task
    end = await bus.publish(channel, END, {})
    assert end.seq == total + 1

    attached_mid_stream = 0
    for after, rec in sinks:
        await rec.wait_end()
        seqs = rec.seqs
        assert seqs == list(range(seqs[0], total + 2)), f"gap or duplicate for after={after}"
        assert [e.id for e in rec.events] == ids([*published, end][seqs[0] - 1 :])
        if after is None:
            assert seqs[0] == 1
        elif isinstance(after, Cursor):
            assert seqs[0] == after.seq + 1
        elif seqs[0] > 1:
            attached_mid_stream += 1
    assert attached_mid_stream > 0, "no LIVE sink attached while events were flowing"


async def test_failing_sink_is_dropped_without_hurting_others(bus: Bus) -> None:
    class Broken(Recorder):
        def deliver(self, event: Event) -> None:
            raise RuntimeError("boom")

    channel = new_channel()
    broken, good = Broken(), Recorder()
    await bus.attach(channel, LIVE, broken)
    await bus.attach(channel, LIVE, good)
    await bus.publish(channel, "token", {})
    await bus.publish(channel, "token", {})
    await good.wait_for(lambda r: len(r.events) == 2)
    assert broken.closed == "sink failed"
    info = await bus.info(channel)
    assert info is not None
    assert info.subscribers == 1


# Subscriptions -----------------------------------------------------------------------------------
async def test_subscription_iterates_until_end(bus: Bus) -> None:
    channel = new_channel()
    got: list[Event] = []
    async with bus.subscribe(channel) as sub:
        published = [*await publish_n(bus, channel, 3), await bus.publish(channel, END, {})]
        async with asyncio.timeout(5):
            async for event in sub:
                got.append(event)
                if event.type == END:
                    break
        assert sub.last_id == published[-1].id
    assert ids(got) == ids(published)

    async with bus.subscribe(channel, parse_id(published[1].id)) as resumed:
        async with asyncio.timeout(5):
            rest = [await anext(resumed), await anext(resumed)]
    assert ids(rest) == ids(published[2:])


async def test_subscription_overflow(bus: Bus) -> None:
    channel = new_channel()
    async with bus.subscribe(channel, maxsize=10) as slow, bus.subscribe(channel) as fast:
        events = await publish_n(bus, channel, 5)
        async with asyncio.timeout(5):
            for _ in range(5):
                await anext(slow)
        assert slow.last_id == events[-1].id
        events += await publish_n(bus, channel, 95, start=6)  # slow never reads again

        async with asyncio.timeout(5):
            got = [await anext(fast) for _ in range(100)]
        assert ids(got) == ids(events)

        with pytest.raises(SubscriberOverflow) as raised:
            async with asyncio.timeout(5):
                await anext(slow)
        assert raised.value.last_id == events[4].id
        info = await bus.info(channel)
        assert info is not None
        assert info.subscribers == 1

    # The overflowed subscriber resumes exactly where it stopped.
    assert raised.value.last_id is not None
    rest = await bus.replay(channel, parse_id(raised.value.last_id))
    assert ids(rest.events) == ids(events[5:])


async def test_iterating_without_entering_is_an_error(bus: Bus) -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await anext(bus.subscribe(new_channel()))


# End, expiry, close ------------------------------------------------------------------------------
async def test_end_finishes_and_channel_expires(make_bus: MakeBus) -> None:
    bus = await make_bus(ttl=0.2)
    channel = new_channel()
    rec = Recorder()
    async with bus.subscribe(channel) as sub:
        await bus.attach(channel, None, rec)
        token = await bus.publish(channel, "token", {})
        end = await bus.publish(channel, END, {"reason": "done"})
        info = await bus.info(channel)
        assert info is not None
        assert info.finished
        assert info.last_seq == 2

        async with asyncio.timeout(5):
            got = [event async for event in sub]  # ends when the channel expires
        assert ids(got) == [token.id, end.id]

    await rec.wait_for(lambda r: r.closed is not None)
    assert rec.closed == "channel expired"

    async def gone() -> bool:
        return await bus.info(channel) is None

    await wait_until(gone, timeout=5)
    replay = await bus.replay(channel, parse_id(end.id))
    assert replay.reset is not None
    assert replay.reset.data["reason"] == "unknown-epoch"

    reborn = await bus.publish(channel, "token", {})
    assert reborn.seq == 1
    assert epoch_of(reborn) != epoch_of(end)


async def test_close_ends_subscribers_and_refuses_publishing(make_bus: MakeBus) -> None:
    bus = await make_bus()
    channel = new_channel()
    rec = Recorder()
    await bus.attach(channel, LIVE, rec)
    async with bus.subscribe(channel) as sub:
        event = await bus.publish(channel, "token", {})
        await bus.close()
        async with asyncio.timeout(5):
            got = [e async for e in sub]
    assert ids(got) == [event.id]
    assert rec.closed == "bus closed"
    with pytest.raises(BusClosed):
        await bus.publish(channel, "token", {})
    with pytest.raises(BusClosed):
        await bus.attach(channel, None, Recorder())
    assert await bus.info(channel) is None
    await bus.close()  # idempotent


async def test_declare_names_the_life_of_a_new_channel(bus: Bus) -> None:
    channel = new_channel()
    await bus.declare(channel, epoch="c0ffee123456")
    first = await bus.publish(channel, "token", {})
    assert first.id == "c0ffee123456-1"
    await bus.declare(channel, epoch="other")  # an existing channel keeps its life
    assert (await bus.publish(channel, "token", {})).id == "c0ffee123456-2"
