"""The dashboard's chaos controls against a server started with ``--chaos``: every pane must
come back from dropped connections, a delivery pause and injected 503s with the full answer (the
fetch pane by resuming its own chat with ``Last-Event-ID``, within the server's abort grace)."""

from __future__ import annotations

import json

import pytest

from realtime_lab.feed.llm import answer_text, answer_tokens
from realtime_lab.transports.keys import CHATS_KEY
from tests.conftest import StartServer
from tests.e2e.conftest import PANES, WAIT_MS, Dashboard, OpenDashboard

pytestmark = pytest.mark.e2e

# The panes whose stream a drop cuts (the polls hold no connection between requests).
STREAMS = ("sse", "ws", "fetch")


async def press(dash: Dashboard, button: str, label: str) -> None:
    """Press a chaos button and wait until the server has accepted the fault."""
    await dash.page.click(button)
    await dash.page.wait_for_function(
        "label => document.getElementById('chaos-status').textContent === label + ': done'",
        arg=label,
        timeout=WAIT_MS,
    )


async def assert_still_streaming(dash: Dashboard) -> None:
    ended = await dash.page.evaluate("() => window.lab.panes.filter(p => p.ended).length")
    assert ended == 0, "the chat ended before the fault: nothing would be tested"


async def test_chaos_drop_pause_and_503s_every_pane_recovers_without_loss(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    server = await start_server(chaos=True)
    dash = await open_dashboard(server)
    assert await dash.page.is_visible("#chaos"), "chaos controls hidden on a --chaos server"

    prompt, seed, max_tokens = "Cut me off and carry on", 2, 84
    expected = answer_text(prompt, seed, max_tokens=max_tokens)
    tokens = len(answer_tokens(prompt, seed, max_tokens=max_tokens))
    assert tokens == 84
    await dash.start_chat(
        prompt, seed=seed, max_tokens=max_tokens, token_ms=80, ttft_ms=50, poll_ms=20
    )
    for key in PANES:
        await dash.wait_tokens(key, 5)

    await dash.page.fill("#chaos-pause-s", "1")
    await press(dash, "#chaos-pause", "pause delivery 1 s")
    # The reconnections that follow the drop meet 503s first: the short poll, which holds no
    # connection to drop, meets them too.
    await dash.page.fill("#chaos-fail-n", "2")
    await press(dash, "#chaos-fail", "503 the next 2 requests")
    await press(dash, "#chaos-drop", "drop all connections")
    await assert_still_streaming(dash)
    for key in PANES:
        await dash.wait_reconnected(key, 1)

    # Dropped again with no 503s waiting: the EventSource now reconnects by itself, sending
    # Last-Event-ID, without the page's own retry path (which counts a failure).
    failures_before = await dash.pane_value("sse", "m.failures")
    await assert_still_streaming(dash)
    await press(dash, "#chaos-drop", "drop all connections")
    for key in STREAMS:
        await dash.wait_reconnected(key, 2)
    assert await dash.pane_value("sse", "m.failures") == failures_before

    summary = await dash.wait_finished()
    dump = json.dumps(summary, indent=1, ensure_ascii=False)
    for key in PANES:
        pane = summary["panes"][key]
        assert await dash.pane_text(key) == expected, f"{key} pane text differs"
        assert pane["end"] == "done", dump
        assert pane["tokens"] == tokens, dump
        assert pane["reconnects"] >= (2 if key in STREAMS else 1), dump
        assert (pane["gaps"], pane["duplicates"], pane["out_of_order"]) == (0, 0, 0), dump
        assert pane["resets"] == 0, dump
    # Two drops, 503s on the way back: the fetch pane resumed the chat it started every time.
    fetch_chat = await dash.pane_value("fetch", "chatId")
    assert fetch_chat != summary["run"]["channel"].removeprefix("chat."), dump
    named = await dash.pane_value("fetch", "chatsNamed")
    assert len(named) >= 3, named  # the first POST, and a resume after each drop
    assert set(named) == {fetch_chat}, named
    assert server.app[CHATS_KEY].get(fetch_chat).status == "done"
    # Chromium reports each refused or cut request on the console itself; nothing else may.
    assert dash.errors(allow_network=True) == []
