"""A Redis Cluster primary dies: its replica takes over and the bus carries on, nothing lost.

These tests kill nodes, so they have a cluster of their own (not the session's).
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from realtime_lab.bus import Bus, create_bus
from realtime_lab.bus.cluster import RedisClusterBroker
from realtime_lab.errors import BusUnavailable
from realtime_lab.protocol.cursor import Cursor
from realtime_lab.protocol.envelope import END, Event
from tests.redis_server import (
    ClusterControl,
    RedisClusterServers,
    redis_cli_binary,
    redis_server_binary,
)

from .conftest import Recorder

pytestmark = pytest.mark.redis


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterServers]:
    if redis_server_binary() is None or redis_cli_binary() is None:
        pytest.skip("redis-server and redis-cli are not installed (apt-get install redis-server)")
    with RedisClusterServers(primaries=3, replicas=1) as cluster:
        yield cluster


@pytest.fixture
async def buses(own_cluster: RedisClusterServers) -> AsyncIterator[tuple[Bus, Bus]]:
    url = own_cluster.url(prefix=f"t{uuid.uuid4().hex[:8]}")
    publisher, follower = create_bus(url), create_bus(url)
    await publisher.start()
    await follower.start()
    yield publisher, follower
    await follower.close()
    await publisher.close()


async def publish_through(bus: Bus, channel: str, type: str, data: dict[str, int]) -> Event:
    """Publish, retrying while the cluster fails over (503s meanwhile), for at most 20 s."""
    async with asyncio.timeout(20):
        while True:
            try:
                return await bus.publish(channel, type, data)
            except BusUnavailable:
                await asyncio.sleep(0.05)


async def test_a_failover_in_sync_loses_nothing(
    own_cluster: RedisClusterServers, buses: tuple[Bus, Bus]
) -> None:
    publisher, follower = buses
    control = ClusterControl(own_cluster)
    broker = follower.broker
    assert isinstance(broker, RedisClusterBroker)
    channel = f"ch-{uuid.uuid4().hex[:8]}"
    key = broker.live_key(channel)
    primary = control.owner(key_slot(key))
    (replica,) = await asyncio.to_thread(control.replicas_of, primary)
    rec = Recorder()
    await follower.attach(channel, None, rec)
    published = [await publisher.publish(channel, "token", {"i": i}) for i in range(1, 11)]
    client = aioredis.Redis(host="127.0.0.1", port=primary)
    try:
        assert await client.execute_command("WAIT", 1, 5000) == 1  # the replica has them all
    finally:
        await client.aclose()
    await rec.wait_for(lambda r: len(r.events) == 10)

    assert await broker.health() is None
    control.node(primary).process.kill()  # type: ignore[union-attr]  # a crash, not a shutdown
    reason = await broker.health()
    assert reason is not None
    assert "unreachable" in reason
    for i in range(11, 21):
        published.append(await publish_through(publisher, channel, "token", {"i": i}))
    published.append(await publish_through(publisher, channel, END, {}))
    assert await publisher.broker.health() is None  # the replica took over

    await rec.wait_end(timeout=20)
    assert [e.id for e in rec.events] == [e.id for e in published]
    assert rec.closed is None
    assert broker._key_shard[key].name == f"127.0.0.1:{replica}"  # the promoted replica


async def test_a_failover_that_lost_acknowledged_events_is_detected(
    own_cluster: RedisClusterServers, buses: tuple[Bus, Bus]
) -> None:
    """The replica is cut off, 5 more events are acknowledged, the primary dies: the channel
    goes on after them (no id given twice) and a position before them gets a ``reset``."""
    publisher, follower = buses
    control = ClusterControl(own_cluster)
    channel = f"ch-{uuid.uuid4().hex[:8]}"
    key = follower.broker.live_key(channel)  # type: ignore[attr-defined]
    primary = control.owner(key_slot(key))
    (replica,) = await asyncio.to_thread(control.replicas_of, primary)
    rec = Recorder()
    await follower.attach(channel, None, rec)
    published = [await publisher.publish(channel, "token", {"i": i}) for i in range(1, 11)]
    epoch = published[0].id.rpartition("-")[0]
    client = aioredis.Redis(host="127.0.0.1", port=primary)
    replica_process = control.node(replica).process
    assert replica_process is not None
    try:
        assert await client.execute_command("WAIT", 1, 5000) == 1
        # Stopped, the replica cannot reconnect: what follows never reaches it.
        replica_process.send_signal(signal.SIGSTOP)
        await client.execute_command("CLIENT KILL TYPE replica")
        published += [await publisher.publish(channel, "token", {"i": i}) for i in range(11, 16)]
        await rec.wait_for(lambda r: len(r.events) == 15)  # acknowledged and seen live
    finally:
        await client.aclose()
        control.node(primary).process.kill()  # type: ignore[union-attr]
        replica_process.send_signal(signal.SIGCONT)

    after = await publish_through(publisher, channel, "token", {"i": 16})
    assert after.id == f"{epoch}-16"  # not -11: no id is given twice
    await rec.wait_for(lambda r: len(r.events) == 16, timeout=20)
    assert [e.id for e in rec.events] == [e.id for e in [*published, after]]
    brokers = [publisher.broker, follower.broker]
    assert sum(b.lost_lives for b in brokers) == 1  # type: ignore[attr-defined]

    # Whoever resumes from before the loss is told, not left with a silent gap.
    replay = await follower.replay(channel, Cursor(epoch, 12))
    assert replay.reset is not None
    assert replay.reset.data["reason"] == "events-lost"
    assert [e.id for e in replay.events[1:]] == [after.id]
    info = await follower.info(channel)
    assert info is not None
    assert (info.lost, info.first_seq, info.last_seq) == (15, 16, 16)
