"""examples/: the host application that mounts the transports, run as a user would."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import aiohttp
from aiohttp import web

from realtime_lab.config import Settings

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mounted.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mounted_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mounted_example", module)
    spec.loader.exec_module(module)
    return module


async def test_the_mounted_transports_serve_next_to_the_apps_own_routes() -> None:
    example = load_example()
    app = example.make_app(Settings(ticker_rate=0, heartbeat=15))
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/hello") as resp:
                assert (await resp.json())["hello"] == "from the host application"
            stream = await session.get(f"{url}/live/sse/news?after=now")
            sock = await session.ws_connect(f"{url}/live/ws/news?after=now")
            async with session.post(f"{url}/notify", data="the build is green") as resp:
                assert resp.status == 201
                published = await resp.json()
            async with asyncio.timeout(5):
                block = b""
                while b"the build is green" not in block:
                    block = await stream.content.readuntil(b"\n\n")
                assert (await sock.receive_json())["id"] == published["id"]
            async with session.get(f"{url}/live/poll/news") as resp:
                assert [e["id"] for e in (await resp.json())["events"]] == [published["id"]]
            async with session.post(f"{url}/live/api/chats/stream", json={"prompt": "hi"}) as resp:
                assert resp.status == 200
                body = await resp.read()
            assert b"event: chat" in body
            assert b"event: end" in body
            stream.close()
            await sock.close()
    finally:
        await runner.cleanup()
