"""The accounting against a packet capture (as ``tests/test_capture.py`` does) with the clients
people use and compression on: for ``--compression off``, ``message`` and ``connection``, what
the server says each client cost equals, to the byte, what left its port on that client's
connections. The clients ask for compression as browsers do: aiohttp's ``Accept-Encoding``
(gzip, deflate, br, zstd with the packages installed) and the ``websockets`` package, which
offers ``permessage-deflate`` and lets the server close first (the capture must show the
server's FIN, not a reset).

Needs tcpdump and the right to capture; skips otherwise, like the uncompressed test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import connect as websockets_connect

from realtime_lab.clients import open_stream
from tests.conftest import RunningServer, StartServer
from tests.pcap import Capture, Ports

TRANSPORTS = ("poll", "longpoll", "sse", "ws")


def _tcpdump() -> str:
    binary = shutil.which("tcpdump")
    if binary is None:
        pytest.skip("tcpdump is not installed (apt-get install tcpdump)")
    if os.geteuid() != 0:
        pytest.skip("capturing packets needs root (or CAP_NET_RAW)")
    return binary


@pytest.mark.parametrize("mode", ["off", "message", "connection"])
async def test_compressed_bytes_counted_match_a_packet_capture(
    start_server: StartServer, tmp_path: Path, mode: str
) -> None:
    binary = _tcpdump()
    server = await start_server(heartbeat=0.3, compression=mode)
    ports = Ports()
    capture = Capture(binary, server.port, tmp_path / "capture.pcap")
    try:
        await capture.start(ports)
        counted, encodings = await _run_and_count(server, ports)
        await server.stop()
        await capture.wait_ended(ports)
    finally:
        capture.kill()
    seen = await capture.read()

    missing = ports.missing(seen)
    assert not missing, "the capture lacks what the test sent:\n" + "\n".join(missing)
    on_the_wire = {
        transport: sum(seen[port][0].sent() for port in ports.with_label(f"stream-{transport}"))
        for transport in TRANSPORTS
    }
    assert counted == on_the_wire
    # The traffic was compressed as the mode says (else the test proves nothing new).
    assert encodings["ws"] == (mode != "off")
    assert encodings["sse"] == (mode == "connection")


async def _stream_one_chat(server: RunningServer, transport: str, ports: Ports) -> bool:
    """One chat over ``transport``; whether its stream was compressed (ws: deflate agreed)."""
    connector = aiohttp.TCPConnector(socket_factory=ports.factory(f"chat-{transport}"))
    async with aiohttp.ClientSession(connector=connector) as session:
        body = {"prompt": "count the zipped wire", "seed": 3, "max_tokens": 60, "token_ms": 3}
        async with session.post(f"{server.url}/api/chats", json=body) as resp:
            channel = (await resp.json())["channel"]
    connector = aiohttp.TCPConnector(limit=1, socket_factory=ports.factory(f"stream-{transport}"))
    async with aiohttp.ClientSession(connector=connector) as own:
        if transport == "ws":
            # The websockets package: it offers deflate as browsers do, and closes as RFC 6455
            # says (the server's TCP close first), so the capture sees the server's FIN.
            sock = ports.bind()
            ports.add(sock.getsockname()[1], "stream-ws")
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
            url = f"{server.ws_url}/ws/{channel}?client=cap-ws"
            async with asyncio.timeout(20), websockets_connect(url, sock=sock) as ws:
                async for _ in ws:
                    pass
                return "Sec-WebSocket-Extensions" in ws.response.headers
        if transport == "sse":
            async with (
                asyncio.timeout(20),
                own.get(f"{server.url}/sse/{channel}?client=cap-sse") as resp,
            ):
                await resp.read()
                return "Content-Encoding" in resp.headers
        async with open_stream(
            server.url,
            channel,
            transport,
            session=own,
            client_tag=f"cap-{transport}",
            poll_interval=0.02,
        ) as client:
            async for _ in client:
                pass
    return False


async def _run_and_count(
    server: RunningServer, ports: Ports
) -> tuple[dict[str, int], dict[str, bool]]:
    counted: dict[str, int] = {}
    encodings: dict[str, bool] = {}
    for transport in TRANSPORTS:
        encodings[transport] = await _stream_one_chat(server, transport, ports)
    connector = aiohttp.TCPConnector(socket_factory=ports.factory("stats"))
    async with aiohttp.ClientSession(connector=connector) as session:
        for transport in TRANSPORTS:
            url = f"{server.url}/api/stats?client=cap-{transport}"
            async with asyncio.timeout(10):
                while True:  # until the server has folded the closed connection in
                    async with session.get(url) as resp:
                        mine = (await resp.json())["client"]
                    if mine["open"] == 0:
                        break
                    await asyncio.sleep(0.05)
            counted[transport] = mine["bytes"]
    return counted, encodings
