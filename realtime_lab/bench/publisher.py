"""``--publisher http``: broadcast fed from outside, one ``POST`` at a time, as apps feed a hub.

An app server that feeds nchan, Centrifugo or Mercure POSTs each event to the hub and waits for
the answer before the next one: one request in flight, on one keep-alive connection. This module
is that app server (a process of its own, so its CPU is its own) and the benchmark points that
use it:

- the publisher: ``python -m realtime_lab.bench.publisher`` POSTs to
  ``/api/channels/{channel}/events`` at a fixed rate, or flat out (``max``: the next request as
  soon as the answer arrives), from its start to the window's end, and prints one JSON line:
  what it published inside the window, the requests' round-trip times, its CPU. It is a raw
  ``asyncio.Protocol`` writing prepared bytes and parsing the answer's head by hand: about
  30 us of CPU per request, so it is the server, not the publisher, that sets the rate reached.
- :func:`run_publisher`: the sweep with the ticker off, subscribers held by native load client
  processes (:class:`~realtime_lab.bench.fleet.Fleet`), the publisher beside them. Each point
  reports the publish rate reached next to the deliveries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import subprocess
import sys
import time
from array import array
from contextlib import suppress
from typing import Any, Final
from urllib.parse import quote

from realtime_lab.bench.fleet import Fleet, FleetError, env_cpus, plan
from realtime_lab.bench.stats import latency_summary, spread
from realtime_lab.bench.target import BenchError, target
from realtime_lab.errors import RealtimeLabError

#: The application channel the publisher feeds (the ticker's channel is the server's own).
CHANNEL: Final = "bench.pub"
EVENT_TYPE: Final = "tick"
#: The publish answer's head is small; anything bigger than this is not the lab's server.
MAX_HEAD: Final = 16 * 1024
MAX_BODY: Final = 1 << 20
#: Publisher transports: the streams the native load client reads.
PUBLISHER_TRANSPORTS: Final = ("sse", "ws")
FLAT_OUT: Final = math.inf


class PublishError(RealtimeLabError):
    """The publisher could not start, or its answers were not HTTP the lab's server sends."""


# The publisher process ----------------------------------------------------------------------------


class _Answers(asyncio.Protocol):
    """One keep-alive connection; each answer's status resolves the pending future."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.want: int | None = None  # body bytes still to come of the current answer
        self.status = 0
        self.pending: asyncio.Future[int] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.want is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        self._fail(PublishError("answer head larger than 16 KiB"))
                    return
                head = bytes(self.buf[:end]).decode("latin-1")
                del self.buf[: end + 4]
                try:
                    self.status, self.want = _parse_head(head)
                except PublishError as exc:
                    self._fail(exc)
                    return
            if len(self.buf) < self.want:
                return
            del self.buf[: self.want]
            self.want = None
            pending, self.pending = self.pending, None
            if pending is not None and not pending.done():
                pending.set_result(self.status)

    def _fail(self, exc: Exception) -> None:
        if self.pending is not None and not self.pending.done():
            self.pending.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pending is not None and not self.pending.done():
            self.pending.set_exception(PublishError(f"connection closed: {exc!r}"))
        if not self.lost.done():
            self.lost.set_result(None)

    def request(self, data: bytes) -> asyncio.Future[int]:
        """Send one request; the future is its answer's status."""
        assert self.transport is not None
        self.pending = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.pending


def _parse_head(head: str) -> tuple[int, int]:
    lines = head.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise PublishError(f"bad status line {lines[0][:80]!r}")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            if not value.strip().isdigit() or int(value) > MAX_BODY:
                raise PublishError(f"bad Content-Length {value.strip()[:20]!r}")
            length = int(value)
        elif name.strip().lower() == "transfer-encoding":
            raise PublishError("chunked answers are not expected from the publish API")
    return int(parts[1]), length


def request_bytes(host_header: str, channel: str, n: int, token: str = "") -> bytes:
    """The ``n``-th publish request, whole (head and body)."""
    body = json.dumps(
        {"type": EVENT_TYPE, "data": {"text": f"token {n}", "n": n}}, separators=(",", ":")
    ).encode()
    head = (
        f"POST /api/channels/{quote(channel, safe='')}/events HTTP/1.1\r\n"
        f"Host: {host_header}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    return head.encode() + b"\r\n" + body


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def publish(
    host: str,
    port: int,
    channel: str,
    rate: float,
    window: tuple[float, float],
    host_header: str = "",
    token: str = "",
) -> dict[str, Any]:
    """POST events one at a time until the window's end; the window's tally.

    ``rate``: requests per second, or :data:`FLAT_OUT`. At a fixed rate a request waits for its
    due time; one that is late goes at once, but a publisher more than one interval behind
    skips ahead (it does not burst to catch up: the rate reached is what the server allowed).
    ``window``: wall-clock (start, end); requests answered inside it are counted.
    """
    loop = asyncio.get_running_loop()
    host_header = host_header or f"{host}:{port}"
    _, conn = await loop.create_connection(_Answers, host, port)
    start, end = window
    end_mono = loop.time() + (end - time.time())
    interval = 0.0 if math.isinf(rate) else 1.0 / rate
    rtt = array("d")
    done = errors = total = 0
    statuses: dict[str, int] = {}
    messages: list[str] = []
    cpu0: float | None = None
    due = loop.time()
    n = 0
    try:
        while True:
            now = loop.time()
            if interval:
                if due > now:
                    await asyncio.sleep(due - now)
                    now = loop.time()
                due = max(due + interval, now - interval)
            if now >= end_mono:
                break
            in_window = time.time() >= start
            if in_window and cpu0 is None:
                cpu0 = _cpu()
            n += 1
            sent = time.perf_counter()
            try:
                status = await conn.request(request_bytes(host_header, channel, n, token))
            except PublishError as exc:
                errors += 1
                if len(messages) < 5:
                    messages.append(str(exc))
                await asyncio.sleep(0.1)
                _, conn = await loop.create_connection(_Answers, host, port)
                continue
            took = (time.perf_counter() - sent) * 1000.0
            total += 1
            if not in_window:
                continue
            if status == 201:
                done += 1
                rtt.append(took)
            else:
                errors += 1
                statuses[str(status)] = statuses.get(str(status), 0) + 1
    finally:
        if conn.transport is not None:
            conn.transport.close()
    cpu = _cpu() - cpu0 if cpu0 is not None else 0.0
    seconds = max(end - start, 1e-9)
    lat = latency_summary(rtt)
    return {
        "op": "published",
        "target_rate": None if math.isinf(rate) else rate,
        "published": done,
        "rate": done / seconds,
        "total": total,
        "errors": errors,
        "statuses": statuses,
        "messages": messages,
        "rtt_p50_ms": lat["p50"],
        "rtt_p99_ms": lat["p99"],
        "rtt_max_ms": lat["max"],
        "cpu_s": cpu,
        "cpu_pct": 100.0 * cpu / seconds,
    }


def parse_rate(text: str) -> float:
    """``max`` (flat out) or a positive number of requests per second.

    Raises:
        ValueError: anything else.
    """
    if text.strip().lower() in ("max", "inf", "flat"):
        return FLAT_OUT
    rate = float(text)
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"a rate is positive, or max: {text!r}")
    return rate


def main(argv: list[str] | None = None) -> int:
    """``python -m realtime_lab.bench.publisher``: publish, print the tally as one JSON line."""
    p = argparse.ArgumentParser(prog="python -m realtime_lab.bench.publisher")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--channel", default=CHANNEL)
    p.add_argument("--rate", type=parse_rate, default=100.0, help="requests/s, or max")
    p.add_argument("--start", type=float, required=True, help="window start (wall clock, s)")
    p.add_argument("--end", type=float, required=True, help="window end (wall clock, s)")
    p.add_argument("--host-header", default="")
    args = p.parse_args(argv)
    # A publisher credential (auth on): from the environment, never argv (ps shows argv).
    token = os.environ.get("RTL_PUBLISHER_TOKEN", "")
    try:
        result = asyncio.run(
            publish(
                args.host,
                args.port,
                args.channel,
                args.rate,
                (args.start, args.end),
                args.host_header,
                token,
            )
        )
    except (OSError, PublishError) as exc:
        print(json.dumps({"op": "error", "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


class PublisherProcess:
    """The publisher, started beside a run: :meth:`wait` for its tally after the window."""

    def __init__(
        self,
        host: str,
        port: int,
        rate: float,
        window: tuple[float, float],
        channel: str = CHANNEL,
        host_header: str = "",
    ) -> None:
        args = [sys.executable, "-m", "realtime_lab.bench.publisher", host, str(port)]
        args += ["--channel", channel, "--rate", "max" if math.isinf(rate) else repr(rate)]
        args += ["--start", repr(window[0]), "--end", repr(window[1])]
        if host_header:
            args += ["--host-header", host_header]
        self.end = window[1]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, grace: float = 30.0) -> dict[str, Any]:
        """Its tally, once it has published to the window's end and exited.

        Raises:
            PublishError: it failed, or is still running ``grace`` s after the window.
        """
        try:
            out, _ = self.proc.communicate(timeout=max(self.end - time.time(), 0.0) + grace)
        except subprocess.TimeoutExpired as exc:
            self.proc.kill()
            self.proc.communicate()
            raise PublishError("the publisher did not finish after the window") from exc
        try:
            reply: dict[str, Any] = json.loads(out.splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise PublishError(
                f"the publisher exited {self.proc.returncode}: {out[-200:]!r}"
            ) from exc
        if reply.get("op") != "published":
            raise PublishError(f"the publisher failed: {reply.get('error')}")
        return reply

    def kill(self) -> None:
        """Stop it now (a run that failed before its window)."""
        if self.proc.poll() is None:
            self.proc.kill()
        with suppress(subprocess.TimeoutExpired):
            self.proc.communicate(timeout=5)


# The benchmark points ---------------------------------------------------------------------------


def stream_path(transport: str, channel: str, tag: str) -> str:
    """The stream request every subscriber sends (from the next event on)."""
    return f"/{transport}/{quote(channel, safe='')}?after=now&client={quote(tag, safe='')}"


def run_point(
    config: Any,
    binary: str,
    transport: str,
    clients: int,
    rate: float,
    tag: str,
    bus: str = "memory",
    buses: Any = None,
) -> dict[str, Any]:
    """One run: ``clients`` subscribers of :data:`CHANNEL`, the publisher at ``rate``.

    On a Redis ``bus`` (servers of ``buses``, :mod:`.buses`) with several processes, the
    publisher posts to the first and the subscribers are spread over all of them.

    Raises:
        BenchError: the server, the load clients or the publisher failed.
    """
    from realtime_lab.bench import buses as bus_measures
    from realtime_lab.bench.server import machine_cpu

    processes = config.workers or env_cpus()
    capacity = plan(clients, processes, sources=config.sources)  # before the server starts
    options = {"ticker_rate": 0.0, "history": 1000}
    with target(config, options, bus, buses, tag=tag) as tgt:
        before = tgt.open_count(transport)
        time.sleep(0.2)  # let the fresh interpreter settle before the baseline
        rss0 = tgt.rss()
        path = stream_path(transport, CHANNEL, tag)
        fleet = Fleet(
            binary,
            tgt.host,
            tgt.port,
            transport,
            path,
            tgt.host_header,
            capacity.allowed,
            processes,
            capacity.sources,
            tgt.ports,
        )
        publisher: PublisherProcess | None = None
        try:
            with fleet:
                opened = fleet.open()
                tgt.wait_open(transport, before + opened["clients"], timeout=30.0)
                time.sleep(0.2)
                rss1 = tgt.rss()
                start = time.time() + config.warmup
                end = start + config.duration
                publisher = PublisherProcess(
                    tgt.host, tgt.port, rate, (start, end), host_header=tgt.host_header
                )
                time.sleep(max(start - time.time(), 0.0))
                fleet.start()
                each0, redis0, machine0 = tgt.cpu_each(), tgt.redis_cpu(), machine_cpu()
                time.sleep(max(end - time.time(), 0.0))
                each1, redis1, machine1 = tgt.cpu_each(), tgt.redis_cpu(), machine_cpu()
                rss_end, redis_rss = tgt.rss(), tgt.redis_rss()
                got = fleet.stop()
                published = publisher.wait()
        except (FleetError, PublishError) as exc:
            if publisher is not None:
                publisher.kill()
            raise BenchError(str(exc)) from exc
    open_clients = int(opened["clients"])
    server_cpu = sum(each1) - sum(each0) if each0 else None
    events = int(got["events"])
    duration = config.duration
    lat = latency_summary(got["latency"])
    offered = published["rate"] * open_clients
    spent = machine1[2] - machine0[2]
    on_bus = bus_measures.measures(
        [b - a for a, b in zip(each0, each1, strict=True)],
        None if redis0 is None or redis1 is None else redis1 - redis0,
        redis_rss,
        events,
        float(max(open_clients, 1)),
        duration,
    )
    return {
        **on_bus,
        "bus": bus,
        "rss_mb": None if rss_end is None else rss_end / 1024,
        "cpu_us_per_event": server_cpu / events * 1e6
        if server_cpu is not None and events
        else None,
        "events_per_s": events / duration,
        "expected_events_per_s": offered,
        "delivered_pct": 100.0 * events / duration / offered if offered else None,
        "p50_ms": lat["p50"],
        "p95_ms": lat["p95"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "lost": int(got["lost"]),
        "dup": int(got["dup"]),
        "reordered": int(got["reordered"]),
        "publish_rate": published["rate"],
        "publish_target": published["target_rate"],
        "publish_rtt_p50_ms": published["rtt_p50_ms"],
        "publish_rtt_p99_ms": published["rtt_p99_ms"],
        "publish_rtt_max_ms": published["rtt_max_ms"],
        "publish_errors": int(published["errors"]),
        "publisher_cpu_pct": published["cpu_pct"],
        "server_cpu_pct": None if server_cpu is None else 100.0 * server_cpu / duration,
        "cpu_s_per_1k": server_cpu / events * 1000 if server_cpu is not None and events else None,
        "client_cpu_pct": 100.0 * float(got["cpu"]) / duration,
        "machine_busy_pct": 100.0 * (machine1[0] - machine0[0]) / spent if spent > 0 else None,
        "rss_kb_per_conn": (rss1 - rss0) / open_clients
        if rss0 is not None and rss1 is not None and open_clients
        else None,
        "clients_open": open_clients,
        "failures": int(opened["failures"]) + int(got["failures"]),
        "disconnects": int(got["disconnects"]),
        "limits": capacity.limits,
        "errors": (list(opened["errors"]) + list(got["errors"]) + published["messages"])[:10],
    }


#: The measures summarised over repeats, in report order.
SUMMARY_KEYS: Final = (
    "publish_rate",
    "events_per_s",
    "expected_events_per_s",
    "delivered_pct",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "publish_rtt_p50_ms",
    "publish_rtt_p99_ms",
    "server_cpu_pct",
    "publisher_cpu_pct",
    "client_cpu_pct",
    "machine_busy_pct",
    "cpu_s_per_1k",
    "lost",
    "dup",
)


def run_publisher(
    config: Any, binary: str | None, progress: Any = None, buses: Any = None
) -> list[dict[str, Any]]:
    """Every (transport, rate, clients, bus) point of ``config`` with the publisher; the results.

    ``buses``: the :class:`~realtime_lab.bench.buses.BusBackends` of ``config.buses``' Redis
    points.

    Raises:
        BenchError: no native load client (the subscribers need it), or a run failed.
    """
    if binary is None:
        raise BenchError("--publisher http reads its streams with the native load client")
    from realtime_lab.bench.buses import SUMMARY_KEYS as BUS_KEYS

    points = []
    for transport in config.transports:
        for rate in config.rates:
            for clients in config.clients:
                for bus in config.buses:
                    runs = []
                    for rep in range(config.repeat):
                        if progress is not None:
                            label = "max" if math.isinf(rate) else f"{rate:g}/s"
                            progress.set_description(
                                f"publisher {transport}@{bus} x{clients} @{label}"
                            )
                        tag = f"bench-pub-{transport}-{clients}-{bus}-{rep}"
                        runs.append(
                            run_point(config, binary, transport, clients, rate, tag, bus, buses)
                        )
                        if progress is not None:
                            progress.update(1)
                    keys = (*SUMMARY_KEYS, *BUS_KEYS, "rss_mb")
                    summary = {k: spread(run.get(k) for run in runs) for k in keys}
                    points.append(
                        {
                            "transport": transport,
                            "label": config.bus_label(transport, bus),
                            "clients": clients,
                            "rate": None if math.isinf(rate) else rate,
                            "bus": bus,
                            "processes": config.processes_on(bus),
                            "runs": runs,
                            "summary": summary,
                        }
                    )
    return points


def markdown(points: list[dict[str, Any]]) -> str:
    """The publisher section of the report."""
    from realtime_lab.bench.report import fmt

    header = [
        "transport",
        "subscribers",
        "publish target/s",
        "publish reached/s",
        "delivered/s",
        "% of published",
        "p50 ms",
        "p99 ms",
        "max ms",
        "publish RTT p99 ms",
        "server CPU %",
        "publisher CPU %",
        "machine busy %",
        "lost",
        "dup",
    ]
    lines = [
        "## External publisher (`--publisher http`)",
        "",
        "One process POSTs each event to `/api/channels/bench.pub/events`, one request in "
        "flight on a keep-alive connection, at the target rate or flat out (`max`); the "
        "ticker is off. Delivered: events/s the subscribers received in the window; % of "
        "published: delivered / (publish rate reached x subscribers). Latency: receive time "
        "minus the event's `ts` (stamped when the server stored it); publish RTT: the POST's "
        "round trip as the publisher saw it. Machine busy: both cores, everything on the "
        "machine (over 90%: the numbers are bounded by the cores, not by the server alone).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for point in points:
        s = point["summary"]

        def med(key: str, s: dict[str, Any] = s) -> float | None:
            value = s[key]["median"]
            return None if value is None else float(value)

        target = "max" if point["rate"] is None else f"{point['rate']:g}"
        cells = [
            point.get("label", point["transport"]),
            str(point["clients"]),
            target,
            fmt(med("publish_rate"), "num"),
            fmt(med("events_per_s"), "rate"),
            fmt(med("delivered_pct"), "pct"),
            fmt(med("p50_ms"), "ms"),
            fmt(med("p99_ms"), "ms"),
            fmt(med("max_ms"), "ms"),
            fmt(med("publish_rtt_p99_ms"), "ms"),
            fmt(med("server_cpu_pct"), "pct"),
            fmt(med("publisher_cpu_pct"), "pct"),
            fmt(med("machine_busy_pct"), "pct"),
            fmt(med("lost"), "int"),
            fmt(med("dup"), "int"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    limits = sorted({m for p in points for r in p["runs"] for m in r["limits"]})
    lines += [""] + [f"Capped: {m}." for m in limits] + ([""] if limits else [])
    return "\n".join(lines)


def bad_runs(points: list[dict[str, Any]]) -> list[str]:
    """The runs that lost, duplicated or reordered events (the bench exits 1 for them)."""
    return [
        f"publisher {p['transport']} x{p['clients']}: lost {r['lost']}, dup {r['dup']}"
        for p in points
        for r in p["runs"]
        if r["lost"] or r["dup"] or r["reordered"]
    ]


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "CHANNEL",
    "FLAT_OUT",
    "PUBLISHER_TRANSPORTS",
    "PublishError",
    "PublisherProcess",
    "bad_runs",
    "main",
    "markdown",
    "parse_rate",
    "publish",
    "request_bytes",
    "run_point",
    "run_publisher",
    "stream_path",
]
