"""The benchmark's outputs: ``results.json``, ``results.md`` (printed too) and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from realtime_lab.bench.stats import Spread

#: Table columns: (measure key, header, formatter name).
COLUMNS = (
    ("events_per_s", "events/s", "rate"),
    ("offered_pct", "% offered", "pct"),
    ("p50_ms", "p50 ms", "ms"),
    ("p95_ms", "p95 ms", "ms"),
    ("p99_ms", "p99 ms", "ms"),
    ("max_ms", "max ms", "ms"),
    ("ttft_ms", "TTFT ms", "ms"),
    ("bytes_per_token", "bytes/token", "num"),
    ("requests_per_token", "req/token", "small"),
    ("cpu_s_per_1k", "CPU s/1k", "small"),
    ("rss_kb_per_conn", "RSS KiB/conn", "num"),
    ("lost", "lost", "int"),
    ("dup", "dup", "int"),
)


#: The chats workload's table: (measure key, header, formatter name).
CHAT_COLUMNS = (
    ("events_per_s", "tokens/s", "rate"),
    ("offered_pct", "% offered", "pct"),
    ("p50_ms", "p50 ms", "ms"),
    ("p99_ms", "p99 ms", "ms"),
    ("max_ms", "max ms", "ms"),
    ("gap_p99_ms", "gap p99 ms", "ms"),
    ("ttft_ms", "TTFT p50 ms", "ms"),
    ("ttft_p99_ms", "TTFT p99 ms", "ms"),
    ("chats_per_s", "chats/s", "num"),
    ("tokens_per_chat", "tokens/chat", "num"),
    ("cpu_us_per_token", "CPU µs/token", "num"),
    ("server_cpu_pct", "server CPU %", "int"),
    ("rss_mb", "RSS MiB", "num"),
    ("lost", "lost", "int"),
    ("dup", "dup", "int"),
)
#: The ratios to the baseline: (measure key, header, whether higher is better).
RATIOS = (
    ("events_per_s", "tokens/s", True),
    ("cpu_us_per_token", "CPU per token", False),
    ("p99_ms", "token p99", False),
    ("ttft_p99_ms", "TTFT p99", False),
)
#: Transports whose stream has no timestamps: token latency is not measured there.
NO_LATENCY = frozenset({"openai"})


def fmt(value: float | None, kind: str) -> str:
    """One number as the table shows it (``n/a`` when not measured)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "int":
        return f"{value:.0f}"
    if kind == "pct":
        return f"{value:.0f}%"
    if kind == "rate":
        return f"{value / 1000:.1f}k" if abs(value) >= 10_000 else f"{value:.0f}"
    if kind == "small":
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) >= 0.001 else f"{value:.1e}"
    # ms and plain numbers: three significant digits, no exponent for ordinary sizes
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def cell(spread: Spread | None, kind: str, ranges: bool) -> str:
    """``median [min-max]`` (just the median when there was one run, or min == max)."""
    if spread is None:
        return "n/a"
    mid = fmt(spread["median"], kind)
    low, high = spread["min"], spread["max"]
    if not ranges or low is None or high is None or fmt(low, kind) == fmt(high, kind):
        return mid
    return f"{mid} [{fmt(low, kind)}-{fmt(high, kind)}]"


def _offered(summary: dict[str, Any]) -> Spread | None:
    got, offered = summary.get("events_per_s"), summary.get("expected_events_per_s")
    if not got or not offered or not offered["median"] or got["median"] is None:
        return None
    ratio = 100.0 * got["median"] / offered["median"]
    return {"median": ratio, "min": None, "max": None}


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _load_client_line(load_client: dict[str, Any] | None, workload: str = "ticker") -> str:
    streams = "SSE and WebSocket" if workload == "ticker" else "Chats"
    if not load_client or load_client.get("streams") != "native":
        note = f" ({load_client['note']})" if load_client and load_client.get("note") else ""
        return f"{streams} read by the asyncio load clients{note}."
    if workload == "chats":
        return (
            "Chats (sse, ws, fetch, openai and the baseline, one reader each) run by the native "
            "load client (loadclient.c, one epoll loop per worker), polls and chats of several "
            "readers by the asyncio ones."
        )
    others = "polls"
    return (
        f"{streams} read by the native load client (loadclient.c, one epoll loop per "
        f"worker), {others} by the asyncio ones."
    )


def markdown(results: dict[str, Any]) -> str:
    """``results.md``: what was run, on what, and the tables."""
    config, machine = results["config"], results["machine"]
    ranges = int(config["repeat"]) > 1
    lines = [
        "# realtime-lab bench",
        "",
        f"Workload **{config['workload']}**, {config['duration']:g} s windows after "
        f"{config['warmup']:g} s warm-up, {config['repeat']} run(s) per point"
        + (" (median [min-max])" if ranges else "")
        + f"; server: {config['url'] or 'own process per run'}; "
        f"{machine['load_workers']} load worker process(es); "
        + _load_client_line(results.get("load_client"), config["workload"]),
        f"Machine: {machine['cpus']} CPUs, {machine['platform']}, Python {machine['python']}, "
        f"load average at start {machine['loadavg_at_start']}. "
        f"Wall time {results['wall_s']:.0f} s.",
        "",
    ]
    points = results["points"]
    if points and config["workload"] == "chats":
        lines += _chats_tables(points, ranges)
        lines += _load_table(points, ranges)
    elif points:
        rates = sorted({p["rate"] for p in points})
        for rate in rates:
            unit = "tokens/s per client" if config["workload"] == "ticker" else "tokens/s per chat"
            lines += [f"## Rate {rate:g} {unit}", ""]
            header = ["transport", "clients"] + [h for _, h, _ in COLUMNS]
            lines += [_row(header), _row(["---"] * len(header))]
            for point in (p for p in points if p["rate"] == rate):
                summary = point["summary"]
                cells = [point["label"], str(point["clients"])]
                for key, _, kind in COLUMNS:
                    spread = _offered(summary) if key == "offered_pct" else summary.get(key)
                    cells.append(cell(spread, kind, ranges and key != "offered_pct"))
                lines.append(_row(cells))
            lines.append("")
        lines += _load_table(points, ranges)
    lines += _via_table(points, ranges)
    scenario = results.get("slow_subscriber")
    if scenario:
        lines += _slow_table(scenario)
    lines += [
        "Latency: receive time minus the envelope's `ts` (one clock). TTFT: ticker - a client "
        "joining mid-window until its first token; chats - from `POST /api/chats` (fetch: from "
        "its `POST /api/chats/stream`, which starts the chat and streams it; one client per "
        "chat, so its clients are its chats). Bytes: "
        "HTTP bytes received plus sent by the load clients in the window (headers, chunk and "
        "frame overhead included; TCP/IP headers not), per delivered token; requests: HTTP "
        "requests sent in the window (a WebSocket or SSE connection is one, and so is each "
        "POST that starts a chat), per token. "
        "RSS/conn: (server RSS with the clients connected and idle - before) / clients. "
        "`% offered`: delivered / (rate x clients).",
        "",
    ]
    return "\n".join(lines)


def _chats_tables(points: list[dict[str, Any]], ranges: bool) -> list[str]:
    """The chats workload: one table per rate, and the ratios to the baseline's points."""
    lines: list[str] = []
    for rate in sorted({p["rate"] for p in points}):
        at_rate = [p for p in points if p["rate"] == rate]
        lines += [
            f"## {rate:g} tokens/s per chat",
            "",
            "Users chatting continuously: each starts a chat, reads its whole answer, then "
            "starts the next. Offered: rate x users.",
            "",
        ]
        header = ["transport", "users"] + [h for _, h, _ in CHAT_COLUMNS]
        lines += [_row(header), _row(["---"] * len(header))]
        for point in at_rate:
            summary = point["summary"]
            cells = [point["label"], str(point["clients"])]
            for key, _, kind in CHAT_COLUMNS:
                if point["transport"] in NO_LATENCY and key in ("p50_ms", "p99_ms", "max_ms"):
                    cells.append("—")
                    continue
                spread = _offered(summary) if key == "offered_pct" else summary.get(key)
                cells.append(cell(spread, kind, ranges and key != "offered_pct"))
            lines.append(_row(cells))
        lines.append("")
        lines += _ratio_table(at_rate)
    lines += [
        "Token latency: receive time minus the envelope's `ts`. The OpenAI endpoint's chunks "
        "carry no id and no timestamp, so its token latency is not measured (—): its gap p99 "
        "(the time between a stream's consecutive tokens, as received, on every transport) "
        "compares it with the others; the simulated generator itself spaces tokens "
        "1/rate ±33%. TTFT: from the request that starts the chat (`POST /api/chats`, "
        "`POST /api/chats/stream`, `POST /v1/chat/completions`, the baseline's `GET /chat`) "
        "to its first token, for chats whose first token came in the window. CPU µs/token: "
        "the server process's CPU time in the window / tokens delivered. RSS: the server's "
        "at the end of the window.",
        "",
    ]
    return lines


def _ratio(point: dict[str, Any], base: dict[str, Any], key: str) -> float | None:
    value, reference = point["summary"].get(key), base["summary"].get(key)
    if not value or not reference or value["median"] is None or not reference["median"]:
        return None
    if point["transport"] in NO_LATENCY and key == "p99_ms":
        return None
    return float(value["median"]) / float(reference["median"])


def _ratio_table(points: list[dict[str, Any]]) -> list[str]:
    """Each transport's point against the baseline's at the same users and rate."""
    bases = {p["clients"]: p for p in points if p["transport"] == "naive"}
    others = [p for p in points if p["transport"] != "naive" and p["clients"] in bases]
    if not others:
        return []
    header = ["transport", "users"] + [f"{h} vs naive" for _, h, _ in RATIOS]
    lines = [
        "Against the baseline (the tutorial handler, `--baseline naive`, same users, same "
        "load client, same run): realtime-lab's figure / the baseline's. Tokens/s: above 1 "
        "is better; CPU per token, p99 and TTFT p99: below 1 is better.",
        "",
        _row(header),
        _row(["---"] * len(header)),
    ]
    for point in others:
        base = bases[point["clients"]]
        cells = [point["label"], str(point["clients"])]
        for key, _, _ in RATIOS:
            ratio = _ratio(point, base, key)
            cells.append("—" if ratio is None else f"{ratio:.2f}x")
        lines.append(_row(cells))
    lines.append("")
    return lines


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The ratios of the report's baseline table, one dict per compared point."""
    out = []
    points = results["points"]
    for rate in sorted({p["rate"] for p in points}):
        at_rate = [p for p in points if p["rate"] == rate]
        bases = {p["clients"]: p for p in at_rate if p["transport"] == "naive"}
        for point in at_rate:
            base = bases.get(point["clients"])
            if base is None or point is base:
                continue
            row: dict[str, Any] = {"label": point["label"], "users": point["clients"]}
            row["rate"] = rate
            for key, _, _ in RATIOS:
                row[key] = _ratio(point, base, key)
            out.append(row)
    return out


def _load_table(points: list[dict[str, Any]], ranges: bool) -> list[str]:
    header = [
        "transport",
        "clients",
        "rate",
        "server CPU %",
        "load-client CPU %",
        "machine busy %",
        "softirq %",
        "late TTFT probes",
        "failed",
        "disconnects",
        "overflows",
        "resets",
    ]
    lines = [
        "## Load and errors",
        "",
        "Server CPU % is of one core (the server is one process; its loopback TCP work done in "
        "softirq context is charged to no process, so it is not in this column nor in CPU "
        "s/1k). Load-client CPU % is summed over the worker processes. Machine busy % and "
        "softirq % are of all CPUs, everyone's load included: near 100% busy the point measured "
        "the machine, not the server alone. A late TTFT probe had no first token within 20 s "
        "(its wait counts as a lower bound).",
        "",
        _row(header),
        _row(["---"] * len(header)),
    ]
    for point in points:
        summary, runs = point["summary"], point["runs"]
        lines.append(
            _row(
                [
                    point["label"],
                    str(point["clients"]),
                    f"{point['rate']:g}",
                    cell(summary["server_cpu_pct"], "int", ranges),
                    cell(summary["client_cpu_pct"], "int", ranges),
                    cell(summary.get("machine_busy_pct"), "int", ranges),
                    cell(summary.get("machine_softirq_pct"), "int", ranges),
                    str(sum(r.get("ttft_late", 0) for r in runs)),
                    str(sum(r["failures"] for r in runs)),
                    str(sum(r["disconnects"] for r in runs)),
                    str(sum(r["overflows"] for r in runs)),
                    str(sum(r["resets"] for r in runs)),
                ]
            )
        )
    lines.append("")
    return lines


#: The via table's columns: (via, measure key, header).
VIA_COLUMNS = (
    ("direct", "bytes_down_per_token", "direct: client received"),
    ("h1", "bytes_down_per_token", "HTTP/1.1: client received"),
    ("h1", "nginx_bytes_per_token", "HTTP/1.1: nginx sent"),
    ("h2", "bytes_down_per_token", "HTTP/2: client received"),
    ("h2", "nginx_bytes_per_token", "HTTP/2: nginx sent"),
    ("h1", "nginx_head_bytes_per_request", "head/request HTTP/1.1"),
    ("h2", "nginx_head_bytes_per_request", "head/request HTTP/2"),
    ("h1", "nginx_requests_per_token", "req/token HTTP/1.1"),
    ("h2", "nginx_requests_per_token", "req/token HTTP/2"),
    ("h1", "nginx_cpu_us_per_token", "nginx µs/token HTTP/1.1"),
    ("h2", "nginx_cpu_us_per_token", "nginx µs/token HTTP/2"),
)


def _via_table(points: list[dict[str, Any]], ranges: bool) -> list[str]:
    """``--via``: bytes per token of each point direct, and through nginx over HTTP/1.1 and
    HTTP/2, side by side (the same transport, clients, rate and interval)."""
    if all(p.get("via", "direct") == "direct" for p in points):
        return []
    groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for p in points:
        same = (p["transport"], p["clients"], p["rate"], p["poll_interval"], p.get("bus"))
        groups.setdefault(same, {})[p.get("via", "direct")] = p
    vias = {via for group in groups.values() for via in group}
    columns = [c for c in VIA_COLUMNS if c[0] in vias]
    header = ["transport", "clients", "rate"] + [h for _, _, h in columns]
    lines = [
        "## Through nginx: bytes per token",
        "",
        "The same points with the load clients straight on the server (direct) and through "
        "nginx with TLS (`--via`, `deploy/nginx-h2.conf`): over HTTP/1.1 (its HTTP/1.1-only "
        "port), and over HTTP/2 (streams of up to five clients multiplexed on one connection, "
        "as a browser tab's; WebSocket stays HTTP/1.1 through nginx, which does not do RFC "
        "8441). Client received: the HTTP bytes the load clients read in the window per token "
        "(HTTP/2: every frame, its 9-byte header, HPACK-coded HEADERS, SETTINGS, WINDOW_UPDATE "
        "and PING included; TLS records not). nginx sent: `$bytes_sent` of the point's "
        "requests in nginx's access log (HTTP/2: the stream's HEADERS and DATA frames), over "
        "the tokens those requests' clients received in their whole lives. Head/request: "
        "(`$bytes_sent` - `$body_bytes_sent`) per request: the response's headers, and over "
        "HTTP/2 each DATA frame's 9-byte header too (HTTP/1.1's chunk framing counts as body). "
        "Req/token: the requests nginx logged per token. nginx "
        "µs/token: nginx's CPU time in the window per token.",
        "",
        _row(header),
        _row(["---"] * len(header)),
    ]
    for (_, clients, rate, _, _), group in groups.items():
        label = next(iter(group.values()))["label"].split(" via ")[0]
        cells = [label, str(clients), f"{rate:g}"]
        for via, key, _ in columns:
            point = group.get(via)
            cells.append("n/a" if point is None else cell(point["summary"].get(key), "num", ranges))
        lines.append(_row(cells))
    lines.append("")
    return lines


def _slow_table(s: dict[str, Any]) -> list[str]:
    header = ["normal SSE clients", "events/s", "p50 ms", "p95 ms", "p99 ms", "max ms"]
    header += ["lost", "dup"]
    lines = [
        "## Slow-subscriber scenario",
        "",
        f"{s['normal_clients']} normal SSE clients on the ticker at {s['rate']:g} tokens/s; then "
        f"{s['stalled_clients']} stalled SSE clients (never read; 4 KiB receive buffer, "
        f"1460-byte MSS) join for {s['phase_s']:g} s. Server send_buffer "
        f"{s['send_buffer'] // 1024} KiB. Lost/dup count over the normal clients' whole lives.",
        "",
        _row(header),
        _row(["---"] * len(header)),
    ]
    for name, phase in (
        ("without stalled", s["without_stalled"]),
        ("with stalled", s["with_stalled"]),
    ):
        lines.append(
            _row(
                [
                    name,
                    fmt(phase["events_per_s"], "rate"),
                    fmt(phase["p50_ms"], "ms"),
                    fmt(phase["p95_ms"], "ms"),
                    fmt(phase["p99_ms"], "ms"),
                    fmt(phase["max_ms"], "ms"),
                    str(phase["lost"]),
                    str(phase["dup"]),
                ]
            )
        )
    growth, bound = s["rss_growth_kb"], s["rss_bound_kb"]
    lines += [
        "",
        f"Stalled clients ended by the server (overflow): {s['server_overflows']} of "
        f"{s['stalled_clients']} (server count)"
        + (
            f", all within {s['all_ended_after_s']:.1f} s of joining"
            if s.get("all_ended_after_s") is not None
            else ""
        )
        + f"; {s['stalled_ended_seen_by_client']} seen closed by the clients, "
        f"{s['stalled_still_open']} still open at the end.",
        f"Server RSS: {fmt(s['rss_kb_before'], 'num')} KiB before, peak "
        f"{fmt(s['rss_kb_peak'], 'num')} KiB, {fmt(s['rss_kb_after'], 'num')} KiB after; growth "
        f"{fmt(growth, 'num')} KiB ({fmt(s['rss_growth_kb_per_stalled'], 'num')} KiB per stalled "
        f"client) against a bound of {fmt(bound, 'num')} KiB (1 MiB of allocator noise + "
        "stalled x (1.25 x send_buffer, for the write buffer's over-allocation, + 16 KiB for "
        "the connection itself)): "
        f"{'within' if s['within_bound'] else 'NOT within'} bound. The kernel's socket buffers "
        "are not in RSS."
        if growth is not None
        else "Server RSS: n/a (external server).",
        "",
    ]
    return lines


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_results(results: dict[str, Any], out: Path, plots: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and (with ``plots``) one PNG per measure.

    Returns:
        The written files by kind (``json``, ``md``, and ``png:<measure>``).
    """
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    json_path = out / "results.json"
    if results["points"] and results["config"]["workload"] == "chats":
        results = {**results, "vs_baseline": ratios(results)}
    json_path.write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    written["json"] = json_path
    md_path = out / "results.md"
    md_path.write_text(markdown(results))
    written["md"] = md_path
    if plots and results["points"]:
        from realtime_lab.bench.plots import plot_measures

        for key, path in plot_measures(results, out).items():
            written[f"png:{key}"] = path
    return written
