"""``bench --bus memory,redis,cluster --processes N``: the bus under a point, and what it costs.

A point on ``memory`` runs one server process, as always. A point on ``redis`` runs ``N`` server
processes (``--processes``) on one private ``redis-server``; on ``cluster``, on a private Redis
Cluster of three primaries (``--cluster-replicas`` replicas each, default none). The bench
starts those servers (:mod:`.redisproc`: free ports, a temporary directory, never the shared
Redis on 6379) the first time a point needs them, empties them (``FLUSHALL``) before each run so
that a run starts as a fresh server does, and stops them at the end (:class:`BusBackends`).

The load spreads over the processes: connection i of a load client reads from process i mod N,
and a chat user POSTs its chats to the next process (i + 1 mod N), so with N > 1 every token
crosses Redis from the process generating the chat to the one streaming it. The ticker runs on
process 0 only (each process's ticker would publish the channel again); an external publisher
(``--publisher http``) posts to process 0, and its subscribers are spread.

Redis CPU is ``utime + stime`` of every redis-server process (``/proc/<pid>/stat``, as the
server's own), summed over the nodes, over the measured window; per event it is divided by the
events that reached the subscribers (a chat's tokens, counted once per chat; a broadcast's
events, once per event): :func:`measures`. :func:`markdown` is the report's section comparing
each point with the ``memory`` point of the same transport, clients and rate.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Final

from realtime_lab.bench.redisproc import (
    RedisClusterServers,
    RedisServer,
    redis_cli_binary,
    redis_server_binary,
)
from realtime_lab.bench.server import cpu_seconds, rss_kb
from realtime_lab.errors import RealtimeLabError

#: The ``--bus`` choices: the embedded bus, one redis-server, a Redis Cluster (3 primaries).
BUS_KINDS: Final = ("memory", "redis", "cluster")
CLUSTER_PRIMARIES: Final = 3


class BusStartError(RealtimeLabError):
    """A bus a point needs could not be started (redis-server or redis-cli missing, or failed)."""


class BusBackends:
    """The Redis servers of a bench invocation, started on first use and stopped on close.

    Use it as a context manager around the sweep; :meth:`url` before each run.
    """

    def __init__(self, cluster_replicas: int = 0) -> None:
        self.cluster_replicas = cluster_replicas
        self.single: RedisServer | None = None
        self.cluster: RedisClusterServers | None = None

    def url(self, kind: str, prefix: str) -> str:
        """The bus URL of a run on ``kind``: Redis started if need be and emptied.

        Raises:
            BusStartError: an unknown kind, or its servers could not start.
        """
        if kind == "memory":
            return "memory://"
        try:
            if kind == "redis":
                if self.single is None:
                    if redis_server_binary() is None:
                        raise BusStartError("--bus redis needs redis-server (apt install redis)")
                    self.single = RedisServer().start()
                self.single.flush()
                return self.single.url(prefix=prefix)
            if kind == "cluster":
                if self.cluster is None:
                    if redis_server_binary() is None or redis_cli_binary() is None:
                        raise BusStartError("--bus cluster needs redis-server and redis-cli")
                    self.cluster = RedisClusterServers(
                        CLUSTER_PRIMARIES, self.cluster_replicas
                    ).start()
                self.cluster.flush()
                return self.cluster.url(prefix=prefix)
        except (OSError, RuntimeError) as exc:  # RedisStartError, CalledProcessError, ...
            raise BusStartError(f"--bus {kind}: {exc}") from exc
        raise BusStartError(f"unknown bus {kind!r}: choose from {', '.join(BUS_KINDS)}")

    def pids(self, kind: str) -> list[int]:
        """The redis-server processes of ``kind`` (none for ``memory``)."""
        if kind == "redis" and self.single is not None:
            return self.single.pids()
        if kind == "cluster" and self.cluster is not None:
            return self.cluster.pids()
        return []

    def close(self) -> None:
        """Stop every server started. Idempotent."""
        single, self.single = self.single, None
        cluster, self.cluster = self.cluster, None
        if single is not None:
            single.stop()
        if cluster is not None:
            cluster.stop()

    def __enter__(self) -> BusBackends:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def redis_cpu(pids: list[int]) -> float | None:
    """CPU seconds the redis-servers ``pids`` have used so far, summed (``None``: no Redis)."""
    return sum(cpu_seconds(pid) for pid in pids) if pids else None


def redis_rss_kb(pids: list[int]) -> int | None:
    """Their resident memory now, summed, in KiB (``None``: no Redis)."""
    return sum(rss_kb(pid) for pid in pids) if pids else None


def spread_ports(ports: list[int], worker: int) -> list[int]:
    """Load worker ``worker``'s view of the processes: ``ports`` rotated to start at its own.

    Its first connection reads from process ``worker mod N``, so that connections spread
    round-robin over the processes whatever the number of workers.
    """
    if not ports:
        return []
    k = worker % len(ports)
    return ports[k:] + ports[:k]


def measures(
    cpu_each: list[float],
    redis_cpu_s: float | None,
    redis_rss: int | None,
    events: int,
    per_event: float,
    duration: float,
) -> dict[str, Any]:
    """The bus measures of one run.

    ``cpu_each``: each server process's CPU seconds in the window; ``redis_cpu_s``: Redis's;
    ``events``: deliveries in the window; ``per_event``: deliveries per published event (a
    chat's readers; a broadcast's subscribers), so that Redis is charged per event it carried.
    """
    published = events / per_event if per_event > 0 else 0.0
    return {
        "processes": len(cpu_each),
        "server_cpu_pct_each": [100.0 * c / duration for c in cpu_each],
        "redis_cpu_pct": None if redis_cpu_s is None else 100.0 * redis_cpu_s / duration,
        "redis_cpu_us_per_event": redis_cpu_s / published * 1e6
        if redis_cpu_s is not None and published
        else None,
        "redis_rss_mb": None if redis_rss is None else redis_rss / 1024,
        "published_events_per_s": published / duration,
    }


#: The summary keys :func:`markdown` reads, besides the sweep's own.
SUMMARY_KEYS: Final = (
    "redis_cpu_pct",
    "redis_cpu_us_per_event",
    "redis_rss_mb",
    "published_events_per_s",
    "cpu_us_per_event",
)


def _med(point: dict[str, Any], key: str) -> float | None:
    value = point["summary"].get(key)
    if not value or value["median"] is None:
        return None
    return float(value["median"])


def _each(point: dict[str, Any]) -> str:
    runs = [r.get("server_cpu_pct_each") or [] for r in point["runs"]]
    if not runs or not runs[0]:
        return "n/a"
    n = len(runs[0])
    cols = [sorted(r[i] for r in runs if len(r) == n) for i in range(n)]
    return " + ".join(f"{c[len(c) // 2]:.0f}" for c in cols)


def _ratio(value: float | None, base: float | None) -> str:
    return "—" if value is None or not base else f"{value / base:.2f}x"


def markdown(points: list[dict[str, Any]], unit: str = "tokens", one: str = "token") -> str:
    """The bus section of the report: each point against ``memory`` at the same load.

    ``unit`` / ``one``: what a delivery is, plural and singular. ``points``: the sweep's or the
    publisher's, each with ``bus``, ``transport``, ``clients``,
    ``rate`` and the summary of :data:`SUMMARY_KEYS`. Empty when every point is on ``memory``.
    """
    from realtime_lab.bench.report import fmt

    if all(p.get("bus", "memory") == "memory" for p in points):
        return ""

    def key(p: dict[str, Any]) -> tuple[Any, ...]:
        return (p["transport"], p["clients"], p["rate"], p.get("compression", "off"))

    bases = {key(p): p for p in points if p.get("bus", "memory") == "memory"}
    header = [
        "transport",
        "clients",
        "bus",
        "processes",
        f"{unit}/s",
        "% offered",
        "p50 ms",
        "p99 ms",
        f"server CPU µs/{one}",
        "server CPU % each",
        "Redis CPU %",
        "Redis CPU µs/event",
        "RSS MiB",
        "Redis RSS MiB",
        f"{unit}/s vs memory",
        "CPU vs memory",
        "p99 vs memory",
    ]
    lines = [
        f"## The bus: what Redis costs per event (`--bus`, {unit})",
        "",
        "Each point on `redis` or `cluster` ran its server processes on one private bus (a "
        "redis-server; a Redis Cluster of three primaries), the load spread over them: a "
        "connection reads from process i mod N and a chat is started on the next process, so "
        "its tokens cross Redis. Server CPU: summed over the processes (µs per delivered "
        f"{one}); each: per process, % of one core. Redis CPU: utime + stime of every "
        "redis-server over the window, summed over the nodes; per event: over the events it "
        "carried (a chat's token once per chat, a broadcast's event once, whatever the "
        "subscribers). RSS: the server processes' summed; Redis: the nodes'. vs memory: this "
        "point's figure / the `memory` point's at the same load (one process).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for p in points:
        base = bases.get(key(p))
        offered = _med(p, "expected_events_per_s")
        got = _med(p, "events_per_s")
        cpu = _med(p, "cpu_us_per_event")
        base_cpu = None if base is None else _med(base, "cpu_us_per_event")
        cells = [
            p["transport"],
            str(p["clients"]),
            p.get("bus", "memory"),
            str(p.get("processes", 1)),
            fmt(got, "rate"),
            fmt(100.0 * got / offered if got is not None and offered else None, "pct"),
            fmt(_med(p, "p50_ms"), "ms"),
            fmt(_med(p, "p99_ms"), "ms"),
            fmt(cpu, "num"),
            _each(p),
            fmt(_med(p, "redis_cpu_pct"), "int"),
            fmt(_med(p, "redis_cpu_us_per_event"), "num"),
            fmt(_med(p, "rss_mb"), "num"),
            fmt(_med(p, "redis_rss_mb"), "num"),
            "—" if base is None or base is p else _ratio(got, _med(base, "events_per_s")),
            "—" if base is None or base is p else _ratio(cpu, base_cpu),
            "—" if base is None or base is p else _ratio(_med(p, "p99_ms"), _med(base, "p99_ms")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


__all__ = [
    "BUS_KINDS",
    "SUMMARY_KEYS",
    "BusBackends",
    "BusStartError",
    "markdown",
    "measures",
    "redis_cpu",
    "redis_rss_kb",
    "spread_ports",
]
