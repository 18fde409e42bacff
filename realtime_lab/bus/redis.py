"""``redis://``: several server processes share one feed through Redis.

URL: ``redis://host:port/db?history=1000&ttl=300&prefix=rtlab`` (``rediss://`` for TLS). ``history``
and ``ttl`` mean what they mean for the memory bus; ``prefix`` namespaces every key and pub/sub
channel. Any other query option (``socket_timeout=5``, ...) is handed to redis-py.

Keys (``{ch}`` in braces is a hash tag, so that one channel's keys share a Redis Cluster slot;
the scripts also touch the bus epoch key, so Redis Cluster itself is not supported):

``<prefix>:epoch``
    the bus epoch: the epoch of every channel's first life, as with the memory bus, so that
    ``<epoch>-0``, handed out for a channel nobody has published to yet, stays valid when its
    first event comes. Created when missing: a flushed Redis starts a new bus epoch.
``<prefix>:{ch}:meta``
    hash: ``epoch`` (this life of the channel), ``last`` (seq of the newest event) and
    ``finished`` (``"1"`` after the first ``end``).
``<prefix>:{ch}:stream``
    stream of the retained events: entry id ``<seq>-0``, one field ``e`` holding the envelope
    JSON, trimmed to exactly ``history`` entries; seqs are consecutive, so the oldest retained seq
    is ``last - XLEN + 1`` and "events after seq n" is ``XRANGE (n+1)-0 +``, O(log N + M).
``<prefix>:{ch}:gone``
    tombstone, set on the first ``end``; it outlives the channel by :data:`TOMBSTONE_TTL`, and a
    channel that comes back while it is there gets a fresh random epoch (the memory bus remembers
    expired names the same way), so cursors of the old life get a ``reset``.
``<prefix>:live:<ch>``
    pub/sub channel: every envelope, in seq order.

:data:`PUBLISH_LUA` appends one event atomically: it reads (or starts) the channel life, bumps
``last``, adds the event to the stream (``XADD``, trimmed), publishes it (``PUBLISH``), and on the
first ``end`` gives the channel keys a ``ttl`` expiry. :data:`READ_LUA` reads the channel state
and the requested slice of history in one consistent step (``attach`` also creates a missing
channel, with an expiry of ``max(ttl, 60 s)`` until its first event, as the memory bus keeps a
channel while it has sinks).

Each process holds one pub/sub connection and one reader task (the only one that ever connects
it). A channel is subscribed on the first local attach and unsubscribed when its last local sink
detaches. Every event is decoded once per process and fanned out with
:class:`~realtime_lab.bus.base.FanOut` to :class:`SeamSink` wrappers: while a sink is being
attached (or caught up after a lost pub/sub connection) its wrapper buffers live events, the
history is read, and the buffer is flushed without gap or duplicate. :meth:`RedisBus.publish`
returns once this process's reader has fanned the event out, so local sinks have it by then, as
with the memory bus.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from realtime_lab.bus.base import (
    After,
    Bus,
    ChannelInfo,
    FanOut,
    Replay,
    Sink,
    is_live,
    make_reset,
    now_ms,
    reset_reason,
)
from realtime_lab.bus.memory import new_epoch
from realtime_lab.errors import BusClosed, BusError, InvalidEnvelope
from realtime_lab.protocol.cursor import Cursor, format_id, parse_id
from realtime_lab.protocol.envelope import END, Event, dumps

log = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "rtlab"
#: Longest wait for a SUBSCRIBE confirmation before ``attach`` gives up.
SUBSCRIBE_TIMEOUT: Final = 10.0
#: Longest wait, in ``publish``, for the local reader to fan the new event out.
SETTLE_TIMEOUT: Final = 1.0
#: Shortest life of the epoch an attach reserves for a channel nobody has published to yet.
MIN_RESERVATION: Final = 60.0
#: How long, after it expires, a channel is remembered so that its next life gets a new epoch.
TOMBSTONE_TTL: Final = 24 * 3600.0
_OUR_QUERY_KEYS: Final = frozenset({"history", "ttl", "prefix"})

# The epoch of a new channel life: the bus epoch (created if missing: a flushed Redis starts a new
# one), unless the channel has lived and expired before (its tombstone is there): then a fresh one.
_LIFE_EPOCH_LUA = """
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
"""

# KEYS: meta, stream, tombstone, bus epoch. ARGV: live channel, envelope head, envelope tail,
# fresh epoch, bus epoch candidate, history, ttl ms, tombstone ms, "1" for an ``end`` event.
# Returns {epoch, seq}.
PUBLISH_LUA: Final = (
    _LIFE_EPOCH_LUA
    + """
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = life_epoch(KEYS[3], KEYS[4], ARGV[4], ARGV[5])
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'last', 0)
end
local seq = redis.call('HINCRBY', meta, 'last', 1)
if seq == 1 then
  redis.call('PERSIST', meta)
end
local payload = ARGV[2] .. epoch .. '-' .. seq .. ARGV[3]
redis.call('XADD', stream, 'MAXLEN', ARGV[6], seq .. '-0', 'e', payload)
if ARGV[9] == '1' and redis.call('HGET', meta, 'finished') ~= '1' then
  redis.call('HSET', meta, 'finished', '1')
  redis.call('PEXPIRE', meta, ARGV[7])
  redis.call('PEXPIRE', stream, ARGV[7])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[8])
end
redis.call('PUBLISH', ARGV[1], payload)
return {epoch, seq}
"""
)

# KEYS: meta, stream, tombstone, bus epoch. ARGV: mode ("info", "live", "all" or "cursor"),
# cursor epoch, cursor seq, limit (-1: none), "1" to create the channel when it does not exist,
# ttl ms of such a reservation, fresh epoch, bus epoch candidate.
# Returns {0, epoch of its next life} for a channel that does not exist, else
# {1, epoch, last, first, finished, pttl, payload...}: the payloads are the retained events from
# the resume position (the oldest one when the cursor needs a reset), at most limit (minus one
# for the reset event) of them.
READ_LUA: Final = (
    _LIFE_EPOCH_LUA
    + """
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = life_epoch(KEYS[3], KEYS[4], ARGV[7], ARGV[8])
  if ARGV[5] ~= '1' then
    return {0, epoch}
  end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'last', 0)
  redis.call('PEXPIRE', meta, ARGV[6])
end
local last = tonumber(redis.call('HGET', meta, 'last') or '0')
local first = last - redis.call('XLEN', stream) + 1
local finished = 0
if redis.call('HGET', meta, 'finished') == '1' then
  finished = 1
end
local out = {1, epoch, last, first, finished, redis.call('PTTL', meta)}
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


def _decode(payload: bytes) -> Event:
    """Decode one envelope from Redis, keeping its bytes (identical to ``Event.json``) cached."""
    event = Event.from_json(payload)
    event.cache["json"] = payload
    return event


def _epoch_of(event_id: str) -> str:
    return event_id.rpartition("-")[0]


@dataclass(slots=True)
class _State:
    """A channel's state as :data:`READ_LUA` saw it, with the history slice it read."""

    info: ChannelInfo  # for a channel that does not exist: an empty one, of its next epoch
    exists: bool
    pttl_ms: int = -1  # -1: no expiry; >= 0: the channel expires in that many milliseconds
    events: list[Event] = field(default_factory=list)


def build_replay(info: ChannelInfo, after: After, limit: int | None, events: list[Event]) -> Replay:
    """The :class:`Replay` for ``after``, given the history slice that starts where it resumes.

    Mirrors :meth:`realtime_lab.bus.memory._Channel.replay` exactly.
    """
    if is_live(after):
        return Replay([], format_id(info.epoch, info.last_seq))
    out: list[Event] = []
    reason = reset_reason(info, after)
    if reason is not None:
        out.append(make_reset(info, after, reason))
        from_seq = info.first_seq
    elif isinstance(after, Cursor):
        from_seq = after.seq + 1
    else:
        from_seq = info.first_seq
    available = info.last_seq - from_seq + 1
    more = False
    if limit is not None and available > max(limit - len(out), 0):
        more = True
    out.extend(events)
    cursor = out[-1].id if out else format_id(info.epoch, from_seq - 1)
    return Replay(out, cursor, more)


class SeamSink:
    """Wraps one attached sink so that history and live events meet without gap or duplicate.

    It starts *held*: live events from the fan-out are buffered. :meth:`release` delivers the
    history read meanwhile, then the buffered events after it, and switches to direct delivery.
    Direct delivery drops events at or before the last one delivered, holds again (and calls
    ``on_gap``) when one is missing, and calls ``on_epoch`` for an event of another channel life
    (unless the sink was given nothing yet and the event opens that life: then it follows it).
    """

    __slots__ = (
        "_buffer",
        "_on_epoch",
        "_on_gap",
        "_prefix",
        "_sent",
        "attaching",
        "closed",
        "key",
        "last",
        "recheck",
        "sink",
    )

    def __init__(
        self,
        sink: Sink,
        on_gap: Callable[[SeamSink], None],
        on_epoch: Callable[[SeamSink], None],
    ) -> None:
        self.sink = sink
        self.key = 0  # the key in the channel's FanOut
        self.last = 0
        self.closed = False
        self.attaching = True
        self.recheck = False  # catch up right after the first release
        self._prefix = ""
        self._sent = False  # anything given to the sink yet
        self._buffer: list[Event] | None = []
        self._on_gap = on_gap
        self._on_epoch = on_epoch

    def __repr__(self) -> str:
        return f"SeamSink({self.sink!r})"

    @property
    def epoch(self) -> str | None:
        """The channel life this sink follows (``None`` until the first release)."""
        return self._prefix[:-1] if self._prefix else None

    @property
    def held(self) -> bool:
        """Buffering for a catch-up (not for the initial attach)."""
        return self._buffer is not None and not self.attaching and not self.closed

    @property
    def live(self) -> bool:
        return self._buffer is None and not self.closed

    def hold(self) -> None:
        """Buffer live events until the next :meth:`release`."""
        if self._buffer is None:
            self._buffer = []

    def release(self, events: Sequence[Event], epoch: str, last: int) -> None:
        """Deliver ``events`` (history ending at ``<epoch>-<last>``), then the buffered events."""
        buffered = self._buffer or []
        self._buffer = None
        self.attaching = False
        self._prefix = epoch + "-"
        for event in events:
            if self.closed:
                return
            self._sent = True
            self.sink.deliver(event)
        self.last = last
        for event in buffered:
            if self.closed:
                return
            self.deliver(event)
        if self.recheck and not self.closed:
            self.recheck = False
            if self._buffer is None:
                self._buffer = []
                self._on_gap(self)

    # Sink protocol -----------------------------------------------------------------------------
    def deliver(self, event: Event) -> None:
        if self._buffer is not None:
            self._buffer.append(event)
            return
        if self.closed:
            return
        if not event.id.startswith(self._prefix):
            if self._sent or event.seq != 1:
                self._on_epoch(self)
                return
            # Nothing given yet: the sink follows the new channel life from its start.
            self._prefix, self.last = _epoch_of(event.id) + "-", 0
        seq = event.seq
        if seq <= self.last:
            return
        if seq != self.last + 1:
            self._buffer = [event]
            self._on_gap(self)
            return
        self.last = seq
        self._sent = True
        self.sink.deliver(event)

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self._buffer = None
            self.sink.close(reason)


@dataclass(eq=False)
class _Local:
    """This process's view of one channel: its sinks and its pub/sub subscription."""

    name: str
    key: bytes  # the pub/sub channel
    subscribed: asyncio.Future[None]  # resolved by the SUBSCRIBE confirmation
    fanout: FanOut = field(default_factory=FanOut)
    expiry: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    seen: tuple[str, int] = ("", 0)  # (epoch, seq) of the newest event the reader handled
    waiters: list[tuple[str, int, asyncio.Future[None]]] = field(default_factory=list)
    resync_wanted: bool = False
    resync_task: asyncio.Task[None] | None = None
    release_task: asyncio.Task[None] | None = None

    def wake(self, epoch: str | None = None, seq: int = 0) -> None:
        """Resolve the publish waiters the reader has gone past (all of them without ``epoch``)."""
        keep = []
        for waiter in self.waiters:
            w_epoch, w_seq, future = waiter
            if epoch is None or w_epoch != epoch or w_seq <= seq:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append(waiter)
        self.waiters = keep


class _RedisAttachment:
    __slots__ = ("_bus", "_key", "_local", "_wrapper")

    def __init__(self, bus: RedisBus, local: _Local, key: int, wrapper: SeamSink) -> None:
        self._bus, self._local, self._key, self._wrapper = bus, local, key, wrapper

    def detach(self) -> None:
        if self._key:
            self._local.fanout.remove(self._key)
            self._key = 0
            self._wrapper.closed = True  # detached, not closed: its sink is not told
            self._bus._release_soon(self._local)


def redact(url: str) -> str:
    """``host:port/db`` of a Redis URL, for messages (no credentials)."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or '/0'}"


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


class RedisBus(Bus):
    """The Redis-backed bus (see the module docstring)."""

    def __init__(
        self,
        url: str,
        history: int | None = None,
        ttl: float | None = None,
        *,
        prefix: str | None = None,
    ) -> None:
        redis_url, options = split_url(url)
        try:
            self.history = int(options["history"]) if history is None else history
            self.ttl = float(options["ttl"]) if ttl is None else ttl
        except KeyError as exc:
            raise ValueError(f"{exc.args[0]} is required (argument or URL query)") from None
        self.prefix = prefix or options.get("prefix") or DEFAULT_PREFIX
        if self.history < 1:
            raise ValueError("history must keep at least one event")
        if self.ttl < 0:
            raise ValueError("ttl must not be negative")
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
        self._reader: asyncio.Task[None] | None = None
        self._locals: dict[bytes, _Local] = {}
        self._sub_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dropping: set[bytes] = set()
        self._closed = False

    # Keys --------------------------------------------------------------------------------------
    def _keys(self, channel: str) -> list[str]:
        tag = f"{self.prefix}:{{{channel}}}"
        return [f"{tag}:meta", f"{tag}:stream", f"{tag}:gone", f"{self.prefix}:epoch"]

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
        client = aioredis.Redis.from_url(self._redis_url, decode_responses=False)
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
                raise BusError(f"cannot reach redis at {self._where}: {exc}") from exc
            raise
        self._redis, self._sub_client, self._pubsub = client, sub_client, pubsub
        self._publish_script = client.register_script(PUBLISH_LUA)
        self._read_script = client.register_script(READ_LUA)
        self._reader = asyncio.create_task(
            self._read_loop(), name=f"redis-bus-reader {self._where}"
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = set(self._tasks)
        if self._reader is not None:
            tasks.add(self._reader)
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                # asyncio.wait neither raises the tasks' CancelledError nor hides our own.
                await asyncio.wait(tasks)
        finally:
            for local in self._locals.values():
                self._forget(local)
                local.fanout.close_all("bus closed")
            self._locals.clear()
            if self._pubsub is not None:
                await self._pubsub.aclose()
            if self._sub_client is not None:
                await self._sub_client.aclose()
            if self._redis is not None:
                await self._redis.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed("the bus is closed")
        if self._redis is None:
            raise BusError("RedisBus is not started: await bus.start() first")

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run one of our scripts; Redis failures become :class:`BusError`."""
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise BusError(f"redis bus at {self._where} failed: {exc}") from exc

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # Publish -----------------------------------------------------------------------------------
    async def publish(self, channel: str, type: str, data: dict[str, Any]) -> Event:
        self._check_open()
        ts = now_ms()
        head = b'{"channel":' + dumps(channel) + b',"id":"'
        tail = b'","type":' + dumps(type) + b',"data":' + dumps(data) + b',"ts":' + dumps(ts) + b"}"
        key = self.live_key(channel)
        # Only a subscription confirmed before the script runs is sure to carry its PUBLISH.
        local = self._locals.get(key)
        if local is not None and not (local.subscribed.done() and not local.subscribed.cancelled()):
            local = None
        raw_epoch, seq = await self._call(
            self._publish_script,
            keys=self._keys(channel),
            args=[
                key,
                head,
                tail,
                new_epoch(),
                new_epoch(),
                self.history,
                self._ttl_ms,
                self._tombstone_ms,
                int(type == END),
            ],
        )
        epoch = raw_epoch.decode()
        event = Event(channel, format_id(epoch, int(seq)), type, data, ts, int(seq))
        event.cache["json"] = head + event.id.encode() + tail
        if local is not None and self._locals.get(key) is local:
            await self._settle(local, epoch, event.seq)
        return event

    async def _settle(self, local: _Local, epoch: str, seq: int) -> None:
        """Wait (briefly) until the local reader has fanned event ``seq`` out to local sinks."""
        seen_epoch, seen_seq = local.seen
        if seen_epoch == epoch and seen_seq >= seq:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        local.waiters.append((epoch, seq, future))
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):
                await future
        except TimeoutError:
            log.warning("event %s-%s of %r not seen on pub/sub in time", epoch, seq, local.name)
        finally:
            local.waiters = [w for w in local.waiters if w[2] is not future]

    # Read side ---------------------------------------------------------------------------------
    async def _read(
        self,
        channel: str,
        after: After,
        limit: int | None,
        *,
        mode: str | None = None,
        reserve: bool = False,
    ) -> _State:
        self._check_open()
        c_epoch, c_seq = "", 0
        if mode is None:
            if is_live(after):
                mode = "live"
            elif isinstance(after, Cursor):
                mode, c_epoch, c_seq = "cursor", after.epoch, after.seq
            else:
                mode = "all"
        result = await self._call(
            self._read_script,
            keys=self._keys(channel),
            args=[
                mode,
                c_epoch,
                c_seq,
                -1 if limit is None else limit,
                "1" if reserve else "",
                self._reserve_ms,
                new_epoch(),
                new_epoch(),
            ],
        )
        local = self._locals.get(self.live_key(channel))
        subscribers = 0 if local is None else len(local.fanout.sinks)
        if not result[0]:
            return _State(ChannelInfo(channel, result[1].decode(), 1, 0, False, 0), exists=False)
        epoch, last, first, finished, pttl = result[1:6]
        info = ChannelInfo(
            channel, epoch.decode(), int(first), int(last), bool(finished), subscribers
        )
        try:
            events = [_decode(payload) for payload in result[6:]]
        except InvalidEnvelope as exc:
            raise BusError(f"corrupt event in redis history of {channel!r}: {exc}") from exc
        return _State(info, True, int(pttl), events)

    async def replay(self, channel: str, after: After, limit: int | None = None) -> Replay:
        # A channel that does not exist answers as the empty first life it will have, as with
        # the memory bus: ``<bus epoch>-0`` stays valid when its first event comes.
        state = await self._read(channel, after, limit)
        return build_replay(state.info, after, limit, state.events)

    async def info(self, channel: str) -> ChannelInfo | None:
        if self._closed:
            return None  # as the memory bus, which forgets every channel on close
        state = await self._read(channel, None, None, mode="info")
        return state.info if state.exists else None

    async def declare(self, channel: str) -> None:
        # Reserved as attach reserves a missing channel: it exists (with an expiry) until its
        # first event makes it permanent.
        await self._read(channel, None, None, mode="info", reserve=True)

    # Attach ------------------------------------------------------------------------------------
    async def attach(self, channel: str, after: After, sink: Sink) -> _RedisAttachment:
        self._check_open()
        local, wrapper, attachment = await self._join(channel, sink)
        try:
            await self._confirmed(local)
            # A missing channel is created (reserved until its first event, see the module doc),
            # as the memory bus creates it on attach: the ids we hand out are the ones to come.
            state = await self._read(channel, after, None, reserve=True)
            replay = build_replay(state.info, after, None, state.events)
            assert replay.cursor is not None
            wrapper.release(replay.events, state.info.epoch, parse_id(replay.cursor).seq)
        except BaseException:
            attachment.detach()
            raise
        self._note_finished(local, state)
        return attachment

    async def _join(self, channel: str, sink: Sink) -> tuple[_Local, SeamSink, _RedisAttachment]:
        """Add ``sink``, wrapped and held, to the channel's local fan-out; subscribe if needed."""
        key = self.live_key(channel)
        async with self._sub_lock:
            self._check_open()
            local = self._locals.get(key)
            if local is None:
                local = _Local(channel, key, asyncio.get_running_loop().create_future())
                self._locals[key] = local
                try:
                    await self._send("SUBSCRIBE", key)
                except BaseException:
                    del self._locals[key]
                    local.subscribed.cancel()
                    self._pubsub.channels.pop(key, None)
                    raise
            wrapper = self._wrap(local, sink)
            wrapper.key = local.fanout.add(wrapper)
            return local, wrapper, _RedisAttachment(self, local, wrapper.key, wrapper)

    def _wrap(self, local: _Local, sink: Sink) -> SeamSink:
        def on_gap(_: SeamSink) -> None:
            self._resync(local)

        def on_epoch(wrapper: SeamSink) -> None:
            self._drop(local, wrapper, "channel expired")

        return SeamSink(sink, on_gap, on_epoch)

    async def _confirmed(self, local: _Local) -> None:
        if not local.subscribed.done():
            await asyncio.wait({local.subscribed}, timeout=SUBSCRIBE_TIMEOUT)
        self._check_open()
        if not local.subscribed.done() or local.subscribed.cancelled():
            raise BusError(f"redis did not confirm the subscription to {local.name!r}")

    def _release_soon(self, local: _Local) -> None:
        """Unsubscribe from a channel that has no local sink left (in a task: it awaits)."""
        if local.fanout.sinks or local.release_task is not None or self._closed:
            return
        local.release_task = self._spawn(self._release(local), f"redis-bus-release {local.name}")

    async def _release(self, local: _Local) -> None:
        try:
            if not local.subscribed.done():
                # Let the SUBSCRIBE confirmation arrive first, so that replies stay paired.
                await asyncio.wait({local.subscribed})
            async with self._sub_lock:
                if local.fanout.sinks or self._locals.get(local.key) is not local:
                    return
                del self._locals[local.key]
                self._forget(local)
                await self._send("UNSUBSCRIBE", local.key)
        finally:
            local.release_task = None

    def _forget(self, local: _Local) -> None:
        for handle in local.expiry.values():
            handle.cancel()
        local.expiry.clear()
        local.wake()
        if not local.subscribed.done():
            local.subscribed.cancel()

    async def _drop_stray(self, key: bytes) -> None:
        """Unsubscribe from a pub/sub channel we have no local state for (a cancelled attach)."""
        try:
            async with self._sub_lock:
                if key not in self._locals:
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
    def _note_finished(self, local: _Local, state: _State) -> None:
        if state.info.finished and state.pttl_ms >= 0:
            self._schedule_expiry(local, state.info.epoch, state.pttl_ms / 1000.0)

    def _schedule_expiry(self, local: _Local, epoch: str, delay: float) -> None:
        if epoch in local.expiry or self._closed:
            return
        loop = asyncio.get_running_loop()
        local.expiry[epoch] = loop.call_later(delay, self._expire, local, epoch)

    def _expire(self, local: _Local, epoch: str) -> None:
        """The channel life ``epoch`` expired: close its local sinks, as the memory bus does."""
        local.expiry.pop(epoch, None)
        for sink in tuple(local.fanout.sinks.values()):
            if isinstance(sink, SeamSink) and sink.epoch == epoch:
                self._drop(local, sink, "channel expired")
        self._release_soon(local)

    def _drop(self, local: _Local, wrapper: SeamSink, reason: str) -> None:
        """Remove ``wrapper`` from the fan-out and close its sink with ``reason``."""
        local.fanout.remove(wrapper.key)
        try:
            wrapper.close(reason)
        except Exception:
            log.exception("closing sink %r failed", wrapper.sink)
        self._release_soon(local)

    # Catch-up ----------------------------------------------------------------------------------

    def _resync(self, local: _Local, everyone: bool = False) -> None:
        """Catch the held sinks of ``local`` (all of them with ``everyone``) up from history."""
        if self._closed:
            return
        if everyone:
            for sink in local.fanout.sinks.values():
                if isinstance(sink, SeamSink):
                    if sink.live:
                        sink.hold()
                    elif sink.attaching:
                        sink.recheck = True
        local.resync_wanted = True
        if local.resync_task is None:
            local.resync_task = self._spawn(
                self._resync_loop(local), f"redis-bus-resync {local.name}"
            )

    async def _resync_loop(self, local: _Local) -> None:
        delay = 0.05
        try:
            while local.resync_wanted and not self._closed:
                local.resync_wanted = False
                groups: dict[tuple[str, int], list[SeamSink]] = {}
                for sink in local.fanout.sinks.values():
                    if isinstance(sink, SeamSink) and sink.held and sink.epoch is not None:
                        groups.setdefault((sink.epoch, sink.last), []).append(sink)
                for (epoch, last), sinks in groups.items():
                    try:
                        state = await self._read(local.name, Cursor(epoch, last), None)
                    except (RedisError, OSError, BusError) as exc:
                        log.warning("catching %r up failed (%s); retrying", local.name, exc)
                        local.resync_wanted = True
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 2.0)
                        break
                    if not state.exists or state.info.epoch != epoch:
                        for sink in sinks:
                            if sink.held:
                                self._drop(local, sink, "channel expired")
                        continue
                    replay = build_replay(state.info, Cursor(epoch, last), None, state.events)
                    assert replay.cursor is not None
                    seq = parse_id(replay.cursor).seq
                    for sink in sinks:
                        if sink.held:
                            try:
                                sink.release(replay.events, epoch, seq)
                            except Exception:
                                log.exception("sink %r failed; it is detached", sink.sink)
                                self._drop(local, sink, "sink failed")
                    self._note_finished(local, state)
        finally:
            local.resync_task = None

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
            except (RedisError, OSError) as exc:
                log.warning("redis bus pub/sub connection failed (%s); reconnecting", exc)
                await conn.disconnect(nowait=True)
                for local in self._locals.values():
                    local.wake()
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
        kind, key = message["type"], message["channel"]
        if kind not in ("message", "subscribe"):
            return
        local = self._locals.get(key)
        if local is None:
            # Leftovers of an UNSUBSCRIBE in flight, or of a cancelled attach: make sure.
            if key not in self._dropping:
                self._dropping.add(key)
                self._spawn(self._drop_stray(key), "redis-bus-drop-stray")
            return
        if kind == "subscribe":
            if not local.subscribed.done():
                local.subscribed.set_result(None)
            else:
                # A confirmation we did not ask for: redis-py re-subscribed after a reconnect,
                # so events may have been missed meanwhile.
                local.wake()
                self._resync(local, everyone=True)
            return
        try:
            event = _decode(message["data"])
        except InvalidEnvelope as exc:
            log.warning("dropping a malformed envelope on %r: %s", key, exc)
            return
        epoch = _epoch_of(event.id)
        local.seen = (epoch, event.seq)
        local.fanout.deliver(event)
        if event.type == END:
            self._schedule_expiry(local, epoch, self.ttl)
        local.wake(epoch, event.seq)
        if not local.fanout.sinks:
            self._release_soon(local)


__all__ = ["RedisBus", "SeamSink", "build_replay", "split_url"]
