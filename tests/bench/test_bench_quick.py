"""A tiny real benchmark: server process, load workers, every output file, plausible numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from realtime_lab.bench import runner
from realtime_lab.bench.plots import SKIP
from realtime_lab.bench.report import markdown, write_results
from realtime_lab.bench.runner import run_bench
from realtime_lab.bench.stats import MEASURES
from realtime_lab.bench.target import BenchConfig, BenchError

pytestmark = pytest.mark.slow


def test_tiny_sweep_and_slow_subscriber(tmp_path: Path) -> None:
    config = BenchConfig(
        out=tmp_path,
        transports=["ws", "poll"],
        clients=[5],
        rates=[50.0],
        poll_intervals=[0.25],
        duration=2.0,
        warmup=0.5,
        repeat=1,
        workers=1,
        slow_subscriber=True,
        stall_clients=3,
        stalled=10,
        stall_rate=1000.0,
        stall_send_buffer=16 * 1024,
        stall_duration=2.0,
        progress=False,
    )
    results = run_bench(config)
    written = write_results(results, tmp_path)

    assert json.loads((tmp_path / "results.json").read_text())["points"]
    md = (tmp_path / "results.md").read_text()
    assert "| ws | 5 |" in md
    assert "| poll | 5 |" in md
    assert "Slow-subscriber scenario" in md
    for key, _, _ in MEASURES:
        if key in SKIP["ticker"]:
            assert not (tmp_path / f"{key}.png").exists()
            continue
        png = tmp_path / f"{key}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
        assert written[f"png:{key}"] == png

    by_transport = {p["transport"]: p["runs"][0] for p in results["points"]}
    for name, run in by_transport.items():
        assert run["events_per_s"] > 0, name
        assert run["lost"] == 0, name
        assert run["dup"] == 0, name
        assert run["failures"] == 0, (name, run["errors"])
        assert run["cpu_s_per_1k"] is not None, name
        assert run["cpu_s_per_1k"] > 0, name
        assert run["rss_kb_per_conn"] is not None, name
    # A poll answer carries HTTP headers and a JSON wrapper for a few events; a WebSocket frame
    # adds two bytes to each envelope.
    assert by_transport["poll"]["bytes_per_token"] > by_transport["ws"]["bytes_per_token"]
    assert by_transport["poll"]["requests_per_token"] > 0
    assert by_transport["ws"]["requests_per_token"] == 0
    assert by_transport["poll"]["p50_ms"] > by_transport["ws"]["p50_ms"]

    slow = results["slow_subscriber"]
    assert slow["stalled_clients"] == 10
    assert slow["server_overflows"] == 10, repr(slow)  # every stalled client was ended ...
    assert slow["within_bound"] is True, repr(slow)  # ... and the memory they cost stayed bounded
    for phase in ("without_stalled", "with_stalled"):
        assert slow[phase]["events_per_s"] > 0
        assert slow[phase]["lost"] == 0
        assert slow[phase]["dup"] == 0
        assert slow[phase]["overflows"] == 0  # the normal clients were never ended


def chats_config(
    out: Path, transports: list[str], load_client: str = "auto", **extra: Any
) -> BenchConfig:
    return BenchConfig(
        out=out,
        workload="chats",
        transports=transports,
        clients=[4],
        rates=[200.0],
        chat_tokens=20,
        ttft_ms=50.0,
        duration=1.5,
        warmup=0.5,
        repeat=1,
        workers=1,
        progress=False,
        load_client=load_client,
        **extra,
    )


def test_tiny_chats_workload(tmp_path: Path) -> None:
    # Two readers per chat: the asyncio clients read ws and longpoll (the native one reads
    # chats of one reader).
    config = chats_config(tmp_path, ["ws", "longpoll", "fetch"], readers=2)
    results = run_bench(config)
    for point in results["points"]:
        run = point["runs"][0]
        name = point["transport"]
        assert run["chats_done"] > 0, name
        assert run["events_per_s"] > 0, name
        assert (run["lost"], run["dup"], run["failures"]) == (0, 0, 0), (name, run["errors"])
        # Every chat ends with `end`: the WebSocket's close 1000 after it is not a disconnect.
        assert run["disconnects"] == 0, (name, run["errors"])
        assert run["incomplete"] == 0, (name, run["errors"])
        assert run["ttft_ms"] >= config.ttft_ms, name  # timed from the POST that made the chat
        assert run["rss_kb_per_conn"] is None, name  # not measured with connections churning
    by_transport = {p["transport"]: p["runs"][0] for p in results["points"]}
    fetch, ws = by_transport["fetch"], by_transport["ws"]
    # The POST that starts a chat counts, whoever streams it: a fetch chat of 20 tokens costs
    # that one request; a WebSocket chat the POST plus a handshake per reader (2), for 40.
    assert fetch["requests_per_token"] == pytest.approx(1 / 20, rel=0.2)
    assert ws["requests_per_token"] == pytest.approx(3 / 40, rel=0.2)
    # Four users, each with one chat at a time: 4 x 200 tokens/s offered, 2 readers on ws.
    assert fetch["expected_events_per_s"] == 800.0
    assert "| fetch | 4 |" in markdown(results)


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)
def test_chats_against_the_naive_baseline(tmp_path: Path) -> None:
    """sse, ws, fetch and openai users, and the baseline's, in one run; the report's ratios."""
    config = chats_config(tmp_path, ["sse", "ws", "fetch", "openai"], baseline="naive")
    config.ttft_ms, config.rates = 0.0, [100.0]
    results = run_bench(config)
    written = write_results(results, tmp_path)
    for key in ("events_per_s", "p99_ms", "ttft_p99_ms", "cpu_us_per_token", "chats_per_s"):
        assert written[f"png:{key}"].read_bytes()[:4] == b"\x89PNG", key
    assert "png:cpu_s_per_1k" not in written
    runs = {p["label"]: p["runs"][0] for p in results["points"]}
    assert list(runs) == ["naive", "sse", "ws", "fetch", "openai"]
    for name, run in runs.items():
        assert run["chats_done"] > 0, name
        assert (run["lost"], run["dup"], run["failures"]) == (0, 0, 0), (name, run["errors"])
        assert (run["disconnects"], run["incomplete"]) == (0, 0), (name, run["errors"])
        # The offered tokens of 4 users at 100/s (the baseline's sleeps drift a little).
        assert run["events_per_s"] > 0.6 * 400, (name, run["events_per_s"])
        assert run["cpu_us_per_token"] > 0, name
        assert run["rss_mb"] > 10, name  # its own process, measured alike
        assert run["ttft_p99_ms"] >= run["ttft_ms"] > 0, name
        assert run["gap_p99_ms"] is not None, name
    assert runs["openai"]["p99_ms"] is None  # chunks carry no timestamp
    assert runs["sse"]["p99_ms"] is not None
    md = markdown(results)
    assert "| naive | 4 |" in md
    assert "| openai | 4 | " in md
    row = next(
        line for line in md.splitlines() if line.startswith("| sse | 4 | ") and "x |" in line
    )
    cpu = runs["sse"]["cpu_us_per_token"] / runs["naive"]["cpu_us_per_token"]
    assert f"| {cpu:.2f}x |" in row, row
    saved = json.loads((tmp_path / "results.json").read_text())
    ratios = {r["label"]: r for r in saved["vs_baseline"]}
    assert set(ratios) == {"sse", "ws", "fetch", "openai"}
    assert ratios["sse"]["cpu_us_per_token"] == pytest.approx(cpu)
    assert ratios["openai"]["p99_ms"] is None


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)
def test_native_and_python_fetch_clients_agree(tmp_path: Path) -> None:
    runs = {}
    for load_client in ("native", "python"):
        results = run_bench(chats_config(tmp_path / load_client, ["fetch"], load_client))
        wording = {"native": "native load client", "python": "asyncio load clients"}
        assert results["load_client"]["streams"] == load_client
        assert wording[load_client] in markdown(results).split("\n")[2]
        runs[load_client] = run = results["points"][0]["runs"][0]
        assert (run["lost"], run["dup"], run["failures"]) == (0, 0, 0), run["errors"]
        assert (run["disconnects"], run["incomplete"]) == (0, 0), run["errors"]
        assert run["ttft_ms"] >= 50.0
        assert run["chats_done"] > 0
    native, python = runs["native"], runs["python"]
    # The same requests and streams, counted byte for byte alike (answers differ a little:
    # the native client asks the same chat every round).
    assert native["bytes_per_token"] == pytest.approx(python["bytes_per_token"], rel=0.03)
    assert native["requests_per_token"] == pytest.approx(python["requests_per_token"], rel=0.2)


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)
def test_native_and_python_load_clients_agree(tmp_path: Path) -> None:
    """The same points read by both load clients: same bytes per token, nothing lost."""
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for load_client in ("native", "python"):
        config = BenchConfig(
            out=tmp_path / load_client,
            transports=["sse", "ws"],
            clients=[6],
            rates=[100.0],
            duration=1.5,
            warmup=0.5,
            repeat=1,
            workers=2,
            progress=False,
            load_client=load_client,
        )
        results = run_bench(config)
        assert results["load_client"]["streams"] == load_client
        wording = {"native": "native load client", "python": "asyncio load clients"}
        assert wording[load_client] in markdown(results).split("\n")[2]
        runs[load_client] = {p["transport"]: p["runs"][0] for p in results["points"]}
    for transport in ("sse", "ws"):
        native, python = runs["native"][transport], runs["python"][transport]
        for run in (native, python):
            assert (run["lost"], run["dup"], run["failures"]) == (0, 0, 0), run["errors"]
            assert run["disconnects"] == 0, run["errors"]
            # 6 clients x 100 tokens/s: all of them, give or take the window's edges.
            assert 500 < run["events_per_s"] < 700, run
            assert run["p50_ms"] is not None
        # Both count every byte of the same frames: within a heartbeat of each other.
        assert native["bytes_per_token"] == pytest.approx(python["bytes_per_token"], rel=0.02)


def test_native_load_client_must_build_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-here")
    config = BenchConfig(out=tmp_path, clients=[1], repeat=1, progress=False, load_client="native")
    with pytest.raises(BenchError, match="no C compiler"):
        run_bench(config)
    auto = runner._load_client("auto")
    assert auto["streams"] == "python"
    assert "no C compiler" in auto["note"]


def test_late_joiners_meet_the_ticker_at_random_phases(tmp_path: Path) -> None:
    """At 2 tokens/s a late joiner waits up to 500 ms for the next token, 250 ms on average.

    Probes that all joined at one fixed moment met the ticker's schedule at one phase: their
    times to first token were all alike (and, as it happened, under 100 ms).
    """
    config = BenchConfig(
        out=tmp_path,
        transports=["sse"],
        clients=[2],
        rates=[2.0],
        duration=2.5,
        warmup=0.5,
        repeat=1,
        workers=2,
        progress=False,
        load_client="python",
    )
    run = run_bench(config)["points"][0]["runs"][0]
    samples = run["ttft_samples_ms"]
    assert len(samples) == 2 * runner.PROBES_PER_WORKER
    assert all(0 < v < 1000 for v in samples), samples
    # Uniform waits over a 500 ms period: all 8 under 150 ms has a chance of 0.3^8 (1 in 15,000).
    assert max(samples) > 150, samples
    assert max(samples) - min(samples) > 50, samples
