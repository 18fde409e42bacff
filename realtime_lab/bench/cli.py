"""``realtime-lab bench``: the subcommand (:mod:`realtime_lab.cli` calls :func:`add_parser`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from realtime_lab.bench.target import BenchConfig
from realtime_lab.config import COMPRESSION_MODES

TRANSPORT_NAMES = ("sse", "ws", "longpoll", "poll", "fetch", "openai")
#: The transports that read a channel: the ticker workload's (fetch and openai stream only the
#: chats their requests start).
TICKER_TRANSPORTS = ("sse", "ws", "longpoll", "poll")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("expected positive numbers")
    return values


def _rates(text: str) -> list[float]:
    """``--rate``: positive numbers, or ``max`` (flat out: ``--publisher http`` only)."""
    from realtime_lab.bench.publisher import parse_rate

    try:
        values = [parse_rate(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive numbers or max, got {text!r}"
        ) from exc
    if not values:
        raise argparse.ArgumentTypeError("expected positive numbers or max")
    return values


def _transports(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in TRANSPORT_NAMES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"transports are a comma-separated subset of {','.join(TRANSPORT_NAMES)}"
        )
    return values


def _modes(text: str) -> list[str]:
    modes = [part.strip() for part in text.split(",") if part.strip()]
    if not modes or set(modes) - set(COMPRESSION_MODES):
        raise argparse.ArgumentTypeError(
            f"compression modes are a comma-separated subset of {','.join(COMPRESSION_MODES)}"
        )
    return modes


def _vias(text: str) -> list[str]:
    from realtime_lab.bench.proxy import VIAS

    vias = [part.strip() for part in text.split(",") if part.strip()]
    if not vias or set(vias) - set(VIAS):
        raise argparse.ArgumentTypeError(
            f"--via takes a comma-separated subset of {','.join(VIAS)}"
        )
    return list(dict.fromkeys(vias))


def _buses(text: str) -> list[str]:
    from realtime_lab.bench.buses import BUS_KINDS

    kinds = [part.strip() for part in text.split(",") if part.strip()]
    if not kinds or set(kinds) - set(BUS_KINDS):
        raise argparse.ArgumentTypeError(
            f"buses are a comma-separated subset of {','.join(BUS_KINDS)}"
        )
    return list(dict.fromkeys(kinds))


def _server_option(text: str) -> tuple[str, str | bool]:
    from dataclasses import fields

    from realtime_lab.config import Settings

    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    known = {f.name for f in fields(Settings)} - {"host", "port"}
    if not sep or name not in known:
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE with NAME one of {', '.join(sorted(known))}"
        )
    if isinstance(getattr(Settings(), name), bool):  # a bare flag of `serve`
        return name, value.strip().lower() in ("1", "true", "yes", "on")
    return name, value.strip()


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench`` to the ``realtime-lab`` subcommands."""
    p = sub.add_parser(
        "bench",
        help="load-test the transports and report what each costs",
        description="Start a server process (or target --url), open N clients of each "
        "transport from load worker processes, drive the ticker (or many chats), and report "
        "per transport: delivered events/s, latency percentiles, time to first token, bytes and "
        "requests per token, server CPU per 1,000 deliveries, server RSS per connection, losses "
        "and duplicates. --workload chats: --chats users chatting continuously (tokens/s "
        "against offered, token and TTFT percentiles, chats/s, CPU per token), with "
        "--baseline naive the same users against a tutorial handler and the ratios to it. "
        "Writes results.json, results.md and one PNG per measure to --out. "
        "Exits 1 when any event was lost, duplicated or out of order.",
    )
    p.add_argument("--workload", choices=("ticker", "chats"), default="ticker")
    p.add_argument(
        "--transports",
        type=_transports,
        default=None,
        help="default sse,ws,longpoll,poll (--workload chats: and fetch, which streams only "
        "the chats its requests start)",
    )
    p.add_argument("--clients", type=_ints, default=None, help="sweep, default 10,100,1000")
    p.add_argument(
        "--rate",
        type=_rates,
        default=None,
        help="tokens/s of the ticker (per chat with --workload chats; of the publisher with "
        "--publisher http, where max is flat out); a list sweeps; default 100",
    )
    p.add_argument(
        "--poll-interval",
        type=_floats,
        default=None,
        help="short-poll interval in s; a list sweeps (poll only); default 1",
    )
    p.add_argument(
        "--compression",
        type=_modes,
        default=["off"],
        help="the server's --compression per point: off, message, connection; a list sweeps "
        "(the clients then ask for compression as a browser does); default off",
    )
    p.add_argument(
        "--via",
        type=_vias,
        default=["direct"],
        help="how the load clients reach the server per point: direct, or through nginx "
        "(deploy/nginx-h2.conf, TLS, started by the bench) over h1 (HTTP/1.1) or h2 (HTTP/2 "
        "streams multiplexed on shared connections; ws stays HTTP/1.1); a list sweeps, and the "
        "report compares bytes per token, nginx's $bytes_sent among them; default direct",
    )
    p.add_argument(
        "--bus",
        type=_buses,
        default=["memory"],
        help="the bus per point: memory (one process), redis (a private redis-server the "
        "bench starts), cluster (a private Redis Cluster of three primaries); a list sweeps "
        "and the report compares each with memory (server and Redis CPU per event); default "
        "memory",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="server processes of a redis or cluster point, sharing its bus (memory: 1); the "
        "load spreads over them, and a chat is read on another process than the one that "
        "generates it; default 1",
    )
    p.add_argument(
        "--cluster-replicas",
        type=int,
        default=0,
        help="replicas per primary of --bus cluster (0)",
    )
    p.add_argument("--duration", type=float, default=None, help="measured s per run (10)")
    p.add_argument("--warmup", type=float, default=None, help="s before measuring (3)")
    p.add_argument("--repeat", type=int, default=None, help="runs per point (3)")
    p.add_argument(
        "--url",
        default=None,
        help="target this running http:// server instead of starting one (no CPU/RSS then; "
        "the bench sets its ticker_rate with PATCH /api/config)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="results folder")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run under a minute: 10,50 clients, 2 s windows, 1 run, all transports, "
        "plus a small slow-subscriber scenario (flags given explicitly still win)",
    )
    p.add_argument(
        "--scenario",
        choices=("sweep", "slow-subscriber", "all", "scale"),
        default=None,
        help="what to run: the sweep (default), the slow-subscriber scenario, or both "
        "(--quick: both); scale: --scale-subscribers SSE clients of one channel at "
        "--scale-rate, then --scale-idle idle SSE connections with heartbeats",
    )
    p.add_argument(
        "--publisher",
        choices=("ticker", "http"),
        default="ticker",
        help="who feeds the broadcast: the server's ticker (default), or http: an external "
        "process POSTing each event to /api/channels/{channel}/events, one request in flight "
        "(sse and ws subscribers; reports the publish rate reached)",
    )
    p.add_argument(
        "--scale-subscribers", type=int, default=10_000, help="scale: subscribers (10000; 0 skips)"
    )
    p.add_argument("--scale-rate", type=float, default=10.0, help="scale: events/s there (10)")
    p.add_argument(
        "--scale-idle", type=int, default=50_000, help="scale: idle connections (50000; 0 skips)"
    )
    p.add_argument(
        "--sources",
        type=int,
        default=0,
        help="127.0.0.x source addresses for the publisher and scale clients (0: as many as "
        "the count needs, one per ~25k connections)",
    )
    p.add_argument(
        "--chats",
        type=_ints,
        default=None,
        help="--workload chats: concurrent users, a sweep (default: --clients's): each starts "
        "a chat, reads its whole answer at --rate tokens/s, then starts the next",
    )
    p.add_argument(
        "--readers",
        type=int,
        default=1,
        help="--workload chats: readers of each chat on sse, ws and the polls (1; fetch and "
        "openai: the one request that starts it)",
    )
    p.add_argument(
        "--chat-tokens",
        type=int,
        default=200,
        help="most tokens a chat's answer has (200: longer than any simulated answer, 40-110 "
        "tokens, so each is read whole, as a typical chat answer of a few sentences is)",
    )
    p.add_argument(
        "--ttft-ms",
        type=float,
        default=0.0,
        help="chats' simulated first-token delay (0: the TTFT measured is the server's own)",
    )
    p.add_argument(
        "--baseline",
        choices=("naive", "floor"),
        default=None,
        help="naive, with --workload chats: the same users against a tutorial aiohttp handler "
        "(realtime_lab/bench/naive.py: one GET per chat, sleep and write), in the same run, "
        "and the ratios to it in the report; floor, with --scenario scale: the same "
        "subscribers against a bare C broadcaster (realtime_lab/bench/floor.c: one send() per "
        "subscriber and nothing else), what this machine gives a fan-out at all",
    )
    p.add_argument("--workers", type=int, default=0, help="load worker processes (0: one per CPU)")
    p.add_argument(
        "--load-client",
        choices=("auto", "native", "python"),
        default="auto",
        help="who reads SSE and WebSocket streams: the C client built from loadclient.c "
        "(native), the asyncio clients (python), or native when a C compiler is found (auto, "
        "the default)",
    )
    p.add_argument("--stalled", type=int, default=None, help="stalled SSE clients (50)")
    p.add_argument("--stall-clients", type=int, default=None, help="normal SSE clients (100)")
    p.add_argument("--stall-rate", type=float, default=None, help="ticker tokens/s there (500)")
    p.add_argument(
        "--stall-send-buffer", type=int, default=None, help="server send_buffer there (65536)"
    )
    p.add_argument(
        "--server-option",
        action="append",
        type=_server_option,
        default=[],
        metavar="NAME=VALUE",
        help="extra `serve` setting for the bench's own server, e.g. coalesce_ms=5 (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.set_defaults(func=run)


#: What an unset flag means, in a normal run and with --quick (``--transports``: every
#: transport the workload has, see :func:`config_from_args`).
NORMAL = {
    "clients": [10, 100, 1000],
    "rate": [100.0],
    "poll_interval": [1.0],
    "duration": 10.0,
    "warmup": 3.0,
    "repeat": 3,
    "stall_clients": 100,
    "stalled": 50,
    "stall_rate": 500.0,
    "stall_send_buffer": 64 * 1024,
}
QUICK = {
    **NORMAL,
    "clients": [10, 50],
    "duration": 2.0,
    "warmup": 1.0,
    "repeat": 1,
    "stall_clients": 20,
    "stalled": 20,
    "stall_rate": 1000.0,
    "stall_send_buffer": 32 * 1024,
}


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` the flags describe (``--quick`` fills what was not given)."""

    quick = bool(args.quick)
    defaults = QUICK if quick else NORMAL

    def get(name: str) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    scenario = args.scenario or ("all" if quick else "sweep")
    duration = float(get("duration"))
    transports = args.transports
    if transports is None:
        transports = list(TRANSPORT_NAMES if args.workload == "chats" else TICKER_TRANSPORTS)
        if args.publisher == "http":
            transports = ["sse", "ws"]
    return BenchConfig(
        out=args.out,
        workload=args.workload,
        transports=list(transports),
        clients=list(args.chats if args.workload == "chats" and args.chats else get("clients")),
        rates=list(get("rate")),
        poll_intervals=list(get("poll_interval")),
        compression=list(args.compression),
        via=list(args.via),
        buses=list(args.bus),
        processes=args.processes,
        cluster_replicas=args.cluster_replicas,
        duration=duration,
        warmup=float(get("warmup")),
        repeat=int(get("repeat")),
        url=args.url,
        workers=args.workers,
        load_client=args.load_client,
        readers=args.readers,
        chat_tokens=args.chat_tokens,
        ttft_ms=args.ttft_ms,
        baseline=args.baseline,
        sweep=scenario in ("sweep", "all"),
        slow_subscriber=scenario in ("slow-subscriber", "all"),
        stall_clients=int(get("stall_clients")),
        stalled=int(get("stalled")),
        stall_rate=float(get("stall_rate")),
        stall_send_buffer=int(get("stall_send_buffer")),
        # The stalled clients need a few seconds to fill their buffers and be ended.
        stall_duration=max(duration, 3.0 if quick else 6.0),
        progress=not args.no_progress,
        quick=quick,
        server_options=dict(args.server_option),
        publisher=args.publisher,
        scale=scenario == "scale",
        scale_subscribers=args.scale_subscribers,
        scale_rate=args.scale_rate,
        scale_idle=args.scale_idle,
        sources=args.sources,
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe; print the Markdown report."""
    from realtime_lab.bench.report import markdown, write_results
    from realtime_lab.bench.runner import run_bench
    from realtime_lab.errors import RealtimeLabError

    config = config_from_args(args)
    if config.url is not None and not config.url.startswith("http://"):
        print("realtime-lab bench: --url must be an http:// URL", file=sys.stderr)
        return 2
    try:
        results = run_bench(config)
    except RealtimeLabError as exc:
        print(f"realtime-lab bench: {exc}", file=sys.stderr)
        return 2
    written = write_results(results, config.out, plots=not args.no_plots)
    print(markdown(results))
    extra_md = _sections(results, config.out)
    if extra_md:
        print(extra_md)
    print(f"wrote {len(written)} files to {config.out}/ in {results['wall_s']:.1f} s")
    bad = [
        f"{p['label']} x{p['clients']}: lost {run['lost']}, dup {run['dup']}"
        for p in results["points"]
        for run in p["runs"]
        if run["lost"] or run["dup"] or run.get("reordered")
    ]
    from realtime_lab.bench import publisher, scale

    bad += publisher.bad_runs(results.get("publisher") or [])
    bad += scale.bad_runs(results.get("scale") or {})
    slow = results.get("slow_subscriber")
    if slow:
        for phase in ("without_stalled", "with_stalled"):
            if slow[phase]["lost"] or slow[phase]["dup"]:
                bad.append(f"slow-subscriber {phase}: lost/dup")
    if bad:
        print("realtime-lab bench: events lost or duplicated: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


def _sections(results: dict[str, Any], out: Path) -> str:
    """The bus, publisher and scale sections (also written to ``sections.md`` beside
    results.md)."""
    from realtime_lab.bench import buses, publisher, scale

    parts = []
    chats = results["config"]["workload"] == "chats"
    unit = ("tokens", "token") if chats else ("deliveries", "delivery")
    parts.append(buses.markdown(results["points"], *unit))
    if results.get("publisher"):
        parts.append(publisher.markdown(results["publisher"]))
        parts.append(buses.markdown(results["publisher"], "deliveries", "delivery"))
    if results.get("scale"):
        parts.append(scale.markdown(results["scale"]))
    text = "\n".join(part for part in parts if part)
    if text:
        (out / "sections.md").write_text(text)
    return text
