"""``realtime-lab bench --via h1,h2``: the points through nginx, its access log, and a small
sweep end to end through a real nginx (TLS, HTTP/2 from ``deploy/nginx-h2.conf``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from realtime_lab.bench import proxy, runner
from realtime_lab.bench.cli import config_from_args
from realtime_lab.bench.report import markdown
from realtime_lab.bench.runner import run_bench
from realtime_lab.bench.target import BenchConfig, BenchError
from realtime_lab.cli import build_parser


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *argv])


def test_each_point_runs_once_per_via_side_by_side() -> None:
    config = config_from_args(
        _args("--transports", "sse,ws", "--clients", "10", "--via", "direct,h1,h2")
    )
    assert config.via == ["direct", "h1", "h2"]
    points = proxy.via_points(config.points(), config.via)
    assert [(p["label"], p["via"]) for p in points] == [
        ("sse", "direct"),
        ("sse via h1", "h1"),
        ("sse via h2", "h2"),
        ("ws", "direct"),
        ("ws via h1", "h1"),
        ("ws via h2", "h2"),
    ]
    # Without the flag the points are as they were: no via key, no nginx.
    plain = config_from_args(_args("--transports", "ws", "--clients", "10"))
    assert plain.via == ["direct"]
    assert proxy.via_points(plain.points(), plain.via) == plain.points()


def test_what_cannot_go_through_nginx_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _args("--via", "h3")
    assert "--via takes" in capsys.readouterr().err
    for config, words in (
        (BenchConfig(out=Path("x"), via=["h2"], url="http://127.0.0.1:1"), "not with --url"),
        (BenchConfig(out=Path("x"), via=["h1"], compression=["message"]), "--compression"),
        (
            BenchConfig(out=Path("x"), workload="chats", transports=["openai"], via=["h2"]),
            "not openai",
        ),
    ):
        with pytest.raises(BenchError, match=words):
            runner.check(config)


def test_the_access_log_adds_up_per_client_tag() -> None:
    log = "\n".join(
        [
            '127.0.0.1 [x] "GET /sse/ticker?after=now&client=a HTTP/2.0" 200 8883 8245 58 3 1 3.0',
            '127.0.0.1 [x] "GET /poll/ticker?after=1-2&client=a HTTP/2.0" 200 300 210 61 3 2 0.0',
            '127.0.0.1 [x] "POST /api/chats?client=b HTTP/1.1" 201 636 441 294 3 1 0.002',
            '127.0.0.1 [x] "GET /api/stats HTTP/1.1" 200 900 700 80 4 1 0.001',
            "garbage",
        ]
    )
    sent = proxy.sent_by_tag(log)
    assert set(sent) == {"a", "b"}
    assert (sent["a"].requests, sent["a"].bytes, sent["a"].body) == (2, 9183, 8455)
    assert sent["a"].protocols == {"HTTP/2.0"}
    assert (sent["b"].requests, sent["b"].bytes, sent["b"].protocols) == (1, 636, {"HTTP/1.1"})


def test_the_configuration_is_deploy_nginx_h2_conf_with_the_ports_changed() -> None:
    text = proxy.build_config(5000, 5001, 5002, worker_connections=300)
    assert "server 127.0.0.1:5000;" in text
    assert "listen 127.0.0.1:5001 ssl http2;" in text
    assert "listen 127.0.0.1:5002 ssl;" in text
    assert "worker_connections 300;" in text
    assert "log_format realtime_lab" in text  # the format proxy.ACCESS_LINE reads


@pytest.mark.nginx
@pytest.mark.slow
@pytest.mark.skipif(proxy.missing() is not None, reason=str(proxy.missing()))
def test_chats_through_nginx_over_http_1_1_and_http_2(tmp_path: Path) -> None:
    config = BenchConfig(
        out=tmp_path,
        workload="chats",
        transports=["sse", "longpoll"],
        clients=[3],
        rates=[50.0],
        via=["h1", "h2"],
        duration=1.5,
        warmup=0.5,
        repeat=1,
        workers=1,
        progress=False,
    )
    results = run_bench(config)
    runs = {p["label"]: p["runs"][0] for p in results["points"]}
    assert set(runs) == {"sse via h1", "sse via h2", "longpoll via h1", "longpoll via h2"}
    for label, run in runs.items():
        assert run["events"] > 0, label
        assert (run["lost"], run["dup"], run["failures"]) == (0, 0, 0), (label, run["errors"])
        assert run["disconnects"] == 0, (label, run["errors"])
        # nginx said which protocol it spoke, and sent about what the client counted: both
        # count the HTTP layer (HTTP/2: frames and HPACK headers), neither the TLS records.
        want = "HTTP/2.0" if label.endswith("h2") else "HTTP/1.1"
        assert run["nginx_protocols"] == [want], label
        nginx, client = run["nginx_bytes_per_token"], run["bytes_down_per_token"]
        assert 0.75 * client < nginx < 1.25 * client, (label, nginx, client)
        assert run["life_tokens"] >= run["events"], label
    # A long poll's answer headers cost less over HTTP/2: HPACK's static table and Huffman.
    h1, h2 = runs["longpoll via h1"], runs["longpoll via h2"]
    assert h2["nginx_head_bytes_per_request"] < 0.75 * h1["nginx_head_bytes_per_request"]
    md = markdown(results)
    assert "## Through nginx: bytes per token" in md
    assert "| sse | 3 | 50 |" in md
    assert (tmp_path / "nginx-h2" / "access.log").exists()
