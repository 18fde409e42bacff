"""The hardened server (``realtime_lab.httpserver``) against real sockets on port 0.

A slow-header client is cut at the header timeout; keep-alive clients, slow bodies, slow handlers
and streams are not; malformed requests get the JSON error shape and one WARNING line.

``hardened`` (a factory fixture) and :class:`HardenedTestServer` (for pytest-aiohttp's
``aiohttp_client``) run any app with the hardening of ``realtime-lab serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_parser import HttpRequestParser, HttpRequestParserPy
from aiohttp.test_utils import TestServer

from realtime_lab.app import make_app
from realtime_lab.httpserver import (
    HardenedAppRunner,
    HardenedRequestHandler,
    HardenedServer,
    one_line,
)
from realtime_lab.logs import RateLimitFilter, setup_logging
from realtime_lab.transports.problems import json_errors
from tests.conftest import test_settings

HEADER_TIMEOUT = 0.5  # seconds: short, so that the tests that wait for it are quick
BOUND = 10.0  # seconds: the most any single wait in these tests may take

RELEASE = web.AppKey("release", asyncio.Event)
server_log = logging.getLogger("realtime_lab.server")
PURE_PYTHON_PARSER = HttpRequestParser is HttpRequestParserPy  # AIOHTTP_NO_EXTENSIONS=1


# Running an app hardened ---------------------------------------------------------------------


@dataclass
class Served:
    runner: HardenedAppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


StartHardened = Callable[..., Awaitable[Served]]


@pytest.fixture
async def hardened() -> AsyncIterator[StartHardened]:
    """Factory: ``server = await hardened(app, header_timeout=0.5)`` on 127.0.0.1, port 0."""
    runners: list[HardenedAppRunner] = []

    async def start(app: web.Application, **kwargs: Any) -> Served:
        kwargs.setdefault("header_timeout", HEADER_TIMEOUT)
        kwargs.setdefault("shutdown_timeout", 2.0)
        runner = HardenedAppRunner(app, handler_cancellation=True, **kwargs)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return Served(runner, runner.addresses[0][1])

    yield start
    for runner in runners:
        await asyncio.wait_for(runner.cleanup(), BOUND)


class HardenedTestServer(TestServer):
    """``aiohttp_client(HardenedTestServer(app))``: pytest-aiohttp's client, hardened server."""

    def __init__(
        self, app: web.Application, *, header_timeout: float = HEADER_TIMEOUT, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout = header_timeout

    async def _make_runner(self, **kwargs: Any) -> HardenedAppRunner:
        return HardenedAppRunner(self.app, header_timeout=self.header_timeout, **kwargs)


def plain_app() -> web.Application:
    """A small app: ``/hello``, ``/echo`` and ``/ignore`` (POST), ``/held`` (answers once
    released), ``/sse``, ``/ws`` (echo), ``/junk``, ``/crash``; errors answered by the project's
    ``json_errors``."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def held(request: web.Request) -> web.Response:
        await request.app[RELEASE].wait()
        return web.Response(text="released")

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await request.app[RELEASE].wait()
        await response.write(b"data: later\n\n")
        return response

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str(msg.data)
        return sock

    async def junk(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.data == "done?":
                await sock.send_str("done")
            else:
                server_log.warning("ws %d: refused a client message: %s", id(sock), msg.data)
        return sock

    async def crash(request: web.Request) -> web.Response:
        raise RuntimeError("a bug of ours")

    app = web.Application()
    app[RELEASE] = asyncio.Event()
    app.on_response_prepare.append(json_errors)
    app.router.add_get("/hello", hello)
    app.router.add_post("/echo", echo)
    app.router.add_post("/ignore", hello)  # answers without reading the body
    app.router.add_get("/held", held)
    app.router.add_get("/sse", sse)
    app.router.add_get("/ws", ws)
    app.router.add_get("/junk", junk)  # a WebSocket that logs a WARNING per message
    app.router.add_get("/crash", crash)
    return app


# Raw HTTP ------------------------------------------------------------------------------------


@dataclass
class Answer:
    version: str
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(version, int(status), headers, body)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One response with a Content-Length, off a connection that stays open."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
    answer = parse(head)
    length = int(answer.headers["content-length"])
    answer.body = await asyncio.wait_for(reader.readexactly(length), BOUND)
    return answer


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def until_closed(reader: asyncio.StreamReader, timeout: float = BOUND) -> bytes:
    """Everything the server sends until it closes (b"" if it reset the connection)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionError:
        return b""


async def exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload`` on a new connection; what the server answered before closing it."""
    async with connection(port) as (reader, writer):
        writer.write(payload)
        return await until_closed(reader)


async def header_timeout_passed(port: int) -> None:
    """Return once the header timeout has passed at least once since the call.

    A connection opened now that sends half a request is closed by the timeout: waiting for
    that is waiting for the timeout, without guessing at a sleep.
    """
    answer = parse(await exchange(port, b"GET /hello HTTP/1.1\r\n"))
    assert answer.status == 408


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


# The header timeout ----------------------------------------------------------------------------


async def test_a_client_dripping_its_headers_is_closed_at_the_timeout(
    hardened: StartHardened, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await hardened(plain_app())
    loop = asyncio.get_running_loop()
    async with connection(server.port) as (reader, writer):
        opened = loop.time()
        writer.write(b"GET /hello HTTP/1.1\r\n")

        async def drip() -> None:
            # A header line every fifth of the timeout, for far longer than the timeout: every
            # gap is short, only the whole is too long.
            for i in range(200):
                await asyncio.sleep(HEADER_TIMEOUT / 5)
                writer.write(b"X-Drip-%d: y\r\n" % i)
                await writer.drain()

        dripping = asyncio.create_task(drip())
        try:
            await until_closed(reader, timeout=HEADER_TIMEOUT * 10)
        finally:
            dripping.cancel()
            await asyncio.gather(dripping, return_exceptions=True)
        elapsed = loop.time() - opened
    assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT * 5
    [warning] = warnings_in(caplog)
    assert warning.name == "realtime_lab.http"
    assert "request headers not complete within 0.5s" in warning.getMessage()
    assert warning.exc_info is None


async def test_half_a_request_is_answered_408_before_the_close(
    hardened: StartHardened, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await hardened(plain_app())
    answer = parse(await exchange(server.port, b"GET /hello HTTP/1.1\r\nHost: x\r\n"))
    assert answer.status == 408
    assert answer.headers["connection"] == "close"
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"]["code"] == "request-timeout"
    assert len(warnings_in(caplog)) == 1


async def test_a_connection_that_sends_nothing_is_closed_silently(
    hardened: StartHardened, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await hardened(plain_app())
    async with connection(server.port) as (reader, _):
        assert await until_closed(reader, timeout=HEADER_TIMEOUT * 10) == b""
    assert warnings_in(caplog) == []


async def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(
    hardened: StartHardened,
) -> None:
    server = await hardened(plain_app())
    async with connection(server.port) as (reader, writer):
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_answer(reader)).body == b"hello"
        assert await until_closed(reader, timeout=HEADER_TIMEOUT * 10) == b""


async def test_a_keep_alive_client_with_pauses_is_not_cut(hardened: StartHardened) -> None:
    # Each request: a pause, half its headers, a pause, the rest; each well inside the timeout
    # counted from the previous answer, while the connection lives far longer than it.
    timeout = 1.0
    server = await hardened(plain_app(), header_timeout=timeout)
    async with connection(server.port) as (reader, writer):
        for i in range(4):
            await asyncio.sleep(timeout / 4)
            writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
            await asyncio.sleep(timeout / 4)
            writer.write(b"X-Request: %d\r\n\r\n" % i)
            answer = await read_answer(reader)
            assert (answer.status, answer.body) == (200, b"hello")


async def test_a_slow_body_is_not_cut(hardened: StartHardened) -> None:
    server = await hardened(plain_app())
    async with connection(server.port) as (reader, writer):
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        await header_timeout_passed(server.port)
        writer.write(b" body")
        answer = await read_answer(reader)
    assert (answer.status, answer.body) == (200, b"hello body")


async def test_a_slow_body_nobody_reads_is_drained_not_cut(hardened: StartHardened) -> None:
    # aiohttp drains the unread rest of a body before it reads the next request.
    server = await hardened(plain_app())
    async with connection(server.port) as (reader, writer):
        writer.write(b"POST /ignore HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        assert (await read_answer(reader)).body == b"hello"
        await header_timeout_passed(server.port)
        writer.write(b" body")
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await read_answer(reader)
    assert (answer.status, answer.body) == (200, b"hello")


async def test_a_slow_handler_is_not_cut(hardened: StartHardened) -> None:
    app = plain_app()
    server = await hardened(app)
    async with connection(server.port) as (reader, writer):
        writer.write(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
        await header_timeout_passed(server.port)
        await header_timeout_passed(server.port)
        app[RELEASE].set()
        answer = await read_answer(reader)
    assert (answer.status, answer.body) == (200, b"released")


async def test_pipelined_requests_behind_a_slow_one_are_answered(hardened: StartHardened) -> None:
    app = plain_app()
    server = await hardened(app)
    async with connection(server.port) as (reader, writer):
        writer.write(
            b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        await header_timeout_passed(server.port)
        app[RELEASE].set()
        bodies = [(await read_answer(reader)).body for _ in range(3)]
    assert bodies == [b"released", b"hello", b"hello"]


async def test_sse_and_websocket_outlive_the_header_timeout(hardened: StartHardened) -> None:
    app = plain_app()
    server = await hardened(app)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.url}/sse") as stream,
        session.ws_connect(f"{server.url}/ws") as sock,
    ):
        assert await asyncio.wait_for(stream.content.readline(), BOUND) == b"data: first\n"
        await header_timeout_passed(server.port)
        await header_timeout_passed(server.port)
        app[RELEASE].set()
        async with asyncio.timeout(BOUND):
            lines = [await stream.content.readline() for _ in range(2)]
            await sock.send_str("still here")
            echoed = await sock.receive_str()
    assert lines == [b"\n", b"data: later\n"]
    assert echoed == "still here"


async def test_the_app_streams_outlive_the_header_timeout(hardened: StartHardened) -> None:
    """The real endpoints: an SSE stream and a WebSocket still deliver after the timeout."""
    server = await hardened(make_app(test_settings()))
    channel = "room.hardened"
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.url}/sse/{channel}") as stream,
        session.ws_connect(f"{server.url}/ws/{channel}") as sock,
    ):
        assert stream.status == 200
        await header_timeout_passed(server.port)
        await header_timeout_passed(server.port)
        published = await session.post(
            f"{server.url}/api/channels/{channel}/events",
            json={"type": "note", "data": {"marker": "after-the-timeout"}},
        )
        assert published.status == 201
        async with asyncio.timeout(BOUND):
            while b"after-the-timeout" not in await stream.content.readline():
                pass
            while "after-the-timeout" not in await sock.receive_str():
                pass


async def test_a_flood_of_junk_messages_costs_a_few_log_lines(hardened: StartHardened) -> None:
    """With ``setup_logging``'s handler, 2,000 identical warnings write 10 lines and a summary."""
    root = logging.getLogger()
    level = root.level
    out = io.StringIO()
    handler = setup_logging("INFO", stream=out, burst=10)
    try:
        server = await hardened(plain_app())
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{server.url}/junk") as sock,
        ):
            for i in range(2000):
                await sock.send_str(f"junk {i}")
            await sock.send_str("done?")
            assert await asyncio.wait_for(sock.receive_str(), BOUND) == "done"
        for f in handler.filters:
            assert isinstance(f, RateLimitFilter)
            f.flush()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    refused = [line for line in out.getvalue().splitlines() if "refused a client message" in line]
    assert len(refused) == 10 + 1  # the summary quotes the last one
    assert refused[9].endswith("junk 9")
    assert "suppressed 1990 similar messages" in refused[10]
    assert refused[10].endswith("junk 1999")


# Malformed requests --------------------------------------------------------------------------

SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # what curl sends after the preface

MALFORMED = [
    pytest.param(b"GET /hello HTTP/1.1\r\nHost: x\r\nBad header\r\n\r\n", 400, id="bad-header"),
    pytest.param(
        b"GET /hello HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 400, id="long"
    ),
    pytest.param(b"G\x00T /hello HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="bad-method"),
    pytest.param(b"GET /\x1b[31mred HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="control-in-path"),
    pytest.param(
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        400,
        id="tls-hello",
        # aiohttp's pure-Python parser waits for the end of a line that never comes (a 408).
        marks=pytest.mark.skipif(PURE_PYTHON_PARSER, reason="llhttp (aiohttp's C parser) only"),
    ),
    pytest.param(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
        400,
        id="two-lengths",
    ),
    pytest.param(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
        id="bad-chunk",
    ),
    # The request line of the HTTP/2 preface without the rest of it: not an HTTP/2 client.
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nXY\r\n\r\n", 505, id="pri-request-line"),
    pytest.param(b"GET /hello HTTP/3.0\r\nHost: x\r\n\r\n", 505, id="http-3.0"),
    pytest.param(b"GET /hello HTTP/2.0\r\nHost: x\r\n\r\n", 505, id="http-2.0"),
    pytest.param(b"GET /hello HTTP/0.9\r\nHost: x\r\n\r\n", 505, id="http-0.9"),
]
CODES = {400: "bad-request", 505: "http-version-not-supported"}


@pytest.mark.parametrize(("payload", "status"), MALFORMED)
async def test_a_malformed_request_gets_a_json_error_and_one_warning_line(
    hardened: StartHardened, caplog: pytest.LogCaptureFixture, payload: bytes, status: int
) -> None:
    caplog.set_level(logging.INFO)
    server = await hardened(plain_app())
    answer = parse(await exchange(server.port, payload))
    assert answer.status == status
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()["error"]
    assert error["code"] == CODES[status]
    assert error["message"]
    [warning] = warnings_in(caplog)
    assert warning.name == "realtime_lab.http"
    assert warning.exc_info is None
    assert "\n" not in warning.getMessage()
    assert f"{status} {CODES[status]}" in warning.getMessage()


def h2_frames(raw: bytes) -> list[tuple[int, int, int, bytes]]:
    """HTTP/2 frames as (type, flags, stream id, payload); fails on a truncated one."""
    frames = []
    while raw:
        assert len(raw) >= 9, raw
        length = int.from_bytes(raw[:3], "big")
        kind, flags = raw[3], raw[4]
        stream = int.from_bytes(raw[5:9], "big") & 0x7FFF_FFFF
        assert len(raw) >= 9 + length, raw
        frames.append((kind, flags, stream, raw[9 : 9 + length]))
        raw = raw[9 + length :]
    return frames


def assert_goaway_http_1_1_required(raw: bytes) -> None:
    """SETTINGS (empty: the server's preface), then GOAWAY HTTP_1_1_REQUIRED with our JSON."""
    [settings, goaway] = h2_frames(raw)
    assert settings == (0x4, 0, 0, b"")
    kind, _, stream, payload = goaway
    assert (kind, stream) == (0x7, 0)
    assert int.from_bytes(payload[:4], "big") == 0  # no stream was processed
    assert int.from_bytes(payload[4:8], "big") == 0xD  # HTTP_1_1_REQUIRED
    error = json.loads(payload[8:])["error"]
    assert error["code"] == "http-version-not-supported"
    assert "speak HTTP/1.1" in error["message"]


async def test_the_h2_preface_is_answered_in_http_2_with_one_warning_line(
    hardened: StartHardened, caplog: pytest.LogCaptureFixture
) -> None:
    """An HTTP/2 client cannot read an HTTP/1.1 answer: it gets GOAWAY HTTP_1_1_REQUIRED."""
    caplog.set_level(logging.INFO)
    server = await hardened(plain_app())
    raw = await exchange(server.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SETTINGS_FRAME)
    assert_goaway_http_1_1_required(raw)
    [record] = [r for r in caplog.records if r.name.startswith(("realtime_lab", "aiohttp"))]
    assert (record.name, record.levelno, record.exc_info) == (
        "realtime_lab.http",
        logging.WARNING,
        None,
    )
    assert "HTTP_1_1_REQUIRED" in record.getMessage()
    assert "\n" not in record.getMessage()


async def test_the_h2_preface_in_pieces_is_recognised(hardened: StartHardened) -> None:
    server = await hardened(plain_app())
    async with connection(server.port) as (reader, writer):
        for i in range(0, 24, 5):  # 5 bytes at a time, each written on its own
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[i : i + 5])
            await writer.drain()
            await asyncio.sleep(
                0.01
            )  # let each piece arrive on its own (not a wait on a condition)
        assert_goaway_http_1_1_required(await until_closed(reader))


@pytest.mark.parametrize("cut", [1, 2, 30])
async def test_a_request_that_starts_like_the_preface_is_served(
    hardened: StartHardened, cut: int
) -> None:
    """The bytes held back while they might be the preface reach the parser after all."""
    server = await hardened(plain_app())
    request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    async with connection(server.port) as (reader, writer):
        writer.write(request[:cut])  # "P" is held back: it may be the preface's first byte
        await writer.drain()
        await asyncio.sleep(0.01)  # the first piece arrives alone (not a wait on a condition)
        writer.write(request[cut:])
        answer = await read_answer(reader)
    assert (answer.status, answer.body) == (200, b"hi")


async def test_curl_http2_prior_knowledge_is_told_http_1_1_is_required(
    hardened: StartHardened,
) -> None:
    """What a user sees: curl reads the GOAWAY and names its error code (13)."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    server = await hardened(plain_app())
    proc = await asyncio.create_subprocess_exec(
        curl,
        "-sv",
        "--http2-prior-knowledge",
        "--max-time",
        "10",
        f"{server.url}/hello",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), BOUND + 5)
    if b"--http2-prior-knowledge" in err and b"unknown" in err.lower():
        pytest.skip("this curl has no HTTP/2")
    assert proc.returncode == 16, err.decode()  # "Error in the HTTP2 framing layer"
    assert b"GOAWAY, error=13" in err, err.decode()
    assert out == b""


async def test_an_unsupported_version_is_answered_in_http_1_1(hardened: StartHardened) -> None:
    server = await hardened(plain_app())
    answer = parse(await exchange(server.port, b"GET /hello HTTP/2.0\r\nHost: x\r\n\r\n"))
    assert (answer.version, answer.status) == ("HTTP/1.1", 505)
    assert answer.json()["error"]["message"] == "HTTP/2.0 is not supported: speak HTTP/1.1"


async def test_a_body_that_breaks_its_encoding_is_a_400_logged_once(
    hardened: StartHardened, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await hardened(plain_app())
    payload = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\n"
    )
    async with connection(server.port) as (reader, writer):
        writer.write(payload)
        await writer.drain()
        writer.write(b"abcde")  # not gzip; the handler is reading by now or soon
        answer = parse(await until_closed(reader))
    assert answer.status == 400
    assert answer.json()["error"]["code"] == "bad-request"
    [warning] = warnings_in(caplog)
    assert warning.exc_info is None
    assert "malformed request body" in warning.getMessage()


async def test_a_crash_of_ours_stays_a_500_with_its_traceback(
    hardened: StartHardened, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await hardened(plain_app())
    answer = parse(await exchange(server.port, b"GET /crash HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert answer.status == 500
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors
    assert errors[0].exc_info is not None


async def test_good_requests_still_work(hardened: StartHardened) -> None:
    server = await hardened(plain_app())
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(f"{server.url}/echo", data=b"x" * 100_000) as resp:
                assert resp.status == 200
                assert await resp.read() == b"x" * 100_000
            async with session.get(f"{server.url}/hello", headers={"X-Long": "v" * 8000}) as resp:
                assert await resp.text() == "hello"


def test_one_line_escapes_and_bounds_what_a_client_sent() -> None:
    text = "Invalid header token:\n\n  b'Bad\\x1b header'\n       ^\n"
    assert one_line(text) == "Invalid header token: b'Bad\\x1b header'"
    assert one_line("a\u202eb\x00c") == "a\\u202eb\\x00c"
    assert one_line("x" * 500) == "x" * 197 + "..."


# The hooks into aiohttp --------------------------------------------------------------------------


async def test_the_runner_serves_through_the_hardened_classes(hardened: StartHardened) -> None:
    """Fails first if aiohttp stops calling the private hooks httpserver relies on."""
    server = await hardened(plain_app())
    assert isinstance(server.runner.server, HardenedServer)  # AppRunner._make_server
    async with connection(server.port) as (reader, writer):
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_answer(reader)
        handlers = server.runner.server.connections
        assert handlers
        assert all(isinstance(h, HardenedRequestHandler) for h in handlers)  # Server.__call__


def test_a_header_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="header_timeout"):
        HardenedAppRunner(web.Application(), header_timeout=0)


async def test_aiohttp_client_can_use_a_hardened_test_server(
    aiohttp_client: Callable[..., Awaitable[Any]],
) -> None:
    client = await aiohttp_client(HardenedTestServer(plain_app()))
    assert await (await client.get("/hello")).text() == "hello"
    raw = await exchange(client.port, b"GET /hello HTTP/1.1\r\nHost: x\r\nBad header\r\n\r\n")
    assert parse(raw).json()["error"]["code"] == "bad-request"


# run_app, as ``realtime-lab serve`` runs it -----------------------------------------------------

SERVE_SCRIPT = """
from aiohttp import web
from realtime_lab.httpserver import run_app

async def hello(request):
    return web.Response(text="hello")

app = web.Application()
app.router.add_get("/hello", hello)
run_app(app, host="127.0.0.1", port=0, header_timeout=0.5, print=lambda s: print(s, flush=True))
print("stopped", flush=True)
"""


async def test_run_app_serves_hardened_until_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVE_SCRIPT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), BOUND)).decode()
        assert line.startswith("Running on http://127.0.0.1:"), line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        answer = parse(await exchange(port, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert answer.status == 200
        assert parse(await exchange(port, b"GET /hello HTTP/1.1\r\n")).status == 408
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), BOUND)
        assert proc.returncode == 0, err.decode()
        assert out.decode().strip() == "stopped"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
