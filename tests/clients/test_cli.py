"""``realtime-lab chat`` and ``tail`` as a user runs them: real processes, a real server."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from realtime_lab.clients.cli import Printer, split_target
from realtime_lab.errors import ClientError
from realtime_lab.feed.llm import answer_text
from realtime_lab.protocol.envelope import Event
from tests.clients.helpers import served

PROMPT = "Why stream tokens 为什么"
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    """``realtime-lab serve`` in a subprocess, stopped afterwards."""
    with served(ENV) as url:
        yield url


def interruptible() -> None:
    """In the child, before it runs: SIGINT to its default, so Python turns it into Ctrl-C.

    A suite started in the background by a script (``bash .ci/run &``) inherits SIGINT ignored,
    and Python leaves an ignored SIGINT ignored: the Ctrl-C these tests send would do nothing.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "realtime_lab", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        env=ENV,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("transport", ["sse", "ws", "longpoll", "fetch"])
def test_chat_prints_the_whole_answer(server_url: str, transport: str) -> None:
    result = run_cli(
        "chat", PROMPT, "--url", server_url, "--transport", transport, "--seed", "9",
        "--ttft-ms", "0", "--token-ms", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = answer_text(PROMPT, 9)
    assert result.stdout.startswith(answer + "\n[end ")
    assert '"reason":"done"' in result.stdout
    assert f"{transport}: " in result.stderr  # the statistics
    assert "latency ms p50" in result.stderr
    # Which chat, before the answer: "chat <id> on chat.<id> over <transport>".
    _, chat_id, _, channel, _, over = result.stderr.splitlines()[0].split()
    assert (channel, over) == (f"chat.{chat_id}", transport)
    if transport == "fetch":
        assert "1 requests" in result.stderr  # one POST started and streamed the chat


def test_tail_reads_channels_only(server_url: str) -> None:
    result = run_cli("tail", f"{server_url}/ticker", "--transport", "fetch")
    assert result.returncode == 2  # argparse: fetch streams the chat it creates, not a channel
    assert "invalid choice: 'fetch'" in result.stderr


def test_tail_prints_json_envelopes_and_a_json_summary(server_url: str) -> None:
    chat = run_cli("chat", "hello", "--url", server_url, "--ttft-ms", "0", "--token-ms", "0")
    assert chat.returncode == 0, chat.stderr
    channel = chat.stderr.split()[3]  # "chat <id> on <channel> over sse"
    result = run_cli("tail", f"{server_url}/poll/{channel}", "--json")
    assert result.returncode == 0, result.stderr
    envelopes = [json.loads(line) for line in result.stdout.splitlines()]
    assert envelopes[-1]["type"] == "end"
    assert "".join(e["data"].get("text", "") for e in envelopes) == answer_text("hello", 0)
    summary = json.loads(result.stderr.strip().splitlines()[-1])
    assert summary["transport"] == "poll"  # taken from the URL
    assert summary["events"] == len(envelopes)


def test_tail_reports_a_refusal(server_url: str) -> None:
    result = run_cli("tail", f"{server_url}/chat.nope", "--transport", "ws")
    assert result.returncode == 1
    assert "404" in result.stderr


def test_split_target() -> None:
    assert split_target("http://127.0.0.1:8080/ticker") == ("http://127.0.0.1:8080", "ticker", None)
    assert split_target("ws://h:1/prefix/ws/chat.ab") == ("http://h:1/prefix", "chat.ab", "ws")
    assert split_target("https://h/x/sse/news?after=1") == ("https://h/x", "news", "sse")
    with pytest.raises(ClientError):
        split_target("http://127.0.0.1:8080/")
    with pytest.raises(ClientError):
        split_target("ticker")


def test_printer_types_tokens_inline_and_other_events_on_their_own_line() -> None:
    out = io.StringIO()
    printer = Printer(out)
    for event_id, kind, data in [
        ("a-1", "token", {"text": "Hel"}),
        ("a-2", "token", {"text": "lo"}),
        ("a-3", "note", {"n": 1}),
        ("a-4", "token", {"text": "!"}),
    ]:
        printer.event(Event("c", event_id, kind, data, 0.0, int(event_id[2:])))
    printer.finish()
    assert out.getvalue() == 'Hello\n[note a-3] {"n":1}\n!\n'


def test_ctrl_c_prints_the_statistics(server_url: str) -> None:
    request = urllib.request.Request(
        f"{server_url}/api/channels/cli-news/events",
        data=json.dumps({"type": "note", "data": {"n": 1}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
    process = subprocess.Popen(
        [sys.executable, "-m", "realtime_lab", "tail", f"{server_url}/cli-news", "-t", "ws"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        preexec_fn=interruptible,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, "tail printed nothing"
        assert process.stdout.readline().startswith(b"[note ")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 130
    assert b"ws: 1 events" in err


def test_ctrl_c_on_a_fetch_chat_cancels_it(server_url: str) -> None:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "realtime_lab", "chat", PROMPT, "--url", server_url,
            "-t", "fetch", "--ttft-ms", "0", "--token-ms", "2000",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        preexec_fn=interruptible,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        ready, _, _ = select.select([process.stderr], [], [], 30)
        assert ready, "chat printed nothing"
        announced = process.stderr.readline().decode().split()
        assert announced[0] == "chat", announced
        chat_id = announced[1]
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 130
    assert b"fetch: " in err  # the statistics
    # Cancelled at once, not after the server's abort grace: it says so already.
    with urllib.request.urlopen(f"{server_url}/api/chats/{chat_id}", timeout=10) as response:
        assert json.loads(response.read())["status"] == "cancelled"
