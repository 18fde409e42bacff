"""The byte accounting against an independent measurement: a packet capture on loopback.

``tcpdump`` records every TCP segment the server sends; the payload lengths per client
connection must match what ``/api/stats?client=TAG`` says that client cost, within 2% (they match
to the byte: the accounting counts status lines, headers, chunk framing and WebSocket frames).
Needs tcpdump and the right to capture (root or CAP_NET_RAW): ``.ci/run`` installs it; elsewhere
the test skips and says why.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import BinaryIO

import aiohttp
import pytest

from realtime_lab.clients import open_stream
from tests.conftest import RunningServer, StartServer

TRANSPORTS = ("poll", "longpoll", "sse", "ws")
SEGMENT = re.compile(r"> 127\.0\.0\.1\.(\d+): tcp (\d+)")


def _tcpdump() -> str:
    binary = shutil.which("tcpdump")
    if binary is None:
        pytest.skip("tcpdump is not installed (apt-get install tcpdump)")
    if os.geteuid() != 0:
        pytest.skip("capturing packets needs root (or CAP_NET_RAW)")
    return binary


async def _start_capture(binary: str, port: int, out: BinaryIO) -> subprocess.Popen[bytes]:
    # -l and --immediate-mode: every packet is printed as it comes, none left in a kernel
    # buffer when we stop; "listening on" tells us the capture is live before we send.
    proc = subprocess.Popen(
        [binary, "-i", "lo", "-nn", "-q", "-l", "--immediate-mode", f"tcp and src port {port}"],
        stdout=out,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    loop = asyncio.get_running_loop()
    lines = []
    for _ in range(3):  # "verbose output suppressed ..." may come first
        lines.append(await asyncio.wait_for(loop.run_in_executor(None, proc.stderr.readline), 15))
        if b"listening" in lines[-1]:
            return proc
    line = b" ".join(lines)
    _stop(proc)
    pytest.skip(f"tcpdump cannot capture here: {line.decode(errors='replace').strip()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    if proc.stderr is not None:
        proc.stderr.close()


async def _stream_one_chat(server: RunningServer, transport: str) -> None:
    async with aiohttp.ClientSession() as session:
        body = {"prompt": "count the wire", "seed": 3, "max_tokens": 60, "token_ms": 3}
        async with session.post(f"{server.url}/api/chats", json=body) as resp:
            channel = (await resp.json())["channel"]
    # A session of its own: one keep-alive connection, so one client port per transport.
    connector = aiohttp.TCPConnector(limit=1)
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


async def test_accounted_bytes_match_a_packet_capture(
    start_server: StartServer, tmp_path: Path
) -> None:
    binary = _tcpdump()
    server = await start_server(heartbeat=0.3)
    out = tmp_path / "capture.txt"
    with out.open("wb") as sink:
        capture = await _start_capture(binary, server.port, sink)
        try:
            counted = await _run_and_count(server)
        finally:
            _stop(capture)
    _compare(out, counted)


async def _run_and_count(server: RunningServer) -> dict[str, int]:
    """Stream one chat per transport; what the server says each cost, in bytes."""
    counted: dict[str, int] = {}
    async with aiohttp.ClientSession() as session:
        for transport in TRANSPORTS:
            await _stream_one_chat(server, transport)
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
    await server.stop()  # nothing more leaves the port before tcpdump is stopped
    return counted


def _compare(out: Path, counted: dict[str, int]) -> None:
    per_connection: dict[int, int] = defaultdict(int)
    for line in out.read_text().splitlines():
        if match := SEGMENT.search(line):
            per_connection[int(match.group(1))] += int(match.group(2))
    captured = sorted(n for n in per_connection.values() if n)
    # Each transport's stream used one connection; match each count to one captured connection.
    for transport, n in counted.items():
        closest = min(captured, key=lambda c: abs(c - n))
        assert abs(closest - n) <= 0.02 * closest, (transport, n, captured)
        captured.remove(closest)
