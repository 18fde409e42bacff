"""The scale scenario (``--scenario scale``): many SSE connections on one server port.

Two parts, each on a fresh server:

1. **Subscribers**: ``scale_subscribers`` SSE clients of one channel fed at ``scale_rate``
   events/s (the ticker, or the external publisher with ``--publisher http``): delivered/s
   against offered (the events the channel actually got in the window x subscribers),
   latency p50/p99/max, lost/dup, server CPU, RSS per connection, and the accept rate while
   they connected. With ``--baseline floor``, the same subscribers then read ``floor.c``
   (:mod:`.floor`), a bare C broadcaster: what a fan-out of one ``send()`` per subscriber
   costs on this machine, whoever writes it, in the same run.
2. **Idle**: ``scale_idle`` SSE connections to a channel nobody publishes to. The server's RSS
   per connection; the accept rate (connections/s, from the first connect to the last response
   head); and the heartbeat's cost: the server's CPU over a window with heartbeats out of the
   way (interval 300 s), then over one with a beat every :data:`PROBE_HEARTBEAT_S` s. The
   difference per beat and connection gives what the default 15 s interval costs at this count.

The connections come from native load client processes spread over source addresses
``127.0.0.2``... (:mod:`.fleet`): one address has about 28k ports to one server port. The
descriptor limits are raised first; a count they (or the port range) cannot hold is cut, and
the report says which limit cut it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from realtime_lab.bench.buses import BusBackends
from realtime_lab.bench.fleet import Capacity, Fleet, FleetError, env_cpus, plan
from realtime_lab.bench.floor import HOST, Floor
from realtime_lab.bench.native import FLOOR_SOURCE, NativeBuildError, build
from realtime_lab.bench.publisher import (
    CHANNEL,
    PublisherProcess,
    PublishError,
    stream_path,
)
from realtime_lab.bench.server import http_json, last_seq_at, machine_cpu
from realtime_lab.bench.stats import latency_summary
from realtime_lab.bench.target import BenchConfig, BenchError, Target, target

#: Heartbeats "off" for the idle baseline: the longest interval ``PATCH /api/config`` takes.
QUIET_HEARTBEAT_S: Final = 300.0
#: The interval of the measured heartbeats (short, so a short window holds several beats).
PROBE_HEARTBEAT_S: Final = 1.0
DEFAULT_HEARTBEAT_S: Final = 15.0
IDLE_CHANNEL: Final = "bench.idle"
SETTLE_S: Final = 1.0  # after the last connection opened, before RSS is read


def _wait_open(tgt: Target, count: int, timeout: float = 60.0) -> int:
    return tgt.wait_open("sse", count, timeout)


def _capacity(config: BenchConfig, count: int, bus: str) -> Capacity:
    # Before the server starts: it inherits the raised descriptor limit.
    workers = config.workers or env_cpus()
    return plan(count, workers, sources=config.sources, servers=config.processes_on(bus))


def _fleet(binary: str, tgt: Target, path: str, capacity: Capacity) -> Fleet:
    return Fleet(
        binary,
        tgt.host,
        tgt.port,
        "sse",
        path,
        tgt.host_header,
        capacity.allowed,
        capacity.processes,
        capacity.sources,
        ports=tgt.ports if len(tgt.ports) > 1 else None,
    )


def _configure(tgt: Target, body: dict[str, Any]) -> None:
    """``PATCH /api/config`` on every server process (settings are each process's own)."""
    for url in tgt.urls():
        http_json(url + "/api/config", "PATCH", body)


@dataclass
class _Measured:
    """What the subscribers part reads of the server it measures (the lab's, or the floor)."""

    cpu: Callable[[], float | None]
    rss: Callable[[], int | None]
    #: The channel's last sequence number (``None``: no event yet, or unknown).
    last_seq: Callable[[], int | None]
    #: Wait until the server holds ``n`` more connections than before the fleet opened.
    wait_open: Callable[[int], object]
    #: Make the channel publish ``rate``/s over ``(start, end)``; returns the external
    #: publisher to wait for, if any.
    feed: Callable[[float, float], PublisherProcess | None]


def run_subscribers(
    config: BenchConfig, binary: str, bus: str = "memory", buses: BusBackends | None = None
) -> dict[str, Any]:
    """Part 1: many subscribers of one channel at a low rate (see the module docstring).

    Raises:
        BenchError: the server or the load clients failed.
    """
    external = config.publisher == "http"
    channel = CHANNEL if external else "ticker"
    rate = config.scale_rate
    options = {"ticker_rate": 0.0, "history": 1000}
    capacity = _capacity(config, config.scale_subscribers, bus)
    with target(config, options, bus, buses, tag="bench-scale") as tgt:
        if tgt.server is None and not external:
            tgt.set_ticker(0.0)
        before = tgt.open_count("sse")
        time.sleep(0.2)

        def feed(start: float, end: float) -> PublisherProcess | None:
            if external:
                return PublisherProcess(
                    tgt.host, tgt.port, rate, (start, end), host_header=tgt.host_header
                )
            tgt.set_ticker(rate)
            return None

        measured = _Measured(
            cpu=tgt.cpu,
            rss=tgt.rss,
            last_seq=lambda: last_seq_at(f"{tgt.url}/api/channels/{channel}"),
            wait_open=lambda n: _wait_open(tgt, before + n),
            feed=feed,
        )
        fleet = _fleet(binary, tgt, stream_path("sse", channel, "bench-scale"), capacity)
        result = _measure(config, fleet, measured, capacity)
    return {
        **result,
        "bus": bus,
        "processes": len(tgt.ports),
        "feed": "publisher http" if external else "ticker",
    }


def run_floor(config: BenchConfig, binary: str, floor_binary: str) -> dict[str, Any]:
    """Part 1 against ``floor.c`` (``--baseline floor``): the same subscribers, same windows.

    Raises:
        BenchError: the floor or the load clients failed.
    """
    capacity = _capacity(config, config.scale_subscribers, "memory")
    with Floor(floor_binary, config.scale_rate) as floor:
        measured = _Measured(
            cpu=floor.cpu,
            rss=floor.rss,
            last_seq=floor.last_seq,
            wait_open=lambda n: None,  # it takes a subscriber as it answers its request head
            feed=lambda start, end: None,  # it publishes from its start, at its rate
        )
        fleet = Fleet(
            binary,
            HOST,
            floor.port,
            "sse",
            stream_path("sse", "floor", "bench-floor"),
            floor.host_header,
            capacity.allowed,
            capacity.processes,
            capacity.sources,
        )
        result = _measure(config, fleet, measured, capacity)
    return {**result, "bus": None, "processes": 1, "feed": "floor.c's timer"}


def _measure(
    config: BenchConfig, fleet: Fleet, server: _Measured, capacity: Capacity
) -> dict[str, Any]:
    """Open ``fleet``, feed the channel, measure one window: part 1's figures."""
    rate = config.scale_rate
    rss0 = server.rss()
    publisher = None
    try:
        with fleet:
            accept_cpu0 = server.cpu()
            opened = fleet.open()
            server.wait_open(int(opened["clients"]))
            accept_cpu = _spent(accept_cpu0, server.cpu())
            time.sleep(SETTLE_S)
            rss1 = server.rss()
            start = time.time() + config.warmup
            end = start + config.duration
            publisher = server.feed(start, end)
            time.sleep(max(start - time.time(), 0.0))
            fleet.start()
            seq0 = server.last_seq()
            cpu0, machine0 = server.cpu(), machine_cpu()
            time.sleep(max(end - time.time(), 0.0))
            cpu1, machine1 = server.cpu(), machine_cpu()
            seq1 = server.last_seq()
            got = fleet.stop()
            published = publisher.wait() if publisher is not None else None
    except (FleetError, PublishError) as exc:
        if publisher is not None:
            publisher.kill()
        raise BenchError(str(exc)) from exc
    duration = config.duration
    clients = int(opened["clients"])
    if published is not None:
        channel_rate = float(published["rate"])
    elif seq0 is not None and seq1 is not None:
        channel_rate = (seq1 - seq0) / duration
    else:
        channel_rate = rate
    events = int(got["events"])
    lat = latency_summary(got["latency"])
    server_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    spent = machine1[2] - machine0[2]
    offered = channel_rate * clients
    return {
        "subscribers": config.scale_subscribers,
        "clients_open": clients,
        "rate": rate,
        "channel_rate": channel_rate,
        "events_per_s": events / duration,
        "offered_per_s": offered,
        "delivered_pct": 100.0 * events / duration / offered if offered else None,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "lost": int(got["lost"]),
        "dup": int(got["dup"]),
        "reordered": int(got["reordered"]),
        "server_cpu_pct": None if server_cpu is None else 100.0 * server_cpu / duration,
        "client_cpu_pct": 100.0 * float(got["cpu"]) / duration,
        "machine_busy_pct": 100.0 * (machine1[0] - machine0[0]) / spent if spent > 0 else None,
        "rss_kb_per_conn": (rss1 - rss0) / clients
        if rss0 is not None and rss1 is not None and clients
        else None,
        "accept_per_s": clients / opened["seconds"] if opened["seconds"] > 0 else None,
        "accept_cpu_us_per_conn": accept_cpu / clients * 1e6 if accept_cpu and clients else None,
        "open_s": opened["seconds"],
        "sources": capacity.sources,
        "fd_limit": capacity.fd_limit,
        "limits": capacity.limits,
        "failures": int(opened["failures"]) + int(got["failures"]),
        "disconnects": int(got["disconnects"]),
        "errors": (list(opened["errors"]) + list(got["errors"]))[:10],
    }


def _spent(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _cpu_window(tgt: Target, seconds: float) -> tuple[float | None, float | None]:
    """The server's CPU % and the machine's softirq % over the next ``seconds``."""
    cpu0, m0 = tgt.cpu(), machine_cpu()
    time.sleep(seconds)
    cpu1, m1 = tgt.cpu(), machine_cpu()
    server = None if cpu0 is None or cpu1 is None else 100.0 * (cpu1 - cpu0) / seconds
    spent = m1[2] - m0[2]
    softirq = 100.0 * (m1[1] - m0[1]) / spent if spent > 0 else None
    return server, softirq


def run_idle(
    config: BenchConfig, binary: str, bus: str = "memory", buses: BusBackends | None = None
) -> dict[str, Any]:
    """Part 2: many idle SSE connections with heartbeats (see the module docstring).

    Raises:
        BenchError: the server or the load clients failed.
    """
    count = config.scale_idle
    options = {"ticker_rate": 0.0, "heartbeat": QUIET_HEARTBEAT_S}
    capacity = _capacity(config, count, bus)
    with target(config, options, bus, buses, tag="bench-idle") as tgt:
        if tgt.server is None:
            _configure(tgt, {"heartbeat": QUIET_HEARTBEAT_S})
        before_each = tgt.open_each("sse")
        before = sum(before_each)
        time.sleep(0.2)
        rss0 = tgt.rss()
        quiet0, _ = _cpu_window(tgt, 1.0)  # the server with no connections at all
        path = stream_path("sse", IDLE_CHANNEL, "bench-idle")
        fleet = _fleet(binary, tgt, path, capacity)
        try:
            with fleet:
                accept_cpu0 = tgt.cpu()
                opened = fleet.open()
                held = _wait_open(tgt, before + int(opened["clients"])) - before
                held_each = [n - b for n, b in zip(tgt.open_each("sse"), before_each, strict=True)]
                accept_cpu = _spent(accept_cpu0, tgt.cpu())
                time.sleep(SETTLE_S)
                rss1 = tgt.rss()
                window = config.duration
                quiet, quiet_softirq = _cpu_window(tgt, window)
                _configure(tgt, {"heartbeat": PROBE_HEARTBEAT_S})
                beating, beating_softirq = _cpu_window(tgt, window)
                _configure(tgt, {"heartbeat": QUIET_HEARTBEAT_S})
                still = tgt.open_count("sse") - before
                fleet.start()
                got = fleet.stop()
        except FleetError as exc:
            raise BenchError(str(exc)) from exc
    clients = int(opened["clients"])
    per_beat_us = None
    at_default_pct = None
    if quiet is not None and beating is not None and clients:
        beats = window / PROBE_HEARTBEAT_S
        # CPU % x window = CPU seconds; per beat and connection, in microseconds.
        per_beat_us = (beating - quiet) / 100.0 * window / beats / clients * 1e6
        at_default_pct = per_beat_us * clients / DEFAULT_HEARTBEAT_S / 1e6 * 100.0
    return {
        "requested": count,
        "bus": bus,
        "processes": len(tgt.ports),
        "clients_open": clients,
        "held_by_server": held,
        "held_each": held_each,
        "still_open_after": still,
        "open_s": opened["seconds"],
        "accept_per_s": clients / opened["seconds"] if opened["seconds"] > 0 else None,
        "accept_cpu_us_per_conn": accept_cpu / clients * 1e6 if accept_cpu and clients else None,
        "rss_kb_before": rss0,
        "rss_kb_after": rss1,
        "rss_kb_per_conn": (rss1 - rss0) / clients
        if rss0 is not None and rss1 is not None and clients
        else None,
        "server_cpu_pct_empty": quiet0,
        "server_cpu_pct_idle": quiet,
        "server_cpu_pct_heartbeat": beating,
        "heartbeat_s": PROBE_HEARTBEAT_S,
        "softirq_pct_idle": quiet_softirq,
        "softirq_pct_heartbeat": beating_softirq,
        "heartbeat_us_per_conn": per_beat_us,
        "heartbeat_pct_at_15s": at_default_pct,
        "window_s": window,
        "sources": capacity.sources,
        "fd_limit": capacity.fd_limit,
        "limits": capacity.limits,
        "failures": int(opened["failures"]) + int(got["failures"]),
        "disconnects": int(got["disconnects"]),
        "errors": (list(opened["errors"]) + list(got["errors"]))[:10],
    }


def run_scale(
    config: BenchConfig,
    binary: str | None,
    progress: Any = None,
    buses: BusBackends | None = None,
) -> dict[str, Any]:
    """Both parts (a part with a count of 0 is skipped); the scenario's results.

    With ``config.baseline == "floor"`` the subscribers part runs against ``floor.c`` too,
    right after the lab's server (``"floor"`` in the results).

    They run on the first bus of ``config.buses``: on ``redis`` or ``cluster`` (servers of
    ``buses``) with :meth:`BenchConfig.processes_on` processes, the connections are spread over
    all of them, so that together they hold more than one process's descriptor limit allows.

    Raises:
        BenchError: no native load client (tens of thousands of asyncio clients would take the
            server's cores), or a part failed.
    """
    if binary is None:
        raise BenchError("the scale scenario needs the native load client (a C compiler)")
    result: dict[str, Any] = {"subscribers": None, "floor": None, "idle": None}
    bus = config.buses[0] if config.buses else "memory"
    if config.scale_subscribers > 0:
        if progress is not None:
            progress.set_description(f"scale: {config.scale_subscribers} subscribers")
        result["subscribers"] = run_subscribers(config, binary, bus, buses)
        if progress is not None:
            progress.update(1)
        if config.baseline == "floor":
            if progress is not None:
                progress.set_description(f"scale: {config.scale_subscribers} on the floor")
            try:
                floor_binary = str(build(source=FLOOR_SOURCE).path)
            except NativeBuildError as exc:
                raise BenchError(f"--baseline floor: {exc}") from exc
            result["floor"] = run_floor(config, binary, floor_binary)
            if progress is not None:
                progress.update(1)
    if config.scale_idle > 0:
        if progress is not None:
            progress.set_description(f"scale: {config.scale_idle} idle")
        result["idle"] = run_idle(config, binary, bus, buses)
        if progress is not None:
            progress.update(1)
    return result


#: The subscribers table: (header, result key, format).
_COLUMNS: Final = (
    ("delivered/s", "events_per_s", "rate"),
    ("offered/s", "offered_per_s", "rate"),
    ("%", "delivered_pct", "pct"),
    ("p50 ms", "p50_ms", "ms"),
    ("p99 ms", "p99_ms", "ms"),
    ("max ms", "max_ms", "ms"),
    ("lost", "lost", "int"),
    ("dup", "dup", "int"),
    ("server CPU", "server_cpu_pct", "pct"),
    ("machine busy", "machine_busy_pct", "pct"),
    ("RSS KiB/conn", "rss_kb_per_conn", "num"),
    ("accept/s", "accept_per_s", "num"),
)


def markdown(scale: dict[str, Any]) -> str:
    """The scale section of the report."""
    from realtime_lab.bench.report import fmt

    lines = ["## Scale", ""]
    subs = scale.get("subscribers")
    if subs:
        floor = scale.get("floor")
        rows = [("realtime-lab", subs)] + ([("floor.c (bare C fan-out)", floor)] if floor else [])
        lines += [
            f"**{subs['clients_open']:,} SSE subscribers** of one channel fed by the "
            f"{subs['feed']} at {subs['rate']:g}/s (the channel got "
            f"{subs['channel_rate']:.1f}/s), over {len(subs['sources'])} source address(es)"
            f"{_servers(subs)}"
            + (
                f"; then {floor['clients_open']:,} of `floor.c`, one thread writing each event "
                "with one `send()` per subscriber and nothing else (`--baseline floor`)"
                if floor
                else ""
            )
            + ":",
            "",
            "| server | " + " | ".join(title for title, _, _ in _COLUMNS) + " |",
            "| --- |" + " --- |" * len(_COLUMNS),
        ]
        lines += [
            f"| {name} | " + " | ".join(fmt(part[key], kind) for _, key, kind in _COLUMNS) + " |"
            for name, part in rows
        ]
        lines.append("")
        lines += [f"Capped: {m}." for m in subs["limits"]]
    idle = scale.get("idle")
    if idle:
        lines += [
            f"**{idle['clients_open']:,} idle SSE connections** (of {idle['requested']:,} "
            f"asked for; the server held {idle['held_by_server']:,}, "
            f"{idle['still_open_after']:,} after the heartbeats{_held(idle)}), over "
            f"{len(idle['sources'])} source address(es){_servers(idle)}, descriptor limit "
            f"{idle['fd_limit']} per process:",
            "",
            f"- opened in {idle['open_s']:.1f} s: {fmt(idle['accept_per_s'], 'num')} "
            f"connections/s accepted, {fmt(idle['accept_cpu_us_per_conn'], 'num')} us of server "
            "CPU per connection opened",
            f"- server RSS {fmt(idle['rss_kb_per_conn'], 'num')} KiB per connection "
            f"({idle['rss_kb_before']} KiB before, {idle['rss_kb_after']} KiB after)",
            f"- server CPU while idle: {fmt(idle['server_cpu_pct_idle'], 'num')}% without "
            f"heartbeats, {fmt(idle['server_cpu_pct_heartbeat'], 'num')}% with one every "
            f"{idle['heartbeat_s']:g} s: {fmt(idle['heartbeat_us_per_conn'], 'num')} us per "
            f"heartbeat and connection, so {fmt(idle['heartbeat_pct_at_15s'], 'num')}% of a "
            "core at the default 15 s interval",
            f"- failures {idle['failures']}, disconnects {idle['disconnects']}",
            "",
        ]
        lines += [f"Capped: {m}." for m in idle["limits"]]
        lines += [f"Error: {e}" for e in idle["errors"][:3]]
    return "\n".join(lines) + "\n"


def _servers(part: dict[str, Any]) -> str:
    n = int(part.get("processes") or 1)
    return "" if n == 1 else f", {n} server processes on {part['bus']}:// (summed)"


def _held(idle: dict[str, Any]) -> str:
    each = idle.get("held_each") or []
    return "" if len(each) < 2 else "; " + " + ".join(f"{n:,}" for n in each) + " per process"


def bad_runs(scale: dict[str, Any]) -> list[str]:
    """What lost, duplicated or reordered events (the bench exits 1 for it)."""
    bad = []
    for name in ("subscribers", "floor"):
        part = scale.get(name)
        if part and (part["lost"] or part["dup"] or part["reordered"]):
            bad.append(f"scale {name}: lost {part['lost']}, dup {part['dup']}")
    return bad


__all__ = ["bad_runs", "markdown", "run_floor", "run_idle", "run_scale", "run_subscribers"]
