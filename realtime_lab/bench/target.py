"""What one benchmark invocation is (:class:`BenchConfig`) and what its runs talk to
(:class:`Target`, :func:`target`): shared by the sweep (:mod:`.runner`) and the scenarios that
run beside it (:mod:`.publisher`, :mod:`.scale`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from realtime_lab.bench.buses import BusBackends, BusStartError, redis_cpu, redis_rss_kb
from realtime_lab.bench.loadgen import CHANNEL_TRANSPORTS
from realtime_lab.bench.server import ServerProcess, http_json
from realtime_lab.errors import RealtimeLabError


class BenchError(RealtimeLabError):
    """The benchmark could not run a point (a worker failed, the server did not start)."""


@dataclass
class BenchConfig:
    """Everything one ``realtime-lab bench`` invocation does."""

    out: Path
    workload: str = "ticker"
    #: The ticker workload's default: the transports that read a channel (``fetch`` is for
    #: the chats workload: it streams the chat its own request starts).
    transports: list[str] = field(default_factory=lambda: list(CHANNEL_TRANSPORTS))
    clients: list[int] = field(default_factory=lambda: [10, 100, 1000])
    rates: list[float] = field(default_factory=lambda: [100.0])
    poll_intervals: list[float] = field(default_factory=lambda: [1.0])
    #: The server's ``--compression`` per point (off, message, connection); the load clients
    #: then ask for compression as a browser does (and are the Python ones: the C client reads
    #: plain streams only).
    compression: list[str] = field(default_factory=lambda: ["off"])
    #: How the load clients reach the server per point: ``direct``, or through nginx with TLS
    #: over ``h1`` (HTTP/1.1) or ``h2`` (HTTP/2), see :mod:`.proxy` and :mod:`.h2client`.
    via: list[str] = field(default_factory=lambda: ["direct"])
    #: The bus per point (:mod:`.buses`): ``memory`` (one process), ``redis`` (one private
    #: redis-server), ``cluster`` (a private Redis Cluster of three primaries).
    buses: list[str] = field(default_factory=lambda: ["memory"])
    #: Server processes of a ``redis`` or ``cluster`` point, on one bus (``memory``: always 1).
    processes: int = 1
    cluster_replicas: int = 0  # replicas per primary of the ``cluster`` bus
    duration: float = 10.0
    warmup: float = 3.0
    repeat: int = 3
    url: str | None = None
    workers: int = 0  # 0: one per CPU
    #: The chats workload: readers of each chat (sse, ws, polls; fetch and openai have one).
    readers: int = 1
    chat_tokens: int = 200
    ttft_ms: float = 0.0
    #: ``"naive"``: run the chats workload against :mod:`.naive`'s handler too (label ``naive``);
    #: ``"floor"``: run the scale scenario's subscribers against ``floor.c`` too (:mod:`.floor`).
    baseline: str | None = None
    sweep: bool = True
    slow_subscriber: bool = False
    stall_clients: int = 100
    stalled: int = 50
    stall_rate: float = 500.0
    stall_send_buffer: int = 64 * 1024
    stall_duration: float = 6.0
    #: Who reads SSE and WebSocket streams: ``native`` (the C client of ``loadclient.c``),
    #: ``python`` (the asyncio clients), or ``auto`` (native when a C compiler is found).
    load_client: str = "auto"
    progress: bool = True
    quick: bool = False
    server_options: dict[str, Any] = field(default_factory=dict)  # extra `serve` settings
    #: Who feeds the broadcast: the server's own ``ticker``, or ``http``: an external process
    #: POSTing each event (:mod:`.publisher`; ``rates`` may then hold ``inf``, flat out).
    publisher: str = "ticker"
    scale: bool = False  # the scale scenario (:mod:`.scale`)
    scale_subscribers: int = 10_000
    scale_rate: float = 10.0
    scale_idle: int = 50_000
    sources: int = 0  # 127.0.0.x source addresses of the publisher and scale clients (0: enough)

    def points(self) -> list[dict[str, Any]]:
        """The sweep's points, in run order (transport, then rate, interval, clients; the
        baseline's first)."""
        out = []
        baseline = ["naive"] if self.baseline == "naive" and self.workload == "chats" else []
        for transport in baseline + self.transports:
            intervals = self.poll_intervals if transport == "poll" else [self.poll_intervals[0]]
            for rate in self.rates:
                for interval in intervals:
                    for clients in self.clients:
                        for mode in self.compression:
                            label = transport
                            if transport == "poll" and len(self.poll_intervals) > 1:
                                label = f"poll@{interval:g}s"
                            if self.compression != ["off"]:
                                label = f"{label}+{mode}"
                            for bus in self.point_buses(transport):
                                out.append(
                                    {
                                        "transport": transport,
                                        "label": self.bus_label(label, bus),
                                        "clients": clients,
                                        "rate": rate,
                                        "poll_interval": interval,
                                        "compression": mode,
                                        "bus": bus,
                                        "processes": self.processes_on(bus),
                                    }
                                )
        return out

    def point_buses(self, transport: str) -> list[str]:
        """The buses a transport's points run on (the naive baseline has none of its own)."""
        return ["memory"] if transport == "naive" else list(self.buses)

    def processes_on(self, bus: str) -> int:
        """Server processes of a point on ``bus``: one on ``memory``, which nothing shares."""
        return 1 if bus == "memory" else max(self.processes, 1)

    def bus_label(self, label: str, bus: str) -> str:
        """``label``, with ``@bus`` (and ``xN`` processes) when the sweep has other buses."""
        if self.buses == ["memory"]:
            return label
        n = self.processes_on(bus)
        return f"{label}@{bus}" + (f"x{n}" if n > 1 else "")


# Target -------------------------------------------------------------------------------------------


class Target:
    """The server a run talks to: our own process, or an existing URL (no CPU/RSS then).

    ``others``: more processes of ours on the same bus (:mod:`.buses`); :attr:`url` is the
    first's, and CPU, RSS and open counts are summed over all. ``redis_pids``: the bus's
    redis-server processes, whose CPU :meth:`redis_cpu` reads.
    """

    def __init__(
        self,
        server: ServerProcess | None,
        url: str,
        *,
        others: list[ServerProcess] | None = None,
        redis_pids: list[int] | None = None,
    ) -> None:
        self.server = server
        self.servers = ([] if server is None else [server]) + list(others or [])
        self.redis_pids = list(redis_pids or [])
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.host_header = parts.netloc
        #: Every process's port, the first's first (one: just :attr:`port`).
        self.ports = [s.port for s in self.servers] if self.servers else [self.port]

    def cpu(self) -> float | None:
        return sum(self.cpu_each()) if self.servers else None

    def cpu_each(self) -> list[float]:
        """Each server process's CPU seconds so far (empty: not ours)."""
        return [s.cpu() for s in self.servers]

    def rss(self) -> int | None:
        return sum(s.rss() for s in self.servers) if self.servers else None

    def redis_cpu(self) -> float | None:
        return redis_cpu(self.redis_pids)

    def redis_rss(self) -> int | None:
        return redis_rss_kb(self.redis_pids)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = http_json(self.url + "/api/stats")
        return result

    def urls(self) -> list[str]:
        """Every server process's URL, the first's first (one: just :attr:`url`)."""
        return [s.url for s in self.servers] if len(self.servers) > 1 else [self.url]

    def open_count(self, transport: str) -> int:
        """Open connections of ``transport``, summed over the processes."""
        return sum(self.open_each(transport))

    def open_each(self, transport: str) -> list[int]:
        """Open connections of ``transport`` on each process, the first's first."""
        return [
            int(http_json(u + "/api/stats")["transports"][transport]["open"]) for u in self.urls()
        ]

    def set_ticker(self, rate: float) -> None:
        # The first process alone: on a shared bus every process's ticker feeds one channel.
        http_json(self.url + "/api/config", "PATCH", {"ticker_rate": rate})

    def wait_open(self, transport: str, count: int, timeout: float) -> int:
        """Wait until the server counts ``count`` more open connections of ``transport``."""
        if transport == "poll":
            return count  # short polls hold nothing open between requests
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            seen = self.open_count(transport)
            if seen >= count:
                break
            time.sleep(0.05)
        return seen


#: The server's settings under the bench. The load comes from one machine, a few addresses: the
#: bounds per client and in total, which exist to stop one client holding everything, are lifted.
BENCH_SERVER: Final[dict[str, Any]] = {
    "log_level": "WARNING",
    "shutdown_timeout": 2.0,
    "max_streams_per_client": 0,
    "max_streams": 0,
    "max_channels": 1_000_000,
    "max_chats": 100_000,
}


@contextmanager
def target(
    config: BenchConfig,
    options: dict[str, Any],
    bus: str = "memory",
    buses: BusBackends | None = None,
    tag: str = "bench",
) -> Iterator[Target]:
    """A fresh server with ``options`` (or ``config.url``) for one run.

    ``bus`` other than ``memory``: :meth:`BenchConfig.processes_on` processes on the bus
    ``buses`` starts (emptied first; keys under the prefix ``tag``), the ticker on the first.

    Raises:
        BenchError: a Redis bus without ``buses``, or its servers could not start.
    """
    if config.url is not None:
        yield Target(None, config.url)
        return
    config.out.mkdir(parents=True, exist_ok=True)
    settings = {**BENCH_SERVER, **options, **config.server_options}
    pids: list[int] = []
    if bus != "memory":
        if buses is None:
            raise BenchError(f"--bus {bus} needs the bench's Redis servers")
        try:
            settings["bus"] = buses.url(bus, prefix=tag)
        except BusStartError as exc:
            raise BenchError(str(exc)) from exc
        pids = buses.pids(bus)
    log = config.out / "server.log"
    servers = [ServerProcess(settings, log)]
    # Each process's ticker would publish the same channel: the others' is off.
    servers += [
        ServerProcess({**settings, "ticker_rate": 0.0}, log)
        for _ in range(config.processes_on(bus) - 1)
    ]
    try:
        for server in servers:
            server.start()
        yield Target(servers[0], servers[0].url, others=servers[1:], redis_pids=pids)
    finally:
        for server in servers:
            server.stop()
