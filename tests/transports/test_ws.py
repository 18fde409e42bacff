"""What only the WebSocket does: client messages, close codes, protocol pings."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.conftest import RunningServer, StartServer
from tests.transports.collect import (
    WS_UPGRADE,
    publish,
    running,
    stalled_get,
    start_chat,
    stats,
    wait_for,
    ws,
)

WSMsgType = aiohttp.WSMsgType


async def receive_json(sock: aiohttp.ClientWebSocketResponse) -> dict:
    msg = await asyncio.wait_for(sock.receive(), timeout=10)
    assert msg.type == WSMsgType.TEXT, msg
    value: dict = json.loads(msg.data)
    return value


async def test_closes_1000_after_end(server: RunningServer, session: aiohttp.ClientSession) -> None:
    chat = await start_chat(session, server.url, "close", seed=2, max_tokens=10)
    got = await ws(session, server.url, chat["channel"])
    assert got.events[-1]["type"] == "end"
    assert got.close_code == 1000


async def test_cancel_message_cancels_the_chat(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    # Slow enough that it cannot finish on its own during the test (300 tokens x 50 ms).
    chat = await start_chat(session, server.url, "cancel", seed=2, max_tokens=300, token_ms=50)
    url = f"{server.ws_url}/ws/{chat['channel']}"
    async with session.ws_connect(url) as sock:
        first = await receive_json(sock)
        assert first["type"] == "token"
        await sock.send_json({"type": "cancel"})
        events = [first]
        async with asyncio.timeout(10):
            async for msg in sock:
                events.append(json.loads(msg.data))
        assert sock.close_code == 1000
    assert events[-1]["type"] == "end"
    assert events[-1]["data"]["reason"] == "cancelled"
    assert len(events) < 300
    async with session.get(f"{server.url}/api/chats/{chat['id']}") as resp:
        assert (await resp.json())["status"] == "cancelled"


async def test_malformed_messages_are_answered_and_the_socket_carries_on(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    async with session.ws_connect(f"{server.ws_url}/ws/room.ws") as sock:
        for message, code in [
            ("not json{", "invalid-json"),
            ("[1, 2]", "invalid-message"),
            (json.dumps({"type": "bogus"}), "unknown-type"),
            (json.dumps({"type": "resume", "after": "not-an-id!"}), "invalid-cursor"),
            (json.dumps({"type": "resume", "after": 5}), "invalid-cursor"),
            (json.dumps({"type": "cancel"}), "not-a-chat"),
        ]:
            await sock.send_str(message)
            answer = await receive_json(sock)
            assert answer["type"] == "error", message
            assert answer["id"] is None
            assert answer["data"]["code"] == code, message
            assert isinstance(answer["data"]["message"], str)
        # Still subscribed: a published event arrives.
        sent = await publish(session, server.url, "room.ws", "note", {"after": "errors"})
        assert await receive_json(sock) == sent
        assert not sock.closed


@pytest.mark.parametrize(
    ("send", "code"),
    [
        pytest.param(lambda s: s.send_bytes(b"\x00\x01"), 1003, id="binary"),
        pytest.param(lambda s: s.send_str(json.dumps({"type": "x" * 5000})), 1009, id="oversized"),
    ],
)
async def test_refused_messages_close_the_socket_and_others_carry_on(
    send: object, code: int, server: RunningServer, session: aiohttp.ClientSession
) -> None:
    url = f"{server.ws_url}/ws/room.close"
    async with session.ws_connect(url) as bystander, session.ws_connect(url) as sock:
        await send(sock)  # type: ignore[operator]
        async with asyncio.timeout(10):
            msg = await sock.receive()
        assert msg.type == WSMsgType.CLOSE
        assert sock.close_code == code
        sent = await publish(session, server.url, "room.close", "note", {"n": 1})
        assert await receive_json(bystander) == sent
        # And new connections are served.
        got = await ws(
            session,
            server.url,
            "room.close",
            after=None,
            stop=lambda e: len(e) == 1,
            read_to_close=False,
        )
        assert got.events == [sent]


async def test_server_pings_and_a_ponging_client_stays(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(heartbeat=0.2)
    url = f"{server.ws_url}/ws/room.ping?client=pinged"
    async with session.ws_connect(url, autoping=False) as sock:
        async with asyncio.timeout(10):
            msg = await sock.receive()
        assert msg.type == WSMsgType.PING
        await sock.pong(msg.data)
    # With autoping (the default) the client answers every ping it reads: across several
    # heartbeats the server keeps the connection, and it still delivers. (A slower beat here: a
    # pong must come back within one interval, and this process also runs the server.)
    async with session.patch(f"{server.url}/api/config", json={"heartbeat": 0.5}) as resp:
        assert resp.status == 200
    async with session.ws_connect(f"{server.ws_url}/ws/room.ping?client=auto") as sock:
        received: asyncio.Queue[dict] = asyncio.Queue()
        async with running(_pump(sock, received)):
            await wait_for(
                lambda: _heartbeats(session, server, "auto", at_least=3), timeout=15, interval=0.05
            )
            sent = await publish(session, server.url, "room.ping", "note", {})
            assert await asyncio.wait_for(received.get(), timeout=10) == sent


async def _pump(sock: aiohttp.ClientWebSocketResponse, into: asyncio.Queue[dict]) -> None:
    # aiohttp answers pings inside receive(): a client has to keep reading to stay alive.
    async for msg in sock:
        into.put_nowait(json.loads(msg.data))


async def _heartbeats(
    session: aiohttp.ClientSession, server: RunningServer, client: str, at_least: int
) -> bool:
    mine = (await stats(session, server.url, client))["client"]
    assert mine["open"] == 1, "the server dropped a client that answers pings"
    return bool(mine["heartbeats"] >= at_least)


async def test_client_that_never_pongs_is_dropped(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(heartbeat=0.2)
    async with session.ws_connect(f"{server.ws_url}/ws/room.mute", autoping=False) as sock:
        async with asyncio.timeout(10):
            while True:
                msg = await sock.receive()
                if msg.type != WSMsgType.PING:  # received, never answered
                    break
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
    await wait_for(lambda: _open_ws(session, server), timeout=10)


async def _open_ws(session: aiohttp.ClientSession, server: RunningServer) -> bool:
    return (await stats(session, server.url))["transports"]["ws"]["open"] == 0


@pytest.mark.parametrize("path", ["/ws/room.gone", "/sse/room.gone"])
async def test_a_client_that_vanishes_mid_stream_is_forgotten(
    server: RunningServer, session: aiohttp.ClientSession, path: str
) -> None:
    """A TCP close without goodbye (no close frame) must not leave the connection registered."""
    headers = WS_UPGRADE if path.startswith("/ws") else {}
    transport = "ws" if path.startswith("/ws") else "sse"
    for round_ in range(3):
        sock = await stalled_get(server.port, path, headers=headers)
        await publish(session, server.url, "room.gone", "note", {"n": round_})
        opened = await wait_for(lambda: _open_count(session, server, transport), timeout=10.0)
        assert opened == 1
        sock.close()
        await wait_for(lambda: _none_open(session, server, transport), timeout=10.0)


async def _open_count(session: aiohttp.ClientSession, server: RunningServer, name: str) -> int:
    return int((await stats(session, server.url))["transports"][name]["open"])


async def _none_open(session: aiohttp.ClientSession, server: RunningServer, name: str) -> bool:
    return await _open_count(session, server, name) == 0
