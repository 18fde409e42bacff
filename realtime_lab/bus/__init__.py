"""The event bus: one channel hub per process over a broker backend chosen by URL.

``memory://`` (default, embedded), ``redis://host:port/db`` (several server processes share
one feed; needs the ``redis`` extra) and ``redis+cluster://host:port[,host:port...]/`` (the same
on a Redis Cluster, :mod:`realtime_lab.bus.cluster`). Backends are imported only when their URL
is used.

Query options of both: ``history`` (events kept per channel), ``history_bytes`` (bytes of
envelope JSON kept per channel), ``ttl`` (seconds an idle or finished channel is kept),
``max_channels`` (channels held at most).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from realtime_lab.bus.base import After, Attachment, ChannelInfo, Replay, Sink
from realtime_lab.bus.broker import DEFAULT_HISTORY_BYTES, DEFAULT_MAX_CHANNELS, Broker
from realtime_lab.bus.hub import Bus
from realtime_lab.bus.subscription import Subscription
from realtime_lab.errors import UnknownBusBackend

__all__ = [
    "After",
    "Attachment",
    "Broker",
    "Bus",
    "ChannelInfo",
    "Replay",
    "Sink",
    "Subscription",
    "create_broker",
    "create_bus",
]


def create_broker(
    url: str,
    *,
    history: int = 1000,
    ttl: float = 300.0,
    history_bytes: int = DEFAULT_HISTORY_BYTES,
    max_channels: int = DEFAULT_MAX_CHANNELS,
) -> Broker:
    """The broker a URL names; the keyword arguments are defaults the URL query may override.

    Raises:
        UnknownBusBackend: the scheme is not ``memory``, ``redis``/``rediss`` or
            ``redis+cluster``, or the backend's
            optional dependency is not installed, or an option is not a number.
        ValueError: an option is out of range (``history`` or a cap below 1, a negative ttl).
    """
    parts = urlsplit(url)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    try:
        history = int(query.get("history", history))
        ttl = float(query.get("ttl", ttl))
        history_bytes = int(query.get("history_bytes", history_bytes))
        max_channels = int(query.get("max_channels", max_channels))
    except ValueError as exc:
        raise UnknownBusBackend(
            f"bad history/ttl/history_bytes/max_channels in bus URL {url!r}"
        ) from exc
    if parts.scheme == "memory":
        from realtime_lab.bus.memory import MemoryBroker

        return MemoryBroker(
            history=history,
            ttl=ttl,
            url=url,
            history_bytes=history_bytes,
            max_channels=max_channels,
        )
    if parts.scheme in ("redis", "rediss"):
        try:
            from realtime_lab.bus.redis import RedisBroker
        except ImportError as exc:
            raise UnknownBusBackend(
                "the redis bus needs the 'redis' package: pip install 'realtime-lab[redis]'"
            ) from exc
        return RedisBroker(
            url, history=history, ttl=ttl, history_bytes=history_bytes, max_channels=max_channels
        )
    if parts.scheme == "redis+cluster":
        try:
            from realtime_lab.bus.cluster import RedisClusterBroker
        except ImportError as exc:
            raise UnknownBusBackend(
                "the redis bus needs the 'redis' package: pip install 'realtime-lab[redis]'"
            ) from exc
        return RedisClusterBroker(
            url, history=history, ttl=ttl, history_bytes=history_bytes, max_channels=max_channels
        )
    raise UnknownBusBackend(
        f"no bus backend for {url!r}: use memory://, redis://host:port/db or "
        "redis+cluster://host:port[,host:port...]/"
    )


def create_bus(url: str, **options: Any) -> Bus:
    """The bus a URL names; ``options`` are :func:`create_broker`'s.

    Then ``await bus.start()`` before use and ``await bus.close()`` at shutdown.
    """
    return Bus(create_broker(url, **options))
