"""``--publisher http``: the publisher process's pacing and one-in-flight rule, and a real run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from realtime_lab.bench import cli, native
from realtime_lab.bench import publisher as pub
from realtime_lab.bench.runner import check
from realtime_lab.bench.server import http_json
from realtime_lab.bench.target import BenchConfig, BenchError
from tests.conftest import StartServer

WAIT = 10.0


def test_parse_rate() -> None:
    assert pub.parse_rate("100") == 100.0
    assert math.isinf(pub.parse_rate("max"))
    for bad in ("0", "-5", "inf!", "nan"):
        with pytest.raises(ValueError, match=r"rate|could not convert"):
            pub.parse_rate(bad)


def test_request_bytes_is_one_whole_request() -> None:
    raw = pub.request_bytes("127.0.0.1:8080", "bench.pub", 7, token="t0k")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /api/channels/bench.pub/events HTTP/1.1\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"Authorization: Bearer t0k" in head
    assert body == b'{"type":"tick","data":{"text":"token 7","n":7}}'


def test_parse_head_refuses_what_the_api_never_sends() -> None:
    assert pub._parse_head("HTTP/1.1 201 Created\r\nContent-Length: 12") == (201, 12)
    for bad in ("SPDY 200", "HTTP/1.1 20x", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"):
        with pytest.raises(pub.PublishError):
            pub._parse_head(bad)


async def test_fixed_rate_is_kept_and_every_event_is_stored(start_server: StartServer) -> None:
    server = await start_server()
    start = time.time() + 0.2
    window = (start, start + 1.0)
    result = await pub.publish("127.0.0.1", server.port, pub.CHANNEL, 100.0, window)
    assert result["errors"] == 0, result
    assert 90 <= result["published"] <= 102, result
    assert result["rtt_p50_ms"] is not None
    assert result["rtt_p50_ms"] < 50
    info = await asyncio.to_thread(http_json, f"{server.url}/api/channels/{pub.CHANNEL}")
    # Every request sent (warm-up included) was stored once, in order: the last seq is the count.
    assert info["last_id"].endswith(f"-{result['total']}")


@contextlib.asynccontextmanager
async def scripted(status: int, delay: float) -> AsyncIterator[dict[str, Any]]:
    """A server answering every publish with ``status`` after ``delay`` s; notes pipelining."""
    seen: dict[str, Any] = {"requests": 0, "early": 0, "connections": 0}

    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        seen["connections"] += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                seen["requests"] += 1
                # Bytes before the answer are a second request in flight.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await reader.readexactly(1)
                        seen["early"] += 1
                body = b'{"ok":true}'
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
                )
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    seen["port"] = srv.sockets[0].getsockname()[1]
    try:
        yield seen
    finally:
        srv.close()
        # The publisher has closed its connection: each handler ends on its next read.
        if handlers:
            await asyncio.wait_for(asyncio.gather(*handlers), WAIT)
        await srv.wait_closed()


async def test_flat_out_keeps_one_request_in_flight() -> None:
    async with scripted(201, 0.005) as seen:
        start = time.time()
        result = await pub.publish(
            "127.0.0.1", seen["port"], "c", pub.FLAT_OUT, (start, start + 0.5)
        )
    assert seen["early"] == 0  # never a second request before the answer
    assert seen["connections"] == 1  # one keep-alive connection
    assert result["target_rate"] is None
    # Each answer takes at least 5 ms: at most 100 in half a second, and flat out nearly that.
    assert 40 <= result["published"] <= 100, result


async def test_refused_publishes_are_errors_not_events() -> None:
    async with scripted(403, 0.0) as seen:
        start = time.time()
        result = await pub.publish("127.0.0.1", seen["port"], "c", 50.0, (start, start + 0.3))
    assert result["published"] == 0
    assert result["errors"] >= 10
    assert result["statuses"] == {"403": result["errors"]}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


def test_cli_publisher_options() -> None:
    config = cli.config_from_args(_args("--publisher", "http", "--rate", "100,max"))
    assert config.publisher == "http"
    assert config.transports == ["sse", "ws"]
    assert config.rates[0] == 100.0
    assert math.isinf(config.rates[1])
    check(config)
    with pytest.raises(BenchError, match="for --publisher http"):
        check(cli.config_from_args(_args("--rate", "max")))
    with pytest.raises(BenchError, match="sse and ws"):
        check(cli.config_from_args(_args("--publisher", "http", "--transports", "poll")))


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)
def test_a_run_delivers_what_was_published(tmp_path: Path) -> None:
    binary = str(native.build().path)
    config = BenchConfig(
        out=tmp_path, duration=1.0, warmup=0.5, repeat=1, workers=2, publisher="http", sources=3
    )
    run = pub.run_point(config, binary, "sse", 30, 50.0, "t-pub")
    assert run["errors"] == [], run
    assert run["clients_open"] == 30
    assert 42 <= run["publish_rate"] <= 51, run
    assert run["lost"] == run["dup"] == run["reordered"] == 0
    assert run["delivered_pct"] is not None
    assert 90 <= run["delivered_pct"] <= 110, run
    assert run["publisher_cpu_pct"] is not None
    assert run["server_cpu_pct"] is not None
    md = pub.markdown(
        [
            {
                "transport": "sse",
                "clients": 30,
                "rate": 50.0,
                "runs": [run],
                "summary": {
                    k: {"median": run[k], "min": run[k], "max": run[k]} for k in pub.SUMMARY_KEYS
                },
            }
        ]
    )
    assert "| sse | 30 | 50 |" in md
