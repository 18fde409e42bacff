"""HTTP compression per ``--compression`` mode: ``Content-Encoding`` of SSE and fetch streams
(flushed per event, one encoder per connection), poll answers compressed when asked, the choice
among codings, and the accounting of the compressed bytes, read raw off the socket."""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from realtime_lab.config import COMPRESSION_MODES, Settings
from realtime_lab.protocol.deflate import MODES
from realtime_lab.protocol.sse import SSEDecoder
from realtime_lab.transports.compression import (
    AVAILABLE,
    MIN_BODY,
    choose_encoding,
    make_encoder,
)
from tests.conftest import RunningServer, StartServer
from tests.transports.collect import (
    fetch,
    parse_response,
    poll,
    raw_get,
    running,
    sse,
    start_chat,
    stats,
    until_count,
    wait_for,
)


def decompressor(name: str) -> Callable[[bytes], bytes]:
    """A function that inflates the next piece of a ``name``-coded body."""
    if name == "gzip":
        return zlib.decompressobj(16 + 15).decompress
    if name == "br":
        import brotli  # type: ignore[import-untyped]

        inflate: Callable[[bytes], bytes] = brotli.Decompressor().process
        return inflate
    from backports import zstd

    return zstd.ZstdDecompressor().decompress


def test_the_modes_are_one_list() -> None:
    assert COMPRESSION_MODES == MODES
    with pytest.raises(ValueError, match="compression"):
        Settings.from_env({}, compression="fast")
    assert Settings.from_env({"REALTIME_LAB_COMPRESSION": "message"}).compression == "message"


def test_gzip_is_always_there_and_br_zstd_with_their_packages() -> None:
    assert "gzip" in AVAILABLE
    assert set(AVAILABLE) == {"gzip", "br", "zstd"}  # the dev install has both packages


@pytest.mark.parametrize(
    ("header", "chosen"),
    [
        (None, None),
        ("", None),
        ("identity", None),
        ("gzip", "gzip"),
        ("gzip, deflate, br, zstd", "gzip"),  # a browser's: the server's order decides
        ("br, zstd", "zstd"),
        ("gzip;q=0.5, br;q=1.0", "br"),  # the client's weights come first
        ("br;q=0, gzip", "gzip"),  # q=0: refused
        ("*", "gzip"),
        ("*;q=0.2, gzip;q=0.1", "zstd"),
        ("*, gzip;q=0", "zstd"),
        ("gzip;q=bad, zstd;q=2", None),  # malformed weights: the element is ignored
        ("GZIP", "gzip"),
        (" , ;q=1", None),
    ],
)
def test_choose_encoding(header: str | None, chosen: str | None) -> None:
    assert choose_encoding(header, ("gzip", "zstd", "br")) == chosen


@pytest.mark.parametrize("name", AVAILABLE)
def test_every_piece_decodes_as_soon_as_it_is_written(name: str) -> None:
    encoder = make_encoder(name)
    inflate = decompressor(name)
    pieces = [b'id: 1-%d\ndata: {"text": " token %d"}\n\n' % (i, i) for i in range(50)]
    for piece in pieces:
        assert inflate(encoder.encode(piece)) == piece  # the flush: nothing is held back
    assert inflate(encoder.finish()) == b""


# Streams -----------------------------------------------------------------------------------------


async def reference(server: RunningServer, tokens: int = 40, **body: Any) -> tuple[str, list[Any]]:
    async with aiohttp.ClientSession() as session:
        chat = await start_chat(session, server.url, "zip me", seed=7, max_tokens=tokens, **body)
        return chat["channel"], await poll(session, server.url, chat["channel"])


@pytest.mark.parametrize("name", AVAILABLE)
async def test_sse_body_is_compressed_per_connection_and_counted_as_sent(
    start_server: StartServer, name: str
) -> None:
    server = await start_server(compression="connection")
    channel, events = await reference(server)
    got = await raw_get(
        server.port, f"/sse/{channel}?client=raw-{name}", headers={"Accept-Encoding": name}
    )
    assert got.status == 200
    assert got.headers["content-encoding"] == name
    assert got.headers["vary"] == "Accept-Encoding"
    text = decompressor(name)(got.body)
    decoded = SSEDecoder().feed(text)
    assert [json.loads(msg.data) for msg in decoded] == events
    assert len(got.body) < len(text) * 0.6
    async with aiohttp.ClientSession() as session:
        counted = (await stats(session, server.url, f"raw-{name}"))["client"]["bytes"]
    assert counted == len(got.raw)


async def test_gzip_sse_ends_with_its_trailer_and_carries_the_heartbeats(
    start_server: StartServer,
) -> None:
    server = await start_server(compression="connection", heartbeat=0.02)
    channel, events = await reference(server, tokens=30, token_ms=10)
    got = await raw_get(server.port, f"/sse/{channel}", headers={"Accept-Encoding": "gzip"})
    inflate = zlib.decompressobj(16 + 15)
    text = inflate.decompress(got.body)
    assert inflate.eof  # the gzip member is complete: its CRC was checked
    assert not inflate.unused_data
    assert text.startswith(b"retry: ")
    assert text.count(b"data: ") == len(events)


async def test_each_event_reaches_the_client_before_the_next_is_made(
    start_server: StartServer,
) -> None:
    server = await start_server(compression="connection")
    async with aiohttp.ClientSession() as session:
        chat = await start_chat(session, server.url, "slow", seed=3, max_tokens=300, token_ms=50)
        # aiohttp's client decodes the body as it comes; the first token comes long before the
        # chat is over, so the encoder did not hold it back.
        got = await sse(
            session, server.url, chat["channel"], stop=until_count(1), read_to_eof=False
        )
        assert got.headers["Content-Encoding"] in AVAILABLE
        assert got.events[0]["type"] == "token"
        async with session.get(f"{server.url}/api/chats/{chat['id']}") as resp:
            assert (await resp.json())["status"] == "running"


@pytest.mark.parametrize("mode", ["off", "message"])
async def test_streams_stay_plain_unless_connection_mode(
    start_server: StartServer, mode: str
) -> None:
    server = await start_server(compression=mode)
    channel, events = await reference(server)
    got = await raw_get(server.port, f"/sse/{channel}", headers={"Accept-Encoding": "gzip, br"})
    assert "content-encoding" not in got.headers
    assert got.body.count(b"data: ") == len(events)


@pytest.mark.parametrize("accept", ["gzip", "br", "zstd", "gzip, deflate, br, zstd"])
async def test_aiohttp_client_decodes_compressed_sse_and_fetch(
    start_server: StartServer, accept: str
) -> None:
    server = await start_server(compression="connection")
    channel, events = await reference(server)
    headers = {"Accept-Encoding": accept}
    async with aiohttp.ClientSession(headers=headers) as session:
        got = await sse(session, server.url, channel)
        assert got.headers["Content-Encoding"] == choose_encoding(accept)
        assert got.events == events
        streamed = await fetch(session, server.url, {"prompt": "fetch zipped", "max_tokens": 30})
        assert streamed.headers["Content-Encoding"] == choose_encoding(accept)
        assert streamed.chat is not None
        assert streamed.events[-1]["type"] == "end"
        assert streamed.events == await poll(session, server.url, streamed.chat["channel"])


async def test_a_compressed_stream_that_overflows_or_is_cut_leaves_the_server_clean(
    start_server: StartServer,
) -> None:
    server = await start_server(compression="connection")
    async with aiohttp.ClientSession() as session:
        chat = await start_chat(session, server.url, "cut", seed=3, max_tokens=300, token_ms=5)
        async with running(
            sse(session, server.url, chat["channel"], stop=until_count(3), read_to_eof=False)
        ) as task:
            got = await task
        assert len(got.events) >= 3

        async def closed() -> bool:
            return (await stats(session, server.url))["transports"]["sse"]["open"] == 0

        await wait_for(closed)


# Polls -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", COMPRESSION_MODES)
@pytest.mark.parametrize("name", AVAILABLE)
async def test_poll_answers_compressed_when_asked(
    start_server: StartServer, mode: str, name: str
) -> None:
    server = await start_server(compression=mode)
    channel, events = await reference(server)
    for transport in ("poll", "longpoll"):
        tag = f"{transport}-{mode}-{name}"
        path = f"/{transport}/{channel}?client={tag}"
        got = await raw_get(server.port, path, headers={"Accept-Encoding": name})
        assert got.status == 200
        if mode == "off":
            assert "content-encoding" not in got.headers
            body = got.body
        else:
            assert got.headers["content-encoding"] == name
            assert got.headers["vary"] == "Accept-Encoding"
            body = decompressor(name)(got.body)
            assert len(got.body) < len(body) / 2
            assert json.loads(body)["events"] == events
        async with aiohttp.ClientSession() as session:
            counted = (await stats(session, server.url, tag))["client"]["bytes"]
        assert counted == len(got.raw)


async def test_small_poll_answers_and_unasked_ones_go_plain(start_server: StartServer) -> None:
    server = await start_server(compression="connection")
    channel, events = await reference(server)
    last = events[-1]["id"]
    small = await raw_get(
        server.port, f"/poll/{channel}?after={last}", headers={"Accept-Encoding": "gzip"}
    )
    assert len(small.body) < MIN_BODY
    assert "content-encoding" not in small.headers
    assert small.headers["vary"] == "Accept-Encoding"
    plain = await raw_get(server.port, f"/poll/{channel}")
    assert "content-encoding" not in plain.headers
    assert parse_response(plain.raw).body == plain.body


async def test_chaos_delays_and_pauses_keep_the_gzip_stream_in_order(
    start_server: StartServer,
) -> None:
    server = await start_server(compression="connection", chaos=True)
    async with aiohttp.ClientSession() as session:
        chat = await start_chat(
            session, server.url, "chaos", seed=5, max_tokens=60, token_ms=5, ttft_ms=300
        )
        path = f"/sse/{chat['channel']}"
        reader = asyncio.create_task(
            raw_get(server.port, path, headers={"Accept-Encoding": "gzip"})
        )
        for action, body in (("delay", {"ms": 30}), ("pause", {"seconds": 0.2})):
            async with session.post(f"{server.url}/api/chaos/{action}", json=body) as resp:
                assert resp.status == 200, await resp.text()
        got = await reader
        events = await poll(session, server.url, chat["channel"])
    text = zlib.decompressobj(16 + 15).decompress(got.body)
    assert [json.loads(msg.data) for msg in SSEDecoder().feed(text)] == events
