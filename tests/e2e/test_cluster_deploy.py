"""``make cluster`` (``deploy/cluster.sh``): Redis, two server processes and nginx in front.

The script runs as a user runs it, on free ports: its own redis-server, two ``realtime-lab
serve --bus redis://...`` processes, and nginx with ``deploy/nginx-cluster.conf`` (the README's
"Behind nginx" blocks, with an upstream of both processes). The dashboard runs in Chromium
through that nginx; the test cuts every stream on both processes (the chaos "drop") until each
kind of stream has been served by both, nginx sending each reconnect to the next process, and
every pane still ends with the exact answer, without a gap or a duplicate.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest

from realtime_lab.feed.llm import answer_text, answer_tokens
from tests.conftest import free_port
from tests.e2e.conftest import PANES, TEST_HOOK, VIEWPORT, Dashboard
from tests.nginx.nginx_proxy import documented_blocks, lines_of, nginx_binary
from tests.redis_server import redis_server_binary

ROOT: Final = Path(__file__).resolve().parents[2]
SCRIPT: Final = ROOT / "deploy" / "cluster.sh"
CONFIG: Final = ROOT / "deploy" / "nginx-cluster.conf"
BOUND: Final = 30.0  # two shared cores: three processes start at once
#: The streams the test cuts, which the page resumes on whichever process nginx picks (the
#: fetch pane's resume is a POST with Last-Event-ID: a process that does not run the chat
#: streams it from the bus, and tells the one that does, so its abort grace does not cancel it).
STREAMS: Final = ("sse", "ws", "fetch")
MAX_ROUNDS: Final = 12
MAX_CHATS: Final = 4  # about five rounds fit in one chat: MAX_ROUNDS fits in three
UPSTREAM_LINE: Final = re.compile(r"^server 127\.0\.0\.1:8080;$")


def _missing() -> str | None:
    if nginx_binary() is None:
        return "nginx is not installed (apt-get install nginx-light)"
    if redis_server_binary() is None:
        return "redis-server is not installed (apt-get install redis-server)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def test_the_cluster_config_is_the_readme_blocks_with_two_upstream_servers() -> None:
    """Every README block is in deploy/nginx-cluster.conf, unchanged but for the upstream's
    one server line, which names the two processes there."""
    deploy = lines_of(CONFIG.read_text(encoding="utf-8"))
    two = ["server 127.0.0.1:8081;", "server 127.0.0.1:8082;"]
    blocks = documented_blocks()
    assert blocks["http"], blocks
    assert len(blocks["server"]) >= 4, blocks
    for block in blocks["http"] + blocks["server"]:
        wanted: list[str] = []
        for line in lines_of(block):
            wanted += two if UPSTREAM_LINE.match(line) else [line]
        found = any(deploy[i : i + len(wanted)] == wanted for i in range(len(deploy)))
        assert found, f"README block not in {CONFIG}:\n{block}"


@dataclass
class Cluster:
    """``deploy/cluster.sh`` running: nginx on ``url``, the processes on ``ports``."""

    process: asyncio.subprocess.Process
    directory: Path
    port: int
    ports: tuple[int, int]
    banner: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def process_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def access_log(self) -> str:
        path = self.directory / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def stop_cluster(cluster: Cluster) -> None:
    """SIGTERM the script, as Ctrl+C would stop it; then nothing may listen on its ports."""
    proc = cluster.process
    try:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), BOUND)
        async with asyncio.timeout(BOUND):
            while any(listening(p) for p in (cluster.port, *cluster.ports)):
                await asyncio.sleep(0.05)  # the children exit within their shutdown timeouts
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """The script on free ports, with ``--chaos`` on both processes; stopped with SIGTERM."""
    ports = {name: free_port() for name in ("PORT", "PORT1", "PORT2", "REDIS_PORT")}
    env = {
        **os.environ,
        **{name: str(port) for name, port in ports.items()},
        "CLUSTER_DIR": str(tmp_path / "cluster"),
        "BIN": str(Path(sys.executable).parent),
        # The cuts can make nginx leave both processes out for its fail_timeout (10 s), and a
        # fetch resume is a POST, which nginx does not try on the next one: its chat must wait.
        "SERVE_ARGS": "--chaos --log-level INFO --fetch-abort-grace 15",
    }
    proc = await asyncio.create_subprocess_exec(
        "bash", str(SCRIPT),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group: Redis, the apps and nginx are its children
    )  # fmt: skip
    assert proc.stdout is not None
    started = Cluster(
        proc, tmp_path / "cluster", ports["PORT"], (ports["PORT1"], ports["PORT2"]), ""
    )
    try:
        started.banner = (await asyncio.wait_for(proc.stdout.readline(), BOUND)).decode()
        assert started.banner.startswith(f"dashboard: {started.url}/"), (
            started.banner + (await proc.stdout.read()).decode()
        )
        yield started
    finally:
        await stop_cluster(started)


async def process_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/api/stats") as resp:
        assert resp.status == 200, await resp.text()
        transports: dict[str, Any] = (await resp.json())["transports"]
        return transports


async def drop(session: aiohttp.ClientSession, url: str, transports: list[str]) -> None:
    """The chaos "drop" of ``transports`` on one process itself (through nginx it would reach
    whichever process nginx picked)."""
    for transport in transports:
        async with session.post(url + "/api/chaos/drop", json={"transport": transport}) as resp:
            assert resp.status == 200, await resp.text()


def served_by_both(stats: list[dict[str, Any]]) -> list[str]:
    """The streams of which each process has opened a connection and delivered events on it
    (a stream cut before its first event on a process was not served by it)."""
    return [
        key
        for key in STREAMS
        if all(s[key]["connections"] >= 1 and s[key]["events"] >= 1 for s in stats)
    ]


async def cut_one_chat(
    dash: Dashboard,
    session: aiohttp.ClientSession,
    cluster: Cluster,
    rounds: int,
    both: list[str],
) -> tuple[int, list[str], dict[str, int]]:
    """One chat on every pane, its streams cut on one process at a time until each kind was
    served by both (``both`` so far) or the chat ended; then every pane must show the exact
    answer, without a gap or a duplicate. Returns the rounds cut so far, the streams both
    processes have served, and how often each stream reconnected in this chat."""
    prompt, seed, max_tokens = "Two processes, one feed", 5, 84
    expected = answer_text(prompt, seed, max_tokens=max_tokens)
    tokens = len(answer_tokens(prompt, seed, max_tokens=max_tokens))
    # 84 tokens, 450 ms apart: about 38 s of streaming for the cuts to land in (a round is a cut
    # and the reconnects it causes; on two busy cores up to eight seconds each, when nginx shuns
    # the cut process for its fail_timeout).
    await dash.start_chat(
        prompt, seed=seed, max_tokens=max_tokens, token_ms=450, ttft_ms=50, poll_ms=50
    )
    for key in PANES:
        await dash.wait_tokens(key, 3)
    reconnects = dict.fromkeys(STREAMS, 0)
    while rounds < MAX_ROUNDS and set(both) != set(STREAMS):
        if await dash.page.evaluate("() => window.lab.panes.some(p => p.ended)"):
            break  # this chat ran out before the cuts were done: the next one goes on
        rounds += 1
        stats = [await process_stats(session, cluster.process_url(i)) for i in range(2)]
        # The process holding most of the streams the other one has not served yet.
        held = [[key for key in STREAMS if per[key]["open"]] for per in stats]
        wanted = [[key for key in keys if key not in both] for keys in held]
        victim = 0 if (len(wanted[0]), len(held[0])) >= (len(wanted[1]), len(held[1])) else 1
        await drop(session, cluster.process_url(victim), [*STREAMS, "longpoll"])
        for key in held[victim]:
            # A stream whose last event was on its way when the stats were read ends instead.
            await dash.wait_reconnected(key, reconnects[key] + 1, or_ended=True)
            reconnects[key] = await dash.pane_value(key, "m.reconnects")
        stats = [await process_stats(session, cluster.process_url(i)) for i in range(2)]
        both = served_by_both(stats)

    # The rest of a 38 s chat, whenever the cuts were done.
    summary = await dash.wait_finished(timeout_ms=60_000)
    dump = json.dumps(summary["panes"], indent=1, ensure_ascii=False)
    for key in PANES:
        pane = summary["panes"][key]
        assert await dash.pane_text(key) == expected, f"{key}: {dump}"
        assert pane["end"] == "done", dump
        assert pane["tokens"] == tokens, dump
        assert (pane["gaps"], pane["duplicates"], pane["out_of_order"]) == (0, 0, 0), dump
    return rounds, both, reconnects


@pytest.mark.e2e
@pytest.mark.nginx
async def test_the_dashboard_through_nginx_moves_between_processes_without_loss(
    cluster: Cluster, browser: Any
) -> None:
    context = await browser.new_context(viewport=VIEWPORT)
    await context.add_init_script(TEST_HOOK)
    dash = Dashboard(await context.new_page(), cluster.url)
    try:
        await dash.open()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND)) as session:
            # Where a reconnect lands is nginx's choice (round robin, and it may shun a cut
            # process for its fail_timeout), so how many cuts it takes until every stream kind
            # was served by both processes is chance: a chat may end first. Then that chat is
            # checked whole and the next one is cut, until both served all, at most MAX_ROUNDS.
            rounds, chats = 0, 0
            both: list[str] = []
            cut = dict.fromkeys(STREAMS, 0)
            while set(both) != set(STREAMS):
                assert rounds < MAX_ROUNDS, (rounds, chats, both)
                assert chats < MAX_CHATS, (rounds, chats, both)
                chats += 1
                rounds, both, reconnects = await cut_one_chat(dash, session, cluster, rounds, both)
                for key in STREAMS:
                    cut[key] += reconnects[key]
            stats = [await process_stats(session, cluster.process_url(i)) for i in range(2)]

        # Both processes delivered events of the streams, and every cut stream resumed from its
        # id on the process it landed on (a resume position is the bus's: the same on either).
        for i, per in enumerate(stats):
            for key in STREAMS:
                assert per[key]["events"] > 0, (i, key, per)
        # Long polls go wherever nginx sends each one (it may shun a cut process for a while, so
        # one of them may have answered them all): they were answered, with events.
        assert sum(per["longpoll"]["events"] for per in stats) > 0, stats
        resumed = sum(per[key]["reconnects"] for per in stats for key in STREAMS)
        assert resumed >= sum(cut.values()), (cut, stats)
        # nginx's word: the stream requests went to both upstreams.
        upstreams = {
            address
            for line in cluster.access_log().splitlines()
            if re.search(r'"GET /(sse|ws|longpoll)/', line) and "upstream=" in line
            for address in re.findall(r"127\.0\.0\.1:\d+", line.split("upstream=", 1)[1])
        }
        assert upstreams == {f"127.0.0.1:{p}" for p in cluster.ports}, upstreams
        assert dash.errors(allow_network=True) == []
        print(f"\n{rounds} cuts over {chats} chat(s); reconnects per pane {cut}")
    finally:
        await context.close()
