"""Fixtures shared by every test folder.

``start_server(**settings)`` runs the real app on 127.0.0.1, port 0, with the same runner options
as ``realtime-lab serve`` (``handler_cancellation=True``), and stops it at the end of the test.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from realtime_lab.app import make_app
from realtime_lab.config import Settings
from realtime_lab.httpserver import HardenedAppRunner
from tests.redis_server import RedisServer, redis_server_binary


def free_port() -> int:
    """A TCP port nobody listens on right now (for processes that cannot take port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def refusing_port() -> Iterator[int]:
    """A port where connections are refused for as long as the block runs.

    The socket is bound and does not listen: a connection to it is refused, and no other
    server of the suite can take the port meanwhile (as it could take a free port number).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_settings(**overrides: Any) -> Settings:
    """Settings for tests: fast feed, short timeouts, no ticker unless asked."""
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "ticker_rate": 0.0,
        "ttft_ms": 20.0,
        "token_ms": 2.0,
        "heartbeat": 15.0,
        "shutdown_timeout": 2.0,
        "longpoll_timeout": 5.0,
    }
    base.update(overrides)
    return Settings(**base)


test_settings.__test__ = False  # type: ignore[attr-defined]


@dataclass
class RunningServer:
    """A live server: ``url`` is ``http://127.0.0.1:PORT``."""

    app: web.Application
    runner: web.AppRunner
    url: str
    port: int
    stopped: bool = False

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http") :]

    async def stop(self) -> None:
        """Stop it as SIGTERM would (idempotent; the fixture stops it anyway)."""
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()


StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Factory: ``server = await start_server(heartbeat=0.5, chaos=True)``."""
    running: list[RunningServer] = []

    async def start(**overrides: Any) -> RunningServer:
        settings = test_settings(**overrides)
        app = make_app(settings)
        runner = HardenedAppRunner(
            app,
            header_timeout=settings.header_timeout,
            handler_cancellation=True,
            shutdown_timeout=settings.shutdown_timeout,
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", overrides.get("port", 0))
        await site.start()
        sockets = site._server.sockets if site._server is not None else ()  # type: ignore[union-attr]
        port = sockets[0].getsockname()[1]
        server = RunningServer(app, runner, f"http://127.0.0.1:{port}", port)
        running.append(server)
        return server

    yield start
    for server in running:
        await asyncio.wait_for(server.stop(), timeout=15)


@pytest.fixture
async def server(start_server: StartServer) -> RunningServer:
    """A server with the test settings."""
    return await start_server()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the session; skips when redis-server is not installed."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with RedisServer(binary) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A Redis bus URL with a key prefix of its own for this test."""
    return redis_server.url(prefix=f"t{uuid.uuid4().hex[:12]}")
