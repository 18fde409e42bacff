"""The four transports behind a real nginx, configured exactly as the README says.

The documented configuration is used with ``proxy_read_timeout`` cut to 1 s, shorter than the
idle gaps these tests create, so nginx's idle cut actually happens within a test's time:

- with heartbeats more frequent than that timeout, idle SSE and WebSocket connections survive;
- without heartbeats nginx cuts them, and a client that resumes loses and repeats nothing;
- with nginx's default ``proxy_buffering on``, SSE tokens pass one by one, even through a
  location that compresses them, thanks to the app's ``X-Accel-Buffering: no``: the same
  location told to ignore that header holds them all back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from realtime_lab.clients import open_stream
from realtime_lab.protocol.envelope import Event
from tests.conftest import RunningServer, StartServer
from tests.nginx.nginx_proxy import Nginx, nginx_binary, start_nginx
from tests.nginx.rawstreams import SSEStream, WSStream, seqs

pytestmark = [
    pytest.mark.nginx,
    pytest.mark.skipif(
        nginx_binary() is None, reason="nginx is not installed (apt-get install nginx-light)"
    ),
]

READ_TIMEOUT_S = 1.0
IDLE_S = 2.5  # an idle period well past nginx's read timeout

# Test-only: SSE through a location that compresses event streams, as a site-wide
# "gzip_types text/event-stream" would; and the same ignoring the app's X-Accel-Buffering.
GZIP = """
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;  # the app answers only the Host values it knows
    gzip on;
    gzip_types text/event-stream;
    gzip_min_length 0;
    gzip_proxied any;
"""
COMPRESSED_SSE = f"""
location /gzip/sse/ {{
    proxy_pass http://realtime_lab/sse/;{GZIP}}}
location /gzip-buffered/sse/ {{
    proxy_pass http://realtime_lab/sse/;{GZIP}    proxy_ignore_headers X-Accel-Buffering;
}}
"""

Proxied = Callable[..., Awaitable[tuple[RunningServer, Nginx]]]


@pytest.fixture
async def proxied(start_server: StartServer, tmp_path: Path) -> AsyncIterator[Proxied]:
    """Factory: ``server, nginx = await proxied(heartbeat=0.3)`` (nginx stops first)."""
    running: list[Nginx] = []

    async def start(*, extra_server: str = "", **settings: Any) -> tuple[RunningServer, Nginx]:
        server = await start_server(**settings)
        nginx = await start_nginx(
            tmp_path / f"nginx{len(running)}",
            server.port,
            read_timeout=f"{READ_TIMEOUT_S:g}s",
            extra_server=extra_server,
        )
        running.append(nginx)
        return server, nginx

    yield start
    for nginx in running:
        nginx.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def publish(
    session: aiohttp.ClientSession, base: str, channel: str, n: int, pad: int = 0
) -> dict[str, Any]:
    data: dict[str, Any] = {"n": n}
    if pad:
        data["pad"] = "x" * pad
    async with session.post(
        f"{base}/api/channels/{channel}/events", json={"type": "note", "data": data}
    ) as resp:
        assert resp.status == 201, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer


async def transport_stats(
    session: aiohttp.ClientSession, server: RunningServer, transport: str
) -> dict[str, int]:
    async with session.get(f"{server.url}/api/stats") as resp:
        stats: dict[str, int] = (await resp.json())["transports"][transport]
        return stats


def reader(
    kind: str, session: aiohttp.ClientSession, nginx: Nginx, channel: str
) -> SSEStream | WSStream:
    if kind == "sse":
        return SSEStream(session, f"{nginx.url}/sse/{channel}")
    return WSStream(session, f"{nginx.ws_url}/ws/{channel}")


# Heartbeats keep idle streams open ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sse", "ws"])
async def test_heartbeats_keep_an_idle_stream_open_through_nginx(
    proxied: Proxied, session: aiohttp.ClientSession, kind: str
) -> None:
    server, nginx = await proxied(heartbeat=0.3)
    loop = asyncio.get_running_loop()
    async with reader(kind, session, nginx, "idle") as stream:
        await publish(session, nginx.url, "idle", 1)
        await stream.wait_events(1)
        quiet_since = loop.time()
        # Only heartbeats for IDLE_S (2.5 x the proxy's read timeout): each one resets it.
        await stream.wait_for(lambda: loop.time() - quiet_since >= IDLE_S, timeout=IDLE_S + 10)
        assert stream.beats >= 3
        assert len(stream.events) == 1

        await publish(session, nginx.url, "idle", 2)
        events = await stream.wait_events(2)
        assert [e["data"]["n"] for e in events] == [1, 2]
        assert stream.ended is None
    stats = await transport_stats(session, server, kind)
    assert stats["connections"] == 1  # the same connection all along
    assert stats["reconnects"] == 0


# Without heartbeats nginx cuts idle streams; resuming loses nothing ----------------------------


@pytest.mark.parametrize("kind", ["sse", "ws"])
async def test_without_heartbeats_nginx_cuts_idle_streams(
    proxied: Proxied, session: aiohttp.ClientSession, kind: str
) -> None:
    _, nginx = await proxied(heartbeat=300)
    loop = asyncio.get_running_loop()
    async with reader(kind, session, nginx, "cut") as stream:
        await publish(session, nginx.url, "cut", 1)
        await stream.wait_events(1)
        quiet_since = loop.time()
        ended, _ = await stream.wait_ended(timeout=READ_TIMEOUT_S + 10)
    # nginx gave up on the quiet upstream: no end event, no clean close from the app.
    assert loop.time() - quiet_since >= READ_TIMEOUT_S * 0.9
    assert [e["type"] for e in stream.events] == ["note"]
    if kind == "ws":
        assert ended == "cut"  # no close frame: the tunnel was simply closed


@pytest.mark.parametrize("kind", ["sse", "ws"])
async def test_a_resuming_client_loses_nothing_across_nginx_idle_cuts(
    proxied: Proxied, session: aiohttp.ClientSession, kind: str
) -> None:
    server, nginx = await proxied(heartbeat=300)
    received: list[Event] = []
    arrived = asyncio.Event()
    total = 6
    async with open_stream(
        nginx.url, "resume", kind, session=session, backoff_max=0.3, max_reconnects=20
    ) as client:

        async def consume() -> None:
            async for event in client:
                received.append(event)
                arrived.set()
                if len(received) >= total:
                    return

        async def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
            async with asyncio.timeout(timeout):
                while not predicate():
                    arrived.clear()
                    if consumer.done():
                        consumer.result()
                        raise AssertionError("the client stopped early")
                    # Re-checked on every event, and every 50 ms for the client's stats.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(arrived.wait(), 0.05)

        def received_at_least(count: int) -> Callable[[], bool]:
            return lambda: len(received) >= count

        def reconnected_at_least(count: int) -> Callable[[], bool]:
            return lambda: client.stats.reconnects >= count

        consumer = asyncio.create_task(consume())
        try:
            n = 0
            for cut in range(1, 3):
                n += 1
                await publish(session, nginx.url, "resume", n)
                await wait_until(received_at_least(n))
                # Quiet now: nginx cuts the stream after READ_TIMEOUT_S and the client resumes.
                await wait_until(reconnected_at_least(cut))
                for _ in range(2):  # published around the reconnection
                    n += 1
                    await publish(session, nginx.url, "resume", n)
            await wait_until(received_at_least(total))
            async with asyncio.timeout(10):
                await consumer
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)

    assert [event.data["n"] for event in received] == list(range(1, total + 1))
    assert seqs([{"id": event.id} for event in received]) == list(range(1, total + 1))
    assert client.stats.duplicates == 0
    assert client.stats.gaps == 0
    assert client.stats.reconnects >= 2
    stats = await transport_stats(session, server, kind)
    assert stats["connections"] >= 3  # the first connection and one per cut
    assert stats["reconnects"] >= 2  # each reconnection resumed from an event id


# Buffering -------------------------------------------------------------------------------------


async def assert_one_by_one(
    session: aiohttp.ClientSession, nginx: Nginx, stream: SSEStream, channel: str
) -> None:
    for n in range(1, 11):
        await publish(session, nginx.url, channel, n)
        # A proxy that waits for more data before sending would hold these small events until
        # its buffer filled or the response ended: here, for ever. Each must arrive before the
        # next one is even published.
        events = await stream.wait_events(n, timeout=5)
        assert events[-1]["data"]["n"] == n


async def test_sse_tokens_pass_nginx_one_by_one(
    proxied: Proxied, session: aiohttp.ClientSession
) -> None:
    _, nginx = await proxied(heartbeat=0.3)
    async with SSEStream(session, f"{nginx.url}/sse/tokens") as stream:
        await assert_one_by_one(session, nginx, stream, "tokens")


async def test_x_accel_buffering_lets_tokens_through_a_compressing_location(
    proxied: Proxied, session: aiohttp.ClientSession
) -> None:
    _, nginx = await proxied(heartbeat=0.3, extra_server=COMPRESSED_SSE)

    async def first_event(path: str) -> dict[str, Any]:
        # Opened in a task: a holding proxy holds back even the response headers.
        async with SSEStream(session, f"{nginx.url}{path}") as held_back:
            return (await held_back.wait_events(1, timeout=60))[0]

    control = asyncio.create_task(first_event("/gzip-buffered/sse/tokens"))
    try:
        async with SSEStream(session, f"{nginx.url}/gzip/sse/tokens") as stream:
            assert stream.response is not None
            assert stream.response.headers.get("Content-Encoding") == "gzip"
            # Unbuffered (the app's header), nginx flushes gzip after every read from the app.
            await assert_one_by_one(session, nginx, stream, "tokens")
            await stream.wait_beats(stream.beats + 2)
            # Buffered (header ignored), the same location has let nothing through.
            assert not control.done()
    finally:
        control.cancel()
        await asyncio.gather(control, return_exceptions=True)


# The other transports and the API --------------------------------------------------------------


async def test_api_polls_and_chats_through_nginx(
    proxied: Proxied, session: aiohttp.ClientSession
) -> None:
    _, nginx = await proxied()
    async with session.post(
        f"{nginx.url}/api/chats", json={"prompt": "hello through a proxy", "max_tokens": 5}
    ) as resp:
        assert resp.status == 201
        chat = await resp.json()
    # The app sees nginx's Host header: the URLs it hands out go through the proxy.
    assert chat["urls"]["sse"] == f"{nginx.url}/sse/{chat['channel']}"
    assert chat["urls"]["ws"] == f"{nginx.ws_url}/ws/{chat['channel']}"

    first = await publish(session, nginx.url, "polled", 1)
    async with session.get(f"{nginx.url}/poll/polled") as resp:
        assert resp.status == 200
        assert [e["id"] for e in (await resp.json())["events"]] == [first["id"]]

    params = {"after": first["id"], "timeout": "0.2"}  # a wait shorter than the read timeout
    async with session.get(f"{nginx.url}/longpoll/polled", params=params) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["events"] == []
    assert answer["cursor"] == first["id"]


async def test_a_long_poll_wait_longer_than_the_read_timeout_gets_504(
    proxied: Proxied, session: aiohttp.ClientSession
) -> None:
    """Why the documented long-poll location sets proxy_read_timeout above the longest wait."""
    _, nginx = await proxied()
    params = {"after": "now", "timeout": "5"}
    async with (
        asyncio.timeout(10),
        session.get(f"{nginx.url}/longpoll/quiet", params=params) as resp,
    ):
        assert resp.status == 504
