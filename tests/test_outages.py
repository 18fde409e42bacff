"""Redis outages: unreachable at start, lost while serving, back again.

A lost Redis is played by a TCP proxy between the server and its own redis-server: cutting it
drops every connection and refuses new ones, as a network partition would, while Redis keeps
its data (another process, which reaches Redis directly, goes on publishing meanwhile).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest

from realtime_lab.bus import create_bus
from realtime_lab.errors import BusUnavailable
from realtime_lab.protocol.envelope import Event
from tests.conftest import StartServer, refusing_port
from tests.redis_server import RedisServer
from tests.transports.collect import wait_for

pytestmark = pytest.mark.redis


class CuttableProxy:
    """A TCP proxy to ``127.0.0.1:target`` whose connections can be cut (and refused) at will."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.up = True
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, **query: str) -> str:
        options = "&".join(f"{k}={v}" for k, v in query.items())
        return f"redis://127.0.0.1:{self.port}/0?{options}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()
            self._writers.discard(sink)

    def cut(self) -> None:
        """Drop every connection; refuse new ones until :meth:`restore`."""
        self.up = False
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    def restore(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[CuttableProxy]:
    cut = await CuttableProxy(redis_server.port).start()
    yield cut
    await cut.close()


def test_serve_exits_with_one_line_when_redis_is_unreachable() -> None:
    with refusing_port() as port:
        done = subprocess.run(
            [sys.executable, "-m", "realtime_lab", "serve", "--port", "0"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "REALTIME_LAB_BUS": f"redis://127.0.0.1:{port}/0"},
            check=False,
        )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"realtime-lab serve: cannot reach redis at 127.0.0.1:{port}/0: ")


async def test_an_unreachable_cluster_is_the_same_refusal() -> None:
    """What ``serve`` turns into that one line: :class:`BusUnavailable` from ``start``."""
    with refusing_port() as first, refusing_port() as second:
        bus = create_bus(f"redis+cluster://127.0.0.1:{first},127.0.0.1:{second}/")
        with pytest.raises(BusUnavailable, match=f"cannot reach redis cluster at .*{second}"):
            await bus.start()
        await bus.close()


async def read_sse(response: aiohttp.ClientResponse, into: list[str]) -> None:
    """Collect the SSE stream's lines (``data:`` lines and ``:`` heartbeat comments)."""
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith(("data:", ":")):
            into.append(line)


async def test_lost_redis_answers_503_and_streams_carry_on(
    start_server: StartServer, proxy: CuttableProxy, redis_server: RedisServer
) -> None:
    prefix = f"outage{os.getpid()}x{id(proxy) % 100000}"
    server = await start_server(bus=proxy.url(prefix=prefix), heartbeat=0.2)
    other = create_bus(redis_server.url(prefix=prefix))  # a process that still reaches Redis
    await other.start()
    lines: list[str] = []
    async with aiohttp.ClientSession() as http:
        try:
            async with http.get(f"{server.url}/api/health") as health:
                assert health.status == 200
            stream = await http.get(f"{server.url}/sse/news")
            reader = asyncio.create_task(read_sse(stream, lines))
            async with http.post(
                f"{server.url}/api/channels/news/events", json={"type": "note", "data": {"n": 1}}
            ) as posted:
                assert posted.status == 201
                first = await posted.json()
            await wait_for(lambda: any('"n":1' in line for line in lines))

            proxy.cut()
            async with http.get(f"{server.url}/api/health") as health:
                assert health.status == 503
                body = await health.json()
            assert body["ok"] is False
            assert body["error"]["code"] == "bus-unavailable"
            assert "redis" in body["error"]["message"]
            async with http.post(
                f"{server.url}/api/channels/news/events", json={"type": "note", "data": {"n": 0}}
            ) as refused:
                assert refused.status == 503
                assert refused.headers["Retry-After"] == "1"
                assert (await refused.json())["error"]["code"] == "bus-unavailable"
            async with http.post(f"{server.url}/api/chats", json={"prompt": "hi"}) as chat:
                assert chat.status == 503
                assert (await chat.json())["error"]["code"] == "bus-unavailable"
            meanwhile: list[Event] = [
                await other.publish("news", "note", {"n": n}) for n in (2, 3, 4)
            ]
            # The stream stays open: heartbeats go on while Redis is away, and waiting for it
            # holds nothing more (one reconnecting reader, one catch-up at most, no backlog).
            beats = sum(1 for line in lines if line.startswith(":"))
            await wait_for(lambda: sum(1 for line in lines if line.startswith(":")) >= beats + 2)
            tasks = len(asyncio.all_tasks())
            await wait_for(lambda: sum(1 for line in lines if line.startswith(":")) >= beats + 5)
            assert len(asyncio.all_tasks()) <= tasks + 1
            assert not reader.done()

            proxy.restore()
            # By itself, the stream gets what was published meanwhile, then goes on.
            await wait_for(lambda: any('"n":4' in line for line in lines), timeout=15)
            async with http.post(
                f"{server.url}/api/channels/news/events", json={"type": "note", "data": {"n": 5}}
            ) as posted:
                assert posted.status == 201
                last = await posted.json()
            await wait_for(lambda: any('"n":5' in line for line in lines))
            data = [line for line in lines if line.startswith("data:")]
            got = [n for n in range(6) for line in data if f'"n":{n}' in line]
            assert got == [1, 2, 3, 4, 5]  # nothing skipped, nothing twice
            epoch = first["id"].rpartition("-")[0]
            assert [e.id for e in meanwhile] == [f"{epoch}-{seq}" for seq in (2, 3, 4)]
            assert last["id"] == f"{epoch}-5"
            async with http.get(f"{server.url}/api/health") as health:
                assert health.status == 200
            reader.cancel()
            stream.close()
        finally:
            await other.close()


async def test_new_requests_during_an_outage_get_a_clear_answer_on_every_transport(
    start_server: StartServer, proxy: CuttableProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Polls, a chat channel's check and a new stream's attach all need Redis: 503, an SSE
    ``error`` event or a WebSocket 1013, each logged once without a traceback; once Redis is
    back the same requests are served."""
    prefix = f"outnew{os.getpid()}x{id(proxy) % 100000}"
    server = await start_server(bus=proxy.url(prefix=prefix), heartbeat=0.2)
    async with aiohttp.ClientSession() as http:
        proxy.cut()
        for path in ("/poll/news", "/longpoll/news?timeout=1", "/sse/chat.feedfacefeedface"):
            async with http.get(server.url + path) as answer:
                assert answer.status == 503, path
                assert (await answer.json())["error"]["code"] == "bus-unavailable", path
        # A stream of a channel the process may serve at once: the 200 is sent before the
        # attach needs Redis, so the stream says why it ends, then ends (once the subscription
        # has gone unconfirmed for redis.SUBSCRIBE_TIMEOUT: both streams wait on the same one).

        async def sse_body() -> str:
            async with http.get(f"{server.url}/sse/news") as stream:
                assert stream.status == 200
                return (await stream.read()).decode()

        async def ws_close() -> tuple[aiohttp.WSMessage, int | None]:
            async with http.ws_connect(f"{server.url}/ws/news") as sock:
                return await sock.receive(), sock.close_code

        async with asyncio.timeout(30):
            body, (message, close_code) = await asyncio.gather(sse_body(), ws_close())
        assert "event: error" in body
        assert '"code":"bus-unavailable"' in body
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert close_code == 1013
        assert "bus-unavailable" in (message.extra or "")
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        assert not [r for r in caplog.records if r.levelname == "ERROR"]

        proxy.restore()

        async def served() -> bool:
            async with http.get(f"{server.url}/poll/news") as answer:
                return answer.status == 200

        async with asyncio.timeout(15):
            while not await served():
                await asyncio.sleep(0.05)  # polling the condition, with the deadline above
