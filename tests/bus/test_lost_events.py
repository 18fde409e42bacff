"""Acknowledged events that Redis lost (a failover, a restart from a stale file) are detected.

Played here on one redis-server by rewinding a channel as a replica without its last writes
would be; ``tests/bus/test_cluster_failover.py`` does it with a real failover.
"""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from realtime_lab.bus import create_bus
from realtime_lab.bus.redis import RedisBroker
from realtime_lab.protocol.cursor import Cursor
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis


async def rewind(port: int, broker: RedisBroker, channel: str, to: int) -> None:
    """Make the channel look as it did after event ``to``: the later ones never happened."""
    meta, stream = broker._keys(channel)[:2]
    raw = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        await raw.hset(meta, mapping={"last": to})
        entries = await raw.xrange(stream, f"{to + 1}-0", "+")
        await raw.xdel(stream, *[entry_id for entry_id, _ in entries])
    finally:
        await raw.aclose()


async def test_events_lost_after_they_were_acknowledged_are_never_reused(
    redis_server: RedisServer, redis_url: str
) -> None:
    publisher, reader = create_bus(redis_url), create_bus(redis_url)
    await publisher.start()
    await reader.start()
    try:
        channel = f"ch-{uuid.uuid4().hex[:8]}"
        events = [await publisher.publish(channel, "token", {"i": i}) for i in range(1, 6)]
        epoch = events[0].id.rpartition("-")[0]
        broker = publisher.broker
        assert isinstance(broker, RedisBroker)
        await rewind(redis_server.port, broker, channel, to=3)

        # A process that knew nothing of events 4 and 5 cannot tell (and is not told).
        assert (await reader.info(channel)).last_seq == 3  # type: ignore[union-attr]
        # The publisher knows it was given 5: the next event is 6, never a second 4.
        after = await publisher.publish(channel, "token", {"i": 6})
        assert after.id == f"{epoch}-6"
        assert broker.lost_lives == 1
        for after_seq, reason in ((3, "events-lost"), (4, "events-lost"), (5, None)):
            replay = await reader.replay(channel, Cursor(epoch, after_seq))
            got = None if replay.reset is None else replay.reset.data["reason"]
            assert got == reason, after_seq
            assert replay.events[-1].id == after.id
        info = await reader.info(channel)
        assert info is not None
        assert (info.lost, info.first_seq, info.last_seq) == (5, 6, 6)
    finally:
        await reader.close()
        await publisher.close()
