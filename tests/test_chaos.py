"""Fault injection: ``/api/chaos/*`` and what each fault does to each transport.

Every effect is observed from the outside with raw clients (:mod:`tests.nginx.rawstreams`):
what a cut connection, a held event or a silenced heartbeat looks like on the wire. Timing is
only ever checked as a lower bound (a delayed event cannot arrive early, however slow the
machine); "nothing arrived yet" is proven by a heartbeat that left the server after the event
would have, so TCP ordering guarantees the event would have been seen first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from realtime_lab.transports import TRANSPORTS
from tests.conftest import RunningServer, StartServer
from tests.nginx.rawstreams import SSEStream, WSStream, seqs


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def chaos_server(start_server: StartServer) -> RunningServer:
    """A server with ``--chaos`` and a heartbeat short enough to prove orderings with."""
    return await start_server(chaos=True, heartbeat=0.3)


async def post(
    session: aiohttp.ClientSession, url: str, body: Any = None, status: int = 200
) -> dict[str, Any]:
    async with session.post(url, json=body) as resp:
        answer: dict[str, Any] = await resp.json()
        assert resp.status == status, answer
        return answer


async def chaos(
    session: aiohttp.ClientSession, server: RunningServer, action: str, **body: Any
) -> dict[str, Any]:
    return await post(session, f"{server.url}/api/chaos/{action}", body)


async def publish(
    session: aiohttp.ClientSession, server: RunningServer, channel: str, n: int
) -> dict[str, Any]:
    return await post(
        session,
        f"{server.url}/api/channels/{channel}/events",
        {"type": "note", "data": {"n": n}},
        status=201,
    )


async def open_count(session: aiohttp.ClientSession, server: RunningServer) -> dict[str, int]:
    async with session.get(f"{server.url}/api/stats") as resp:
        body = await resp.json()
    return {name: body["transports"][name]["open"] for name in TRANSPORTS}


async def wait_open(
    session: aiohttp.ClientSession, server: RunningServer, timeout: float = 10.0, **expected: int
) -> None:
    """Wait until the server counts ``expected`` open connections per transport."""
    async with asyncio.timeout(timeout):
        while True:
            counts = await open_count(session, server)
            if all(counts[name] == n for name, n in expected.items()):
                return
            await asyncio.sleep(0.02)  # polling the condition, with the deadline above


def stream(
    kind: str, session: aiohttp.ClientSession, server: RunningServer, channel: str
) -> SSEStream | WSStream:
    if kind == "sse":
        return SSEStream(session, f"{server.url}/sse/{channel}")
    return WSStream(session, f"{server.ws_url}/ws/{channel}")


def notes(events: list[dict[str, Any]]) -> list[int]:
    return [event["data"]["n"] for event in events]


# Off unless --chaos -------------------------------------------------------------------------------

ACTIONS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/api/chaos", None),
    ("POST", "/api/chaos/drop", {"transport": "all"}),
    ("POST", "/api/chaos/pause", {"seconds": 1}),
    ("POST", "/api/chaos/delay", {"ms": 100}),
    ("POST", "/api/chaos/fail", {"transport": "all", "count": 1}),
    ("POST", "/api/chaos/heartbeats", {"enabled": False}),
    ("POST", "/api/chaos/reset", None),
]


async def test_chaos_endpoints_answer_404_without_the_flag(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server()
    for method, path, body in ACTIONS:
        async with session.request(method, server.url + path, json=body) as resp:
            assert resp.status == 404, path
            answer = await resp.json()
        assert answer["error"]["code"] == "not-found"
        assert "--chaos" in answer["error"]["message"]
    # Nothing took effect: the next poll is served normally.
    async with session.get(f"{server.url}/poll/quiet") as resp:
        assert resp.status == 200


async def test_state_reflects_every_switch_and_reset_clears_them(
    chaos_server: RunningServer, session: aiohttp.ClientSession
) -> None:
    server = chaos_server
    async with session.get(f"{server.url}/api/chaos") as resp:
        initial = await resp.json()
    assert initial == {
        "enabled": True,
        "paused_for_s": 0.0,
        "write_delay_ms": 0.0,
        "heartbeats": True,
        "fail_next": dict.fromkeys(TRANSPORTS, 0),
    }
    assert await chaos(session, server, "pause", seconds=30) == {"paused_for_s": 30}
    assert await chaos(session, server, "delay", ms=250) == {"write_delay_ms": 250}
    assert await chaos(session, server, "heartbeats", enabled=False) == {"heartbeats": False}
    answer = await chaos(session, server, "fail", transport="sse", count=3)
    assert answer["transport"] == "sse"
    assert answer["count"] == 3
    assert answer["fail_next"] == {"poll": 0, "longpoll": 0, "sse": 3, "ws": 0, "fetch": 0}
    async with session.get(f"{server.url}/api/chaos") as resp:
        state = await resp.json()
    assert 0 < state["paused_for_s"] <= 30
    assert state["write_delay_ms"] == 250
    assert state["heartbeats"] is False
    assert state["fail_next"]["sse"] == 3
    assert await chaos(session, server, "reset") == initial


BAD_BODIES: list[tuple[str, Any, int, str]] = [
    ("drop", {}, 400, "invalid-parameter"),
    ("drop", {"transport": "carrier-pigeon"}, 400, "invalid-parameter"),
    ("drop", {"transport": 1}, 400, "invalid-parameter"),
    ("pause", {}, 400, "invalid-parameter"),
    ("pause", {"seconds": 0}, 400, "invalid-parameter"),
    ("pause", {"seconds": -1}, 400, "invalid-parameter"),
    ("pause", {"seconds": 61}, 400, "invalid-parameter"),
    ("pause", {"seconds": "5"}, 400, "invalid-parameter"),
    ("pause", {"seconds": True}, 400, "invalid-parameter"),
    ("delay", {"ms": -1}, 400, "invalid-parameter"),
    ("delay", {"ms": 10_001}, 400, "invalid-parameter"),
    ("delay", {"ms": None}, 400, "invalid-parameter"),
    ("fail", {"transport": "sse"}, 400, "invalid-parameter"),
    ("fail", {"transport": "sse", "count": 1.5}, 400, "invalid-parameter"),
    ("fail", {"transport": "sse", "count": -2}, 400, "invalid-parameter"),
    ("fail", {"transport": "nope", "count": 1}, 400, "invalid-parameter"),
    ("heartbeats", {"enabled": "no"}, 400, "invalid-parameter"),
    ("heartbeats", {}, 400, "invalid-parameter"),
    ("pause", [1], 400, "invalid-json"),
    ("pause", "{not json", 400, "invalid-json"),
    ("pause", b"seconds=1", 415, "unsupported-media-type"),
]


@pytest.mark.parametrize(("action", "body", "status", "code"), BAD_BODIES)
async def test_bad_bodies_are_refused_with_json_errors(
    chaos_server: RunningServer,
    session: aiohttp.ClientSession,
    action: str,
    body: Any,
    status: int,
    code: str,
) -> None:
    url = f"{chaos_server.url}/api/chaos/{action}"
    if isinstance(body, bytes):
        request = session.post(url, data=body, headers={"Content-Type": "text/plain"})
    elif isinstance(body, str):
        request = session.post(url, data=body, headers={"Content-Type": "application/json"})
    else:
        request = session.post(url, json=body)
    async with request as resp:
        assert resp.status == status
        answer = await resp.json()
    assert answer["error"]["code"] == code
    assert answer["error"]["message"]
    # A refused request changed nothing.
    async with session.get(f"{chaos_server.url}/api/chaos") as resp:
        state = await resp.json()
    assert state["paused_for_s"] == 0.0
    assert state["write_delay_ms"] == 0.0
    assert state["heartbeats"] is True
    assert set(state["fail_next"].values()) == {0}


async def test_wrong_method_is_a_json_405(
    chaos_server: RunningServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{chaos_server.url}/api/chaos/drop") as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["code"] == "method-not-allowed"


# drop ---------------------------------------------------------------------------------------------


class RawLongPoll:
    """A long poll on a raw socket, to see a cut as it is (aiohttp's client would quietly retry
    an idempotent request whose connection broke)."""

    def __init__(self, server: RunningServer, channel: str, after: str) -> None:
        self.server, self.path = server, f"/longpoll/{channel}?after={after}&timeout=30"
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> asyncio.StreamReader:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        self.writer.write(f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await self.writer.drain()
        return reader

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.writer is not None
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close)."""
    async with asyncio.timeout(timeout):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def test_drop_all_cuts_sse_ws_and_waiting_long_polls_abruptly(
    chaos_server: RunningServer, session: aiohttp.ClientSession
) -> None:
    server = chaos_server
    first = await publish(session, server, "cut", 1)
    async with (
        RawLongPoll(server, "cut", first["id"]) as longpoll,
        stream("sse", session, server, "cut") as sse,
        stream("ws", session, server, "cut") as ws,
    ):
        await sse.wait_events(1)
        await ws.wait_events(1)
        await wait_open(session, server, sse=1, ws=1, longpoll=1)

        assert await chaos(session, server, "drop", transport="all") == {
            "dropped": 3,
            "transport": "all",
        }

        # No end event, no final chunk, no close frame, no answer: the connections just break.
        assert (await sse.wait_ended())[0] == "cut"
        kind, code = await ws.wait_ended()
        assert (kind, code) == ("cut", aiohttp.WSCloseCode.ABNORMAL_CLOSURE)
        for reader in (sse, ws):
            assert [e["type"] for e in reader.events] == ["note"]
        assert await read_to_eof(longpoll) == b""
    await wait_open(session, server, sse=0, ws=0, longpoll=0)


async def test_drop_one_transport_leaves_the_others_alone(
    chaos_server: RunningServer, session: aiohttp.ClientSession
) -> None:
    server = chaos_server
    async with (
        stream("sse", session, server, "some") as sse,
        stream("ws", session, server, "some") as ws,
    ):
        await wait_open(session, server, sse=1, ws=1)
        assert await chaos(session, server, "drop", transport="ws") == {
            "dropped": 1,
            "transport": "ws",
        }
        assert (await ws.wait_ended())[0] == "cut"
        assert await chaos(session, server, "drop", transport="poll") == {
            "dropped": 0,
            "transport": "poll",
        }
        await publish(session, server, "some", 1)
        assert notes(await sse.wait_events(1)) == [1]
        assert sse.ended is None


# pause --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sse", "ws"])
async def test_pause_holds_stream_events_then_delivers_them_in_order(
    chaos_server: RunningServer, session: aiohttp.ClientSession, kind: str
) -> None:
    server = chaos_server
    loop = asyncio.get_running_loop()
    async with stream(kind, session, server, "held") as reader:
        await publish(session, server, "held", 1)
        await reader.wait_events(1)

        await chaos(session, server, "pause", seconds=60)
        for n in (2, 3, 4):
            await publish(session, server, "held", n)
        # Heartbeats are not held: one written after the publishes proves the events were not
        # written before it (same socket, so they would have arrived first).
        beats = reader.beats
        await reader.wait_beats(beats + 1)
        assert notes(reader.events) == [1]

        # Shorten the pause: it now ends by itself, 0.3 s after this request arrives.
        started = loop.time()
        await chaos(session, server, "pause", seconds=0.3)
        events = await reader.wait_events(4)
        assert loop.time() - started >= 0.3
        assert notes(events) == [1, 2, 3, 4]
        assert seqs(events) == [1, 2, 3, 4]

        # The pause is over: events flow again, once each.
        await publish(session, server, "held", 5)
        assert notes(await reader.wait_events(5)) == [1, 2, 3, 4, 5]
        assert reader.ended is None


@pytest.mark.parametrize("kind", ["sse", "ws"])
async def test_overflow_during_a_pause_names_the_last_event_actually_sent(
    start_server: StartServer, session: aiohttp.ClientSession, kind: str
) -> None:
    server = await start_server(chaos=True, send_buffer=4096)
    async with stream(kind, session, server, "flood") as reader:
        first = await publish(session, server, "flood", 1)
        await reader.wait_events(1)
        await chaos(session, server, "pause", seconds=60)
        for n in range(2, 6):  # 4 x 1.5 kB held: more than the 4 kB send buffer
            await post(
                session,
                f"{server.url}/api/channels/flood/events",
                {"type": "note", "data": {"n": n, "pad": "x" * 1500}},
                status=201,
            )
        await reader.wait_ended()
    # The held events never reached the client: resuming must start right after event 1.
    if isinstance(reader, SSEStream):
        signal = reader.events[-1]
        assert signal["code"] == "overflow"
        assert signal["last_id"] == first["id"]
        assert notes(reader.events[:-1]) == [1]
    else:
        assert reader.log[-1] == ("eof", 1013)
        assert reader.close_reason == f"overflow: resume after {first['id']}"
        assert notes(reader.events) == [1]


async def test_pause_holds_a_waiting_long_poll(
    chaos_server: RunningServer, session: aiohttp.ClientSession
) -> None:
    server = chaos_server
    first = await publish(session, server, "lp", 1)

    async def longpoll() -> dict[str, Any]:
        params = {"after": first["id"], "timeout": "30"}
        async with session.get(f"{server.url}/longpoll/lp", params=params) as resp:
            assert resp.status == 200
            answer: dict[str, Any] = await resp.json()
            return answer

    waiting = asyncio.create_task(longpoll())
    try:
        await wait_open(session, server, longpoll=1)
        await chaos(session, server, "pause", seconds=60)
        await publish(session, server, "lp", 2)
        await publish(session, server, "lp", 3)
        # The publish woke the waiter, but the pause keeps it from answering.
        await wait_open(session, server, longpoll=1)
        assert not waiting.done()

        await chaos(session, server, "reset")
        async with asyncio.timeout(10):
            answer = await waiting
    finally:
        waiting.cancel()
    assert notes(answer["events"]) == [2, 3]
    assert answer["cursor"] == answer["events"][-1]["id"]


async def test_pause_holds_events_already_published_from_polls(
    chaos_server: RunningServer, session: aiohttp.ClientSession
) -> None:
    server = chaos_server
    loop = asyncio.get_running_loop()
    first = await publish(session, server, "lp2", 1)
    await chaos(session, server, "pause", seconds=60)
    await publish(session, server, "lp2", 2)
    await publish(session, server, "lp2", 3)

    # A short poll during the pause gets nothing, and a cursor that loses nothing.
    async with session.get(f"{server.url}/poll/lp2", params={"after": first["id"]}) as resp:
        polled = await resp.json()
    assert polled["events"] == []
    assert polled["cursor"] == first["id"]

    # A long poll that arrives during the pause waits for its end, then gets everything.
    params = {"after": first["id"], "timeout": "30"}
    waiting = asyncio.create_task(session.get(f"{server.url}/longpoll/lp2", params=params))
    try:
        await wait_open(session, server, longpoll=1)
        assert not waiting.done()
        started = loop.time()
        await chaos(session, server, "pause", seconds=0.3)
        async with asyncio.timeout(10):
            resp = await waiting
        async with resp:
            assert resp.status == 200
            answer = await resp.json()
    finally:
        waiting.cancel()
    assert loop.time() - started >= 0.3
    assert notes(answer["events"]) == [2, 3]

    async with session.get(f"{server.url}/poll/lp2", params={"after": first["id"]}) as resp:
        assert notes((await resp.json())["events"]) == [2, 3]


async def test_a_long_poll_dropped_during_a_pause_is_cut_at_once(
    chaos_server: RunningServer, session: aiohttp.ClientSession
) -> None:
    server = chaos_server
    first = await publish(session, server, "lp3", 1)
    async with RawLongPoll(server, "lp3", first["id"]) as longpoll:
        await wait_open(session, server, longpoll=1)
        await chaos(session, server, "pause", seconds=60)
        await publish(session, server, "lp3", 2)  # wakes the waiter, which the pause holds
        assert (await chaos(session, server, "drop", transport="longpoll"))["dropped"] == 1
        # Cut now, not when the 60 s pause ends.
        assert await read_to_eof(longpoll) == b""


# delay --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sse", "ws"])
async def test_delay_delays_every_stream_write_and_keeps_order(
    chaos_server: RunningServer, session: aiohttp.ClientSession, kind: str
) -> None:
    server = chaos_server
    loop = asyncio.get_running_loop()
    async with stream(kind, session, server, "slow") as reader:
        await publish(session, server, "slow", 1)
        await reader.wait_events(1)
        assert await chaos(session, server, "delay", ms=400) == {"write_delay_ms": 400}

        sent = loop.time()
        await publish(session, server, "slow", 2)
        await reader.wait_events(2)
        assert loop.time() - sent >= 0.4

        # Turning the delay off while a write is still delayed must not let newer events
        # overtake it.
        await chaos(session, server, "delay", ms=1000)
        await publish(session, server, "slow", 3)
        await chaos(session, server, "delay", ms=0)
        await publish(session, server, "slow", 4)
        events = await reader.wait_events(4)
        assert notes(events) == [1, 2, 3, 4]
        await publish(session, server, "slow", 5)
        assert notes(await reader.wait_events(5)) == [1, 2, 3, 4, 5]


# fail ---------------------------------------------------------------------------------------------


async def test_fail_answers_503_the_next_n_requests_then_recovers(
    chaos_server: RunningServer, session: aiohttp.ClientSession
) -> None:
    server = chaos_server
    await chaos(session, server, "fail", transport="poll", count=2)
    for _ in range(2):
        async with session.get(f"{server.url}/poll/flaky") as resp:
            assert resp.status == 503
            answer = await resp.json()
        assert answer["error"]["code"] == "chaos-unavailable"
    async with session.get(f"{server.url}/poll/flaky") as resp:
        assert resp.status == 200


async def test_fail_all_fails_each_transport_once(
    chaos_server: RunningServer, session: aiohttp.ClientSession
) -> None:
    server = chaos_server
    answer = await chaos(session, server, "fail", transport="all", count=1)
    assert answer["fail_next"] == dict.fromkeys(TRANSPORTS, 1)
    await publish(session, server, "flaky", 1)

    http = {
        "poll": f"{server.url}/poll/flaky",
        "longpoll": f"{server.url}/longpoll/flaky?timeout=0",
        "sse": f"{server.url}/sse/flaky",
    }
    for url in http.values():
        async with session.get(url) as resp:
            assert resp.status == 503, url
            assert (await resp.json())["error"]["code"] == "chaos-unavailable"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(f"{server.ws_url}/ws/flaky")
    assert refused.value.status == 503
    async with session.post(f"{server.url}/api/chats/stream", json={"prompt": "p"}) as resp:
        assert resp.status == 503
    async with session.get(f"{server.url}/api/stats") as resp:
        assert (await resp.json())["chats_running"] == 0  # the failed fetch started no chat

    # Each transport failed exactly once: the second try works.
    for name in ("poll", "longpoll"):
        async with session.get(http[name]) as resp:
            assert resp.status == 200
            assert notes((await resp.json())["events"]) == [1]
    for kind in ("sse", "ws"):
        async with stream(kind, session, server, "flaky") as reader:
            assert notes(await reader.wait_events(1)) == [1]
    async with session.get(f"{server.url}/api/chaos") as resp:
        assert (await resp.json())["fail_next"] == dict.fromkeys(TRANSPORTS, 0)


# heartbeats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sse", "ws"])
async def test_heartbeats_can_be_silenced_and_restored(
    start_server: StartServer, session: aiohttp.ClientSession, kind: str
) -> None:
    server = await start_server(chaos=True, heartbeat=0.2)
    assert await chaos(session, server, "heartbeats", enabled=False) == {"heartbeats": False}
    # The chat's first token comes 1.5 s from now: several heartbeat intervals of silence.
    chat = await post(
        session,
        f"{server.url}/api/chats",
        {"prompt": "quiet please", "ttft_ms": 1500, "token_ms": 5000, "max_tokens": 3},
        status=201,
    )
    async with stream(kind, session, server, chat["channel"]) as reader:
        await reader.wait_events(1)
        assert reader.log[0][0] == "event", reader.log[:3]

        assert await chaos(session, server, "heartbeats", enabled=True) == {"heartbeats": True}
        await reader.wait_beats(1)
        assert reader.beats >= 1
