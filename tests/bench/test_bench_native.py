"""The native load client (loadclient.c) against scripted servers: what it counts, byte for byte.

Each test serves one connection from a tiny asyncio server on port 0 that sends exactly the
bytes the test wrote (cut at awkward places), so a parser that mis-reads a chunk boundary, a
comment, a ping or a close shows up as a wrong count. The client closes its connection after an
``end`` event (or on an overflow), which is how a test knows it has read everything.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from array import array
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from realtime_lab.bench import native, wire
from realtime_lab.protocol.sse import encode_comment, encode_event, encode_retry
from realtime_lab.transports.sse import chunked

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="no C compiler: the benchmark falls back to its asyncio load clients",
)

WAIT = 10.0
#: Serves one connection (its request is in ``script.request``).
Serve = Callable[["Scripted", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = native.build(directory=tmp_path_factory.mktemp("native"))
    assert built.path.is_file()
    return built.path


def test_build_reuses_an_unchanged_binary(tmp_path: Path) -> None:
    first = native.build(directory=tmp_path)
    mtime = first.path.stat().st_mtime_ns
    second = native.build(directory=tmp_path)
    assert second.path == first.path
    assert second.path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary left over


def test_build_without_a_compiler_says_so(tmp_path: Path) -> None:
    with pytest.raises(native.NativeBuildError, match="no C compiler"):
        native.build(cc="no-such-compiler-here", directory=tmp_path)


def envelope(seq: int, kind: str = "token", ts: float | None = None) -> str:
    # One second ago, in whole ms: every envelope is as long, so a test cuts them alike.
    ts = float(int(time.time() * 1000.0) - 1000) if ts is None else ts
    body = {"channel": "t", "id": f"e1-{seq}", "type": kind, "data": {"text": "x"}, "ts": ts}
    return json.dumps(body, separators=(",", ":"))


async def trickle(writer: asyncio.StreamWriter, data: bytes, cuts: list[int]) -> None:
    """Write ``data`` in pieces cut at the ascending offsets ``cuts``, one flush per piece."""
    start = 0
    for cut in [*cuts, len(data)]:
        writer.write(data[start:cut])
        await writer.drain()
        start = cut
        await asyncio.sleep(0)


class Scripted:
    """One scripted connection: the request it got, and when the client hung up."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.request = b""
        self.window_open = asyncio.Event()  # the client has started counting
        self.hung_up = asyncio.Event()

    async def head_then(self, writer: asyncio.StreamWriter, head: bytes) -> None:
        """Send the response head, then wait until the client counts what follows."""
        writer.write(head)
        await writer.drain()
        await self.window_open.wait()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.request = await reader.readuntil(b"\r\n\r\n")
        try:
            await self.serve(self, reader, writer)
            while await reader.read(4096):  # pongs, until the client closes
                pass
        finally:
            self.hung_up.set()
            writer.close()


async def run_client(
    binary: Path, transport: str, serve: Serve, path: str | None = None
) -> tuple[dict[str, Any], dict[str, Any], array[float], Scripted]:
    """Run the client for one connection; return its opened reply, window tally and latencies.

    ``path``: what it asks for (default ``/<transport>/t?after=now&client=x``).
    """
    script = Scripted(serve)
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        "127.0.0.1",
        str(port),
        transport,
        "1",
        f"127.0.0.1:{port}",
        path or f"/{transport}/t?after=now&client=x",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(WAIT):
            opened = json.loads(await proc.stdout.readline())
            proc.stdin.write(b"start\n")
            await proc.stdin.drain()
            assert json.loads(await proc.stdout.readline()) == {"op": "started"}
            script.window_open.set()
            await script.hung_up.wait()
            proc.stdin.write(b"stop\n")
            await proc.stdin.drain()
            window = json.loads(await proc.stdout.readline())
            latency = array("d")
            latency.frombytes(await proc.stdout.readexactly(8 * window["latency_count"]))
            proc.stdin.write(b"quit\n")
            await proc.stdin.drain()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.close()
        await server.wait_closed()
    return opened, window, latency, script


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def sse_token(seq: int) -> bytes:
    return encode_event(envelope(seq), id=f"e1-{seq}")


def sse_control(seq: int, kind: str) -> bytes:
    return encode_event(envelope(seq, kind), event=kind, id=f"e1-{seq}")


async def test_sse_counts_tokens_gaps_duplicates_and_resets_however_cut(binary: Path) -> None:
    # 1 2 3, a heartbeat, retry, 5 (one lost), 5 again (a duplicate), a reset to 9 (6-9 lost),
    # 10 split over two chunks, a two-line data event, then the end.
    two_lines = (
        b"id: e1-11\ndata: "
        + envelope(11)[:30].encode()
        + b"\ndata: "
        + envelope(11)[30:].encode()
        + b"\n\n"
    )
    body = (
        chunked(sse_token(1) + sse_token(2))
        + chunked(sse_token(3))
        + chunked(encode_comment("ping"))
        + chunked(encode_retry(300))
        + chunked(sse_token(5))
        + chunked(sse_token(5))
        + chunked(sse_control(9, "reset"))
        + chunked(sse_token(10)[:17])
        + chunked(sse_token(10)[17:])
        + chunked(two_lines)
        + chunked(sse_control(12, "end"))
    )

    async def serve(
        script: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await script.head_then(writer, SSE_HEAD)
        await trickle(writer, body, list(range(1, len(body), 37)))

    opened, window, latency, script = await run_client(binary, "sse", serve)
    assert opened == {"op": "opened", "clients": 1, "failures": 0, "errors": []}
    assert script.request.startswith(b"GET /sse/t?after=now&client=x HTTP/1.1\r\n")
    assert b"Accept: text/event-stream\r\n" in script.request
    assert window["events"] == 6  # 1 2 3 5 10 11
    assert window["dup"] == 1
    assert window["lost"] == 1  # 4; 6-9 are behind the reset, which announces them
    assert window["resets"] == 1
    assert window["disconnects"] == 0  # it left on its own, after the end
    assert window["bytes"] == len(body)
    assert len(latency) == 6
    assert all(900.0 < v < 1000.0 + WAIT * 1000 for v in latency), list(latency)


async def test_sse_overflow_error_and_server_close(binary: Path) -> None:
    overflow = encode_event(
        '{"code":"overflow","message":"behind","last_id":"e1-1"}', event="error"
    )

    async def serve(
        script: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await script.head_then(writer, SSE_HEAD)
        # The server ends the stream after its overflow signal (the last chunk); the client hangs
        # up on seeing it.
        writer.write(chunked(sse_token(1)) + chunked(overflow) + b"0\r\n\r\n")
        await writer.drain()

    _, window, _, _ = await run_client(binary, "sse", serve)
    assert window["events"] == 1
    assert window["overflows"] == 1
    assert window["disconnects"] == 1
    assert window["errors"] == ["SSEClient: stream ended by the server"]


async def test_refused_stream_counts_a_failure(binary: Path) -> None:
    async def serve(
        script: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    opened, window, _, _ = await run_client(binary, "sse", serve)
    assert opened["clients"] == 0
    assert opened["failures"] == 1
    assert opened["errors"] == ["SSEClient: HTTP 503"]
    assert window["failures"] == 1
    assert window["events"] == 0


def ws_frame(opcode: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, size])
    else:
        head = bytes([0x80 | opcode, 126]) + size.to_bytes(2, "big")
    return head + payload


def ws_head(request: bytes) -> bytes:
    key = next(
        line.split(b":", 1)[1].strip().decode()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + wire.ws_accept(key).encode() + b"\r\n\r\n"
    )


def unmask(frame: bytes) -> tuple[int, bytes]:
    assert frame[1] & 0x80, "client frames must be masked"
    size = frame[1] & 0x7F
    mask = frame[2:6]
    return frame[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(frame[6 : 6 + size]))


async def test_ws_counts_frames_answers_pings_and_reads_the_end(binary: Path) -> None:
    pongs: list[tuple[int, bytes]] = []
    big = json.loads(envelope(4))
    big["data"] = {"text": "y" * 300}  # a frame with a 16-bit length

    async def serve(
        script: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        frames = (
            ws_frame(0x1, envelope(1).encode())
            + ws_frame(0x9, b"hb")
            + ws_frame(0x1, envelope(2).encode())
            + ws_frame(0x1, envelope(2).encode())
            + ws_frame(0x1, json.dumps(big, separators=(",", ":")).encode())
            + ws_frame(0x1, envelope(5, "end").encode())
            + ws_frame(0x8, (1000).to_bytes(2, "big"))
        )
        await script.head_then(writer, ws_head(script.request))
        await trickle(writer, frames, list(range(3, len(frames), 29)))
        pongs.append(unmask(await reader.readexactly(8)))

    opened, window, latency, script = await run_client(binary, "ws", serve)
    assert opened["clients"] == 1
    assert b"Upgrade: websocket\r\n" in script.request
    assert window["events"] == 3  # 1 2 4
    assert window["dup"] == 1
    assert window["lost"] == 1  # 3
    assert window["disconnects"] == 0  # it left on its own, after the end
    assert window["bytes_up"] == 8  # the masked pong
    assert pongs == [(0xA, b"hb")]
    assert len(latency) == 3
    assert all(math.isfinite(v) and v > 900.0 for v in latency)


async def test_ws_overflow_close_and_a_bad_accept(binary: Path) -> None:
    async def overflow(
        script: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        close = ws_frame(0x8, (1013).to_bytes(2, "big") + b"overflow")
        await script.head_then(writer, ws_head(script.request))
        writer.write(ws_frame(0x1, envelope(1).encode()) + close)
        await writer.drain()

    _, window, _, _ = await run_client(binary, "ws", overflow)
    assert (window["events"], window["overflows"], window["disconnects"]) == (1, 1, 0)

    async def wrong_accept(
        script: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(ws_head(script.request).replace(b"Accept: ", b"Accept: x"))
        await writer.drain()

    opened, _, _, _ = await run_client(binary, "ws", wrong_accept)
    assert opened["failures"] == 1
    assert opened["errors"] == ["WSClient: ws: bad Sec-WebSocket-Accept"]


# Fetch: one POST per chat, read to its end, then the next chat --------------------------------

CHAT_REQUEST = '{"prompt":"bench","max_tokens":3}'


def chat_event(chat_id: str) -> bytes:
    chat = {"id": chat_id, "channel": f"chat.{chat_id}"}
    return encode_event(json.dumps({"chat": chat}, separators=(",", ":")), event="chat")


def chat_token(chat_id: str, seq: int, kind: str = "token") -> bytes:
    body = json.loads(envelope(seq, kind))
    body["id"] = f"{chat_id}-{seq}"
    text = json.dumps(body, separators=(",", ":"))
    return encode_event(text, event=None if kind == "token" else kind, id=body["id"])


async def test_fetch_posts_a_chat_reads_it_to_its_end_and_starts_the_next(binary: Path) -> None:
    """Round 1: a chat read to its end (its first event missing: one loss); round 2: cut after
    one token (an incomplete chat); round 3: held open until the window closes."""
    requests: list[bytes] = []
    window_open = asyncio.Event()
    third = asyncio.Event()
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        size = int(next(
            line.split(b":", 1)[1] for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ))  # fmt: skip
        requests.append(head + await reader.readexactly(size))
        n = len(requests)
        try:
            writer.write(SSE_HEAD)
            await writer.drain()
            await window_open.wait()
            opening = chunked(encode_retry(1000) + chat_event(f"c{n}"))
            if n == 1:
                body = (
                    chunked(chat_token("c1", 2))  # c1-1 never came
                    + chunked(chat_token("c1", 3)[:9])
                    + chunked(chat_token("c1", 3)[9:] + chat_token("c1", 4, "end"))
                    + b"0\r\n\r\n"
                )
                await trickle(writer, opening + body, [5, len(opening) + 3])
            elif n == 2:
                writer.write(opening + chunked(chat_token("c2", 1)))
                await writer.drain()  # and the server goes away mid-chat
            else:
                writer.write(opening)
                await writer.drain()
                third.set()
                await release.wait()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        str(binary), "127.0.0.1", str(port), "fetch", "1", f"127.0.0.1:{port}",
        "/api/chats/stream?client=x", CHAT_REQUEST,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(WAIT):
            opened = json.loads(await proc.stdout.readline())
            proc.stdin.write(b"start\n")
            await proc.stdin.drain()
            assert json.loads(await proc.stdout.readline()) == {"op": "started"}
            window_open.set()
            await third.wait()
            proc.stdin.write(b"stop\n")
            await proc.stdin.drain()
            window = json.loads(await proc.stdout.readline())
            latency = array("d")
            latency.frombytes(await proc.stdout.readexactly(8 * window["latency_count"]))
            ttft = array("d")
            ttft.frombytes(await proc.stdout.readexactly(8 * window["ttft_count"]))
            proc.stdin.write(b"quit\n")
            await proc.stdin.drain()
            assert await proc.wait() == 0
    finally:
        release.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.close()
        await server.wait_closed()

    assert opened == {"op": "opened", "clients": 1, "failures": 0, "errors": []}
    assert len(requests) == 3
    for request in requests:
        assert request.startswith(b"POST /api/chats/stream?client=x HTTP/1.1\r\n")
        assert b"Content-Type: application/json\r\n" in request
        assert b"Accept: text/event-stream\r\n" in request
        assert request.endswith(b"\r\n\r\n" + CHAT_REQUEST.encode())
    # Round 1: 2 and 3 delivered, 1 lost (the run opened at c1-0); round 2: its one token.
    assert window["events"] == 3
    assert window["lost"] == 1
    assert (window["dup"], window["resets"]) == (0, 0)
    assert window["chats"] == 1  # read to its end in the window
    assert window["incomplete"] == 1  # round 2
    assert window["disconnects"] == 1
    assert window["failures"] == 0
    assert window["requests"] == 2  # rounds 2 and 3 were asked inside the window
    assert window["errors"] == ["FetchClient: connection closed by the server"]
    assert len(latency) == 3
    assert len(ttft) == 2  # one per chat that had a first token
    assert all(0 < v < WAIT * 1000 for v in ttft), list(ttft)


async def test_fetch_needs_a_body_and_only_fetch_takes_one(binary: Path) -> None:
    for argv in (["fetch", "1", "h", "/api/chats/stream"], ["sse", "1", "h", "/sse/t", "{}"]):
        proc = await asyncio.create_subprocess_exec(
            str(binary), "127.0.0.1", "1", *argv, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), WAIT)
        assert proc.returncode == 2, argv
        assert b"BODY" in err
