"""The byte accounting against an independent measurement: a packet capture on loopback.

``tcpdump`` records every TCP segment to and from the server's port; what the server sent on
each client connection, SYN to FIN, must equal to the byte what ``/api/stats?client=TAG`` says
that client cost (the accounting counts status lines, headers, chunk framing and WebSocket
frames). The capture is proved live (a probe's SYN is in it) before the traffic, and every
connection the test opens must be in it whole, or the test fails naming the ones that are not.
Needs tcpdump and the right to capture (root or CAP_NET_RAW): ``.ci/run`` installs it; elsewhere
the test skips and says why.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import aiohttp
import pytest

from realtime_lab.clients import open_stream
from tests.conftest import RunningServer, StartServer
from tests.pcap import Capture, Ports, connections

TRANSPORTS = ("poll", "longpoll", "sse", "ws")


def _tcpdump() -> str:
    binary = shutil.which("tcpdump")
    if binary is None:
        pytest.skip("tcpdump is not installed (apt-get install tcpdump)")
    if os.geteuid() != 0:
        pytest.skip("capturing packets needs root (or CAP_NET_RAW)")
    return binary


async def test_accounted_bytes_match_a_packet_capture(
    start_server: StartServer, tmp_path: Path
) -> None:
    binary = _tcpdump()
    server = await start_server(heartbeat=0.3)
    ports = Ports()
    capture = Capture(binary, server.port, tmp_path / "capture.pcap")
    try:
        await capture.start(ports)
        counted = await _run_and_count(server, ports)
        await server.stop()  # every connection closed: nothing more leaves the port
        await capture.wait_ended(ports)
    finally:
        capture.kill()
    seen = await capture.read()

    missing = ports.missing(seen)
    assert not missing, "the capture lacks what the test sent:\n" + "\n".join(missing)
    on_the_wire: dict[str, int] = {}
    per_connection: dict[str, list[int]] = {}
    for transport in TRANSPORTS:
        used = ports.with_label(f"stream-{transport}")
        assert used, f"{transport}: the client opened no connection"
        per_connection[transport] = [seen[port][0].sent() for port in used]
        on_the_wire[transport] = sum(per_connection[transport])
    assert counted == on_the_wire, "\n".join(
        f"{t}: the server counted {counted[t]}, the capture has {on_the_wire[t]} "
        f"(per connection: {per_connection[t]})"
        for t in TRANSPORTS
        if counted[t] != on_the_wire[t]
    )


async def _stream_one_chat(server: RunningServer, transport: str, ports: Ports) -> None:
    connector = aiohttp.TCPConnector(socket_factory=ports.factory(f"chat-{transport}"))
    async with aiohttp.ClientSession(connector=connector) as session:
        body = {"prompt": "count the wire", "seed": 3, "max_tokens": 60, "token_ms": 3}
        async with session.post(f"{server.url}/api/chats", json=body) as resp:
            channel = (await resp.json())["channel"]
    # A session of its own: every connection it opens is this transport's (limit=1: the polls
    # reuse one keep-alive connection), and the server counts exactly these under the tag.
    connector = aiohttp.TCPConnector(limit=1, socket_factory=ports.factory(f"stream-{transport}"))
    async with (
        aiohttp.ClientSession(connector=connector) as own,
        open_stream(
            server.url,
            channel,
            transport,
            session=own,
            client_tag=f"cap-{transport}",
            poll_interval=0.02,
        ) as client,
    ):
        async for _ in client:
            pass


async def _run_and_count(server: RunningServer, ports: Ports) -> dict[str, int]:
    """Stream one chat per transport; what the server says each cost, in bytes."""
    counted: dict[str, int] = {}
    connector = aiohttp.TCPConnector(socket_factory=ports.factory("stats"))
    async with aiohttp.ClientSession(connector=connector) as session:
        for transport in TRANSPORTS:
            await _stream_one_chat(server, transport, ports)
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
    return counted


# The checker itself, on tcpdump lines written here: no capture, no root needed. -------------

SERVER = 40001
CLIENT = 50000
ISN = (1 << 32) - 6  # the server's sequence numbers wrap within the first segment


def _seg(src: int, dst: int, flags: str, seq: str = "", length: int = 0) -> str:
    at = f", seq {seq}" if seq else ""
    return (
        f"IP 127.0.0.1.{src} > 127.0.0.1.{dst}: Flags [{flags}]{at}, ack 1, win 512, "
        f"options [nop,nop,TS val 1 ecr 2], length {length}"
    )


WHOLE = [  # 10 + 20 + 5 bytes from the server, then both FINs
    _seg(CLIENT, SERVER, "S", "100"),
    _seg(SERVER, CLIENT, "S.", str(ISN)),
    _seg(CLIENT, SERVER, "."),
    _seg(SERVER, CLIENT, "P.", f"{ISN + 1}:5", 10),
    _seg(SERVER, CLIENT, "P.", "5:25", 20),
    _seg(SERVER, CLIENT, "FP.", "25:30", 5),
    _seg(CLIENT, SERVER, "F.", "101"),
    _seg(SERVER, CLIENT, "."),
]


def _problems(lines: list[str]) -> list[str]:
    ports = Ports()
    ports.add(CLIENT, "stream-x")
    return ports.missing(connections("\n".join(lines), SERVER))


def test_a_whole_connection_counts_the_servers_bytes_syn_to_fin() -> None:
    seen = connections("\n".join(WHOLE), SERVER)
    assert _problems(WHOLE) == []
    assert seen[CLIENT][0].sent() == 35


def test_a_retransmitted_segment_or_syn_is_counted_once() -> None:
    lines = [WHOLE[0], *WHOLE[:5], WHOLE[4], *WHOLE[5:]]
    seen = connections("\n".join(lines), SERVER)
    assert _problems(lines) == []
    assert seen[CLIENT][0].sent() == 35


def test_a_segment_missing_from_the_capture_is_named() -> None:
    lines = [line for line in WHOLE if line != WHOLE[4]]
    assert _problems(lines) == [f"stream-x (port {CLIENT}): server bytes 10..30 not in the capture"]


def test_a_connection_without_its_syn_or_its_fin_is_named() -> None:
    assert _problems(WHOLE[2:]) == [
        f"stream-x (port {CLIENT}): no SYN from the client",
        f"stream-x (port {CLIENT}): no SYN-ACK from the server",
    ]
    assert _problems(WHOLE[:5]) == [f"stream-x (port {CLIENT}): no FIN from the server"]
    reset = [*WHOLE[:5], _seg(SERVER, CLIENT, "R.", "25")]
    assert _problems(reset) == [
        f"stream-x (port {CLIENT}): no FIN from the server",
        f"stream-x (port {CLIENT}): reset (RST)",
    ]


def test_absent_reused_and_unknown_connections_are_named() -> None:
    assert _problems([]) == [f"stream-x (port {CLIENT}): 0 connections in the capture"]
    again = [_seg(CLIENT, SERVER, "S", "900"), *WHOLE[1:]]
    assert _problems([*WHOLE, *again]) == [
        f"stream-x (port {CLIENT}): 2 connections in the capture"
    ]
    other = [_seg(CLIENT + 1, SERVER, "S", "7")]
    assert _problems([*WHOLE, *other]) == [f"port {CLIENT + 1}: a connection the test did not open"]
