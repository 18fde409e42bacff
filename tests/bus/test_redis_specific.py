"""What only the Redis bus does: keys, scripts, several processes, pub/sub housekeeping."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from realtime_lab.bus import Bus, create_bus
from realtime_lab.bus.redis import RedisBroker, split_url
from realtime_lab.errors import BusClosed, BusError, EventTooLarge, TooManyChannels
from realtime_lab.protocol.cursor import parse_id
from realtime_lab.protocol.envelope import END, RESET, Event
from tests.conftest import refusing_port
from tests.redis_server import RedisServer, redis_server_binary

from .conftest import Recorder, wait_until

MakeRedisBus = Callable[..., Awaitable[Bus]]


def new_channel() -> str:
    return f"ch-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def make_redis_bus(redis_url: str) -> AsyncIterator[MakeRedisBus]:
    """Started Redis buses sharing one key prefix: like server processes sharing one feed."""
    made: list[Bus] = []

    async def make(history: int = 1000, ttl: float = 300.0) -> Bus:
        bus = create_bus(redis_url, history=history, ttl=ttl)
        assert isinstance(bus.broker, RedisBroker)
        await bus.start()
        made.append(bus)
        return bus

    yield make
    for bus in reversed(made):
        await bus.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client on the test server, to look behind the bus."""
    client = aioredis.Redis.from_url(redis_server.url())
    yield client
    await client.aclose()


async def numsub(raw: aioredis.Redis, key: bytes) -> int:
    counts = await raw.pubsub_numsub(key)
    return int(counts[0][1])


# Pure parts (no server) --------------------------------------------------------------------------
def test_split_url_keeps_redis_options_and_takes_ours() -> None:
    url, ours = split_url("redis://h:1/2?history=5&ttl=0.5&prefix=abc&socket_timeout=3")
    assert url == "redis://h:1/2?socket_timeout=3"
    assert ours == {"history": "5", "ttl": "0.5", "prefix": "abc"}
    broker = create_bus("redis://h:1/2?history=5&ttl=0.5&prefix=abc").broker
    assert isinstance(broker, RedisBroker)
    assert (broker.history, broker.ttl, broker.prefix) == (5, 0.5, "abc")
    default = create_bus("redis://h:1/2").broker
    assert isinstance(default, RedisBroker)
    assert (default.history, default.ttl, default.prefix) == (1000, 300.0, "rtlab")
    with pytest.raises(ValueError, match="history"):
        RedisBroker("redis://h:1/2", history=0, ttl=1)


# Lifecycle ---------------------------------------------------------------------------------------
@pytest.mark.redis
async def test_start_fails_clearly_and_use_before_start_is_refused(
    redis_server: RedisServer,
) -> None:
    with refusing_port() as port:
        nowhere = Bus(RedisBroker(f"redis://127.0.0.1:{port}/0", history=10, ttl=1))
        with pytest.raises(BusError, match="cannot reach redis"):
            await nowhere.start()
        await nowhere.close()

    unstarted = Bus(RedisBroker(redis_server.url(), history=10, ttl=1))
    with pytest.raises(BusError, match="start"):
        await unstarted.publish("c", "token", {})
    await unstarted.close()
    with pytest.raises(BusClosed):
        await unstarted.start()


# Storage -----------------------------------------------------------------------------------------
@pytest.mark.redis
async def test_keys_stream_and_wire_format(
    make_redis_bus: MakeRedisBus, raw: aioredis.Redis, redis_url: str
) -> None:
    bus = await make_redis_bus(history=3)
    channel = new_channel()
    events = [
        await bus.publish(channel, "token", {"text": f"héllo {i} </script>"}) for i in range(5)
    ]
    prefix = split_url(redis_url)[1]["prefix"]
    meta, stream = f"{prefix}:{{{channel}}}:meta", f"{prefix}:{{{channel}}}:stream"
    tombstone = f"{prefix}:{{{channel}}}:gone"
    bus_epoch, index = f"{prefix}:epoch", f"{prefix}:channels"
    expected = sorted(key.encode() for key in (meta, stream, tombstone, bus_epoch, index))
    assert sorted(await raw.keys(f"{prefix}:*")) == expected

    epoch = parse_id(events[0].id).epoch
    assert await raw.get(bus_epoch) == epoch.encode()  # a channel's first life: the bus epoch
    kept = sum(len(e.json) for e in events[2:])
    assert await raw.hgetall(meta) == {
        b"epoch": epoch.encode(),
        b"last": b"5",
        b"bytes": str(kept).encode(),
    }
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await raw.xrange(stream)  # type: ignore[assignment]
    assert [entry_id for entry_id, _ in entries] == [b"3-0", b"4-0", b"5-0"]  # trimmed to 3
    assert [fields[b"e"] for _, fields in entries] == [e.json for e in events[2:]]
    # Unfinished channels expire too, ttl after their last event; the index says when.
    for key in (meta, stream):
        assert 0 < await raw.pttl(key) <= 300_000
    assert 24 * 3600_000 < await raw.pttl(tombstone) <= 24 * 3600_000 + 300_000
    assert await raw.zrange(index, 0, -1) == [channel.encode()]
    now_s, now_us = await raw.time()
    score = await raw.zscore(index, channel)
    assert score is not None
    assert 0 < score - (now_s * 1000 + now_us // 1000) <= 300_000


@pytest.mark.redis
async def test_end_sets_expiry_and_new_life_after_it(
    make_redis_bus: MakeRedisBus, raw: aioredis.Redis, redis_url: str
) -> None:
    bus = await make_redis_bus(ttl=30)
    channel = new_channel()
    prefix = split_url(redis_url)[1]["prefix"]
    meta, stream = f"{prefix}:{{{channel}}}:meta", f"{prefix}:{{{channel}}}:stream"
    tombstone = f"{prefix}:{{{channel}}}:gone"
    await bus.publish(channel, "token", {})
    end = await bus.publish(channel, END, {})
    assert 0 < await raw.pttl(meta) <= 30_000
    assert 0 < await raw.pttl(stream) <= 30_000
    assert 24 * 3600_000 < await raw.pttl(tombstone) <= 24 * 3600_000 + 30_000
    assert (await raw.hget(meta, "finished")) == b"1"
    after_end = await bus.publish(channel, "token", {})  # still the same life, same expiry
    assert after_end.seq == 3
    assert 0 < await raw.pttl(stream) <= 30_000

    await raw.delete(meta, stream)  # as if they expired: the tombstone stays
    info = await bus.info(channel)
    assert info is None
    replay = await bus.replay(channel, parse_id(end.id))
    assert replay.reset is not None
    assert replay.reset.data["reason"] == "unknown-epoch"
    reborn = await bus.publish(channel, "token", {})
    assert reborn.seq == 1
    assert parse_id(reborn.id).epoch != parse_id(end.id).epoch


# Several processes -------------------------------------------------------------------------------
@pytest.mark.redis
async def test_two_buses_share_one_feed(make_redis_bus: MakeRedisBus) -> None:
    first, second = await make_redis_bus(), await make_redis_bus()
    channel = new_channel()
    on_first, on_second = Recorder(), Recorder()
    await first.attach(channel, None, on_first)
    await second.attach(channel, None, on_second)

    async def produce(bus: Bus, name: str) -> list[Event]:
        out = []
        for i in range(50):
            out.append(await bus.publish(channel, "token", {"by": name, "i": i}))
            if i % 5 == 0:
                await asyncio.sleep(0)
        return out

    from_first, from_second = await asyncio.gather(
        produce(first, "first"), produce(second, "second")
    )
    end = await second.publish(channel, END, {})
    await on_first.wait_end()
    await on_second.wait_end()

    expected = sorted([*from_first, *from_second, end], key=lambda e: e.seq)
    assert [e.seq for e in expected] == list(range(1, 102))
    assert len({parse_id(e.id).epoch for e in expected}) == 1
    for rec in (on_first, on_second):
        assert [e.id for e in rec.events] == [e.id for e in expected]
        assert [e.json for e in rec.events] == [e.json for e in expected]
    for bus in (first, second):
        replay = await bus.replay(channel, None)
        assert [e.id for e in replay.events] == [e.id for e in expected]


@pytest.mark.redis
async def test_position_on_an_unpublished_channel_holds_across_processes(
    make_redis_bus: MakeRedisBus,
) -> None:
    reader, writer = await make_redis_bus(), await make_redis_bus()
    channel = new_channel()
    before = await reader.replay(channel, None)
    assert before.cursor is not None
    events = [await writer.publish(channel, "token", {"i": i}) for i in range(3)]
    resumed = await reader.replay(channel, parse_id(before.cursor))
    assert resumed.reset is None
    assert [e.id for e in resumed.events] == [e.id for e in events]


@pytest.mark.redis
async def test_attach_to_an_expired_channel_reserves_its_next_epoch(
    make_redis_bus: MakeRedisBus, raw: aioredis.Redis, redis_url: str
) -> None:
    reader, writer = await make_redis_bus(), await make_redis_bus()
    channel = new_channel()
    old_end = await writer.publish(channel, END, {})
    prefix = split_url(redis_url)[1]["prefix"]
    await raw.delete(f"{prefix}:{{{channel}}}:meta", f"{prefix}:{{{channel}}}:stream")

    rec = Recorder()
    await reader.attach(channel, parse_id(old_end.id), rec)
    assert [e.type for e in rec.events] == [RESET]
    reset = rec.events[0]
    assert reset.seq == 0
    assert reset.data["reason"] == "unknown-epoch"
    assert parse_id(reset.id).epoch != parse_id(old_end.id).epoch  # a fresh epoch ...

    first = await writer.publish(channel, "token", {})
    assert first.id == f"{parse_id(reset.id).epoch}-1"  # ... that the next publisher uses
    await rec.wait_for(lambda r: len(r.events) == 2)
    assert rec.events[1].id == first.id
    assert rec.closed is None


# Pub/sub housekeeping ----------------------------------------------------------------------------
@pytest.mark.redis
async def test_subscribes_on_first_attach_and_unsubscribes_after_last(
    make_redis_bus: MakeRedisBus, raw: aioredis.Redis
) -> None:
    bus = await make_redis_bus()
    channel = new_channel()
    key = live_key(bus, channel)
    assert await numsub(raw, key) == 0
    one = await bus.attach(channel, None, Recorder())
    two = await bus.attach(channel, None, Recorder())
    assert await numsub(raw, key) == 1  # one subscription per process, not per sink
    one.detach()
    # A negative check: nothing to wait for if the bus is right, so a short bounded pause in
    # which a wrong unsubscribe would have reached Redis.
    await asyncio.sleep(0.01)
    assert await numsub(raw, key) == 1
    two.detach()

    async def unsubscribed() -> bool:
        return await numsub(raw, key) == 0

    await wait_until(unsubscribed)

    # And it comes back on the next attach.
    rec = Recorder()
    again = await bus.attach(channel, None, rec)
    assert await numsub(raw, key) == 1
    await bus.publish(channel, "token", {})
    assert len(rec.events) == 1
    again.detach()


@pytest.mark.redis
async def test_cancelled_attach_leaves_no_subscription(
    make_redis_bus: MakeRedisBus, raw: aioredis.Redis
) -> None:
    bus = await make_redis_bus()
    channel = new_channel()
    key = live_key(bus, channel)
    for steps in range(4):  # cancel at successive points of the attach
        task = asyncio.create_task(bus.attach(channel, None, Recorder()))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        try:
            attachment: Any = await task
        except asyncio.CancelledError:
            pass
        else:
            attachment.detach()

    async def unsubscribed() -> bool:
        return await numsub(raw, key) == 0

    await wait_until(unsubscribed)


@pytest.mark.redis
async def test_lost_pubsub_connection_is_caught_up_from_history(
    make_redis_bus: MakeRedisBus, raw: aioredis.Redis
) -> None:
    bus, other = await make_redis_bus(), await make_redis_bus()
    channel = new_channel()
    rec = Recorder()
    await bus.attach(channel, None, rec)
    published = [await other.publish(channel, "token", {"i": i}) for i in range(3)]
    await rec.wait_for(lambda r: len(r.events) == 3)

    await raw.client_kill_filter(_type="pubsub")
    # Published while the reader reconnects: pub/sub drops them, history does not.
    published += [await other.publish(channel, "token", {"i": i}) for i in range(3, 8)]
    published.append(await other.publish(channel, END, {}))
    await rec.wait_end()
    assert [e.id for e in rec.events] == [e.id for e in published]

    published.append(await other.publish(channel, "token", {"after": "reconnect"}))
    await rec.wait_for(lambda r: len(r.events) == len(published))
    assert [e.id for e in rec.events] == [e.id for e in published]


@pytest.mark.redis
async def test_sinks_of_a_vanished_channel_life_are_closed(
    make_redis_bus: MakeRedisBus, raw: aioredis.Redis, redis_url: str
) -> None:
    bus = await make_redis_bus()
    channel = new_channel()
    rec = Recorder()
    await bus.attach(channel, None, rec)
    old = await bus.publish(channel, "token", {})
    prefix = split_url(redis_url)[1]["prefix"]
    await raw.delete(*await raw.keys(f"{prefix}:*"))  # as FLUSHDB would, for our keys only

    fresh = Recorder()
    await bus.attach(channel, None, fresh)
    new = await bus.publish(channel, "token", {})
    assert new.seq == 1
    assert parse_id(new.id).epoch != parse_id(old.id).epoch
    await rec.wait_for(lambda r: r.closed is not None)
    assert rec.closed == "channel expired"
    assert [e.id for e in rec.events] == [old.id]
    await fresh.wait_for(lambda r: len(r.events) == 1)
    assert [e.id for e in fresh.events] == [new.id]


@pytest.mark.redis
async def test_idle_sink_follows_a_new_life_when_the_reservation_lapses(
    make_redis_bus: MakeRedisBus, raw: aioredis.Redis, redis_url: str
) -> None:
    bus = await make_redis_bus()
    channel = new_channel()
    prefix = split_url(redis_url)[1]["prefix"]
    meta, stream = f"{prefix}:{{{channel}}}:meta", f"{prefix}:{{{channel}}}:stream"
    await bus.publish(channel, END, {})
    await raw.delete(meta, stream)  # expired: the next life takes a fresh epoch
    rec = Recorder()
    await bus.attach(channel, None, rec)  # reserves that fresh epoch
    reserved = await bus.info(channel)
    assert reserved is not None
    assert reserved.last_seq == 0
    assert 0 < await raw.pttl(meta) <= 300_000
    await raw.delete(meta)  # the reservation lapsed before anyone published
    event = await bus.publish(channel, "token", {})
    assert parse_id(event.id).epoch != reserved.epoch
    await rec.wait_for(lambda r: len(r.events) == 1)
    assert [e.id for e in rec.events] == [event.id]
    assert rec.closed is None


@pytest.mark.redis
async def test_finished_channel_expiry_reaches_sinks_attached_after_end(
    make_redis_bus: MakeRedisBus,
) -> None:
    bus, late = await make_redis_bus(ttl=0.3), await make_redis_bus(ttl=0.3)
    channel = new_channel()
    await bus.publish(channel, "token", {})
    await bus.publish(channel, END, {})
    rec = Recorder()
    await late.attach(channel, None, rec)  # learns the remaining ttl from Redis
    assert [e.type for e in rec.events] == ["token", END]
    await rec.wait_for(lambda r: r.closed is not None, timeout=5)
    assert rec.closed == "channel expired"


@pytest.mark.redis
async def test_survives_a_redis_restart() -> None:
    """Redis comes back empty: a new bus epoch, old sinks closed, new ones served."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer() as server:
        bus = Bus(RedisBroker(server.url(prefix="restart"), history=100, ttl=10))
        await bus.start()
        try:
            rec = Recorder()
            await bus.attach("c", None, rec)
            old = await bus.publish("c", "token", {})
            server.restart()

            got: list[Event] = []

            async def published() -> bool:
                try:
                    got.append(await bus.publish("c", "token", {}))
                except BusError:  # until the bus's connections are back
                    return False
                return True

            await wait_until(published)
            new = got[0]
            assert new.seq == 1
            assert parse_id(new.id).epoch != parse_id(old.id).epoch
            await rec.wait_for(lambda r: r.closed is not None)
            assert rec.closed == "channel expired"
            assert [e.id for e in rec.events] == [old.id]

            fresh = Recorder()
            await bus.attach("c", None, fresh)
            assert [e.id for e in fresh.events] == [new.id]
        finally:
            await bus.close()


def live_key(bus: Bus, channel: str) -> bytes:
    broker = bus.broker
    assert isinstance(broker, RedisBroker)
    return broker.live_key(channel)


# Bounds ------------------------------------------------------------------------------------------
@pytest.mark.redis
async def test_the_channel_cap_is_shared_by_every_process(make_redis_bus: MakeRedisBus) -> None:
    first, second = await make_redis_bus(), await make_redis_bus()
    for bus in (first, second):
        broker = bus.broker
        assert isinstance(broker, RedisBroker)
        broker.max_channels = 2
    await first.publish(new_channel(), "token", {})
    await second.publish(new_channel(), "token", {})
    with pytest.raises(TooManyChannels) as raised:
        await first.publish(new_channel(), "token", {})
    assert raised.value.retry_after is not None
    assert 290 < raised.value.retry_after <= 300  # when the first channel expires
    assert (first.limits["too-many-channels"], second.limits["too-many-channels"]) == (1, 0)


@pytest.mark.redis
async def test_byte_cap_accounting_in_the_meta_hash(
    make_redis_bus: MakeRedisBus, raw: aioredis.Redis, redis_url: str
) -> None:
    bus = await make_redis_bus()
    broker = bus.broker
    assert isinstance(broker, RedisBroker)
    broker.history_bytes = 700
    channel = new_channel()
    published = [await bus.publish(channel, "token", {"pad": "x" * (50 * i)}) for i in range(9)]
    prefix = split_url(redis_url)[1]["prefix"]
    meta, stream = f"{prefix}:{{{channel}}}:meta", f"{prefix}:{{{channel}}}:stream"
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await raw.xrange(stream)  # type: ignore[assignment]
    kept = [fields[b"e"] for _, fields in entries]
    assert kept == [e.json for e in published[-len(kept) :]]
    assert len(kept) < 9
    assert sum(map(len, kept)) <= 700 < sum(map(len, kept)) + len(published[-len(kept) - 1].json)
    assert await raw.hget(meta, "bytes") == str(sum(map(len, kept))).encode()
    # Refused without a round trip when surely too large, by the script when just too large.
    with pytest.raises(EventTooLarge):
        await bus.publish(channel, "token", {"pad": "x" * 700})
    assert int(await raw.hget(meta, "last") or 0) == 9


@pytest.mark.redis
async def test_retain_extends_unfinished_channels_only(
    make_redis_bus: MakeRedisBus,
    raw: aioredis.Redis,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("realtime_lab.bus.redis.RETAIN_BATCH", 2)  # three channels: two batches
    bus = await make_redis_bus(ttl=30)
    broker = bus.broker
    assert isinstance(broker, RedisBroker)
    prefix = split_url(redis_url)[1]["prefix"]
    live, done, missing = new_channel(), new_channel(), new_channel()
    await bus.publish(live, "token", {})
    await bus.publish(done, END, {})
    for name in (live, done):
        await raw.pexpire(f"{prefix}:{{{name}}}:meta", 1000)
    await broker.retain([missing, done, live])  # live is in the second batch
    assert 1000 < await raw.pttl(f"{prefix}:{{{live}}}:meta") <= 30_000
    assert 0 < await raw.pttl(f"{prefix}:{{{done}}}:meta") <= 1000  # still ends ttl after end
    assert await raw.exists(f"{prefix}:{{{missing}}}:meta") == 0  # not created


@pytest.mark.redis
async def test_tickets_are_prefixed_keys_with_an_expiry(
    make_redis_bus: MakeRedisBus, raw: aioredis.Redis, redis_url: str
) -> None:
    bus = await make_redis_bus()
    prefix = split_url(redis_url)[1]["prefix"]
    key = "ab" * 32
    await bus.put_ticket(key, b"record", 2.5)
    assert 2000 < await raw.pttl(f"{prefix}:ticket:{key}") <= 2500
    assert await bus.take_ticket(key) == b"record"
    assert await raw.exists(f"{prefix}:ticket:{key}") == 0


def test_bound_options_come_from_the_url() -> None:
    broker = create_bus("redis://h:1/2?history_bytes=512&max_channels=7&socket_timeout=3").broker
    assert isinstance(broker, RedisBroker)
    assert (broker.history_bytes, broker.max_channels) == (512, 7)
    assert split_url("redis://h/0?history_bytes=1&max_channels=2")[0] == "redis://h/0"
    default = create_bus("redis://h:1/2").broker
    assert isinstance(default, RedisBroker)
    assert (default.history_bytes, default.max_channels) == (1 << 20, 10_000)
    with pytest.raises(ValueError, match="max_channels"):
        RedisBroker("redis://h:1/2", history=1, ttl=1, max_channels=0)


@pytest.mark.redis
async def test_a_channel_without_a_byte_count_is_counted_once(
    make_redis_bus: MakeRedisBus, raw: aioredis.Redis, redis_url: str
) -> None:
    bus = await make_redis_bus()
    channel = new_channel()
    events = [await bus.publish(channel, "token", {"i": i}) for i in range(3)]
    prefix = split_url(redis_url)[1]["prefix"]
    meta = f"{prefix}:{{{channel}}}:meta"
    await raw.hdel(meta, "bytes")  # as a channel stored by an older version would be
    events.append(await bus.publish(channel, "token", {"i": 3}))
    assert await raw.hget(meta, "bytes") == str(sum(len(e.json) for e in events)).encode()


@pytest.mark.redis
async def test_a_task_cancelled_mid_command_ends(make_redis_bus: MakeRedisBus) -> None:
    """redis-py can answer a command whose task was cancelled and drop the cancel; ours end."""
    bus = await make_redis_bus()
    broker = bus.broker
    assert isinstance(broker, RedisBroker)
    keys = [uuid.uuid4().hex * 2 for _ in range(3)]

    async def polls_forever() -> None:
        while True:  # as the lease and retain loops do; only a cancel ends it
            await broker.take_ticket(keys[0])
            await broker.put_ticket(keys[1], b"v", 30)
            await broker.chat_store().get(keys[2])  # type: ignore[union-attr]

    loop = asyncio.get_running_loop()
    for attempt in range(60):
        task = asyncio.create_task(polls_forever())
        # Cancel at a different point of the commands each time (never at the first await).
        due = loop.time() + 0.0005 * (attempt % 12 + 1)
        while loop.time() < due:
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done, f"attempt {attempt}: the task ran on after its cancel"
        assert task.cancelled()


@pytest.mark.redis
async def test_commands_beyond_the_pool_wait_for_a_connection(redis_url: str) -> None:
    """At ``max_connections`` a command waits for a free connection instead of failing."""
    bus = create_bus(redis_url + "&max_connections=2")
    await bus.start()
    try:
        channels = [new_channel() for _ in range(40)]
        events = await asyncio.gather(*(bus.publish(name, "token", {}) for name in channels))
        assert [event.seq for event in events] == [1] * 40
        broker = bus.broker
        assert isinstance(broker, RedisBroker)
        pool = broker._check_open().connection_pool
        assert pool.max_connections == 2
    finally:
        await bus.close()
