"""``--baseline floor``: the bare C broadcaster (the scale run with it: test_bench_scale)."""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from realtime_lab.bench import native
from realtime_lab.bench.floor import HOST, Floor
from realtime_lab.bench.target import BenchError

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


@pytest.fixture(scope="module")
def floor_binary() -> str:
    return str(native.build(source=native.FLOOR_SOURCE).path)


@pytest.fixture
def floor(floor_binary: str) -> Iterator[Floor]:
    with Floor(floor_binary, 50.0) as running:
        yield running


def _request(port: int, raw: bytes) -> socket.socket:
    conn = socket.create_connection((HOST, port), timeout=5)
    conn.sendall(raw)
    return conn


def _read_until(conn: socket.socket, marker: bytes, count: int = 1) -> bytes:
    """What ``conn`` sends until ``marker`` has come ``count`` times (bounded by its timeout)."""
    got = b""
    while got.count(marker) < count:
        chunk = conn.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _answer(port: int, raw: bytes) -> tuple[str, dict[str, object]]:
    with _request(port, raw) as conn:
        got = _read_until(conn, b"\0")  # until it closes
    head, _, body = got.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), json.loads(body)


def test_it_streams_envelopes_in_sequence_to_a_subscriber(floor: Floor) -> None:
    with _request(floor.port, b"GET /sse/floor HTTP/1.1\r\nHost: x\r\n\r\n") as conn:
        got = _read_until(conn, b"\n\n", count=4)
    head, _, stream = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Type: text/event-stream" in head
    blocks = [b for b in stream.split(b"\n\n") if b][:3]
    envelopes = []
    for block in blocks:
        id_line, data_line = block.split(b"\n")
        envelope = json.loads(data_line.removeprefix(b"data: "))
        assert id_line == b"id: " + envelope["id"].encode()
        envelopes.append(envelope)
    epochs = {e["id"].rsplit("-", 1)[0] for e in envelopes}
    seqs = [int(e["id"].rsplit("-", 1)[1]) for e in envelopes]
    assert len(epochs) == 1
    assert seqs == list(range(seqs[0], seqs[0] + 3))
    assert all(e["type"] == "token" for e in envelopes)
    assert abs(envelopes[-1]["ts"] - time.time() * 1000) < 5000


def test_it_says_its_last_event_and_its_health(floor: Floor) -> None:
    assert _answer(floor.port, b"GET /api/health HTTP/1.1\r\n\r\n") == (
        "HTTP/1.1 200 OK",
        {"ok": True},
    )
    first = floor.last_seq()
    deadline = time.monotonic() + 5
    while floor.last_seq() == first and time.monotonic() < deadline:
        time.sleep(0.02)
    later = floor.last_seq()
    assert later is not None
    assert first is None or later > first
    assert floor.cpu() >= 0
    assert floor.rss() > 0


def test_it_refuses_what_it_does_not_serve_and_keeps_going(floor: Floor) -> None:
    assert _answer(floor.port, b"POST /sse/x HTTP/1.1\r\n\r\n") == (
        "HTTP/1.1 400 Bad Request",
        {"error": "GET only"},
    )
    # A whole 4 KiB (its MAX_HEAD) without the head's end; no byte more, which would be unread
    # when it closes, so that the kernel would answer with a reset instead of its answer.
    start = b"GET /sse/x HTTP/1.1\r\nX: "
    status, body = _answer(floor.port, start + b"a" * (4096 - len(start)))
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert body == {"error": "head too long"}
    assert _answer(floor.port, b"GET /api/health HTTP/1.1\r\n\r\n")[1] == {"ok": True}


def test_a_binary_that_does_not_start_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="did not start"), Floor("/bin/true", 10.0):
        pass
