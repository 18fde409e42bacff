"""``realtime-lab bench --compression``: the sweep's points, its refusals, and the load clients
that ask for compression as a browser does and read every mode's bytes against a real server."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from realtime_lab.bench import loadgen, runner
from realtime_lab.bench.cli import config_from_args
from realtime_lab.cli import build_parser
from tests.conftest import StartServer


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *argv])


def test_the_sweep_has_one_point_per_mode_labelled_with_it() -> None:
    config = config_from_args(
        _args("--transports", "ws,sse", "--clients", "10", "--compression", "off,connection")
    )
    assert config.compression == ["off", "connection"]
    points = config.points()
    assert [(p["label"], p["compression"]) for p in points] == [
        ("ws+off", "off"),
        ("ws+connection", "connection"),
        ("sse+off", "off"),
        ("sse+connection", "connection"),
    ]
    # Without the flag: one mode, off, and the labels as they were.
    plain = config_from_args(_args("--transports", "ws", "--clients", "10"))
    assert [(p["label"], p["compression"]) for p in plain.points()] == [("ws", "off")]


def test_bad_modes_and_native_only_transports_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        _args("--compression", "off,zip")
    assert "compression modes" in capsys.readouterr().err
    with pytest.raises(runner.BenchError, match="Python clients"):
        runner.check(
            runner.BenchConfig(
                out=Path("x"), workload="chats", transports=["openai"], compression=["message"]
            )
        )
    with pytest.raises(runner.BenchError, match="--compression takes"):
        runner.check(runner.BenchConfig(out=Path("x"), compression=["fast"]))


@pytest.mark.parametrize("mode", ["off", "message", "connection"])
@pytest.mark.parametrize("transport", ["ws", "sse", "poll", "longpoll"])
async def test_the_load_clients_read_every_mode(
    start_server: StartServer, mode: str, transport: str
) -> None:
    server = await start_server(compression=mode, ticker_rate=200.0)
    tally = loadgen.Tally()
    tally.in_window = True
    host = f"127.0.0.1:{server.port}"
    client = loadgen.make_client(
        transport, tally, host, "ticker", "now", "bench-z", poll_interval=0.05, compress=True
    )
    loop = asyncio.get_running_loop()
    await loop.create_connection(lambda: client, "127.0.0.1", server.port)
    try:
        async with asyncio.timeout(10):
            while tally.events < 100:
                await asyncio.sleep(0.01)
    finally:
        client.close()
    assert tally.errors == []
    assert (tally.lost, tally.dup, tally.failures) == (0, 0, 0)
    per_token = tally.bytes / tally.events
    # What each mode is measured to cost (README: 115 B as served, 101 per message, 27 per
    # connection on the WebSocket; 143 and 40 B for SSE), with room for the handshake's share.
    if transport == "ws":
        expect = {"off": (110, 130), "message": (95, 115), "connection": (20, 40)}[mode]
        assert expect[0] <= per_token <= expect[1], per_token
    elif transport == "sse":
        expect = {"off": (135, 160), "message": (135, 160), "connection": (30, 55)}[mode]
        assert expect[0] <= per_token <= expect[1], per_token
