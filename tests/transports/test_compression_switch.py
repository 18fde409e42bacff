"""``PATCH /api/config {"compression"}``: the dashboard's switch. New connections get the new
mode, an open one keeps the mode its handshake agreed; a bad mode is refused; and
``/api/stats`` says how much CPU the process has used (the page's CPU per token)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as websockets_connect

from tests.conftest import StartServer
from tests.transports.collect import start_chat, stats


async def patch(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.patch(f"{url}/api/config", json=body) as resp:
        return resp.status, await resp.json()


async def read_all(sock: ClientConnection) -> list[dict[str, Any]]:
    events = []
    async with asyncio.timeout(20):
        async for message in sock:
            events.append(json.loads(message))
    return events


async def test_a_new_mode_applies_to_new_connections_and_open_ones_keep_theirs(
    start_server: StartServer,
) -> None:
    server = await start_server(compression="off")
    async with aiohttp.ClientSession() as session:
        chat = await start_chat(session, server.url, "switch", seed=3, max_tokens=80, token_ms=20)
        url = f"{server.ws_url}/ws/{chat['channel']}"
        async with websockets_connect(url, open_timeout=10) as before:
            status, body = await patch(session, server.url, {"compression": "connection"})
            assert status == 200
            assert body["compression"] == "connection"
            async with websockets_connect(url, open_timeout=10) as after:
                assert before.response.headers.get("Sec-WebSocket-Extensions") is None
                extension = after.response.headers.get("Sec-WebSocket-Extensions") or ""
                assert extension.startswith("permessage-deflate")
                old, new = await read_all(before), await read_all(after)
        assert old == new
        assert old[-1]["type"] == "end"
        # GET says the mode too, and a poll asked for gzip now gets it.
        async with session.get(f"{server.url}/api/config") as resp:
            assert (await resp.json())["compression"] == "connection"
        async with session.get(
            f"{server.url}/poll/{chat['channel']}", headers={"Accept-Encoding": "gzip"}
        ) as resp:
            assert resp.headers.get("Content-Encoding") == "gzip"


async def test_a_mode_that_does_not_exist_is_refused_and_changes_nothing(
    start_server: StartServer,
) -> None:
    server = await start_server(compression="message")
    async with aiohttp.ClientSession() as session:
        for bad in ("gzip", 1, None, ["off"]):
            status, body = await patch(session, server.url, {"compression": bad, "heartbeat": 9})
            assert status == 400, bad
            assert body["error"]["code"] == "invalid-parameter"
        async with session.get(f"{server.url}/api/config") as resp:
            config = await resp.json()
    assert config["compression"] == "message"
    assert config["heartbeat"] != 9


async def test_stats_say_the_cpu_the_process_used(start_server: StartServer) -> None:
    server = await start_server()
    async with aiohttp.ClientSession() as session:
        first = (await stats(session, server.url))["process_cpu_s"]
        await start_chat(session, server.url, "burn a little", seed=1, max_tokens=200)
        later = (await stats(session, server.url))["process_cpu_s"]
    assert isinstance(first, float)
    assert later > first
