"""``deploy/nginx-h2.conf`` (what ``make h2`` runs): nginx with TLS and HTTP/2 in front of the app.

The configuration keeps the README's "Behind nginx" blocks unchanged; over its HTTP/2 port the
JSON API and SSE stream as HTTP/2 streams (curl, which offers h2 in its ALPN), WebSocket
handshakes go over HTTP/1.1 on the same port (nginx has no RFC 8441), and its second port speaks
HTTP/1.1 only. The app, told to trust the proxy, sees the browser's https.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningServer, StartServer, free_port
from tests.nginx.h2_proxy import DEPLOY, H2Proxy, missing, start_h2_proxy
from tests.nginx.nginx_proxy import documented_blocks, lines_of

pytestmark = [pytest.mark.nginx, pytest.mark.skipif(missing() is not None, reason=str(missing()))]

BOUND = 15.0
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


def test_the_deploy_config_keeps_the_readme_blocks() -> None:
    """Every README block (upstream, map, locations) is in deploy/nginx-h2.conf, in order."""
    deploy = lines_of(DEPLOY.read_text(encoding="utf-8"))
    blocks = documented_blocks()
    for context in ("http", "server"):
        for block in blocks[context]:
            wanted = lines_of(block)
            assert wanted, block
            start = next(
                (i for i in range(len(deploy)) if deploy[i : i + len(wanted)] == wanted), None
            )
            assert start is not None, f"README block not in {DEPLOY}:\n{block}"


@pytest.fixture
async def proxy(
    start_server: StartServer, tmp_path: Path
) -> AsyncIterator[tuple[RunningServer, H2Proxy]]:
    server = await start_server(trusted_proxies="127.0.0.1")
    nginx = await start_h2_proxy(tmp_path / "nginx", server.port)
    try:
        yield server, nginx
    finally:
        nginx.stop()


async def curl(*args: str) -> tuple[int, str, str]:
    assert CURL is not None
    proc = await asyncio.create_subprocess_exec(
        CURL, "-sSk", "--max-time", "10", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), BOUND)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def publish(base: str, channel: str, n: int) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/api/channels/{channel}/events", json={"type": "note", "data": {"n": n}}
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()


@needs_curl
async def test_the_h2_port_speaks_http_2_and_the_other_http_1_1(
    proxy: tuple[RunningServer, H2Proxy],
) -> None:
    _, nginx = proxy
    fmt = "%{http_code} %{http_version}"
    assert await curl("--http2", "-o", "/dev/null", "-w", fmt, f"{nginx.h2_url}/api/config") == (
        0, "200 2", ""
    )  # fmt: skip
    assert await curl("--http2", "-o", "/dev/null", "-w", fmt, f"{nginx.h1_url}/api/config") == (
        0, "200 1.1", ""
    )  # fmt: skip
    # The dashboard itself, over HTTP/2.
    code, page, _ = await curl("--http2", f"{nginx.h2_url}/")
    assert code == 0
    assert "Realtime Lab" in page


@needs_curl
async def test_sse_streams_over_http_2(proxy: tuple[RunningServer, H2Proxy]) -> None:
    """An SSE stream is one HTTP/2 stream; events pass one by one (nginx does not buffer it)."""
    server, nginx = proxy
    channel = "room.h2"
    await publish(server.url, channel, 1)
    assert CURL is not None
    proc = await asyncio.create_subprocess_exec(
        CURL, "-sSkN", "--http2", "-i", "--max-time", "20", f"{nginx.h2_url}/sse/{channel}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(BOUND):
            while not any('"n":1' in line for line in seen):
                seen.append((await proc.stdout.readline()).decode())
            # A live event while the stream is open: it arrives without the stream ending.
            await publish(server.url, channel, 2)
            while not any('"n":2' in line for line in seen):
                line = (await proc.stdout.readline()).decode()
                assert line, "".join(seen)
                seen.append(line)
    finally:
        proc.kill()
        await proc.wait()
    head = "".join(seen).lower()
    assert head.startswith("http/2 200"), head
    assert "content-type: text/event-stream" in head


async def test_websocket_goes_over_http_1_1_on_the_h2_port(
    proxy: tuple[RunningServer, H2Proxy],
) -> None:
    """nginx offers no RFC 8441 extended CONNECT: a wss: handshake is HTTP/1.1, upgraded."""
    server, nginx = proxy
    channel = "room.wss"
    origin = nginx.h2_url
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"wss://127.0.0.1:{nginx.h2_port}/ws/{channel}", ssl=False, headers={"Origin": origin}
        ) as sock,
    ):
        await publish(server.url, channel, 7)
        async with asyncio.timeout(BOUND):
            while True:
                message: Any = await sock.receive_json()
                if message.get("type") == "note":
                    break
    assert message["data"] == {"n": 7}


async def test_the_app_sees_https_through_the_proxy(proxy: tuple[RunningServer, H2Proxy]) -> None:
    """With --trusted-proxies the app believes X-Forwarded-Proto: its URLs say https and wss."""
    _, nginx = proxy
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{nginx.h1_url}/api/chats",
            json={"prompt": "hello", "max_tokens": 2},
            ssl=False,
            headers={"Origin": nginx.h1_url},
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()
        text = await resp.text()
    assert "wss://" in text, text
    assert "https://" in text, text


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@needs_curl
async def test_make_h2_serves_both_ports_and_stops_on_sigterm(tmp_path: Path) -> None:
    """``deploy/h2.sh`` (``make h2``) as a user runs it, on free ports, until SIGTERM."""
    script = DEPLOY.parent / "h2.sh"
    ports = {"PORT": free_port(), "H2_PORT": free_port(), "H1_PORT": free_port()}
    env = {
        **os.environ,
        **{name: str(port) for name, port in ports.items()},
        "H2_DIR": str(tmp_path / "h2"),
        "BIN": str(Path(sys.executable).parent),
    }
    proc = await asyncio.create_subprocess_exec(
        "bash", str(script),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group: the app and nginx are its children
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = (await asyncio.wait_for(proc.stdout.readline(), BOUND)).decode()
        assert banner.startswith(f"HTTP/2:   https://127.0.0.1:{ports['H2_PORT']}/"), banner
        fmt = "%{http_code} %{http_version}"
        for port, version in ((ports["H2_PORT"], "2"), (ports["H1_PORT"], "1.1")):
            url = f"https://127.0.0.1:{port}/api/config"
            async with asyncio.timeout(BOUND):  # the app may still be starting behind nginx
                while (answer := await curl("--http2", "-o", "/dev/null", "-w", fmt, url))[1] != (
                    f"200 {version}"
                ):
                    await asyncio.sleep(0.1)  # polling the app's start, with a deadline
            assert answer[0] == 0
        assert (tmp_path / "h2" / "cert.pem").exists()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), BOUND)
        # Both children went with it: nothing listens on their ports any more.
        async with asyncio.timeout(BOUND):
            while any(listening(port) for port in ports.values()):
                await asyncio.sleep(0.05)  # they exit within their shutdown timeouts
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
