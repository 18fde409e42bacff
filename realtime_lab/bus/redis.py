"""``redis://``: several server processes share one feed through Redis.

URL: ``redis://host:port/db?history=1000&ttl=300&prefix=rtlab`` (``rediss://`` for TLS).
``history``, ``history_bytes``, ``ttl`` and ``max_channels`` mean what they mean for the memory
bus; ``prefix`` namespaces every key and pub/sub channel. Any other query option
(``socket_timeout=5``, ``max_connections=100``, ...) is handed to redis-py.

Connections: commands share a redis-py ``BlockingConnectionPool`` of ``max_connections`` (100
unless the URL says otherwise): at the cap a command waits up to :data:`POOL_WAIT_S` for a free
connection, then fails as ``BusUnavailable``. (redis-py's default pool refuses at once with
``MaxConnectionsError``: at 300 chatting users a burst of commands made chats fail to start.)

Keys (``{ch}`` in braces is a hash tag, so that one channel's keys share a Redis Cluster slot;
the scripts also touch the bus epoch key and the channel index, which live in no channel's slot:
on Redis Cluster, ``redis+cluster://`` (:mod:`realtime_lab.bus.cluster`) runs the same scripts
with a per-slot epoch and the index kept apart):

``<prefix>:epoch``
    the bus epoch: the epoch of every channel's first life, as with the memory bus, so that
    ``<epoch>-0``, handed out for a channel nobody has published to yet, stays valid when its
    first event comes. Created when missing: a flushed Redis starts a new bus epoch.
``<prefix>:channels``
    sorted set, the channel index: every channel name, scored by the Redis time (ms) at which
    its keys expire. It counts channels for ``max_channels`` in O(log N): names whose score has
    passed are dropped (O(expired)) before a new channel is counted. One key for the whole
    prefix, in no channel's slot: fine on one Redis, to be split per slot for Cluster.
``<prefix>:{ch}:meta``
    hash: ``epoch`` (this life of the channel), ``last`` (seq of the newest event), ``bytes``
    (envelope bytes in the stream) and ``finished`` (``"1"`` after the first ``end``).
``<prefix>:{ch}:stream``
    stream of the retained events: entry id ``<seq>-0``, one field ``e`` holding the envelope
    JSON, trimmed (exactly, oldest first) to at most ``history`` entries and ``history_bytes``
    bytes of envelope; seqs are consecutive, so the oldest retained seq is ``last - XLEN + 1``
    and "events after seq n" is ``XRANGE (n+1)-0 +``, O(log N + M).
``<prefix>:{ch}:gone``
    tombstone of a channel that has had events; it outlives the channel's keys by
    :data:`TOMBSTONE_TTL`, and a channel that comes back while it is there gets a fresh random
    epoch (the memory bus remembers expired names the same way), so cursors of the old life get
    a ``reset``.
``<prefix>:ticket:<key>``
    one auth ticket record (``SET PX``, redeemed with ``GETDEL``).
``<prefix>:live:<ch>``
    pub/sub channel: every envelope, in seq order.

Expiry: every publish to an unfinished channel sets its keys to expire ``ttl`` later (the first
``end`` does so one last time), so a channel nobody publishes to is evicted after ``ttl`` even if
it never ended. Followed channels are kept: reserving one (every attach) and :meth:`retain` (the
hub, every ``ttl / 3``) push its expiry to at least ``ttl`` away; finished channels are never
pushed back.

:data:`PUBLISH_LUA` appends one event atomically: it reads (or starts, if the channel index has
room) the channel life, refuses an event over ``history_bytes``, adds the event to the stream and
trims it, refreshes the expiry, and publishes it (``PUBLISH``). :data:`READ_LUA` reads the channel
state and the requested slice of history in one consistent step (``attach`` also creates a
missing channel, with an expiry of ``max(ttl, 60 s)`` until its first event).

Lost acknowledged events: Redis replicates asynchronously, so a promoted replica (or a restart
from a stale file) may lack the newest events of a channel although its publisher was told they
were stored, and handing their ids out again would give other events the ids that clients
already hold. Each process remembers, per channel (:data:`MAX_MARKS`, LRU), the newest event it
knows of (published, seen live, read) and passes it to every script: a channel of the same life
that is behind that mark lost events, and the script (``repair``) moves its ``last`` up to the
mark (the lost ids are never reused), drops the history before it and records ``lost`` in the
meta hash; a resume position before the mark then gets a ``reset`` with reason
``events-lost``. Events no surviving process knew of cannot be detected.

Each process holds one pub/sub connection and one reader task (the only one that ever connects
it). The hub (:mod:`realtime_lab.bus.hub`) subscribes a channel when its first local sink attaches
and unsubscribes it when the last one leaves; every event is decoded once per process and handed
to the hub, which joins history and live events and fans them out. When the pub/sub connection
comes back after a failure, redis-py re-subscribes and the hub is told to catch up from history.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from realtime_lab.bus.base import After, ChannelInfo, History, epoch_of, is_live, now_ms
from realtime_lab.bus.broker import DEFAULT_HISTORY_BYTES, DEFAULT_MAX_CHANNELS, Broker
from realtime_lab.bus.chatstore import ChatStore
from realtime_lab.bus.memory import new_epoch
from realtime_lab.bus.redis_chats import RedisChatStore
from realtime_lab.bus.tasks import Background, raise_if_cancelling
from realtime_lab.errors import (
    BusClosed,
    BusError,
    BusUnavailable,
    EventTooLarge,
    InvalidEnvelope,
    LimitReached,
    TooManyChannels,
)
from realtime_lab.protocol.cursor import Cursor, format_id
from realtime_lab.protocol.envelope import END, Event, dumps

log = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "rtlab"
#: Longest wait for a SUBSCRIBE confirmation before ``attach`` gives up.
SUBSCRIBE_TIMEOUT: Final = 10.0
#: How long a command waits for a free connection of the pool before it fails.
POOL_WAIT_S: Final = 5.0
#: Shortest life of the epoch an attach reserves for a channel nobody has published to yet.
MIN_RESERVATION: Final = 60.0
#: How long, after it expires, a channel is remembered so that its next life gets a new epoch.
TOMBSTONE_TTL: Final = 24 * 3600.0
#: Channels whose newest known event a broker remembers to detect lost events (LRU).
MAX_MARKS: Final = 10_000
#: Channels per pipeline of :meth:`RedisBroker.retain`.
RETAIN_BATCH: Final = 256
#: Bytes every envelope has besides ``head`` and ``tail``: the shortest id, ``xxxxxxxx-1``.
_MIN_ID_BYTES: Final = 10
_OUR_QUERY_KEYS: Final = frozenset({"history", "ttl", "prefix", "history_bytes", "max_channels"})
#: The pub/sub messages :meth:`RedisBroker._dispatch` acts on (sharded ones: Redis Cluster).
_KINDS: Final = {
    "message": "message",
    "smessage": "message",
    "subscribe": "subscribe",
    "ssubscribe": "subscribe",
}

# Helpers shared by the scripts. ``now_ms``: Redis's own clock, the one its key expiry uses.
# ``life_epoch``: the epoch of a new channel life: the bus epoch (created if missing: a flushed
# Redis starts a new one), unless the channel has lived and expired before (its tombstone is
# there): then a fresh one. ``admit``: room for one more channel in the index, or the refusal
# ({-1, code, ms until the next channel expires, or -1}). ``extend``: keep an unfinished channel
# for at least ``ttl`` more ms (never shortens).
_HELPERS_LUA = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function life_epoch(gone, bus, fresh, bus_candidate)
  if redis.call('EXISTS', gone) == 1 then
    return fresh
  end
  local epoch = redis.call('GET', bus)
  if not epoch then
    epoch = bus_candidate
    redis.call('SET', bus, epoch)
  end
  return epoch
end
local function admit(index, name, now, max, admitted)
  if not index then
    -- Redis Cluster: the caller counts the channel in the index first (another slot).
    if admitted then
      return nil
    end
    return {-2, 'admit', 0}
  end
  redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. now)
  if redis.call('ZCARD', index) < max or redis.call('ZSCORE', index, name) then
    return nil
  end
  local oldest = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
  local wait = -1
  if oldest[2] then
    wait = math.max(tonumber(oldest[2]) - now, 0)
  end
  return {-1, 'too-many-channels', wait}
end
-- A failover lost events the caller saw acknowledged: its mark (the newest event of this life
-- it knows of) is ahead of the channel. Skip their seqs, so that no id is ever given twice, and
-- drop the history that no longer leads up to them. Returns the channel's new last seq, or nil.
local function repair(meta, stream, epoch, last, mark_epoch, mark_seq)
  mark_seq = tonumber(mark_seq)
  if epoch ~= mark_epoch or last >= mark_seq then
    return nil
  end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'last', mark_seq, 'bytes', 0, 'lost', mark_seq)
  return mark_seq
end
local function extend(meta, stream, gone, index, name, now, ttl, tomb, last)
  local left = redis.call('PTTL', meta)
  if left >= ttl then
    return 0
  end
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', stream, ttl)
  if last > 0 then
    redis.call('SET', gone, '1', 'PX', tomb)
  end
  if index then
    redis.call('ZADD', index, 'GT', now + ttl, name)
  end
  return 1
end
"""

# KEYS: meta, stream, tombstone, bus epoch, channel index (absent on Redis Cluster). ARGV: live
# channel, envelope head, envelope tail, fresh epoch, bus epoch candidate, history, ttl ms,
# tombstone ms, "1" for an ``end`` event, history bytes, max channels, channel name, the publish
# command (``PUBLISH``, or ``SPUBLISH`` on Redis Cluster), "1" when the caller has admitted a new
# channel into the cluster's index, the caller's mark of the channel (epoch, seq: the newest
# event of it the caller knows of; "", 0 for none).
# Returns {1, epoch, seq, 1 if the mark showed lost events else 0}, or a refusal
# {-1, code, detail}: ``too-many-channels`` (detail: ms until the next channel expires, -1 if
# unknown) or ``event-too-large`` (detail: its bytes); on
# Redis Cluster, {-2, 'admit', 0} for a new channel not admitted yet.
PUBLISH_LUA: Final = (
    _HELPERS_LUA
    + """
local meta, stream, gone, index = KEYS[1], KEYS[2], KEYS[3], KEYS[5]
local ttl, cap, history = tonumber(ARGV[7]), tonumber(ARGV[10]), tonumber(ARGV[6])
local now = now_ms()
local state = redis.call('HMGET', meta, 'epoch', 'last', 'finished', 'bytes')
local epoch, last, bytes = state[1], tonumber(state[2] or '0'), tonumber(state[4] or '0')
local finished = state[3] == '1'
local new = not epoch
if new then
  local refused = admit(index, ARGV[12], now, tonumber(ARGV[11]), ARGV[14] == '1')
  if refused then
    return refused
  end
  epoch = life_epoch(gone, KEYS[4], ARGV[4], ARGV[5])
  last, bytes = 0, 0
  redis.call('DEL', stream)
elseif not state[4] then
  -- A channel from before the byte count: count its stream once.
  for _, entry in ipairs(redis.call('XRANGE', stream, '-', '+')) do
    bytes = bytes + #entry[2][2]
  end
end
local fixed = repair(meta, stream, epoch, last, ARGV[15], ARGV[16])
if fixed then
  last, bytes = fixed, 0
end
local seq = last + 1
local payload = ARGV[2] .. epoch .. '-' .. seq .. ARGV[3]
local size = #payload
if size > cap then
  return {-1, 'event-too-large', size}
end
redis.call('XADD', stream, seq .. '-0', 'e', payload)
bytes = bytes + size
local count = redis.call('XLEN', stream)
if count > history or bytes > cap then
  -- Trim exactly, oldest first, to both caps; the new event (at most cap bytes) always stays.
  local from = seq - count + 1
  while (count > history or bytes > cap) and from < seq do
    local want = math.max(count - history, 16)
    local batch = redis.call('XRANGE', stream, from .. '-0', '+', 'COUNT', want)
    for _, entry in ipairs(batch) do
      if (count <= history and bytes <= cap) or from >= seq then
        break
      end
      count = count - 1
      bytes = bytes - #entry[2][2]
      from = from + 1
    end
  end
  if from >= seq then
    bytes = size
  end
  redis.call('XTRIM', stream, 'MINID', from .. '-0')
end
if new then
  redis.call('HSET', meta, 'epoch', epoch, 'last', seq, 'bytes', bytes)
else
  redis.call('HSET', meta, 'last', seq, 'bytes', bytes)
end
if not finished then
  if ARGV[9] == '1' then
    redis.call('HSET', meta, 'finished', '1')
  end
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', stream, ttl)
  redis.call('SET', gone, '1', 'PX', ARGV[8])
  if index then
    redis.call('ZADD', index, now + ttl, ARGV[12])
  end
end
redis.call(ARGV[13], ARGV[1], payload)
return {1, epoch, seq, fixed and 1 or 0}
"""
)

# KEYS: meta, stream, tombstone, bus epoch, channel index (absent on Redis Cluster). ARGV: mode
# ("info", "live", "all" or "cursor"), cursor epoch, cursor seq, limit (-1: none), "1" to reserve
# the channel (create it when it does not exist, keep it ttl more when it does), ttl ms of such a
# creation, fresh epoch, bus epoch candidate, ttl ms, tombstone ms, max channels, channel name,
# the epoch a created channel gets ("" for the usual choice), "1" when the caller has admitted a
# new channel into the cluster's index (as for PUBLISH_LUA, which also says the {-2} answer), the
# caller's mark of the channel (as for PUBLISH_LUA).
# Returns {0, epoch of its next life} for a channel that does not exist, a refusal
# {-1, 'too-many-channels', ms} when reserving a new one is over the cap, else
# {1, epoch, last, first, finished, pttl, lost, repaired, payload...} (``lost``: the newest seq
# a failover lost, 0 if none; ``repaired``: 1 when the mark showed it now): the payloads are the
# retained events from
# the resume position (the oldest one when the cursor needs a reset), at most limit (minus one
# for the reset event) of them.
READ_LUA: Final = (
    _HELPERS_LUA
    + """
local meta, stream, gone, index = KEYS[1], KEYS[2], KEYS[3], KEYS[5]
local reserve = ARGV[5] == '1'
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  if reserve and ARGV[13] ~= '' then
    epoch = ARGV[13]
  else
    epoch = life_epoch(gone, KEYS[4], ARGV[7], ARGV[8])
  end
  if not reserve then
    return {0, epoch}
  end
  local now = now_ms()
  local refused = admit(index, ARGV[12], now, tonumber(ARGV[11]), ARGV[14] == '1')
  if refused then
    return refused
  end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'last', 0, 'bytes', 0)
  redis.call('PEXPIRE', meta, ARGV[6])
  if index then
    redis.call('ZADD', index, 'GT', now + tonumber(ARGV[6]), ARGV[12])
  end
  reserve = false
end
local last = tonumber(redis.call('HGET', meta, 'last') or '0')
local fixed = repair(meta, stream, epoch, last, ARGV[15], ARGV[16])
if fixed then
  last = fixed
end
local first = last - redis.call('XLEN', stream) + 1
local finished = 0
if redis.call('HGET', meta, 'finished') == '1' then
  finished = 1
end
if reserve and finished == 0 then
  extend(meta, stream, gone, index, ARGV[12], now_ms(), tonumber(ARGV[9]), ARGV[10], last)
end
local lost = tonumber(redis.call('HGET', meta, 'lost') or '0')
local out = {1, epoch, last, first, finished, redis.call('PTTL', meta), lost, fixed and 1 or 0}
local mode = ARGV[1]
if mode == 'info' or mode == 'live' then
  return out
end
local from, reset = first, 0
if mode == 'cursor' then
  local seq = tonumber(ARGV[3])
  if ARGV[2] == epoch and seq <= last and seq >= first - 1 then
    from = seq + 1
  else
    reset = 1
  end
end
local count = last - from + 1
local limit = tonumber(ARGV[4])
if limit >= 0 and count > limit - reset then
  count = math.max(limit - reset, 0)
end
if count > 0 then
  local entries = redis.call('XRANGE', stream, from .. '-0', '+', 'COUNT', count)
  for _, entry in ipairs(entries) do
    out[#out + 1] = entry[2][2]
  end
end
return out
"""
)

# KEYS: meta, stream, tombstone, bus epoch (unused), channel index (absent on Redis Cluster).
# ARGV: ttl ms, tombstone ms,
# channel name. Keeps an existing unfinished channel for at least ttl more; 1 if it did.
RETAIN_LUA: Final = (
    _HELPERS_LUA
    + """
local meta = KEYS[1]
local state = redis.call('HMGET', meta, 'epoch', 'last', 'finished')
if not state[1] or state[3] == '1' then
  return 0
end
return extend(meta, KEYS[2], KEYS[3], KEYS[5], ARGV[3], now_ms(), tonumber(ARGV[1]), ARGV[2],
  tonumber(state[2] or '0'))
"""
)


def _decode(payload: bytes) -> Event:
    """Decode one envelope from Redis, keeping its bytes (identical to ``Event.json``) cached."""
    event = Event.from_json(payload)
    event.cache["json"] = payload
    return event


def redact(url: str) -> str:
    """``host:port/db`` of a Redis URL, for messages (no credentials)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # several hosts (a cluster URL): name them all
        return parts.netloc.rpartition("@")[2]
    return f"{parts.hostname or 'localhost'}:{port or 6379}{parts.path or '/0'}"


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """The URL for redis-py (our options removed) and our options (``history``, ``ttl``, ...)."""
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _OUR_QUERY_KEYS:
            ours[key] = value
        else:
            theirs.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours


@dataclass(eq=False)
class _Sub:
    """One subscribed pub/sub channel of this process."""

    name: str
    key: bytes
    confirmed: asyncio.Future[None]  # resolved by the SUBSCRIBE confirmation
    expiry: dict[str, asyncio.TimerHandle] = field(default_factory=dict)


class RedisBroker(Broker):
    """The Redis broker (see the module docstring)."""

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
        super().__init__()
        redis_url, options = split_url(url)
        try:
            self.history = int(options["history"]) if history is None else history
            self.ttl = float(options["ttl"]) if ttl is None else ttl
        except KeyError as exc:
            raise ValueError(f"{exc.args[0]} is required (argument or URL query)") from None
        self.history_bytes = (
            int(options.get("history_bytes", DEFAULT_HISTORY_BYTES))
            if history_bytes is None
            else history_bytes
        )
        self.max_channels = (
            int(options.get("max_channels", DEFAULT_MAX_CHANNELS))
            if max_channels is None
            else max_channels
        )
        self.prefix = prefix or options.get("prefix") or DEFAULT_PREFIX
        if self.history < 1:
            raise ValueError("history must keep at least one event")
        if self.history_bytes < 1:
            raise ValueError("history_bytes must be at least 1")
        if self.max_channels < 1:
            raise ValueError("max_channels must be at least 1")
        if self.ttl < 0:
            raise ValueError("ttl must not be negative")
        for kind in ("too-many-channels", "event-too-large"):
            self.limits[kind] = 0  # exported at 0 before the first refusal
        self.url = url
        self._where = redact(url)
        self._redis_url = redis_url
        self._ttl_ms = str(max(1, round(self.ttl * 1000)))
        self._reserve_ms = str(round(max(self.ttl, MIN_RESERVATION) * 1000))
        self._tombstone_ms = str(round((self.ttl + TOMBSTONE_TTL) * 1000))
        self._redis: aioredis.Redis | None = None
        self._sub_client: aioredis.Redis | None = None
        self._pubsub: Any = None  # redis.asyncio.client.PubSub (untyped in redis-py)
        self._handshaking = False
        self._publish_script: Any = None
        self._read_script: Any = None
        self._retain_script: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._subs: dict[bytes, _Sub] = {}
        self._background = Background()
        self._dropping: set[bytes] = set()
        self._closed = False
        self._publish_command = "PUBLISH"
        #: What the last Redis failure was (``None`` before the first).
        self.last_failure: str | None = None
        # The newest event this process knows of, per channel (published, seen live or read):
        # what tells a failover that lost acknowledged events (see PUBLISH_LUA's ``repair``).
        self._marks: OrderedDict[str, tuple[str, int]] = OrderedDict()
        #: Channel lives in which a failover was found to have lost acknowledged events.
        self.lost_lives = 0
        self._chat_store: ChatStore | None = None

    # Failover marks ----------------------------------------------------------------------------
    def _mark(self, channel: str, epoch: str, seq: int) -> None:
        """Remember the newest event of ``channel`` this process knows of (bounded, LRU)."""
        marks = self._marks
        known = marks.get(channel)
        if known is not None:
            if known[0] == epoch and known[1] >= seq:
                marks.move_to_end(channel)
                return
            marks.move_to_end(channel)
        marks[channel] = (epoch, seq)
        if len(marks) > MAX_MARKS:
            marks.popitem(last=False)

    def _lost(self, channel: str, epoch: str, seq: int) -> None:
        self.lost_lives += 1
        log.warning(
            "redis lost acknowledged events of %r (a failover: the replica was behind); "
            "the channel goes on after %s-%s, older positions get a reset",
            channel,
            epoch,
            seq,
        )

    # Keys --------------------------------------------------------------------------------------
    def _keys(self, channel: str) -> list[str]:
        tag = f"{self.prefix}:{{{channel}}}"
        return [
            f"{tag}:meta",
            f"{tag}:stream",
            f"{tag}:gone",
            f"{self.prefix}:epoch",
            f"{self.prefix}:channels",
        ]

    def ticket_key(self, key: str) -> str:
        """The Redis key of a ticket record."""
        return f"{self.prefix}:ticket:{key}"

    def live_key(self, channel: str) -> bytes:
        """The pub/sub channel carrying ``channel``'s events."""
        return f"{self.prefix}:live:{channel}".encode()

    # Lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, load the scripts and start the pub/sub reader. Idempotent."""
        if self._closed:
            raise BusClosed("the bus is closed")
        if self._redis is not None:
            return
        client = aioredis.Redis.from_pool(
            aioredis.BlockingConnectionPool.from_url(
                self._redis_url, decode_responses=False, timeout=POOL_WAIT_S
            )
        )
        # The pub/sub connection never retries by itself: only the reader task reconnects it, so
        # that no two coroutines ever run a connection handshake (or read) at the same time.
        sub_client = aioredis.Redis.from_url(
            self._redis_url, decode_responses=False, retry=Retry(NoBackoff(), 0, ())
        )
        pubsub: Any = sub_client.pubsub()  # PubSub's methods are untyped in redis-py
        try:
            await client.ping()
            await pubsub.connect()
        except BaseException as exc:
            await pubsub.aclose()
            await sub_client.aclose()
            await client.aclose()
            if isinstance(exc, RedisError | OSError):
                raise BusUnavailable(f"cannot reach redis at {self._where}: {exc}") from exc
            raise
        self._redis, self._sub_client, self._pubsub = client, sub_client, pubsub
        self._publish_script = client.register_script(PUBLISH_LUA)
        self._read_script = client.register_script(READ_LUA)
        self._retain_script = client.register_script(RETAIN_LUA)
        self._reader = asyncio.create_task(
            self._read_loop(), name=f"redis-bus-reader {self._where}"
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._background.cancel_all(self._reader)
        finally:
            for sub in self._subs.values():
                self._forget(sub)
            self._subs.clear()
            if self._pubsub is not None:
                await self._pubsub.aclose()
            if self._sub_client is not None:
                await self._sub_client.aclose()
            if self._redis is not None:
                await self._redis.aclose()

    async def health(self) -> str | None:
        """``None`` when Redis answers a PING within 2 s, else why not (``/api/health`` says it)."""
        client = self._check_open()
        try:
            async with asyncio.timeout(2.0):
                await client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            return f"redis at {self._where} is unreachable: {exc or 'no answer within 2 s'}"
        return None

    def chat_store(self) -> ChatStore | None:
        """Chat records and leases in this Redis (:mod:`realtime_lab.bus.redis_chats`)."""
        if self._chat_store is None:
            self._chat_store = RedisChatStore(self, _HELPERS_LUA, PUBLISH_LUA)
        return self._chat_store

    def _check_open(self) -> aioredis.Redis:
        if self._closed:
            raise BusClosed("the bus is closed")
        if self._redis is None:
            raise BusError("the redis bus is not started: await bus.start() first")
        return self._redis

    def _refusal(self, channel: str, code: bytes, detail: int) -> LimitReached:
        """The counted exception for a script's refusal ``{-1, code, detail}``."""
        if code == b"event-too-large":
            return self.refused(
                EventTooLarge(
                    f"an event of {detail} bytes is over the {self.history_bytes}-byte history cap",
                    "event-too-large",
                    413,
                )
            )
        return self.refused(
            TooManyChannels(
                f"the bus holds {self.max_channels} channels, its maximum; "
                f"{channel!r} is not one of them",
                "too-many-channels",
                507,
                detail / 1000.0 if detail >= 0 else None,
            )
        )

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run one of our scripts; Redis failures become :class:`BusUnavailable`."""
        try:
            result = await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise self.unavailable(exc) from exc
        raise_if_cancelling()
        return result

    def unavailable(self, exc: BaseException) -> BusUnavailable:
        """The error for a Redis failure (remembered in :attr:`last_failure`)."""
        self.last_failure = f"redis bus at {self._where} failed: {exc}"
        return BusUnavailable(self.last_failure)

    async def _run(
        self, script: Any, channel: str, keys: list[str], args: list[Any], life_ms: str
    ) -> Any:
        """Run a channel's script (the cluster broker first admits a new channel, ``life_ms``)."""
        return await self._call(script, keys, args)

    # Publish -----------------------------------------------------------------------------------
    async def publish(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        self._check_open()
        ts = now_ms()
        head = b'{"channel":' + dumps(channel) + b',"id":"'
        tail = b'","type":' + dumps(type) + b',"data":' + dumps(data) + b',"ts":' + dumps(ts) + b"}"
        if len(head) + len(tail) + _MIN_ID_BYTES > self.history_bytes:
            # Surely too large: refused without sending it (the script checks exactly).
            size = len(head) + len(tail) + _MIN_ID_BYTES
            raise self._refusal(channel, b"event-too-large", size)
        mark_epoch, mark_seq = self._marks.get(channel, ("", 0))
        status, raw_epoch, seq, *repaired = await self._run(
            self._publish_script,
            channel,
            self._keys(channel),
            [
                self.live_key(channel),
                head,
                tail,
                new_epoch(),
                new_epoch(),
                self.history,
                self._ttl_ms,
                self._tombstone_ms,
                int(type == END),
                self.history_bytes,
                self.max_channels,
                channel,
                self._publish_command,
                "",
                mark_epoch,
                mark_seq,
            ],
            self._ttl_ms,
        )
        if status < 0:
            raise self._refusal(channel, raw_epoch, int(seq))
        epoch = raw_epoch.decode()
        if repaired and repaired[0]:
            self._lost(channel, epoch, mark_seq)
        self._mark(channel, epoch, int(seq))
        event = Event(channel, format_id(epoch, int(seq)), type, data, ts, int(seq))
        event.cache["json"] = head + event.id.encode() + tail
        return event

    # Read side ---------------------------------------------------------------------------------
    async def read(
        self, channel: str, after: After, limit: int | None, *, reserve: bool = False
    ) -> History:
        return await self._read(channel, after, limit, reserve, None)

    async def declare(self, channel: str, epoch: str | None = None) -> None:
        await self._read(channel, None, 0, True, epoch)

    async def _read(
        self, channel: str, after: After, limit: int | None, reserve: bool, epoch: str | None
    ) -> History:
        self._check_open()
        c_epoch, c_seq = "", 0
        if is_live(after) or limit == 0:
            mode = "live"
        elif isinstance(after, Cursor):
            mode, c_epoch, c_seq = "cursor", after.epoch, after.seq
        else:
            mode = "all"
        mark_epoch, mark_seq = self._marks.get(channel, ("", 0))
        result = await self._run(
            self._read_script,
            channel,
            self._keys(channel),
            [
                mode,
                c_epoch,
                c_seq,
                -1 if limit is None else limit,
                "1" if reserve else "",
                self._reserve_ms,
                new_epoch(),
                new_epoch(),
                self._ttl_ms,
                self._tombstone_ms,
                self.max_channels,
                channel,
                epoch or "",
                "",
                mark_epoch,
                mark_seq,
            ],
            self._reserve_ms,
        )
        if result[0] < 0:
            raise self._refusal(channel, result[1], int(result[2]))
        if not result[0]:
            return History(ChannelInfo(channel, result[1].decode(), 1, 0, False, 0), False, [])
        raw_epoch, last, first, finished, pttl, lost, repaired = result[1:8]
        info = ChannelInfo(
            channel, raw_epoch.decode(), int(first), int(last), bool(finished), 0, int(lost)
        )
        if repaired:
            self._lost(channel, info.epoch, mark_seq)
        self._mark(channel, info.epoch, info.last_seq)
        try:
            events = [_decode(payload) for payload in result[8:]]
        except InvalidEnvelope as exc:
            raise BusError(f"corrupt event in redis history of {channel!r}: {exc}") from exc
        sub = self._subs.get(self.live_key(channel))
        if sub is not None and info.finished and int(pttl) >= 0:
            self._schedule_expiry(sub, info.epoch, int(pttl) / 1000.0)
        return History(info, True, events)

    async def retain(self, channels: Collection[str]) -> None:
        client = self._check_open()
        names = list(channels)
        for start in range(0, len(names), RETAIN_BATCH):
            # One round trip per batch; each script touches one channel's slot (and the index).
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for name in names[start : start + RETAIN_BATCH]:
                        args = [self._ttl_ms, self._tombstone_ms, name]
                        await self._retain_script(keys=self._keys(name), args=args, client=pipe)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                raise self.unavailable(exc) from exc
            raise_if_cancelling()

    # Tickets -----------------------------------------------------------------------------------
    async def put_ticket(self, key: str, value: bytes, ttl_s: float) -> None:
        client = self._check_open()
        try:
            if ttl_s <= 0:
                await client.delete(self.ticket_key(key))
            else:
                await client.set(self.ticket_key(key), value, px=max(1, math.ceil(ttl_s * 1000)))
        except (RedisError, OSError) as exc:
            raise self.unavailable(exc) from exc
        raise_if_cancelling()

    async def take_ticket(self, key: str) -> bytes | None:
        client = self._check_open()
        try:
            value = await client.getdel(self.ticket_key(key))
        except (RedisError, OSError) as exc:
            raise self.unavailable(exc) from exc
        raise_if_cancelling()
        return value.encode() if isinstance(value, str) else value  # bytes: no decode_responses

    # Subscriptions -----------------------------------------------------------------------------
    async def subscribe(self, channel: str) -> None:
        self._check_open()
        key = self.live_key(channel)
        sub = self._subs.get(key)
        if sub is None:
            sub = _Sub(channel, key, asyncio.get_running_loop().create_future())
            self._subs[key] = sub
            try:
                await self._send("SUBSCRIBE", key)
            except BaseException:
                self._drop_sub(sub)
                raise
        try:
            if not sub.confirmed.done():
                await asyncio.wait({sub.confirmed}, timeout=SUBSCRIBE_TIMEOUT)
            self._check_open()
            if not sub.confirmed.done() or sub.confirmed.cancelled():
                raise BusError(f"redis did not confirm the subscription to {channel!r}")
        except BaseException:
            if self._subs.get(key) is sub:
                self._drop_sub(sub)
                if not self._closed:
                    await self._send("UNSUBSCRIBE", key)
            raise

    def _drop_sub(self, sub: _Sub) -> None:
        if self._subs.get(sub.key) is sub:
            del self._subs[sub.key]
        self._forget(sub)
        self._pubsub.channels.pop(sub.key, None)

    async def unsubscribe(self, channel: str) -> None:
        sub = self._subs.get(self.live_key(channel))
        if sub is None or self._closed:
            return
        if not sub.confirmed.done():
            # Let the SUBSCRIBE confirmation arrive first, so that replies stay paired.
            await asyncio.wait({sub.confirmed}, timeout=SUBSCRIBE_TIMEOUT)
        if self._subs.get(sub.key) is sub:
            del self._subs[sub.key]
            self._forget(sub)
            await self._send("UNSUBSCRIBE", sub.key)

    def _forget(self, sub: _Sub) -> None:
        for handle in sub.expiry.values():
            handle.cancel()
        sub.expiry.clear()
        if not sub.confirmed.done():
            sub.confirmed.cancel()

    async def _drop_stray(self, key: bytes) -> None:
        """Unsubscribe from a pub/sub channel we have no subscription for (a cancelled one)."""
        try:
            if key not in self._subs:
                await self._send("UNSUBSCRIBE", key)
        finally:
            self._dropping.discard(key)

    async def _send(self, command: str, key: bytes) -> None:
        """Send SUBSCRIBE or UNSUBSCRIBE on the pub/sub connection, if it is up.

        ``pubsub.channels`` is what redis-py re-subscribes to when the reader reconnects, so a
        command that cannot be sent now takes effect then. Never reconnects by itself.
        """
        pubsub = self._pubsub
        if command == "SUBSCRIBE":
            pubsub.channels[key] = None
        else:
            pubsub.channels.pop(key, None)
        conn = pubsub.connection
        if conn is None or not conn.is_connected or self._handshaking:
            return
        try:
            await conn.send_command(command, key, check_health=False)
        except Exception as exc:
            # The connection failed or was dropped meanwhile (redis-py may then fail with an
            # AttributeError on its closed writer): the reader reconnects and re-subscribes.
            log.warning("%s %r failed: %r", command, key, exc)

    # Expiry ------------------------------------------------------------------------------------
    def _schedule_expiry(self, sub: _Sub, epoch: str, delay: float) -> None:
        if epoch in sub.expiry or self._closed:
            return
        loop = asyncio.get_running_loop()
        sub.expiry[epoch] = loop.call_later(delay, self._expire, sub, epoch)

    def _expire(self, sub: _Sub, epoch: str) -> None:
        """The channel life ``epoch`` expired in Redis: tell the hub, as the memory bus does."""
        sub.expiry.pop(epoch, None)
        if self._subs.get(sub.key) is sub:
            self.handler.on_expired(sub.name, epoch)

    # Pub/sub reader ----------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        pubsub = self._pubsub
        conn = pubsub.connection
        delay = 0.05
        while True:
            try:
                if not conn.is_connected:
                    self._handshaking = True
                    try:
                        await conn.connect()  # redis-py re-subscribes to pubsub.channels
                    finally:
                        self._handshaking = False
                message = await pubsub.handle_message(await pubsub.parse_response(block=True))
                raise_if_cancelling()
            except (RedisError, OSError) as exc:
                # Logged once per outage, not once per reconnect attempt.
                level = logging.WARNING if delay == 0.05 else logging.DEBUG
                log.log(level, "redis bus pub/sub connection failed (%s); reconnecting", exc)
                await conn.disconnect(nowait=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            if message is None:
                continue
            try:
                self._dispatch(message)
            except Exception:
                log.exception("redis bus failed to dispatch %r", message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, key = _KINDS.get(message["type"]), message["channel"]
        if kind is None:
            return
        sub = self._subs.get(key)
        if sub is None:
            # Leftovers of an UNSUBSCRIBE in flight, or of a cancelled subscribe: make sure.
            if key not in self._dropping:
                self._dropping.add(key)
                self._background.spawn(self._drop_stray(key), "redis-bus-drop-stray")
            return
        if kind == "subscribe":
            if not sub.confirmed.done():
                sub.confirmed.set_result(None)
            else:
                # A confirmation we did not ask for: redis-py re-subscribed after a reconnect,
                # so events may have been missed meanwhile.
                self.handler.on_gap(sub.name)
            return
        try:
            event = _decode(message["data"])
        except InvalidEnvelope as exc:
            log.warning("dropping a malformed envelope on %r: %s", key, exc)
            return
        self._mark(sub.name, epoch_of(event.id), event.seq)
        self.handler.on_event(sub.name, event)
        if event.type == END:
            self._schedule_expiry(sub, epoch_of(event.id), self.ttl)


__all__ = ["RedisBroker", "split_url"]
