"""A subscriber that stops reading is ended with bounded memory; the others do not notice."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from realtime_lab.protocol.sse import SSEDecoder
from realtime_lab.transports import stream
from realtime_lab.transports.keys import BUS_KEY
from tests.conftest import RunningServer, StartServer
from tests.transports.collect import (
    WS_UPGRADE,
    Envelope,
    parse_response,
    read_to_eof,
    running,
    sse,
    stalled_get,
    stats,
    until_count,
    wait_for,
    ws_frames,
)

SEND_BUFFER = 64 * 1024
PAD = "x" * 4000  # ~4 KiB per event
BATCH = 8  # events published between two checks that the reading client kept up
CHANNEL = "room.flood"


def kernel_capacity(stalled: socket.socket) -> int:
    """An upper bound of the payload the two kernels can hold for one loopback connection.

    The server's send buffer autotunes up to ``tcp_wmem``'s maximum (aiohttp never sets
    ``SO_SNDBUF``); the client's receive buffer is the one we set (``getsockopt`` reports the
    doubled size the kernel actually allows).
    """
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        wmem_max = 16 * 1024 * 1024
    return wmem_max + stalled.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


class Follower:
    """A well-behaved SSE client that reads everything, and says how far it got."""

    def __init__(self) -> None:
        self.events: list[Envelope] = []
        self.changed = asyncio.Event()

    async def run(self, session: aiohttp.ClientSession, url: str) -> None:
        decoder = SSEDecoder()
        async with session.get(url) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                self.events.extend(json.loads(m.data) for m in decoder.feed(chunk))
                self.changed.set()

    async def wait_for(self, count: int, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.events) < count:
                self.changed.clear()
                await self.changed.wait()


async def client_stats(session: aiohttp.ClientSession, server: RunningServer, tag: str) -> Any:
    return (await stats(session, server.url, tag))["client"]


async def flood(
    server: RunningServer,
    session: aiohttp.ClientSession,
    follower: Follower,
    count: int,
    *,
    until_overflow: str | None = None,
) -> int:
    """Publish ``count`` events, never letting ``follower`` fall more than a batch behind.

    With ``until_overflow`` (a client tag), stop once that client overflowed. Published
    straight on the in-process bus: thousands of HTTP POSTs would only make the test
    slow, and the publish path is not what is tested here.
    """
    bus = server.app[BUS_KEY]
    for start in range(0, count, BATCH):
        for i in range(start, min(start + BATCH, count)):
            await bus.publish(CHANNEL, "bulk", {"i": i, "pad": PAD})
        await follower.wait_for(min(start + BATCH, count))
        if until_overflow and (await client_stats(session, server, until_overflow))["overflows"]:
            return min(start + BATCH, count)
    return count


async def open_stalled(
    server: RunningServer, session: aiohttp.ClientSession, transport: str = "sse"
) -> socket.socket:
    headers = WS_UPGRADE if transport == "ws" else None
    path = f"/{transport}/{CHANNEL}?client=stalled"
    stalled = await stalled_get(server.port, path, headers=headers)
    try:
        await wait_for(lambda: _is_open(session, server, "stalled"))
    except BaseException:
        stalled.close()
        raise
    return stalled


async def _is_open(session: aiohttp.ClientSession, server: RunningServer, tag: str) -> bool:
    return bool((await client_stats(session, server, tag))["open"] == 1)


async def test_stalled_subscriber_is_ended_and_the_others_get_everything(
    start_server: StartServer, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long grace before the abort, so that the test can read what the server queued for the
    # stalled client (its last events and the overflow signal) deterministically.
    monkeypatch.setattr(stream, "ABORT_GRACE_S", 60.0)
    server = await start_server(send_buffer=SEND_BUFFER, history=100_000, history_bytes=1 << 30)
    stalled = await open_stalled(server, session)
    try:
        kernel = kernel_capacity(stalled)
        # Bytes the server may have counted for the stalled connection when it is ended:
        # - everything the kernels accepted (its send queue + our receive queue), plus one
        #   segment of overshoot (the send buffer limit is checked before a segment is queued);
        # - what asyncio buffered: at most SEND_BUFFER before the write that overflows, plus
        #   that write (one event), plus the overflow signal;
        # - the response headers and the retry block.
        frame = 2 * len(PAD)
        bound = kernel + 64 * 1024 + SEND_BUFFER + frame + 1024 + 1024
        # Publish well over that bound: a server that buffered without limit would count it all.
        count = 2 * bound // len(PAD) + BATCH
        follower = Follower()
        async with running(follower.run(session, f"{server.url}/sse/{CHANNEL}?client=reader")):
            await wait_for(lambda: _is_open(session, server, "reader"))
            await flood(server, session, follower, count)

            # The stalled connection was ended for overflowing, not left to grow ...
            mine = await wait_for(lambda: _ended(session, server), timeout=15, interval=0.05)
            assert mine["overflows"] == 1
            assert mine["bytes"] <= bound, (mine["bytes"], bound)
            sse_stats = (await stats(session, server.url))["transports"]["sse"]
            assert sse_stats["overflows"] >= 1
            assert sse_stats["open"] == 1  # only the follower is left
            # ... while the reading client got every event, in order.
            assert [e["data"]["i"] for e in follower.events] == list(range(count))
            assert (await client_stats(session, server, "reader"))["overflows"] == 0

        # What the stalled client finds when it finally reads: its events, then an error
        # event naming the id to resume from, then the end of the connection.
        response = parse_response(await read_to_eof(stalled))
    finally:
        stalled.close()
    assert response.status == 200
    messages = SSEDecoder().feed(response.body)
    signal = messages[-1]
    assert signal.event == "error"
    error = json.loads(signal.data)
    assert error["code"] == "overflow"
    delivered = [json.loads(m.data) for m in messages[:-1]]
    assert delivered == follower.events[: len(delivered)]
    assert error["last_id"] == delivered[-1]["id"]
    # Resuming from it gives exactly the rest.
    rest = await sse(
        session,
        server.url,
        CHANNEL,
        last_event_id=error["last_id"],
        stop=until_count(count - len(delivered)),
        read_to_eof=False,
    )
    assert rest.events == follower.events[len(delivered) :]


async def _ended(session: aiohttp.ClientSession, server: RunningServer) -> Any:
    mine = await client_stats(session, server, "stalled")
    return mine if mine["open"] == 0 else None


async def test_never_reading_subscriber_is_aborted(
    start_server: StartServer, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "ABORT_GRACE_S", 0.2)
    server = await start_server(send_buffer=SEND_BUFFER, history=100_000, history_bytes=1 << 30)
    stalled = await open_stalled(server, session)
    try:
        assert server.runner.server is not None
        local = stalled.getsockname()
        (handler,) = [
            h
            for h in server.runner.server.connections
            if h.transport is not None and h.transport.get_extra_info("peername") == local
        ]
        transport = handler.transport
        assert transport is not None
        follower = Follower()
        async with running(follower.run(session, f"{server.url}/sse/{CHANNEL}")):
            published = await flood(
                server,
                session,
                follower,
                2 * kernel_capacity(stalled) // len(PAD),
                until_overflow="stalled",
            )
        assert (await client_stats(session, server, "stalled"))["overflows"] == 1
        # The client never reads, so closing cannot flush: after the grace the server aborts
        # the connection and frees what it had queued for it.
        await wait_for(
            lambda: transport.is_closing() and transport.get_write_buffer_size() == 0,
            timeout=10,
        )
        assert published > 0
    finally:
        stalled.close()


async def test_resuming_from_far_back_is_paced_not_overflowed(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    # A client that resumes from an old id asks for more history than send_buffer (and the
    # kernel buffers) can hold at once. That is not falling behind: the server must write the
    # replay as the client reads it, not overflow it.
    server = await start_server(send_buffer=SEND_BUFFER, history=100_000, history_bytes=1 << 30)
    probe = await stalled_get(server.port, f"/sse/{CHANNEL}?after=now")
    try:
        count = 2 * kernel_capacity(probe) // len(PAD) + 1
    finally:
        probe.close()
    bus = server.app[BUS_KEY]
    first = await bus.publish(CHANNEL, "bulk", {"i": 0, "pad": PAD})
    for i in range(1, count):
        await bus.publish(CHANNEL, "bulk", {"i": i, "pad": PAD})
    end = await bus.publish(CHANNEL, "end", {"reason": "done"})

    # SSE, through a socket with a small receive window that reads steadily.
    sock = await stalled_get(server.port, f"/sse/{CHANNEL}?after={first.id}&client=sse")
    try:
        response = parse_response(await read_to_eof(sock))
    finally:
        sock.close()
    events = [json.loads(m.data) for m in SSEDecoder().feed(response.body)]
    assert [e["data"].get("i") for e in events[:-1]] == list(range(1, count))
    assert events[-1]["id"] == end.id

    # WebSocket, through aiohttp's client.
    url = f"{server.ws_url}/ws/{CHANNEL}?after={first.id}&client=ws"
    received: list[Envelope] = []
    async with asyncio.timeout(30), session.ws_connect(url, max_msg_size=0) as sock_ws:
        async for msg in sock_ws:
            received.append(json.loads(msg.data))
        assert sock_ws.close_code == 1000
    assert [e["data"].get("i") for e in received[:-1]] == list(range(1, count))
    assert received[-1]["id"] == end.id

    for tag in ("sse", "ws"):
        assert (await client_stats(session, server, tag))["overflows"] == 0, tag


async def test_stalled_websocket_is_closed_1013_naming_the_resume_id(
    start_server: StartServer, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "ABORT_GRACE_S", 60.0)  # so the test can read the close frame
    server = await start_server(send_buffer=SEND_BUFFER, history=100_000, history_bytes=1 << 30)
    stalled = await open_stalled(server, session, "ws")
    try:
        follower = Follower()
        async with running(follower.run(session, f"{server.url}/sse/{CHANNEL}")):
            await flood(
                server,
                session,
                follower,
                2 * kernel_capacity(stalled) // len(PAD),
                until_overflow="stalled",
            )
        await wait_for(lambda: _ended(session, server))
        raw = await read_to_eof(stalled)
    finally:
        stalled.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    frames = ws_frames(body)
    opcode, payload = frames[-1]
    assert opcode == 0x8
    assert int.from_bytes(payload[:2], "big") == 1013
    texts = [json.loads(p) for op, p in frames[:-1] if op == 0x1]
    assert texts == follower.events[: len(texts)]
    assert payload[2:].decode() == f"overflow: resume after {texts[-1]['id']}"
