"""The :class:`~realtime_lab.bus.chatstore.ChatStore` of ``redis://`` and ``redis+cluster://``.

Keys (besides the channel's own, :mod:`realtime_lab.bus.redis`):

``<prefix>:{<chat channel tag>}:chat``
    hash, the chat's record (``id``, ``owner``, ``prompt``, ``seed``, ``ttft_ms``, ``token_ms``,
    ``max_tokens``, ``created``, ``status``, ``finished``, ``process``): in the slot of the chat's
    channel, so that :data:`END_ORPHAN_LUA` reads it and publishes the channel's ``end`` in one
    atomic step on Redis Cluster too. Expires with the channel (the chat's ttl). The text is not
    stored: a reader rebuilds it from the channel's history (no write per token).
``<prefix>:procs``
    sorted set, the leases: process id scored by the Redis time (ms) its lease ends. Renewed once
    a second per process (not per chat); a process whose score passed is dead.
``<prefix>:{proc.<id>}:chats``
    set, the chats a process generates (added at start, removed at the end): what the others end
    when its lease passes.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Collection, Mapping
from typing import Any, Final, Protocol, TypeVar

from redis.exceptions import RedisError

from realtime_lab.bus.base import now_ms
from realtime_lab.bus.chatstore import DEAD_BATCH, Renewal
from realtime_lab.bus.memory import new_epoch
from realtime_lab.bus.tasks import raise_if_cancelling
from realtime_lab.protocol.channels import chat_channel
from realtime_lab.protocol.envelope import dumps

_T = TypeVar("_T")


class RedisBrokerLike(Protocol):
    """What the store uses of :class:`realtime_lab.bus.redis.RedisBroker` (which creates it)."""

    prefix: str
    history: int
    history_bytes: int
    max_channels: int
    _ttl_ms: str
    _tombstone_ms: str
    _publish_command: str

    def _check_open(self) -> Any: ...
    def _keys(self, channel: str) -> list[str]: ...
    def live_key(self, channel: str) -> bytes: ...
    def unavailable(self, exc: BaseException) -> BaseException: ...
    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any: ...


def end_orphan_lua(helpers_lua: str, publish_lua: str) -> str:
    """The orphan script, from the Redis broker's publish script (see :data:`END_ORPHAN_LUA`).

    The publish script's body becomes a function of its own KEYS and ARGV, so that the orphan
    script checks the chat first and then publishes exactly as a publish does (ids, trimming,
    expiry, live).
    """
    body = publish_lua.removeprefix(helpers_lua)
    return helpers_lua + "local function publish(KEYS, ARGV)\n" + body + "\nend\n" + END_ORPHAN_LUA


# The orphan script's own part (:func:`end_orphan_lua` puts the helpers and the publish function
# before it). KEYS: the chat record, then the channel's publish keys (meta, stream, tombstone,
# epoch[, index]). ARGV: the dead process, the 16 arguments of PUBLISH_LUA for the ``end`` event
# (its tail stops before the tokens count), the rest of the tail after the count. Ends the chat
# once: only while its record says it runs on that process and its channel has no ``end``.
# Returns 1 when it published the ``end``, 0 otherwise.
END_ORPHAN_LUA: Final = """
local chat = KEYS[1]
local state = redis.call('HMGET', chat, 'status', 'process')
if state[1] ~= 'running' or state[2] ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME')
redis.call('HSET', chat, 'status', 'error', 'finished', t[1] .. '.' .. string.format('%06d',
  tonumber(t[2])))
local meta = redis.call('HMGET', KEYS[2], 'epoch', 'last', 'finished')
if not meta[1] or meta[3] == '1' then
  return 0
end
local args = {}
for i = 2, 17 do
  args[#args + 1] = ARGV[i]
end
args[3] = ARGV[4] .. string.format('%d', tonumber(meta[2] or '0')) .. ARGV[18]
local done = publish({KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}, args)
if done[1] == 1 then
  return 1
end
return 0
"""

# KEYS: the leases. ARGV: process, lease ms, most dead ones to return, processes to watch...
# Returns {1 if the process had a lease, 1 if it had passed, how many dead, dead processes...,
# watched processes without a live lease...}.
RENEW_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prev = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local out = {0, 0, 0}
if prev then
  out[1] = 1
  if tonumber(prev) < now then
    out[2] = 1
  end
end
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0,
    tonumber(ARGV[3]))) do
  out[#out + 1] = dead
  out[3] = out[3] + 1
end
for i = 4, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if not score or tonumber(score) < now then
    out[#out + 1] = ARGV[i]
  end
end
return out
"""

# KEYS: the leases. ARGV: process. Drops the lease if it is still passed (the caller checked that
# the process lists no chat: its set lives in another slot on Redis Cluster).
FORGET_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) < now then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return 1
"""

_END_HEAD: Final = b'","type":"end","data":{"reason":"error","tokens":'


class RedisChatStore:
    """Chat records and leases in the broker's Redis (see the module docstring)."""

    def __init__(self, broker: RedisBrokerLike, helpers_lua: str, publish_lua: str) -> None:
        self._broker = broker
        self._end_orphan_lua = end_orphan_lua(helpers_lua, publish_lua)
        self._scripts: tuple[Any, Any, Any] | None = None
        self._leased: set[str] = set()  # processes this store has renewed once at least

    # Keys --------------------------------------------------------------------------------------
    def chat_key(self, chat_id: str) -> str:
        """The record's key: beside the channel's ``meta``, in its slot."""
        return self._broker._keys(chat_channel(chat_id))[0].removesuffix(":meta") + ":chat"

    def _leases_key(self) -> str:
        return f"{self._broker.prefix}:procs"

    def _chats_key(self, process: str) -> str:
        return f"{self._broker.prefix}:{{proc.{process}}}:chats"

    # Plumbing ----------------------------------------------------------------------------------
    def _client(self) -> Any:
        return self._broker._check_open()

    def _script(self, which: int) -> Any:
        if self._scripts is None:
            client = self._client()
            self._scripts = (
                client.register_script(self._end_orphan_lua),
                client.register_script(RENEW_LUA),
                client.register_script(FORGET_LUA),
            )
        return self._scripts[which]

    async def _do(self, *calls: Awaitable[_T]) -> list[_T]:
        """Await Redis commands together; a Redis failure becomes ``BusUnavailable``."""
        try:
            # gather: each call is awaited (or cancelled) even when another one fails.
            results = list(await asyncio.gather(*calls))
        except (RedisError, OSError) as exc:
            raise self._broker.unavailable(exc) from exc
        raise_if_cancelling()
        return results

    # ChatStore ---------------------------------------------------------------------------------
    async def put(
        self,
        chat_id: str,
        fields: Mapping[str, str],
        ttl_s: float,
        *,
        process: str,
        running: bool,
    ) -> None:
        client, key = self._client(), self.chat_key(chat_id)
        ms = max(1, math.ceil(ttl_s * 1000))
        listed = self._chats_key(process)
        # The record first, so that a listed chat always has one; both are idempotent.
        await self._do(client.hset(key, mapping=dict(fields)))
        await self._do(
            client.pexpire(key, ms),
            client.sadd(listed, chat_id) if running else client.srem(listed, chat_id),
        )

    async def get(self, chat_id: str) -> dict[str, str] | None:
        (raw,) = await self._do(self._client().hgetall(self.chat_key(chat_id)))
        if not raw:
            return None
        return {_text(k): _text(v) for k, v in raw.items()}

    async def renew(self, process: str, ttl_s: float, watch: Collection[str] = ()) -> Renewal:
        keys = [self._leases_key()]
        args = [process, math.ceil(ttl_s * 1000), DEAD_BATCH, *watch]  # <= 0: passed already
        result = await self._broker._call(self._script(1), keys, args)
        had, passed, count, *names = result
        lapsed = bool(passed) or (not had and process in self._leased)
        self._leased.add(process)
        dead = [_text(name) for name in names[:count]]
        gone = [_text(name) for name in names[count:]]
        return Renewal(lapsed, [name for name in dead if name != process], gone)

    async def orphans(self, process: str) -> list[str]:
        (members,) = await self._do(self._client().smembers(self._chats_key(process)))
        return sorted(_text(m) for m in members)

    async def end_orphan(self, chat_id: str, process: str) -> bool:
        broker = self._broker
        channel = chat_channel(chat_id)
        head = b'{"channel":' + dumps(channel) + b',"id":"'
        publish_args: list[Any] = [
            broker.live_key(channel),
            head,
            _END_HEAD,
            new_epoch(),
            new_epoch(),
            broker.history,
            broker._ttl_ms,
            broker._tombstone_ms,
            1,
            broker.history_bytes,
            broker.max_channels,
            channel,
            broker._publish_command,
            "1",  # the channel exists (checked by the script): never admitted anew
            "",
            0,
        ]
        tail = b'},"ts":' + dumps(now_ms()) + b"}"
        keys = [self.chat_key(chat_id), *broker._keys(channel)]
        done = await broker._call(self._script(0), keys, [process, *publish_args, tail])
        return bool(done)

    async def forget(self, process: str, chat_ids: list[str]) -> None:
        client = self._client()
        if chat_ids:
            await self._do(client.srem(self._chats_key(process), *chat_ids))
        (left,) = await self._do(client.scard(self._chats_key(process)))
        if not left:
            await self._broker._call(self._script(2), [self._leases_key()], [process])

    async def leave(self, process: str) -> None:
        await self._do(self._client().zrem(self._leases_key(), process))
        self._leased.discard(process)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


__all__ = ["END_ORPHAN_LUA", "RedisChatStore"]
