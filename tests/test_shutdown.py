"""A real ``realtime-lab serve`` process: it starts, serves, and on SIGTERM ends every open
stream cleanly and exits 0 within its shutdown timeout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import free_port
from tests.transports.collect import running, stats, wait_for

SHUTDOWN_TIMEOUT = 3.0
MARGIN = 10.0  # a loaded machine; the server itself should take well under a second


def command() -> list[str]:
    script = Path(sys.executable).with_name("realtime-lab")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "realtime_lab"]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *command(),
        "serve",
        "--port",
        str(port),
        "--shutdown-timeout",
        str(SHUTDOWN_TIMEOUT),
        "--ticker-rate",
        "0",
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "REALTIME_LAB_LOG_LEVEL": "INFO"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_for(lambda: _healthy(session, base, proc), timeout=30, interval=0.1)
        yield proc, base
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        log.close()
        if proc.returncode not in (0, -signal.SIGKILL):
            print((tmp_path / "server.log").read_text(errors="replace"))


async def _healthy(
    session: aiohttp.ClientSession, base: str, proc: asyncio.subprocess.Process
) -> bool:
    assert proc.returncode is None, "the server exited during startup"
    try:
        async with session.get(f"{base}/api/health") as resp:
            return resp.status == 200 and (await resp.json()) == {"ok": True}
    except aiohttp.ClientConnectionError:
        return False


async def read_sse(session: aiohttp.ClientSession, url: str) -> bytes:
    # aiohttp raises ClientPayloadError if the chunked body is cut off instead of ended.
    async with session.get(url) as resp:
        assert resp.status == 200
        return await resp.read()


async def read_ws(session: aiohttp.ClientSession, url: str) -> int | None:
    async with session.ws_connect(url) as sock:
        async for _ in sock:
            pass
        return sock.close_code


async def longpoll(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url) as resp:
        assert resp.status == 200
        value: dict = await resp.json()
        return value


async def open_counts(session: aiohttp.ClientSession, base: str) -> dict[str, int] | None:
    transports = (await stats(session, base))["transports"]
    counts = {name: transports[name]["open"] for name in ("sse", "ws", "longpoll")}
    return counts if counts == {"sse": 1, "ws": 1, "longpoll": 1} else None


async def test_sigterm_ends_open_streams_and_exits_0(
    serve: tuple[asyncio.subprocess.Process, str],
) -> None:
    proc, base = serve
    ws_base = base.replace("http", "ws", 1)
    async with (
        aiohttp.ClientSession() as session,
        running(read_sse(session, f"{base}/sse/room.bye")) as sse_task,
        running(read_ws(session, f"{ws_base}/ws/room.bye")) as ws_task,
        running(longpoll(session, f"{base}/longpoll/room.bye?after=now&timeout=60")) as lp_task,
    ):
        await wait_for(lambda: open_counts(session, base), timeout=15)
        loop = asyncio.get_running_loop()
        started = loop.time()
        proc.send_signal(signal.SIGTERM)

        async with asyncio.timeout(SHUTDOWN_TIMEOUT + MARGIN):
            body = await sse_task
            close_code = await ws_task
            answer = await lp_task
            returncode = await proc.wait()
        elapsed = loop.time() - started

    assert body.startswith(b"retry: 1000\n")
    assert close_code == 1001
    assert answer["events"] == []
    assert returncode == 0
    assert elapsed < SHUTDOWN_TIMEOUT + MARGIN


async def test_sigterm_when_idle_exits_0(serve: tuple[asyncio.subprocess.Process, str]) -> None:
    proc, _ = serve
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SHUTDOWN_TIMEOUT + MARGIN):
            await proc.wait()
    assert proc.returncode == 0
