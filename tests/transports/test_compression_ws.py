"""WebSocket ``permessage-deflate`` on the server, per ``--compression`` mode: what the handshake
answers, what the frames carry (read raw and inflated with the RFC's rules), that clients people
use (the ``websockets`` package, aiohttp's client) decode every mode, and that the accounting
counts the compressed bytes that crossed the socket."""

from __future__ import annotations

import asyncio
import json
import os
import zlib
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import connect as websockets_connect

from realtime_lab.protocol.deflate import Inflater
from realtime_lab.protocol.websocket import (
    OP_CLOSE,
    OP_TEXT,
    FrameDecoder,
    close_frame,
)
from tests.conftest import RunningServer, StartServer
from tests.transports.collect import WS_UPGRADE, poll, start_chat, stats

MODES = ("off", "message", "connection")
OFFER = "permessage-deflate; client_max_window_bits"


async def chat_channel(server: RunningServer, tokens: int = 40) -> tuple[str, list[dict[str, Any]]]:
    """A finished chat's channel and its events as polling reads them (the reference)."""
    async with aiohttp.ClientSession() as session:
        chat = await start_chat(session, server.url, "deflate me", seed=5, max_tokens=tokens)
        got = await poll(session, server.url, chat["channel"])
    return chat["channel"], got


class RawWS:
    """A WebSocket read byte for byte: the handshake answer, then every frame the server sent."""

    def __init__(self, head: dict[str, str], frames: list[tuple[int, bytes, bool]], size: int):
        self.head = head
        self.frames = frames  # (opcode, payload, rsv1)
        self.size = size  # every byte the server sent on the socket, handshake included


async def raw_ws(port: int, path: str, offer: str | None) -> RawWS:
    """Open ``path`` with ``offer``, read until the server's close, answer it, read to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        fields = {"Host": f"127.0.0.1:{port}", **WS_UPGRADE}
        if offer is not None:
            fields["Sec-WebSocket-Extensions"] = offer
        head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        writer.write(head.encode() + b"\r\n")
        async with asyncio.timeout(20):
            answer = await reader.readuntil(b"\r\n\r\n")
            size = len(answer)
            lines = answer.decode("latin-1").split("\r\n")
            assert lines[0].startswith("HTTP/1.1 101"), lines[0]
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            decoder = FrameDecoder(rsv1=True)
            frames: list[tuple[int, bytes, bool]] = []
            while not frames or frames[-1][0] != OP_CLOSE:
                chunk = await reader.read(1 << 16)
                assert chunk, "the server closed the socket before its close frame"
                size += len(chunk)
                frames += [(op, payload, rsv1) for op, payload, _, rsv1 in decoder.feed(chunk)]
            # The answering close frame: the server must still be reading (no reset).
            writer.write(close_frame(1000, mask=os.urandom(4)))
            while chunk := await reader.read(1 << 16):
                size += len(chunk)
    finally:
        writer.close()
        await writer.wait_closed()
    return RawWS(headers, frames, size)


def texts(frames: list[tuple[int, bytes, bool]], inflater: Inflater | None) -> list[dict[str, Any]]:
    out = []
    for opcode, payload, rsv1 in frames:
        if opcode != OP_TEXT:
            continue
        if rsv1:
            assert inflater is not None, "a compressed frame without the extension"
            payload = inflater.message(payload)
        out.append(json.loads(payload))
    return out


# The handshake and the frames, read raw ----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_raw_frames_inflate_to_the_events_and_the_accounting_counts_them(
    start_server: StartServer, mode: str
) -> None:
    server = await start_server(compression=mode)
    channel, reference = await chat_channel(server)
    got = await raw_ws(server.port, f"/ws/{channel}?client=raw-{mode}", OFFER)
    extension = got.head.get("sec-websocket-extensions")
    compressed = [rsv1 for op, _, rsv1 in got.frames if op == OP_TEXT]
    if mode == "off":
        assert extension is None
        assert not any(compressed)
        inflater = None
    elif mode == "message":
        assert extension == "permessage-deflate; server_no_context_takeover"
        # Each message inflates on its own: a fresh context per message is enough.
        inflater = Inflater(no_context_takeover=True)
        assert sum(compressed) > len(compressed) // 2
    else:
        assert extension == "permessage-deflate; server_max_window_bits=12"
        inflater = Inflater()
        assert all(compressed)
    assert texts(got.frames, inflater) == reference
    async with aiohttp.ClientSession() as session:
        counted = (await stats(session, server.url, f"raw-{mode}"))["client"]["bytes"]
    assert counted == got.size


async def test_connection_mode_frames_need_the_context_kept(start_server: StartServer) -> None:
    server = await start_server(compression="connection")
    channel, _ = await chat_channel(server)
    got = await raw_ws(server.port, f"/ws/{channel}", OFFER)
    payloads = [payload for op, payload, rsv1 in got.frames if op == OP_TEXT and rsv1]
    # Read each message with a fresh context: the later ones refer back to earlier ones.
    failures = 0
    for payload in payloads[1:]:
        try:
            json.loads(zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff"))
        except (zlib.error, ValueError, UnicodeDecodeError):
            failures += 1
    assert failures > len(payloads) // 2
    # And it is smaller than the per-message mode by far.
    per_message = await start_server(compression="message")
    channel2, _ = await chat_channel(per_message)
    shared = await raw_ws(per_message.port, f"/ws/{channel2}", OFFER)
    assert got.size < shared.size * 0.6


@pytest.mark.parametrize("mode", ["message", "connection"])
async def test_live_subscribers_get_frames_their_inflater_reads(
    start_server: StartServer, mode: str
) -> None:
    # Connected before the first token (ttft 500 ms): the events come live, through the
    # broadcast, beside a plain subscriber that offers nothing.
    server = await start_server(compression=mode)
    async with aiohttp.ClientSession() as session:
        chat = await start_chat(
            session, server.url, "live", seed=5, max_tokens=40, token_ms=5, ttft_ms=500
        )
    path = f"/ws/{chat['channel']}"
    first, second, plain = await asyncio.gather(
        raw_ws(server.port, path, OFFER),
        raw_ws(server.port, path, OFFER),
        raw_ws(server.port, path, None),
    )
    async with aiohttp.ClientSession() as session:
        reference = await poll(session, server.url, chat["channel"])
    inflater = Inflater(no_context_takeover=mode == "message")
    assert texts(first.frames, inflater) == reference
    assert texts(plain.frames, None) == reference
    compressed = [rsv1 for op, _, rsv1 in first.frames if op == OP_TEXT]
    if mode == "message":
        # One deflated copy per event, shared: both subscribers got the same bytes.
        assert first.frames == second.frames
        assert sum(compressed) > len(compressed) // 2
    else:
        # Each connection's own compressor (same input, so the same output here).
        assert all(compressed)
        assert texts(second.frames, Inflater()) == reference


@pytest.mark.parametrize(
    ("offer", "extension"),
    [
        (None, None),
        ("x-webkit-deflate-frame", None),
        ("permessage-deflate; server_max_window_bits=8", None),  # zlib cannot keep 2**8
        ("permessage-deflate; unknown=1, permessage-deflate", "permessage-deflate; server_max_"),
        ("permessage-deflate; server_no_context_takeover", "permessage-deflate; server_no_"),
        (
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits=10",
        ),
    ],
)
async def test_connection_mode_answers_what_the_offer_allows(
    start_server: StartServer, offer: str | None, extension: str | None
) -> None:
    server = await start_server(compression="connection")
    channel, reference = await chat_channel(server, tokens=10)
    got = await raw_ws(server.port, f"/ws/{channel}", offer)
    answer = got.head.get("sec-websocket-extensions")
    if extension is None:
        assert answer is None
    else:
        assert answer is not None
        assert answer.startswith(extension)
    no_takeover = answer is not None and "server_no_context_takeover" in answer
    inflater = Inflater(no_context_takeover=no_takeover) if answer else None
    assert texts(got.frames, inflater) == reference


# Clients people use ------------------------------------------------------------------------------


async def read_with_websockets(url: str) -> tuple[list[dict[str, Any]], str | None, int | None]:
    events = []
    async with websockets_connect(url, open_timeout=10) as sock:
        extension = sock.response.headers.get("Sec-WebSocket-Extensions")
        async with asyncio.timeout(20):
            try:
                async for message in sock:
                    events.append(json.loads(message))
            except websockets.ConnectionClosedOK:  # pragma: no cover - iteration ends on 1000
                pass
        code = sock.close_code
    return events, extension, code


@pytest.mark.parametrize("mode", MODES)
async def test_the_websockets_package_decodes_every_mode(
    start_server: StartServer, mode: str
) -> None:
    server = await start_server(compression=mode)
    channel, reference = await chat_channel(server)
    events, extension, code = await read_with_websockets(f"{server.ws_url}/ws/{channel}")
    assert events == reference
    assert code == 1000
    assert (extension is None) == (mode == "off")


@pytest.mark.parametrize("mode", MODES)
async def test_aiohttp_client_decodes_every_mode_and_its_compressed_messages_are_read(
    start_server: StartServer, mode: str
) -> None:
    server = await start_server(compression=mode)
    async with aiohttp.ClientSession() as session:
        chat = await start_chat(session, server.url, "long", seed=2, max_tokens=300, token_ms=50)
        url = f"{server.ws_url}/ws/{chat['channel']}"
        async with session.ws_connect(url, compress=15) as sock:
            assert bool(sock.compress) == (mode != "off")
            first = json.loads((await asyncio.wait_for(sock.receive(), 10)).data)
            assert first["type"] == "token"
            # A compressed client message (aiohttp compresses it when the extension is on).
            await sock.send_json({"type": "cancel", "pad": "x" * 200})
            events = [first]
            async with asyncio.timeout(20):
                async for msg in sock:
                    events.append(json.loads(msg.data))
            assert sock.close_code == 1000
        assert events[-1]["type"] == "end"
        assert events[-1]["data"]["reason"] == "cancelled"
        got = await poll(session, server.url, chat["channel"])
        assert events == got


async def test_a_compressed_client_message_too_large_inflated_closes_1009(
    start_server: StartServer,
) -> None:
    server = await start_server(compression="message", ws_max_message=1024)
    async with aiohttp.ClientSession() as session:
        chat = await start_chat(session, server.url, "bomb", seed=2, max_tokens=300, token_ms=50)
        url = f"{server.ws_url}/ws/{chat['channel']}"
        async with session.ws_connect(url, compress=15) as sock:
            # 100 KB of spaces deflate to a few hundred bytes: under the limit on the wire.
            await sock.send_str('{"type": "cancel", "pad": "' + " " * 100_000 + '"}')
            async with asyncio.timeout(10):
                async for _ in sock:
                    pass
            assert sock.close_code == 1009


async def test_chaos_delays_and_pauses_keep_the_compressed_stream_in_order(
    start_server: StartServer,
) -> None:
    # Under faults every event takes the per-connection slow path (held, delayed, then
    # written): the context-keeping compressor must see them in the order they are written.
    server = await start_server(compression="connection", chaos=True)
    async with aiohttp.ClientSession() as session:
        chat = await start_chat(
            session, server.url, "chaos", seed=5, max_tokens=60, token_ms=5, ttft_ms=300
        )
        reader = asyncio.create_task(raw_ws(server.port, f"/ws/{chat['channel']}", OFFER))
        for action, body in (("delay", {"ms": 30}), ("pause", {"seconds": 0.2})):
            async with session.post(f"{server.url}/api/chaos/{action}", json=body) as resp:
                assert resp.status == 200, await resp.text()
        got = await reader
        reference = await poll(session, server.url, chat["channel"])
    assert texts(got.frames, Inflater()) == reference
