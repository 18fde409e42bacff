"""The fetch pane in a real Chromium: ``fetch()`` POSTs the prompt to ``/api/chats/stream`` and
reads SSE from the same response. It resumes its own chat with ``Last-Event-ID`` after the server
drops it, sends a refused first POST again, aborts on Stop (the server then cancels the chat), and
streams as the signed-in user with auth on."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest

from realtime_lab.auth import TokenAuthority
from realtime_lab.transports.keys import CHATS_KEY
from tests.conftest import RunningServer, StartServer
from tests.e2e.conftest import PANES, SHARED, WAIT_MS, Dashboard, OpenDashboard
from tests.e2e.test_dashboard import assert_all_panes_intact, dump, expect
from tests.transports.collect import wait_for

pytestmark = pytest.mark.e2e

SECRET = "an-e2e-secret-for-the-fetch-pane-at-least-32-bytes"
ALICE = TokenAuthority(SECRET).mint("alice", ttl=3600)


async def admin(server: RunningServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a chaos switch (auth off: the admin side answers loopback clients); its answer."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{server.url}{path}", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer


async def chat_state(server: RunningServer, chat_id: str) -> dict[str, Any]:
    """``GET /api/chats/{id}``, as any client would ask."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{server.url}/api/chats/{chat_id}") as resp,
    ):
        assert resp.status == 200, await resp.text()
        state: dict[str, Any] = await resp.json()
        return state


async def fetch_chat(dash: Dashboard) -> str:
    """The chat the fetch pane streams, once its response has named it."""
    await dash.page.wait_for_function(
        "() => window.lab.panes.find(p => p.key === 'fetch').chatId !== null", timeout=WAIT_MS
    )
    chat_id: str = await dash.pane_value("fetch", "chatId")
    return chat_id


async def test_a_dropped_fetch_stream_resumes_the_same_chat(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    server = await start_server(chaos=True)
    dash = await open_dashboard(server)
    prompt, seed, max_tokens = "Drop the fetch stream and carry on", 3, 70
    expected, tokens = expect(prompt, seed, max_tokens)
    await dash.start_chat(prompt, seed=seed, max_tokens=max_tokens, token_ms=60, ttft_ms=50)
    chat_id = await fetch_chat(dash)
    await dash.wait_tokens("fetch", 5)

    dropped = await admin(server, "/api/chaos/drop", {"transport": "fetch"})
    assert dropped == {"dropped": 1, "transport": "fetch"}
    assert await dash.pane_value("fetch", "ended") is None, "the chat ended before the drop"
    await dash.wait_reconnected("fetch")

    summary = await dash.wait_finished()
    await assert_all_panes_intact(dash, summary, expected, tokens)
    fetch = summary["panes"]["fetch"]
    assert fetch["reconnects"] >= 1, dump(summary)
    assert fetch["requests_server"] >= 2, dump(summary)  # the POST, and its Last-Event-ID retry
    # The same chat, not a new one: its id, and every response named it.
    assert await dash.pane_value("fetch", "chatId") == chat_id
    named = await dash.pane_value("fetch", "chatsNamed")
    assert named == [chat_id] * len(named), named
    assert len(named) >= 2, named
    state = await chat_state(server, chat_id)
    assert (state["status"], state["text"]) == ("done", expected)
    # Only the fetch stream was dropped.
    for key in SHARED:
        assert summary["panes"][key]["reconnects"] == 0, dump(summary)
    assert dash.errors(allow_network=True) == []


async def test_cut_connection_resumes_the_same_chat_to_its_end(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    server = await start_server()  # the default abort grace, 3 s
    dash = await open_dashboard(server)
    prompt, seed, max_tokens = "Cut me off and carry on", 0, 80
    expected, tokens = expect(prompt, seed, max_tokens)
    # About 4.5 s of tokens after the cut: longer than the grace.
    await dash.start_chat(prompt, seed=seed, max_tokens=max_tokens, token_ms=60, ttft_ms=50)
    chat_id = await fetch_chat(dash)
    await dash.wait_tokens("fetch", 5)
    await dash.page.click("#pane-fetch [data-role=cut]")
    await dash.wait_reconnected("fetch")
    await dash.page.wait_for_function(
        "() => window.lab.panes.find(p => p.key === 'fetch').chatsNamed.length === 2",
        timeout=WAIT_MS,
    )
    assert await dash.pane_value("fetch", "chatsNamed") == [chat_id, chat_id]

    summary = await dash.wait_finished()
    state = await chat_state(server, chat_id)
    assert state["status"] == "done", state
    await assert_all_panes_intact(dash, summary, expected, tokens)
    assert summary["panes"]["fetch"]["requests_server"] == 2, dump(summary)


async def test_a_refused_first_post_is_sent_again_and_starts_one_chat(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    server = await start_server(chaos=True)
    dash = await open_dashboard(server)
    # The fetch pane's first two POSTs answer 503 before any chat is started.
    await admin(server, "/api/chaos/fail", {"transport": "fetch", "count": 2})
    prompt, seed, max_tokens = "Try the POST again", 1, 30
    expected, tokens = expect(prompt, seed, max_tokens)
    running = server.app[CHATS_KEY].running
    await dash.start_chat(prompt, seed=seed, max_tokens=max_tokens, token_ms=20, ttft_ms=50)
    chat_id = await fetch_chat(dash)
    assert server.app[CHATS_KEY].running <= running + 2  # the shared chat and this one

    summary = await dash.wait_finished()
    await assert_all_panes_intact(dash, summary, expected, tokens)
    fetch = summary["panes"]["fetch"]
    assert (fetch["failures"], fetch["reconnects"]) == (2, 1), dump(summary)
    assert fetch["requests_browser"] == fetch["requests_server"] == 3, dump(summary)
    assert await dash.pane_value("fetch", "chatsNamed") == [chat_id]
    assert dash.errors(allow_network=True) == []


async def test_stop_aborts_the_request_and_the_server_cancels_the_chat(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    grace = 0.3
    server = await start_server(fetch_abort_grace=grace)
    dash = await open_dashboard(server)
    await dash.start_chat("Stop me half way", max_tokens=400, token_ms=40, ttft_ms=20)
    chat_id = await fetch_chat(dash)
    shared = await dash.page.evaluate("() => window.lab.app.run.chat.id")
    await dash.wait_tokens("fetch", 3)
    tag = await dash.pane_value("fetch", "tag")

    await dash.page.click("#stop")
    stopped = time.monotonic()
    assert await dash.note("fetch") == (
        f"stopped: request aborted, so the server cancels chat {chat_id}"
    )

    async def cancelled() -> bool:
        return (await chat_state(server, chat_id))["status"] == "cancelled"

    await wait_for(cancelled, timeout=10, interval=0.05)
    assert time.monotonic() - stopped >= grace * 0.9  # after the grace, not before
    state = await chat_state(server, chat_id)
    assert state["tokens"] < 400, state
    # The request is closed on the server too, and the other panes' chat was not touched (Stop
    # closed their connections, which cancel nothing).
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{server.url}/api/stats", params={"client": tag}) as resp,
    ):
        client = (await resp.json())["client"]
    assert client["open"] == 0, client
    assert (await chat_state(server, shared))["status"] != "cancelled"
    summary = await dash.summary()
    assert summary["panes"]["fetch"]["end"] is None, json.dumps(summary)
    assert await dash.page.text_content("#run-status") == "stopped"
    assert dash.errors() == []


async def test_with_auth_on_the_signed_in_fetch_pane_streams_as_the_user(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    server = await start_server(auth_secret=SECRET)
    dash = await open_dashboard(server)
    await dash.sign_in(ALICE)
    prompt, seed, max_tokens = "Fetch me as alice", 6, 35
    expected, tokens = expect(prompt, seed, max_tokens)
    await dash.start_chat(prompt, seed=seed, max_tokens=max_tokens, token_ms=20, ttft_ms=40)
    summary = await dash.wait_finished()
    await assert_all_panes_intact(dash, summary, expected, tokens)
    chat_id = await dash.pane_value("fetch", "chatId")
    chat = server.app[CHATS_KEY].get(chat_id)
    assert (chat.owner, chat.text) == ("alice", expected)
    # Signed in, the server's figures for the pane are there (they would be refused otherwise).
    for key in PANES:
        assert summary["panes"][key]["requests_server"] is not None, dump(summary)
    assert summary["panes"]["fetch"]["requests_server"] == 1, dump(summary)
    await dash.screenshot("fetch-pane-signed-in")
    assert dash.errors() == []
