"""What the Redis Cluster bus does beyond the contract: slots, sharded pub/sub, moved slots."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from realtime_lab.bus import Bus, create_broker, create_bus
from realtime_lab.bus.cluster import RedisClusterBroker, channel_tag, parse_cluster_url, slot_tag
from realtime_lab.errors import UnknownBusBackend
from realtime_lab.protocol.envelope import END, Event
from tests.redis_server import ClusterControl, RedisClusterServers

from .conftest import Recorder, wait_until

pytestmark = pytest.mark.redis

MakeBus = Callable[..., Awaitable[Bus]]


def new_channel() -> str:
    return f"ch-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def make_cluster_bus(cluster_url: str) -> AsyncIterator[MakeBus]:
    made: list[Bus] = []

    async def make(**options: int | float) -> Bus:
        bus = create_bus(cluster_url, **options)
        await bus.start()
        made.append(bus)
        return bus

    yield make
    for bus in reversed(made):
        await bus.close()


def broker_of(bus: Bus) -> RedisClusterBroker:
    assert isinstance(bus.broker, RedisClusterBroker)
    return bus.broker


async def node_client(port: int) -> aioredis.Redis:
    return aioredis.Redis(host="127.0.0.1", port=port, decode_responses=False)


def test_url_names_nodes_and_options() -> None:
    nodes, options = parse_cluster_url(
        "redis+cluster://:secret@10.0.0.1:7000,10.0.0.2:7001/?prefix=p&socket_timeout=2.5"
    )
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert options == {"password": "secret", "socket_timeout": 2.5}
    with pytest.raises(ValueError, match="unknown option"):
        parse_cluster_url("redis+cluster://h:1/?decode_responses=1")
    with pytest.raises(ValueError, match="at least one"):
        parse_cluster_url("redis+cluster:///")
    broker = create_broker("redis+cluster://h:1,h:2/?prefix=px&history=7&max_channels=9")
    assert isinstance(broker, RedisClusterBroker)
    assert (broker.prefix, broker.history, broker.max_channels) == ("px", 7, 9)
    with pytest.raises(UnknownBusBackend):
        create_broker("redis+nope://h:1/")


def test_every_key_of_a_channel_is_in_its_slot() -> None:
    broker = RedisClusterBroker("redis+cluster://h:1/?prefix=p", history=10, ttl=60)
    for channel in ("chat.abc", "a{b}c", "}x", ""):
        keys = [k.encode() for k in broker._keys(channel)] + [broker.live_key(channel)]
        assert len({key_slot(k) for k in keys}) == 1, channel
    assert channel_tag("chat.abc") == "chat.abc"
    assert broker._keys("chat.abc")[0] == "p:{chat.abc}:meta"
    assert all(key_slot(slot_tag(s).encode()) == s for s in (0, 1, 5000, 16383))


async def test_live_events_cross_only_their_shard(
    make_cluster_bus: MakeBus, redis_cluster: RedisClusterServers
) -> None:
    """Sharded pub/sub: one subscription per process on the owner, none anywhere else."""
    bus = await make_cluster_bus()
    other = await make_cluster_bus()
    broker = broker_of(bus)
    control = ClusterControl(redis_cluster)
    channels = [new_channel() for _ in range(12)]
    recorders = [Recorder() for _ in range(24)]
    for index, rec in enumerate(recorders):  # two sinks per channel: still one subscription
        await bus.attach(channels[index % len(channels)], None, rec)
    for channel in channels:
        await other.publish(channel, "token", {"c": channel})
    for index, rec in enumerate(recorders):
        await rec.wait_for(lambda r: len(r.events) == 1)
        assert rec.events[0].data == {"c": channels[index % len(channels)]}

    owners = {control.owner(key_slot(broker.live_key(c))) for c in channels}
    assert set(broker._shards) == {f"127.0.0.1:{port}" for port in owners}  # one reader each
    for channel in channels:
        key = broker.live_key(channel)
        owner = control.owner(key_slot(key))
        for port in control.primaries():
            client = await node_client(port)
            try:
                counts = dict(await client.execute_command("PUBSUB SHARDNUMSUB", key))
                classic = dict(await client.execute_command("PUBSUB NUMSUB", key))
            finally:
                await client.aclose()
            assert counts[key] == (1 if port == owner else 0), (channel, port)
            assert classic[key] == 0


async def test_publishing_touches_the_index_only_for_a_new_channel(
    make_cluster_bus: MakeBus, redis_cluster: RedisClusterServers
) -> None:
    bus = await make_cluster_bus()
    broker = broker_of(bus)
    channel = new_channel()
    await bus.publish(channel, "token", {})
    cluster = broker._check_open()
    index = broker.index_key(channel)
    first = await cluster.zscore(index, channel)
    assert first is not None
    for _ in range(5):
        await bus.publish(channel, "token", {})
    assert await cluster.zscore(index, channel) == first
    epoch_key = broker._keys(channel)[3]
    assert epoch_key.startswith(f"{broker.prefix}:{{")
    assert (await cluster.get(epoch_key)) is not None


async def test_every_key_is_in_the_slot_of_a_channel_or_of_an_index_bucket(
    make_cluster_bus: MakeBus, redis_cluster: RedisClusterServers
) -> None:
    """No key every channel shares: each key of a channel's life is in the channel's slot, the
    index's buckets spread over the shards; a ticket is a key of its own (the process registry
    of shared chats, ``<prefix>:procs``, is not made by the bus itself)."""
    control = ClusterControl(redis_cluster)
    bus = await make_cluster_bus()
    broker = broker_of(bus)
    channels = [new_channel() for _ in range(40)]
    for channel in channels:
        await bus.publish(channel, "token", {})
    await bus.publish(channels[0], END, {})
    await broker.put_ticket(uuid.uuid4().hex * 2, b"v", 30)
    keys: list[bytes] = []
    for port in control.primaries():
        client = await node_client(port)
        try:
            keys += [key async for key in client.scan_iter(match=f"{broker.prefix}:*")]
        finally:
            await client.aclose()
    assert keys
    ticket = f"{broker.prefix}:ticket:".encode()
    untagged = [
        key for key in keys if not key.startswith(ticket) and (b"{" not in key or b"}" not in key)
    ]
    assert untagged == [], untagged
    buckets = {broker.index_key(channel) for channel in channels}
    assert len(buckets) > 1
    owners = {control.owner(key_slot(key.encode())) for key in buckets}
    assert len(owners) > 1  # the buckets are on more than one shard
    counted = 0
    cluster = broker._check_open()
    for bucket in buckets:
        counted += int(await cluster.zcard(bucket))
    assert counted == len(channels)


async def follow_while_the_slot_moves(
    make_cluster_bus: MakeBus, control: ClusterControl, total: int = 200
) -> tuple[list[Recorder], list[Event], RedisClusterBroker, int]:
    """Publish ``total`` events from one process while another follows; move the slot halfway."""
    publisher, follower = await make_cluster_bus(), await make_cluster_bus()
    broker = broker_of(follower)
    channel = new_channel()
    slot = key_slot(broker.live_key(channel))
    source = control.owner(slot)
    target = next(port for port in control.primaries() if port != source)
    recs = [Recorder(), Recorder()]
    await follower.attach(channel, None, recs[0])
    published: list[Event] = []
    moved = asyncio.Event()

    async def produce() -> None:
        for i in range(1, total + 1):
            published.append(await publisher.publish(channel, "token", {"i": i}))
            if i == total // 2:
                moved.set()
            await asyncio.sleep(0.002 if i % 5 == 0 else 0)
        published.append(await publisher.publish(channel, END, {}))

    producer = asyncio.create_task(produce())
    await moved.wait()
    await asyncio.to_thread(control.migrate_slot, slot, target)
    await follower.attach(channel, None, recs[1])  # attached after the move
    async with asyncio.timeout(30):
        await producer
    return recs, published, broker, target


async def test_a_moved_slot_loses_and_repeats_nothing(
    make_cluster_bus: MakeBus, redis_cluster: RedisClusterServers
) -> None:
    control = ClusterControl(redis_cluster)
    recs, published, broker, target = await follow_while_the_slot_moves(make_cluster_bus, control)
    for rec in recs:
        await rec.wait_end(timeout=15)
        assert [e.id for e in rec.events] == [e.id for e in published]
    # The subscription followed the slot to its new owner.
    (key,) = broker._subs
    assert broker._key_shard[key].name == f"127.0.0.1:{target}"


async def test_a_moved_subscription_tells_the_hub_of_a_gap(
    make_cluster_bus: MakeBus, redis_cluster: RedisClusterServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a move nothing else may come: the hub must still read what it missed meanwhile."""
    control = ClusterControl(redis_cluster)
    publisher, follower = await make_cluster_bus(), await make_cluster_bus()
    broker = broker_of(follower)
    channel = new_channel()
    rec = Recorder()
    await follower.attach(channel, None, rec)
    await publisher.publish(channel, "token", {"i": 1})
    await rec.wait_for(lambda r: len(r.events) == 1)
    gaps: list[str] = []
    on_gap = follower.on_gap

    def spy(name: str) -> None:
        gaps.append(name)
        on_gap(name)

    monkeypatch.setattr(follower, "on_gap", spy)
    slot = key_slot(broker.live_key(channel))
    target = next(port for port in control.primaries() if port != control.owner(slot))
    await asyncio.to_thread(control.migrate_slot, slot, target)
    await wait_until(lambda: channel in gaps, timeout=10)
    assert broker._key_shard[broker.live_key(channel)].name == f"127.0.0.1:{target}"
    last = await publisher.publish(channel, "token", {"i": 2})
    await rec.wait_for(lambda r: len(r.events) == 2)
    assert rec.events[-1].id == last.id
