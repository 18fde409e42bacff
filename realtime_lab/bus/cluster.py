"""``redis+cluster://``: several server processes share one feed through a Redis Cluster.

URL: ``redis+cluster://host:port[,host:port...]/?prefix=rtlab&history=1000&ttl=300`` (any node
of the cluster will do; more are tried when the first is down). ``history``, ``history_bytes``,
``ttl``, ``max_channels`` and ``prefix`` mean what they mean for ``redis://``
(:mod:`realtime_lab.bus.redis`, whose scripts this broker runs); ``socket_timeout`` and
``socket_connect_timeout`` (seconds), ``username`` and ``password`` go to redis-py.

Keys: every key of a channel carries the hash tag ``{<channel>}`` (``{<sha1 of the name>}`` when
the name itself holds a brace), so one channel's keys, its scripts and its sharded pub/sub channel
live in one slot, on one shard:

``<prefix>:{ch}:meta``, ``<prefix>:{ch}:stream``, ``<prefix>:{ch}:gone``
    as on ``redis://``.
``<prefix>:{ch}:live``
    the sharded pub/sub channel (``SPUBLISH`` from the publish script): an event crosses only
    its shard, never the whole cluster as classic ``PUBLISH`` would.
``<prefix>:{<slot tag>}:epoch``
    the epoch of the first life of the channels of one hash slot (the single-node bus epoch, one
    per slot): a script reads it in the slot it runs in. ``<slot tag>`` is the shortest hex
    string that hashes to that slot (:func:`slot_tag`). A flushed or lost slot starts a new one.
``<prefix>:{idx<k>}:channels``, ``k`` in ``0..INDEX_BUCKETS-1``
    the channel index, split into :data:`INDEX_BUCKETS` buckets, each a sorted set in a slot of
    its own (so on the shards in turn: no key that every process writes to), a channel's name
    in bucket ``crc32(name) % INDEX_BUCKETS``. It is touched only when a channel life begins (to
    count it against ``max_channels``) and, at the cap, to drop names that expired: never per
    event. A channel's scripts run in the channel's slot and cannot reach it, so a new channel
    is admitted in two steps: the script answers "admit me" (``{-2}``), the broker counts the
    other buckets (``ZCARD``) and adds the name to its own bucket if the total leaves room
    (:data:`ADMIT_LUA`, which checks its bucket's own count atomically), then runs the script
    again, admitted. Two new channels admitted at the same moment on two buckets can both take
    the last place: the cap is exact for admissions one after the other, and over by at most the
    admissions in flight otherwise. The scores are lower bounds of the channels' expiry
    (publishes do not refresh them): at the cap, the names whose score has passed, in every
    bucket, are checked against their ``meta`` key and rescored or dropped
    (:data:`RECONCILE_LUA`) before the channel is refused.
``<prefix>:ticket:<key>``
    one ticket record, in its own slot.

Live events: one sharded pub/sub connection and one reader task per shard (primary) this
process follows channels on, whatever the number of subscribers: the hub subscribes a channel
once per process. MOVED/ASK on commands are followed by redis-py's ``RedisCluster``. When the
topology changes under a subscription (Redis tells a slot's subscribers ``sunsubscribe`` when
the slot moves, a reader's connection fails, or a node answers ``SSUBSCRIBE`` with MOVED), the
broker reloads the slot map, moves each subscription to its slot's new owner, and the new
owner's confirmation tells the hub about a gap (:meth:`LiveHandler.on_gap`): the hub reads what
was published meanwhile from history, so nothing is lost or delivered twice. A failover whose
replica lacked acknowledged events is detected as on ``redis://`` (``repair`` in the scripts):
the channel goes on after them and older positions get a ``reset`` (``events-lost``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import zlib
from binascii import crc_hqx
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import RedisClusterException, RedisError

from realtime_lab.bus.redis import (
    PUBLISH_LUA,
    READ_LUA,
    RETAIN_BATCH,
    RETAIN_LUA,
    RedisBroker,
    _Sub,
)
from realtime_lab.bus.tasks import raise_if_cancelling
from realtime_lab.errors import BusClosed, BusError, BusUnavailable

log = logging.getLogger(__name__)

#: Names of the index whose score has passed, checked per attempt at the cap.
STALE_BATCH: Final = 32
#: Buckets of the channel index, each in a slot of its own (see the module docstring).
INDEX_BUCKETS: Final = 16
#: Reconnect pauses of a shard reader.
RECONNECT_FIRST_S: Final = 0.05
RECONNECT_MAX_S: Final = 2.0
_REDIS_PY_OPTIONS: Final = {
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "username": str,
    "password": str,
}

# KEYS: one bucket of the channel index. ARGV: channel name, ms it is counted for (a lower
# bound of its expiry), the room left in this bucket (max channels minus the other buckets'
# count). Returns {1} when the channel is counted (it was, or there was room), else {-1, now
# in ms}: the broker then reconciles the names whose score has passed, in every bucket
# (RECONCILE_LUA), and tries once more.
ADMIT_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local index, name = KEYS[1], ARGV[1]
local score = now + tonumber(ARGV[2])
if redis.call('ZSCORE', index, name) or redis.call('ZCARD', index) < tonumber(ARGV[3]) then
  redis.call('ZADD', index, 'GT', score, name)
  redis.call('ZADD', index, 'NX', score, name)
  return {1}
end
return {-1, now}
"""

# KEYS: one bucket of the channel index. ARGV: pairs of (name, PTTL of its meta key). A name
# whose channel is gone (PTTL < 0) is dropped unless it was counted again meanwhile; the others
# are rescored.
RECONCILE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local index = KEYS[1]
for i = 1, #ARGV, 2 do
  local name, left = ARGV[i], tonumber(ARGV[i + 1])
  local score = redis.call('ZSCORE', index, name)
  if score and tonumber(score) < now then
    if left < 0 then
      redis.call('ZREM', index, name)
    else
      redis.call('ZADD', index, 'XX', now + left, name)
    end
  end
end
return 1
"""

_slot_tags: list[str] | None = None
_slot_tags_lock = threading.Lock()


def slot_tags() -> list[str]:
    """For each hash slot, the shortest hex string that hashes to it (computed once, ~0.3 s)."""
    global _slot_tags
    with _slot_tags_lock:
        if _slot_tags is None:
            table: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
            left, n = REDIS_CLUSTER_HASH_SLOTS, 0
            while left:
                tag = b"%x" % n
                slot = crc_hqx(tag, 0) % REDIS_CLUSTER_HASH_SLOTS  # key_slot() of a plain key
                if table[slot] is None:
                    table[slot] = tag.decode()
                    left -= 1
                n += 1
            _slot_tags = [tag for tag in table if tag is not None]
        return _slot_tags


def slot_tag(slot: int) -> str:
    """A hash tag that puts a key in ``slot``."""
    return slot_tags()[slot]


def channel_tag(channel: str) -> str:
    """The hash tag of a channel's keys: its name, or a digest when the name holds a brace."""
    if "{" in channel or "}" in channel or not channel:
        return hashlib.sha1(channel.encode()).hexdigest()
    return channel


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The nodes of a ``redis+cluster://`` URL and the redis-py options of its query.

    Raises:
        ValueError: no node, a bad port, or an option this broker does not know.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    options: dict[str, Any] = {}
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        user, colon, password = auth.partition(":")
        if colon:
            options["password"] = password
            if user:
                options["username"] = user
        elif user:
            options["password"] = user
    nodes: list[tuple[str, int]] = []
    for item in netloc.split(","):
        item = item.strip()
        if not item:
            continue
        host, colon, port = item.rpartition(":")
        if not colon:
            host, port = item, "6379"
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad port in redis cluster node {item!r}")
        nodes.append((host.strip("[]") or "127.0.0.1", int(port)))
    if not nodes:
        raise ValueError("a redis+cluster:// URL names at least one host:port")
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ("history", "ttl", "prefix", "history_bytes", "max_channels"):
            continue
        convert = _REDIS_PY_OPTIONS.get(key)
        if convert is None:
            raise ValueError(f"unknown option {key!r} in a redis+cluster:// URL")
        options[key] = convert(value)
    return nodes, options


@dataclass(eq=False)
class _Shard:
    """The sharded pub/sub connection to one primary, and the live keys subscribed on it."""

    name: str  # host:port
    client: aioredis.Redis
    pubsub: Any  # redis.asyncio.client.PubSub (untyped)
    keys: set[bytes] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    handshaking: bool = True
    retired: bool = False


class RedisClusterBroker(RedisBroker):
    """The Redis Cluster broker (see the module docstring)."""

    def __init__(
        self,
        url: str,
        history: int | None = None,
        ttl: float | None = None,
        *,
        prefix: str | None = None,
        history_bytes: int | None = None,
        max_channels: int | None = None,
    ) -> None:
        nodes, options = parse_cluster_url(url)
        super().__init__(
            url,
            history,
            ttl,
            prefix=prefix,
            history_bytes=history_bytes,
            max_channels=max_channels,
        )
        self._nodes, self._options = nodes, options
        self._where = ",".join(f"{host}:{port}" for host, port in nodes)
        self._publish_command = "SPUBLISH"
        self._cluster: RedisCluster | None = None
        self._admit_script: Any = None
        self._reconcile_script: Any = None
        self._shards: dict[str, _Shard] = {}
        self._key_shard: dict[bytes, _Shard] = {}
        self._unplaced: set[bytes] = set()  # live keys waiting for a slot owner
        self._topology_lock = asyncio.Lock()
        self._rerouting: asyncio.Task[None] | None = None
        self._index_keys = [f"{self.prefix}:{{idx{k}}}:channels" for k in range(INDEX_BUCKETS)]

    # Keys --------------------------------------------------------------------------------------
    def _keys(self, channel: str) -> list[str]:
        tag = f"{self.prefix}:{{{channel_tag(channel)}}}"
        slot = key_slot(tag.encode())
        return [
            f"{tag}:meta",
            f"{tag}:stream",
            f"{tag}:gone",
            f"{self.prefix}:{{{slot_tag(slot)}}}:epoch",
        ]

    def live_key(self, channel: str) -> bytes:
        """The sharded pub/sub channel carrying ``channel``'s events (in the channel's slot)."""
        return f"{self.prefix}:{{{channel_tag(channel)}}}:live".encode()

    # Lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to the cluster (learn its slots) and load the scripts. Idempotent.

        Raises:
            BusUnavailable: no node named in the URL answers.
        """
        if self._closed:
            raise BusClosed("the bus is closed")
        if self._cluster is not None:
            return
        await asyncio.to_thread(slot_tags)
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in self._nodes],
            decode_responses=False,
            **self._options,
        )
        try:
            await cluster.initialize()
        except BaseException as exc:
            await cluster.aclose()
            if isinstance(exc, RedisError | RedisClusterException | OSError):
                raise BusUnavailable(f"cannot reach redis cluster at {self._where}: {exc}") from exc
            raise
        self._cluster = cluster
        self._publish_script = cluster.register_script(PUBLISH_LUA)
        self._read_script = cluster.register_script(READ_LUA)
        self._retain_script = cluster.register_script(RETAIN_LUA)
        self._admit_script = cluster.register_script(ADMIT_LUA)
        self._reconcile_script = cluster.register_script(RECONCILE_LUA)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        shards = list(self._shards.values())
        try:
            await self._background.cancel_all()  # the readers and reroutes, retired ones too
        finally:
            for sub in self._subs.values():
                self._forget(sub)
            self._subs.clear()
            for shard in shards:
                await _close_shard(shard)
            self._shards.clear()
            if self._cluster is not None:
                await self._cluster.aclose()

    def _check_open(self) -> Any:
        if self._closed:
            raise BusClosed("the bus is closed")
        if self._cluster is None:
            raise BusError("the redis bus is not started: await bus.start() first")
        return self._cluster

    async def health(self) -> str | None:
        """``None`` when every slot's primary answers, else why not (what ``/api/health`` says)."""
        cluster = self._check_open()
        try:
            async with asyncio.timeout(2.0):
                await cluster.ping(target_nodes=RedisCluster.PRIMARIES)
        except (RedisError, OSError, TimeoutError) as exc:
            return f"redis cluster at {self._where} is unreachable: {exc or 'no answer within 2 s'}"
        return None

    # Scripts and the channel index -------------------------------------------------------------
    async def _run(
        self, script: Any, channel: str, keys: list[str], args: list[Any], life_ms: str
    ) -> Any:
        result = await self._call(script, keys, args)
        if result[0] != -2:
            return result
        await self._admit(channel, life_ms)
        args = list(args)
        args[13] = "1"  # ARGV[14] of both scripts: admitted
        return await self._call(script, keys, args)

    def index_key(self, channel: str) -> str:
        """The bucket of the channel index that counts ``channel``."""
        return self._index_keys[zlib.crc32(channel.encode()) % INDEX_BUCKETS]

    async def _admit(self, channel: str, life_ms: str) -> None:
        """Count a new channel in the index, or raise the refusal (see the module docstring)."""
        cluster = self._check_open()
        own = self.index_key(channel)
        others = [key for key in self._index_keys if key != own]
        for attempt in range(2):
            try:
                counts = await asyncio.gather(*(cluster.zcard(key) for key in others))
            except (RedisError, OSError) as exc:
                raise self.unavailable(exc) from exc
            raise_if_cancelling()
            room = self.max_channels - sum(int(count) for count in counts)
            result = await self._call(self._admit_script, [own], [channel, life_ms, max(room, 0)])
            if result[0] == 1:
                return
            now_ms = int(result[1])
            if attempt or not await self._reconcile(now_ms):
                raise self._refusal(channel, b"too-many-channels", await self._next_room(now_ms))

    async def _next_room(self, now_ms: int) -> int:
        """Ms until the oldest score of the index passes (-1 if it holds none): a refusal's
        ``Retry-After``."""
        cluster = self._check_open()
        try:
            oldest = await asyncio.gather(
                *(cluster.zrange(key, 0, 0, withscores=True) for key in self._index_keys)
            )
        except (RedisError, OSError) as exc:
            raise self.unavailable(exc) from exc
        raise_if_cancelling()
        scores = [float(entry[0][1]) for entry in oldest if entry]
        return max(int(min(scores)) - now_ms, 0) if scores else -1

    async def _reconcile(self, now_ms: int) -> bool:
        """Check the index's names whose score passed ``now_ms`` against their channels, in
        every bucket; whether there were any (a second admission may then find room)."""
        cluster = self._check_open()
        try:
            stale = await asyncio.gather(
                *(
                    cluster.zrangebyscore(key, "-inf", f"({now_ms}", start=0, num=STALE_BATCH)
                    for key in self._index_keys
                )
            )
            raise_if_cancelling()
            found = False
            for key, raw in zip(self._index_keys, stale, strict=True):
                if not raw:
                    continue
                found = True
                names = [name.decode() if isinstance(name, bytes) else name for name in raw]
                left = await asyncio.gather(*(cluster.pttl(self._keys(n)[0]) for n in names))
                pairs: list[Any] = []
                for name, ms in zip(names, left, strict=True):
                    pairs += [name, int(ms)]
                await self._call(self._reconcile_script, [key], pairs)
        except (RedisError, OSError) as exc:
            raise self.unavailable(exc) from exc
        return found

    async def retain(self, channels: Collection[str]) -> None:
        self._check_open()
        names = list(channels)
        for start in range(0, len(names), RETAIN_BATCH):
            # Each script runs in its channel's slot; the batch goes out at once.
            await asyncio.gather(
                *(
                    self._call(
                        self._retain_script,
                        self._keys(name),
                        [self._ttl_ms, self._tombstone_ms, name],
                    )
                    for name in names[start : start + RETAIN_BATCH]
                )
            )

    # Tickets: RedisBroker's put_ticket/take_ticket run as they are, each key in its own slot.

    # Sharded subscriptions ---------------------------------------------------------------------
    def _drop_sub(self, sub: _Sub) -> None:
        if self._subs.get(sub.key) is sub:
            del self._subs[sub.key]
        self._forget(sub)
        shard = self._key_shard.pop(sub.key, None)
        if shard is not None:
            shard.keys.discard(sub.key)
        self._unplaced.discard(sub.key)

    async def _send(self, command: str, key: bytes) -> None:
        """SSUBSCRIBE a live key on its slot's owner, or SUNSUBSCRIBE it where it is."""
        if command == "SUBSCRIBE":
            shard = self._key_shard.get(key)
            if shard is None:
                shard = self._owner_shard(key)
                if shard is None:
                    self._unplaced.add(key)
                    self._reroute_soon()
                    return
                self._key_shard[key] = shard
                shard.keys.add(key)
            await self._shard_send(shard, "SSUBSCRIBE", key)
            return
        self._unplaced.discard(key)
        shard = self._key_shard.pop(key, None)
        if shard is not None:
            shard.keys.discard(key)
        else:
            shard = self._owner_shard(key, create=False)  # a stray: where it should be
        if shard is not None:
            await self._shard_send(shard, "SUNSUBSCRIBE", key)

    def _owner_shard(self, key: bytes, *, create: bool = True) -> _Shard | None:
        """The reader of the primary that owns ``key``'s slot (started when missing)."""
        cluster = self._check_open()
        try:
            node = cluster.get_node_from_key(key)
        except RedisError:
            return None
        if node is None:
            return None
        shard = self._shards.get(node.name)
        if shard is None and create:
            client = aioredis.Redis(
                host=node.host,
                port=node.port,
                decode_responses=False,
                retry=Retry(NoBackoff(), 0, ()),
                **self._options,
            )
            shard = _Shard(node.name, client, client.pubsub())
            self._shards[node.name] = shard
            shard.task = self._background.spawn(
                self._shard_loop(shard), f"redis-cluster-reader {node.name}"
            )
        return shard

    async def _shard_send(self, shard: _Shard, command: str, key: bytes) -> None:
        conn = shard.pubsub.connection
        if conn is None or not conn.is_connected or shard.handshaking:
            return  # the reader (re)subscribes shard.keys once connected
        try:
            await conn.send_command(command, key, check_health=False)
        except Exception as exc:
            log.warning("%s %r on %s failed: %r", command, key, shard.name, exc)

    async def _shard_loop(self, shard: _Shard) -> None:
        """Read one shard's sharded pub/sub connection; reconnect, or hand its keys over."""
        delay = RECONNECT_FIRST_S
        try:
            while not shard.retired:
                try:
                    conn = shard.pubsub.connection
                    if conn is None or not conn.is_connected:
                        shard.handshaking = True
                        try:
                            if conn is None:
                                await shard.pubsub.connect()
                            else:
                                await conn.connect()
                            await self._resubscribe(shard)
                        finally:
                            shard.handshaking = False
                    response = await shard.pubsub.parse_response(block=True)
                    message = await shard.pubsub.handle_message(response)
                    raise_if_cancelling()
                except (RedisError, OSError) as exc:
                    # Logged once per outage, not once per reconnect attempt.
                    level = logging.WARNING if delay == RECONNECT_FIRST_S else logging.DEBUG
                    log.log(level, "redis cluster pub/sub at %s failed (%s)", shard.name, exc)
                    conn = shard.pubsub.connection
                    if conn is not None:
                        await conn.disconnect(nowait=True)
                    # Maybe the topology changed (a failover, a moved slot): find the owners.
                    await self._reroute()
                    if shard.retired:
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX_S)
                    continue
                delay = RECONNECT_FIRST_S
                if message is None:
                    continue
                if message["type"] == "sunsubscribe":
                    key = message["channel"]
                    if key in self._subs and self._key_shard.get(key) is shard:
                        # Not ours: Redis dropped it, its slot moved. Find the new owner.
                        self._reroute_soon()
                    continue
                try:
                    self._dispatch(message)
                except Exception:
                    log.exception("redis cluster bus failed to dispatch %r", message)
        finally:
            if shard.retired:
                await _close_shard(shard)

    async def _resubscribe(self, shard: _Shard) -> None:
        """SSUBSCRIBE every key of the shard, one command each (they span slots)."""
        conn = shard.pubsub.connection
        sent: set[bytes] = set()
        while todo := shard.keys - sent:
            for key in todo:
                await conn.send_command("SSUBSCRIBE", key, check_health=False)
            sent |= todo

    def _reroute_soon(self) -> None:
        if self._rerouting is None and not self._closed:
            self._rerouting = self._background.spawn(self._reroute_task(), "redis-cluster-reroute")

    async def _reroute_task(self) -> None:
        try:
            await self._reroute()
        finally:
            self._rerouting = None

    async def _reroute(self) -> None:
        """Reload the slot map and move every subscription to its slot's owner."""
        if self._closed:
            return
        cluster = self._check_open()
        async with self._topology_lock:
            try:
                await cluster.nodes_manager.initialize()
            except (RedisError, OSError) as exc:
                log.warning("reloading the redis cluster slots failed (%s)", exc)
                return
            for key in list(self._subs):
                old = self._key_shard.get(key)
                new = self._owner_shard(key)
                if new is None or new is old:
                    continue
                if old is not None:
                    old.keys.discard(key)
                    await self._shard_send(old, "SUNSUBSCRIBE", key)
                self._unplaced.discard(key)
                self._key_shard[key] = new
                new.keys.add(key)
                # Its confirmation there tells the hub of a gap (the sub is confirmed already);
                # one not yet confirmed is confirmed by it.
                await self._shard_send(new, "SSUBSCRIBE", key)
            current = asyncio.current_task()
            for name, shard in list(self._shards.items()):
                if shard.keys:
                    continue
                del self._shards[name]
                shard.retired = True
                if shard.task is not None and shard.task is not current:
                    shard.task.cancel()


async def _close_shard(shard: _Shard) -> None:
    try:
        await shard.pubsub.aclose()
    finally:
        await shard.client.aclose()


__all__ = ["RedisClusterBroker", "channel_tag", "parse_cluster_url", "slot_tag"]
