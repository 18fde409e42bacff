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
    duration: float = 10.0
    warmup: float = 3.0
    repeat: int = 3
    url: str | None = None
    workers: int = 0  # 0: one per CPU
    #: The chats workload: readers of each chat (sse, ws, polls; fetch and openai have one).
    readers: int = 1
    chat_tokens: int = 200
    ttft_ms: float = 0.0
    #: ``"naive"``: run the chats workload against :mod:`.naive`'s handler too (label ``naive``).
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
        baseline = [self.baseline] if self.baseline and self.workload == "chats" else []
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
                            out.append(
                                {
                                    "transport": transport,
                                    "label": label,
                                    "clients": clients,
                                    "rate": rate,
                                    "poll_interval": interval,
                                    "compression": mode,
                                }
                            )
        return out


# Target -------------------------------------------------------------------------------------------


class Target:
    """The server a run talks to: our own process, or an existing URL (no CPU/RSS then)."""

    def __init__(self, server: ServerProcess | None, url: str) -> None:
        self.server = server
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.host_header = parts.netloc

    def cpu(self) -> float | None:
        return None if self.server is None else self.server.cpu()

    def rss(self) -> int | None:
        return None if self.server is None else self.server.rss()

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = http_json(self.url + "/api/stats")
        return result

    def set_ticker(self, rate: float) -> None:
        http_json(self.url + "/api/config", "PATCH", {"ticker_rate": rate})

    def wait_open(self, transport: str, count: int, timeout: float) -> int:
        """Wait until the server counts ``count`` more open connections of ``transport``."""
        if transport == "poll":
            return count  # short polls hold nothing open between requests
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            seen = int(self.stats()["transports"][transport]["open"])
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
def target(config: BenchConfig, options: dict[str, Any]) -> Iterator[Target]:
    """A fresh server with ``options`` (or ``config.url``) for one run."""
    if config.url is not None:
        yield Target(None, config.url)
        return
    config.out.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(
        {**BENCH_SERVER, **options, **config.server_options}, config.out / "server.log"
    )
    server.start()
    try:
        yield Target(server, server.url)
    finally:
        server.stop()
