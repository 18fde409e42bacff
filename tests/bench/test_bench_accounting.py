"""How a load client counts what it receives: losses, duplicates, resets, ends, overflows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from realtime_lab.bench import loadgen, runner
from realtime_lab.bench.cli import config_from_args
from realtime_lab.bench.wire import Item
from realtime_lab.cli import build_parser


def _tok(seq: int, ts: float = 1000.0) -> Item:
    return Item(None, seq, ts, b"")


async def test_continuity_counts_gaps_and_duplicates() -> None:
    tally = loadgen.Tally()
    tally.in_window = True
    client = loadgen.SSEClient(tally, "h", "ticker", "now", "t", 990.0)
    client.items([_tok(5), _tok(6), _tok(6), _tok(9), _tok(8), _tok(10)], now=1004.0)
    # 7 and 8 skipped; 8 came late (reordered, its gap still counted); the second 6 a duplicate.
    assert (tally.lost, tally.dup, tally.reordered) == (2, 1, 1)
    assert tally.events == 4
    assert list(tally.latency) == [4.0] * 4
    assert list(tally.ttft) == [14.0]


async def test_nothing_counts_outside_the_window_but_losses_do() -> None:
    tally = loadgen.Tally()
    client = loadgen.WSClient(tally, "h", "ticker", "now", "t", 0.0)
    client.items([_tok(1), _tok(3)], now=5.0)
    assert tally.events == 0
    assert tally.lost == 1


async def test_a_chat_is_read_from_its_first_event() -> None:
    tally = loadgen.Tally()
    client = loadgen.SSEClient(tally, "h", "chat.x", "", "t", 0.0, from_start=True)
    client.items([_tok(3), Item("end", 4, 1.0, b"")], now=5.0)
    assert tally.lost == 2  # seq 1 and 2 never arrived
    assert client.saw_end
    assert client.done.done()  # the client closes itself after the end


async def test_reset_counts_what_history_could_not_serve() -> None:
    tally = loadgen.Tally()
    client = loadgen.SSEClient(tally, "h", "ticker", "now", "t", 0.0)
    # After seq 10, a reset whose id is 40 (the position before the oldest retained, 41).
    client.items([_tok(10), Item("reset", 40, 2.0, b"{}"), _tok(41), _tok(42)], now=5.0)
    # The reset announces the loss of 11-40: counted as a reset, not as lost ids.
    assert (tally.resets, tally.lost, tally.dup) == (1, 0, 0)


async def test_overflow_error_is_counted() -> None:
    tally = loadgen.Tally()
    client = loadgen.SSEClient(tally, "h", "ticker", "now", "t", 0.0)
    client.items([Item("error", -1, float("nan"), b'{"code":"overflow"}')], now=1.0)
    assert tally.overflows == 1


def test_split() -> None:
    assert loadgen.split(10, 3) == [4, 3, 3]
    assert loadgen.split(1, 2) == [1, 0]


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *argv])


def test_quick_fills_what_was_not_given() -> None:
    config = config_from_args(_args("--quick", "--transports", "sse,ws", "--out", "x"))
    assert config.transports == ["sse", "ws"]
    assert config.clients == [10, 50]
    assert config.repeat == 1
    assert config.sweep
    assert config.slow_subscriber
    assert config.out == Path("x")
    full = config_from_args(_args("--clients", "10,3000", "--rate", "50,100"))
    assert full.clients == [10, 3000]
    assert full.rates == [50.0, 100.0]
    assert full.repeat == 3
    assert not full.slow_subscriber
    only = config_from_args(_args("--scenario", "slow-subscriber"))
    assert only.slow_subscriber
    assert not only.sweep


def test_points_sweep_poll_intervals_for_poll_only() -> None:
    config = config_from_args(
        _args("--transports", "sse,poll", "--clients", "10", "--poll-interval", "0.5,2")
    )
    assert [p["label"] for p in config.points()] == ["sse", "poll@0.5s", "poll@2s"]


@pytest.mark.parametrize(
    "argv", [["--transports", "sse,carrier-pigeon"], ["--clients", "0"], ["--rate", "x"]]
)
def test_bad_flags_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _args(*argv)
    assert "bench" in capsys.readouterr().err


def test_server_options_pass_through_and_are_checked() -> None:
    config = config_from_args(
        _args("--server-option", "coalesce_ms=5", "--server-option", "chaos=true")
    )
    assert config.server_options == {"coalesce_ms": "5", "chaos": True}
    with pytest.raises(SystemExit):
        _args("--server-option", "port=1")


class Sent:
    """A stand-in transport that keeps what a load client writes."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def test_a_fetch_client_posts_its_chat_and_does_not_count_the_chat_event() -> None:
    tally = loadgen.Tally()
    tally.in_window = True
    request = b'{"prompt":"p","max_tokens":2}'
    client = loadgen.make_client(
        "fetch", tally, "h:1", "", "", "tag", from_start=True, request=request
    )
    assert isinstance(client, loadgen.FetchClient)
    sent = Sent()
    client.transport = sent  # type: ignore[assignment]
    client.start()
    assert sent.data.startswith(b"POST /api/chats/stream?client=tag HTTP/1.1\r\nHost: h:1\r\n")
    assert b"Content-Length: 29\r\n" in sent.data
    assert b"Accept: text/event-stream\r\n" in sent.data
    assert sent.data.endswith(b"\r\n\r\n" + request)
    assert (tally.requests, tally.bytes_up) == (1, len(sent.data))

    opening = b'{"chat":{"id":"ab12","channel":"chat.ab12"}}'
    client.items(
        [Item("chat", -1, float("nan"), opening), _tok(1), _tok(2), Item("end", 3, 1.0, b"")],
        now=1004.0,
    )
    assert tally.events == 2  # the chat event names the chat: it is no delivery
    assert (tally.lost, tally.dup) == (0, 0)
    assert client.saw_end
    assert client.done.done()


def test_fetch_is_for_the_chats_workload(tmp_path: Path) -> None:
    assert "fetch" not in config_from_args(_args()).transports  # the ticker: four transports
    chats = config_from_args(_args("--workload", "chats"))
    assert chats.transports == ["sse", "ws", "longpoll", "poll", "fetch", "openai"]
    runner.check(chats)
    for name in ("fetch", "openai"):
        ticker = config_from_args(_args("--transports", f"sse,{name}"))
        with pytest.raises(runner.BenchError, match="--workload chats"):
            runner.check(ticker)
    with pytest.raises(runner.BenchError, match="--workload chats"):
        runner.check(config_from_args(_args("--baseline", "naive")))
    with pytest.raises(runner.BenchError, match="--scenario scale"):
        runner.check(config_from_args(_args("--workload", "chats", "--baseline", "floor")))
    with pytest.raises(runner.BenchError, match="--scale-subscribers above 0"):
        runner.check(
            config_from_args(
                _args("--scenario", "scale", "--scale-subscribers", "0", "--baseline", "floor")
            )
        )
    runner.check(config_from_args(_args("--scenario", "scale", "--baseline", "floor")))
    # A floor run has no naive point: the baseline of the chats sweep is only ever naive.
    assert (
        config_from_args(_args("--workload", "chats", "--baseline", "floor")).points()[0][
            "transport"
        ]
        != "floor"
    )
    with pytest.raises(runner.BenchError, match="unknown"):
        runner.check(runner.BenchConfig(out=tmp_path, transports=["pigeon"]))
    assert runner.BenchConfig(out=tmp_path).transports == ["sse", "ws", "longpoll", "poll"]


def test_bench_refuses_fetch_on_the_ticker(capsys: pytest.CaptureFixture[str]) -> None:
    from realtime_lab.bench.cli import run

    assert run(_args("--transports", "fetch", "--no-progress", "--no-plots")) == 2
    assert "--workload chats" in capsys.readouterr().err


def test_chat_readers_spread_users_round_robin() -> None:
    # 3 users with 2 readers each, round-robin over 2 workers.
    assert runner.chat_readers("sse", 3, 2, 2) == [[2, 2], [2]]
    assert runner.chat_readers("ws", 4, 1, 2) == [[1, 1], [1, 1]]
    # A fetch or openai chat is read by the request that starts it, whatever --readers says.
    for name in ("fetch", "openai", "naive"):
        assert runner.chat_readers(name, 3, 10, 2) == [[1, 1], [1]]


def test_chats_sweep_users_with_the_baseline_first() -> None:
    config = config_from_args(
        _args("--workload", "chats", "--chats", "100,1000", "--transports", "sse,openai")
    )
    assert config.clients == [100, 1000]
    assert (config.ttft_ms, config.chat_tokens, config.readers) == (0.0, 200, 1)
    assert config_from_args(_args("--workload", "chats", "--clients", "7")).clients == [7]
    with_base = config_from_args(
        _args("--workload", "chats", "--chats", "10", "--transports", "ws", "--baseline", "naive")
    )
    assert [(p["label"], p["clients"]) for p in with_base.points()] == [
        ("naive", 10),
        ("ws", 10),
    ]


def test_chat_templates_are_the_requests_the_python_clients_send() -> None:
    spec = {"tag": "b 1", "chat_tokens": 30, "token_ms": 20.0, "ttft_ms": 0.0}
    path, body = loadgen.chat_template({**spec, "transport": "sse"})
    assert path == "/api/chats?client=b%201"
    assert body is not None
    worker = loadgen.Worker.__new__(loadgen.Worker)
    worker.spec = {**spec, "transport": "fetch"}
    seed = 3 * loadgen.SEED_STRIDE + 2  # user 3, round 2
    request = json.dumps(worker.chat_request(3, 2), separators=(",", ":"))
    assert body.replace("$SEED", str(seed)) == request
    path, body = loadgen.chat_template({**spec, "transport": "openai"})
    assert path.startswith("/v1/chat/completions?")
    assert body is not None
    sent = json.loads(body.replace("$SEED", "7"))
    assert (sent["stream"], sent["max_tokens"], sent["seed"]) == (True, 30, 7)
    path, body = loadgen.chat_template({**spec, "transport": "naive"})
    assert body is None
    assert path.startswith("/chat?tokens=30&rate=50&ttft_ms=0&seed=$SEED&")
