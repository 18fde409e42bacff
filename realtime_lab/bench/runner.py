"""The benchmark's coordinator: sweep points, measurement windows, repeats, scenarios.

One *point* is (transport, clients, token rate, poll interval). In the chats workload, clients
are *users chatting continuously*: each starts a chat, reads its whole answer, and starts the
next (sse, ws and the polls start it with ``POST /api/chats`` and read its channel, with
``readers`` readers each; fetch and openai with the request that streams it); with
``baseline="naive"`` the same users run against the tutorial handler of :mod:`.naive` too, in
the same run, for the report's ratios. Each run of a point:

1. starts a fresh server process with the ticker paused (or uses ``--url``);
2. opens the point's clients, spread over the load workers, waits until the server counts them,
   and reads the server's RSS: (RSS with N idle connections - RSS before) / N;
3. starts the ticker at the point's rate (``PATCH /api/config``), lets it run for the warm-up,
   then counts deliveries for ``duration`` seconds while reading the server's CPU time; a few
   probe clients join during the window to time a late joiner's first token;
4. closes the clients and stops the server (SIGTERM, then wait).

A fresh server per run keeps one point's leftovers (memory the allocator keeps, connections
still closing) out of the next one's numbers; it costs about half a second.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import platform
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final

from realtime_lab.bench import buses as bus_measures
from realtime_lab.bench import native, proxy
from realtime_lab.bench.buses import BusBackends
from realtime_lab.bench.loadgen import (
    CHANNEL_TRANSPORTS,
    NATIVE_ONLY,
    TRANSPORTS,
    split,
    worker_main,
)
from realtime_lab.bench.server import ServerProcess, machine_cpu, raise_fd_limit
from realtime_lab.bench.stats import MEASURES, latency_summary, median, spread
from realtime_lab.bench.target import BenchConfig, BenchError, Target, target
from realtime_lab.config import COMPRESSION_MODES

PAUSED_TICKER_MAX: Final = 1000.0  # the largest ticker_rate PATCH /api/config accepts
PROBES_PER_WORKER: Final = 4
REPLY_GRACE: Final = 120.0
#: What one open SSE connection costs the server besides its send buffer (the sweep measures
#: 9-14 KiB of RSS per idle SSE connection; rounded up).
CONNECTION_OVERHEAD_KB: Final = 16
#: asyncio keeps unsent bytes in a bytearray, which CPython over-allocates by 1/8 as it grows;
#: the overflow check fires after the write that crossed ``send_buffer``.
BUFFER_SLACK: Final = 1.25
#: RSS moves by a few hundred KiB between samples whatever the stalled clients do (allocator
#: arenas, the stats requests themselves); the bound allows for it once, not per client.
ALLOCATOR_NOISE_KB: Final = 1024
STALL_END_WAIT: Final = 20.0  # longest wait, after the phase, for the stalled clients to be ended


# Worker pool --------------------------------------------------------------------------------------


class WorkerPool:
    """The load worker processes and their command pipes."""

    def __init__(
        self,
        count: int,
        native: str | None = None,
        main: Callable[[Connection, int], None] = worker_main,
    ) -> None:
        #: The native load client's binary, which the workers run for SSE and WebSocket points
        #: (``None``: they use their asyncio clients for every transport).
        self.native = native
        # spawn, not fork: the coordinator may have threads (tqdm's monitor), and a fresh
        # interpreter per worker holds nothing of the coordinator's.
        context = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        for index in range(count):
            parent, child = context.Pipe()
            proc = context.Process(
                target=main, args=(child, index), name=f"bench-worker-{index}", daemon=True
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def __len__(self) -> int:
        return len(self.conns)

    def ask(self, commands: list[dict[str, Any] | None], timeout: float) -> list[dict[str, Any]]:
        """Send one command per worker (``None``: none to that one) and collect the replies.

        Raises:
            BenchError: a worker failed the command, died, or did not answer in time.
        """
        for conn, command in zip(self.conns, commands, strict=True):
            if command is not None:
                conn.send(command)
        return self.collect(commands, timeout)

    def collect(
        self, commands: list[dict[str, Any] | None], timeout: float
    ) -> list[dict[str, Any]]:
        """Collect the replies to ``commands`` already sent (``{}`` where none was).

        Raises:
            BenchError: as :meth:`ask`.
        """
        replies: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        for index, (conn, command) in enumerate(zip(self.conns, commands, strict=True)):
            if command is None:
                replies.append({})
                continue
            if not conn.poll(max(deadline - time.monotonic(), 0.0)):
                raise BenchError(f"load worker {index} did not answer {command['op']!r} in time")
            try:
                reply: dict[str, Any] = conn.recv()
            except (EOFError, OSError) as exc:
                raise BenchError(f"load worker {index} died") from exc
            if reply.get("op") == "error":
                raise BenchError(f"load worker {index}: {reply['error']}")
            replies.append(reply)
        return replies

    def broadcast(self, command: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        """Send the same command to every worker."""
        return self.ask([dict(command) for _ in self.conns], timeout)

    def close(self) -> None:
        """Ask the workers to quit, and make sure they did."""
        for conn in self.conns:
            with suppress(OSError, ValueError):
                conn.send({"op": "quit"})
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            proc.close()
        self.procs, self.conns = [], []


# One run ------------------------------------------------------------------------------------------


def _sleep_until(wall: float) -> None:
    time.sleep(max(wall - time.time(), 0.0))


def _merge(replies: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {
        "latency": array("d"),
        "ttft": array("d"),
        "gaps": array("d"),
        "errors": [],
    }
    for reply in replies:
        for key, value in reply.items():
            if key in ("latency", "ttft", "gaps"):
                total[key].frombytes(value)
            elif key == "errors":
                total["errors"].extend(value)
            elif isinstance(value, int | float) and key != "op":
                total[key] = total.get(key, 0) + value
    return total


def _history(rate: float, interval: float) -> int:
    # Enough history that a poller one interval (or a slow second) behind never needs a reset.
    return max(1000, int(rate * max(interval, 1.0) * 4))


def chat_readers(transport: str, users: int, readers: int, workers: int) -> list[list[int]]:
    """Per worker, the number of readers of each of its users' chats (the chats workload).

    Each of ``users`` users has one chat at a time, read by ``readers`` readers (fetch, openai
    and the baseline: by the one request that starts it); users go to the workers round-robin.
    """
    per_chat = [readers if transport in CHANNEL_TRANSPORTS else 1] * users
    return [per_chat[i::workers] for i in range(workers)]


class NaiveServer(ServerProcess):
    """The baseline's server (:mod:`.naive`), started and measured as the lab's is."""

    def command(self) -> list[str]:
        module = "realtime_lab.bench.naive"
        return [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(self.port)]


@contextmanager
def naive_target(config: BenchConfig) -> Iterator[Target]:
    """A fresh baseline server for one run."""
    config.out.mkdir(parents=True, exist_ok=True)
    server = NaiveServer({}, config.out / "naive.log")
    server.start()
    try:
        yield Target(server, server.url)
    finally:
        server.stop()


def run_point(
    config: BenchConfig,
    pool: WorkerPool,
    point: dict[str, Any],
    tag: str,
    buses: BusBackends | None = None,
) -> dict[str, Any]:
    """One run of one point; the measures of :data:`MEASURES` and the raw counts.

    A point on a Redis bus (``point["bus"]``) runs on the servers ``buses`` started.
    """
    rate = float(point["rate"])
    chats = config.workload == "chats"
    paused_start = not chats and rate <= PAUSED_TICKER_MAX
    options: dict[str, Any] = {
        "ticker_rate": 0.0 if chats or paused_start else rate,
        "history": _history(rate, point["poll_interval"]),
        "longpoll_max_timeout": 60.0,
        "ttft_ms": config.ttft_ms,
        "compression": point.get("compression", "off"),
    }
    if chats:
        # The OpenAI endpoint paces its chats by these settings, not by its request.
        options["token_ms"] = 1000.0 / rate
        options["max_tokens"] = max(config.chat_tokens, 1)
    clients = int(point["clients"])
    transport = point["transport"]
    bus = point.get("bus", "memory")
    opening = (
        naive_target(config)
        if transport == "naive"
        else target(config, options, bus, buses, tag=tag)
    )
    via = point.get("via", "direct")
    with opening as tgt, proxy.front(config.out, tgt.port, via, clients) as front:
        if tgt.server is None and not chats:
            tgt.set_ticker(0.0 if paused_start else rate)
        before = 0 if chats else tgt.open_count(transport)
        time.sleep(0.2)  # let the fresh interpreter settle before the baseline
        rss0 = tgt.rss()
        per_worker = chat_readers(transport, clients, config.readers, len(pool)) if chats else []
        shares = [sum(r) for r in per_worker] if chats else split(clients, len(pool))
        commands: list[dict[str, Any] | None] = []
        for i, share in enumerate(shares):
            if share == 0:
                commands.append(None)
                continue
            commands.append(
                {
                    "op": "open",
                    "workload": config.workload,
                    "transport": transport,
                    "clients": share,
                    "chat_readers": [r for r in per_worker[i] if r] if chats else [],
                    "channel": "ticker",
                    "host": tgt.host,
                    # Several processes: this worker's connections start at process i mod N.
                    "port": bus_measures.spread_ports(tgt.ports, i)[0],
                    "ports": bus_measures.spread_ports(tgt.ports, i),
                    "host_header": tgt.host_header,
                    "tag": tag,
                    "poll_interval": point["poll_interval"],
                    "chat_tokens": config.chat_tokens,
                    "token_ms": 1000.0 / rate if rate > 0 else 0.0,
                    "ttft_ms": config.ttft_ms,
                    "compression": options["compression"],
                    # The C client reads plain streams only: compressed points use Python's.
                    "native": pool.native if options["compression"] == "off" else None,
                }
            )
        front.route(commands)  # through nginx (a --via point): its port, TLS, no C client
        opened = pool.ask(commands, timeout=REPLY_GRACE)
        open_clients = sum(r.get("clients", 0) for r in opened)
        rss_per_conn: float | None = None
        if not chats:
            tgt.wait_open(transport, before + open_clients, timeout=30.0)
            time.sleep(0.2)
            rss1 = tgt.rss()
            if rss0 is not None and rss1 is not None and open_clients:
                rss_per_conn = (rss1 - rss0) / open_clients
            if paused_start:
                tgt.set_ticker(rate)
        start = time.time() + config.warmup
        end = start + config.duration
        window = {"op": "window", "start": start, "end": end, "probes": PROBES_PER_WORKER}
        for conn, command in zip(pool.conns, commands, strict=True):
            if command is not None:
                conn.send(window)
        _sleep_until(start)
        front.mark()
        each0, redis0, machine0 = tgt.cpu_each(), tgt.redis_cpu(), machine_cpu()
        _sleep_until(end)
        front.mark()
        each1, redis1, machine1 = tgt.cpu_each(), tgt.redis_cpu(), machine_cpu()
        rss_end, redis_rss = tgt.rss(), tgt.redis_rss()
        cpu0 = sum(each0) if each0 else None
        cpu1 = sum(each1) if each1 else None
        results = pool.collect([None if c is None else window for c in commands], REPLY_GRACE)
        closed = pool.ask(
            [None if c is None else {"op": "close"} for c in commands], timeout=REPLY_GRACE
        )
    total = _merge(results)
    measures = _measures(config, point, total, cpu0, cpu1, rss_per_conn, open_clients, opened)
    measures["rss_mb"] = None if rss_end is None else rss_end / 1024
    measures.update(front.measures(tag, closed, measures))  # nginx's log, once it has stopped
    # A chat's tokens reach its readers; a broadcast's events, every open client.
    fanout = (config.readers if transport in CHANNEL_TRANSPORTS else 1) if chats else open_clients
    redis_s = None if redis0 is None or redis1 is None else redis1 - redis0
    measures.update(
        bus_measures.measures(
            [b - a for a, b in zip(each0, each1, strict=True)],
            redis_s,
            redis_rss,
            int(measures["events"]),
            float(max(fanout, 1)),
            config.duration,
        ),
        bus=bus,
        cpu_us_per_event=measures["cpu_us_per_token"],
    )
    spent = machine1[2] - machine0[2]
    if spent > 0:
        measures["machine_busy_pct"] = 100.0 * (machine1[0] - machine0[0]) / spent
        measures["machine_softirq_pct"] = 100.0 * (machine1[1] - machine0[1]) / spent
    return measures


def _measures(
    config: BenchConfig,
    point: dict[str, Any],
    total: dict[str, Any],
    cpu0: float | None,
    cpu1: float | None,
    rss_per_conn: float | None,
    open_clients: int,
    opened: list[dict[str, Any]],
) -> dict[str, Any]:
    events = int(total.get("events", 0))
    duration = config.duration
    lat = latency_summary(total["latency"])
    ttft = [v for v in total["ttft"] if math.isfinite(v)]
    gaps = latency_summary(total["gaps"])
    server_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    chats_done = int(total.get("chats", 0))
    # The window's tally carries the failures (and their messages) of the opening too.
    failures = int(total.get("failures", 0))
    errors = total["errors"]
    # Offered: every client's stream at the rate (chats: every user's, whatever the chat).
    expected = float(point["rate"]) * (open_clients if config.workload == "ticker" else 0)
    if config.workload == "chats":
        expected = float(point["rate"]) * int(point["clients"])
    return {
        "events_per_s": events / duration,
        "expected_events_per_s": expected,
        "p50_ms": lat["p50"],
        "p95_ms": lat["p95"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "ttft_ms": median(ttft) if ttft else None,
        "ttft_p99_ms": latency_summary(ttft)["p99"],
        "gap_p99_ms": gaps["p99"],
        "gap_p50_ms": gaps["p50"],
        "chats_per_s": chats_done / duration if config.workload == "chats" else None,
        "tokens_per_chat": events / chats_done if chats_done else None,
        "cpu_us_per_token": server_cpu / events * 1e6
        if server_cpu is not None and events
        else None,
        "ttft_samples_ms": sorted(round(v, 2) for v in ttft),
        "bytes_per_token": (total.get("bytes", 0) + total.get("bytes_up", 0)) / events
        if events
        else None,
        "bytes_down_per_token": total.get("bytes", 0) / events if events else None,
        "bytes_up_per_token": total.get("bytes_up", 0) / events if events else None,
        "requests_per_token": total.get("requests", 0) / events if events else None,
        "cpu_s_per_1k": server_cpu / events * 1000 if server_cpu is not None and events else None,
        "rss_kb_per_conn": rss_per_conn,
        "lost": int(total.get("lost", 0)),
        "dup": int(total.get("dup", 0)),
        "reordered": int(total.get("reordered", 0)),
        "server_cpu_pct": None if server_cpu is None else 100.0 * server_cpu / duration,
        "client_cpu_pct": 100.0 * float(total.get("cpu", 0.0)) / duration,
        "clients_open": open_clients,
        "failures": failures,
        "disconnects": int(total.get("disconnects", 0)),
        "overflows": int(total.get("overflows", 0)),
        "resets": int(total.get("resets", 0)),
        "incomplete": int(total.get("incomplete", 0)),
        "chats_done": chats_done,
        "ttft_late": int(total.get("ttft_late", 0)),
        "machine_busy_pct": None,
        "machine_softirq_pct": None,
        "events": events,
        "errors": errors[:10],
    }


# Slow-subscriber scenario -----------------------------------------------------------------------


def _window(
    pool: WorkerPool, active: list[bool], seconds: float, sample: Callable[[], None] | None = None
) -> dict[str, Any]:
    start = time.time() + 0.05
    end = start + seconds
    commands: list[dict[str, Any] | None] = [
        {"op": "window", "start": start, "end": end, "probes": 0} if on else None for on in active
    ]
    for conn, command in zip(pool.conns, commands, strict=True):
        if command is not None:
            conn.send(command)
    while time.time() < end:
        if sample is not None:
            sample()
        time.sleep(min(0.2, max(end - time.time(), 0.0)))
    replies = pool.collect(commands, REPLY_GRACE)
    total = _merge(replies)
    lat = latency_summary(total["latency"])
    return {
        "events_per_s": total.get("events", 0) / seconds,
        "p50_ms": lat["p50"],
        "p95_ms": lat["p95"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "lost": int(total.get("lost", 0)),
        "dup": int(total.get("dup", 0)),
        "reordered": int(total.get("reordered", 0)),
        "overflows": int(total.get("overflows", 0)),
        "disconnects": int(total.get("disconnects", 0)),
    }


def run_slow_subscriber(config: BenchConfig, pool: WorkerPool) -> dict[str, Any]:
    """N normal SSE clients on the ticker, then K stalled ones beside them.

    Reports the normal clients' latency without and with the stalled ones, the server's RSS
    growth against its bound (1 MiB + K x (1.25 x send_buffer + the cost of an open
    connection)), and how many stalled clients the server ended, and when.
    """
    options = {"ticker_rate": config.stall_rate, "send_buffer": config.stall_send_buffer}
    tag = "bench-slow"
    with target(config, options) as tgt:
        if tgt.server is None:
            tgt.set_ticker(config.stall_rate)
        spec = {
            "op": "open",
            "workload": "ticker",
            "transport": "sse",
            "channel": "ticker",
            "host": tgt.host,
            "port": tgt.port,
            "host_header": tgt.host_header,
            "tag": tag,
            "poll_interval": 1.0,
            "native": pool.native,
        }
        shares = split(config.stall_clients, len(pool))
        active = [share > 0 for share in shares]
        pool.ask([{**spec, "clients": share} if share else None for share in shares], REPLY_GRACE)
        time.sleep(config.warmup)
        without = _window(pool, active, config.stall_duration)
        overflows0 = int(tgt.stats()["transports"]["sse"]["overflows"])
        rss_before = tgt.rss()
        stall_shares = split(config.stalled, len(pool))
        stalled = pool.ask(
            [
                {**spec, "op": "stall", "count": k, "rcvbuf": 4096} if k else None
                for k in stall_shares
            ],
            REPLY_GRACE,
        )
        opened = sum(r.get("count", 0) for r in stalled)
        stalled_at = time.monotonic()
        watch: dict[str, float | None] = {
            "peak": rss_before or 0,
            "overflows": 0,
            "all_ended_after": None,
        }

        def sample() -> None:
            rss = tgt.rss()
            if rss is not None:
                watch["peak"] = max(watch["peak"] or 0, rss)
            count = int(tgt.stats()["transports"]["sse"]["overflows"]) - overflows0
            watch["overflows"] = count
            if count >= opened and watch["all_ended_after"] is None:
                watch["all_ended_after"] = time.monotonic() - stalled_at

        with_stalled = _window(pool, active, config.stall_duration, sample)
        # Wait (bounded) until the server has ended every stalled client, then past the grace
        # after which it aborts their sockets, so the clients' own view agrees.
        deadline = time.monotonic() + STALL_END_WAIT
        sample()
        while watch["all_ended_after"] is None and time.monotonic() < deadline:
            time.sleep(0.2)
            sample()
        time.sleep(2.5)
        sample()
        rss_after = tgt.rss()
        unstalled = pool.ask([{"op": "unstall"} if k else None for k in stall_shares], REPLY_GRACE)
        pool.ask([{"op": "close"} if a else None for a in active], REPLY_GRACE)
    peak = watch["peak"]
    growth = None if rss_before is None or peak is None else peak - rss_before
    bound = ALLOCATOR_NOISE_KB + opened * (
        BUFFER_SLACK * config.stall_send_buffer / 1024 + CONNECTION_OVERHEAD_KB
    )
    return {
        "normal_clients": config.stall_clients,
        "stalled_clients": opened,
        "rate": config.stall_rate,
        "send_buffer": config.stall_send_buffer,
        "phase_s": config.stall_duration,
        "without_stalled": without,
        "with_stalled": with_stalled,
        "server_overflows": watch["overflows"],
        "all_ended_after_s": watch["all_ended_after"],
        "stalled_ended_seen_by_client": sum(r.get("ended", 0) for r in unstalled),
        "stalled_still_open": sum(r.get("alive", 0) for r in unstalled),
        "rss_kb_before": rss_before,
        "rss_kb_peak": peak if rss_before is not None else None,
        "rss_kb_after": rss_after,
        "rss_growth_kb": growth,
        "rss_growth_kb_per_stalled": None if growth is None or not opened else growth / opened,
        "rss_bound_kb": bound,
        "within_bound": None if growth is None else growth <= bound,
    }


# The whole benchmark ----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def _load_client(choice: str) -> dict[str, Any]:
    """Build the native load client when ``choice`` asks for it; describe what will read.

    Raises:
        BenchError: ``native`` was asked for and could not be built.
    """
    if choice not in ("auto", "native", "python"):
        raise BenchError(f"unknown load client {choice!r} (auto, native or python)")
    if choice == "python":
        return {"streams": "python", "binary": None, "note": "asked for with --load-client"}
    try:
        built = native.build()
    except native.NativeBuildError as exc:
        if choice == "native":
            raise BenchError(f"--load-client native: {exc}") from exc
        return {"streams": "python", "binary": None, "note": f"native unavailable: {exc}"}
    return {"streams": "native", "binary": str(built.path), "note": f"built with {built.compiler}"}


def check(config: BenchConfig) -> None:
    """Refuse a configuration that cannot run.

    Raises:
        BenchError: an unknown transport, or ``fetch`` in the ticker workload (a fetch stream
            reads no channel: it starts the chat it streams), an unknown bus, or a bus of the
            bench's own with ``--url``.
    """
    unknown = [t for t in config.transports if t not in TRANSPORTS]
    if unknown:
        raise BenchError(f"unknown transports {unknown}: choose from {', '.join(TRANSPORTS)}")
    if config.publisher not in ("ticker", "http"):
        raise BenchError(f"unknown publisher {config.publisher!r} (ticker or http)")
    if config.publisher == "http" and config.sweep:
        from realtime_lab.bench.publisher import PUBLISHER_TRANSPORTS

        if config.workload != "ticker" or set(config.transports) - set(PUBLISHER_TRANSPORTS):
            raise BenchError("--publisher http feeds the broadcast to sse and ws subscribers")
    elif any(math.isinf(rate) for rate in config.rates) and config.sweep:
        raise BenchError("a rate of max (flat out) is for --publisher http")
    for name in ("fetch", "openai"):
        if config.workload == "ticker" and name in config.transports:
            raise BenchError(
                f"{name} streams the chat its request starts, not the ticker: run it with "
                "--workload chats"
            )
    if config.baseline not in (None, "naive", "floor"):
        raise BenchError(f"unknown baseline {config.baseline!r} (naive, floor)")
    if config.baseline == "naive" and config.workload != "chats":
        raise BenchError("--baseline naive is a chats workload: add --workload chats")
    if config.baseline == "floor" and not (config.scale and config.scale_subscribers > 0):
        raise BenchError(
            "--baseline floor compares the scale scenario's subscribers: add --scenario scale "
            "(and --scale-subscribers above 0)"
        )
    if config.readers < 1:
        raise BenchError("--readers must be at least 1")
    from realtime_lab.bench.buses import BUS_KINDS

    if not config.buses or set(config.buses) - set(BUS_KINDS):
        raise BenchError(f"--bus takes {', '.join(BUS_KINDS)}, not {config.buses}")
    if config.processes < 1 or config.cluster_replicas < 0:
        raise BenchError("--processes is at least 1 and --cluster-replicas at least 0")
    if config.url is not None and config.buses != ["memory"]:
        raise BenchError("--bus starts the bench's own servers: not with --url")
    why = proxy.check_vias(
        config.via,
        config.transports + ([config.baseline] if config.baseline else []),
        url=config.url,
        compression=config.compression,
        processes=config.processes,
    )
    if why is not None:
        raise BenchError(why)
    unknown_modes = [m for m in config.compression if m not in COMPRESSION_MODES]
    if unknown_modes or not config.compression:
        raise BenchError(f"--compression takes {', '.join(COMPRESSION_MODES)}, not {unknown_modes}")
    if config.compression != ["off"] and (
        {"openai", "naive"} & set(config.transports)
        or config.baseline
        or config.publisher == "http"
    ):
        raise BenchError(
            "--compression sweeps read with the Python clients: not openai, naive or "
            "--publisher http, which the native client alone reads"
        )


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the sweep (and scenarios) of ``config``; return the results document.

    Write it with :func:`realtime_lab.bench.report.write_results`.
    """
    check(config)
    raise_fd_limit()
    started = time.time()
    publishing = config.sweep and config.publisher == "http"
    points = config.points() if config.sweep and not publishing else []
    points = proxy.via_points(points, config.via)  # each point direct and/or through nginx
    steps = len(points) * config.repeat + (1 if config.slow_subscriber else 0)
    if publishing:
        steps += len(config.transports) * len(config.rates) * len(config.clients) * config.repeat
    if config.scale:
        subscribers = config.scale_subscribers > 0
        steps += subscribers * (1 + (config.baseline == "floor")) + (config.scale_idle > 0)
    sections: dict[str, Any] = {}  # the publisher and scale results
    workers = config.workers or max(os.cpu_count() or 1, 1)
    load_client = _load_client(config.load_client)
    native_only = sorted({p["transport"] for p in points} & NATIVE_ONLY)
    if native_only and load_client["streams"] != "native":
        raise BenchError(
            f"{', '.join(native_only)} need the native load client ({load_client['note']})"
        )
    progress = _progress(steps, config.progress)
    results: list[dict[str, Any]] = []
    scenario: dict[str, Any] | None = None
    main = worker_main
    if any(p.get("via", "direct") != "direct" for p in points):
        from realtime_lab.bench.h2client import proxy_worker_main  # needs h2: --via points only

        main = proxy_worker_main
    pool = WorkerPool(workers, load_client["binary"], main)
    buses = BusBackends(config.cluster_replicas)
    try:
        for number, point in enumerate(points):
            runs = []
            for rep in range(config.repeat):
                progress.set_description(
                    f"{point['label']} x{point['clients']} @{point['rate']:g}/s #{rep + 1}"
                )
                runs.append(run_point(config, pool, point, f"bench-{number}-{rep}", buses))
                progress.update(1)
            summary = {key: spread(run[key] for run in runs) for key, _, _ in MEASURES}
            for extra in (
                "server_cpu_pct",
                "client_cpu_pct",
                "expected_events_per_s",
                "machine_busy_pct",
                "machine_softirq_pct",
                "tokens_per_chat",
                "gap_p50_ms",
                *proxy.SUMMARY_KEYS,
                *bus_measures.SUMMARY_KEYS,
            ):
                summary[extra] = spread(run.get(extra) for run in runs)
            results.append({**point, "runs": runs, "summary": summary})
        if config.slow_subscriber:
            progress.set_description("slow-subscriber")
            scenario = run_slow_subscriber(config, pool)
            progress.update(1)
        if publishing:
            from realtime_lab.bench.publisher import run_publisher

            sections["publisher"] = run_publisher(config, load_client["binary"], progress, buses)
        if config.scale:
            from realtime_lab.bench.scale import run_scale

            sections["scale"] = run_scale(config, load_client["binary"], progress, buses)
    finally:
        progress.close()
        pool.close()
        buses.close()
    cfg = asdict(config)
    cfg["out"] = str(config.out)
    return {
        "version": 1,
        "config": cfg,
        "machine": {**machine_info(), "load_workers": workers},
        "load_client": load_client,
        "wall_s": time.time() - started,
        "points": results,
        "slow_subscriber": scenario,
        **sections,
    }


class _Progress:
    def set_description(self, text: str) -> None: ...

    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _Progress()
    from tqdm import tqdm

    # No monitor thread: the coordinator must stay single-threaded, because the server process
    # is started with a preexec_fn (see server.py), which is unsafe with threads.
    tqdm.monitor_interval = 0
    return tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)


__all__ = [
    "MEASURES",
    "BenchConfig",
    "BenchError",
    "WorkerPool",
    "chat_readers",
    "check",
    "run_bench",
    "run_point",
    "run_slow_subscriber",
]
