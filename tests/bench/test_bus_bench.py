"""``bench --bus redis --processes 2``: the load spread over processes, and what Redis costs.

Two tests: the native load client, given two servers' ports, starts each user's chat on one
process and reads it on the other (two in-process apps that record what they are asked); and a
small end-to-end sweep on a private redis-server with two ``serve`` processes, whose report has
every process's CPU and Redis's.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from aiohttp import web

from realtime_lab.app import make_app
from realtime_lab.bench import buses, native
from realtime_lab.bench.loadgen import NativeClients
from realtime_lab.bench.redisproc import redis_server_binary
from realtime_lab.bench.runner import run_bench
from realtime_lab.bench.target import BenchConfig
from tests.bench.test_bench_chats import serving
from tests.conftest import test_settings

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="no C compiler: the bus points read their chats with the native load client",
)

WAIT = 20.0
USERS = 4


class Seen:
    """The chat channels one app created (``POST /api/chats``) and was asked to stream."""

    def __init__(self, changed: asyncio.Event) -> None:
        self.created: set[str] = set()
        self.streamed: set[str] = set()
        self.changed = changed  # shared by the apps: what any of them saw

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith("/sse/"):
            self.streamed.add(request.path.removeprefix("/sse/"))
            self.changed.set()
        response = await handler(request)
        if request.path == "/api/chats" and isinstance(response, web.Response):
            assert response.text is not None
            self.created.add(str(json.loads(response.text)["channel"]))
            self.changed.set()
        return response


async def test_a_chat_is_started_on_one_process_and_read_on_the_next(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    binary = native.build(directory=tmp_path_factory.mktemp("native")).path
    changed = asyncio.Event()
    seen = [Seen(changed), Seen(changed)]
    async with AsyncExitStack() as stack:
        ports = []
        for record in seen:
            app = make_app(test_settings())
            app.middlewares.append(record.middleware)
            ports.append(await stack.enter_async_context(serving(app, 10.0)))
        spec = {
            "workload": "chats",
            "transport": "sse",
            "host": "127.0.0.1",
            "port": ports[0],
            "ports": ports,
            "host_header": f"127.0.0.1:{ports[0]}",
            "tag": "bench-test",
            "chat_tokens": 5,
            "token_ms": 2.0,
            "ttft_ms": 0.0,
        }
        # Two memory buses share nothing: a chat read on the other process is not found there
        # (404), which is how this test sees where each request went.
        clients, opened = await NativeClients.open(str(binary), spec, USERS)
        try:
            async with asyncio.timeout(WAIT):
                while not all(len(s.streamed) >= USERS // 2 for s in seen):
                    changed.clear()
                    await changed.wait()
        finally:
            await clients.close()
    assert opened["clients"] == 0
    assert opened["failures"] == USERS
    for this, other in ((seen[0], seen[1]), (seen[1], seen[0])):
        assert this.created, "each process started chats"
        assert this.streamed <= other.created, (this.streamed, other.created)
        assert not this.streamed & this.created


@pytest.mark.redis
def test_bus_redis_with_two_processes_reports_server_and_redis_cpu(tmp_path: Path) -> None:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    config = BenchConfig(
        out=tmp_path,
        workload="chats",
        transports=["sse"],
        clients=[6],
        rates=[50.0],
        buses=["redis"],
        processes=2,
        duration=2.0,
        warmup=1.0,
        repeat=1,
        workers=1,
        load_client="native",
        progress=False,
    )
    results = run_bench(config)
    (point,) = results["points"]
    (run,) = point["runs"]
    assert (point["bus"], point["processes"], point["label"]) == ("redis", 2, "sse@redisx2")
    assert run["errors"] == [], run["errors"]
    assert (run["lost"], run["dup"], run["failures"]) == (0, 0, 0)
    assert run["events"] > 0
    assert run["chats_done"] > 0
    # Both processes worked (one generates a user's chat, the other streams it) ...
    assert len(run["server_cpu_pct_each"]) == 2
    assert all(pct > 0 for pct in run["server_cpu_pct_each"]), run["server_cpu_pct_each"]
    # ... and Redis carried every token: its CPU, per event, and its memory are measured.
    assert run["redis_cpu_pct"] is not None
    assert run["redis_cpu_pct"] > 0
    assert run["redis_cpu_us_per_event"] is not None
    assert run["redis_cpu_us_per_event"] > 0
    assert run["redis_rss_mb"] is not None
    assert run["redis_rss_mb"] > 0
    table = buses.markdown(results["points"], "tokens", "token")
    assert "| sse | 6 | redis | 2 |" in table
