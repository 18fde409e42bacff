"""The dashboard in a real Chromium: one chat streamed on five panes (four read the chat the page
starts, the fetch pane POSTs the same prompt and seed itself), the figures they show, the
controls, and recovery from connections the page cuts itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from realtime_lab.feed.llm import answer_text, answer_tokens
from realtime_lab.transports.keys import CHATS_KEY, SETTINGS_KEY
from tests.conftest import RunningServer, StartServer
from tests.e2e.conftest import PANES, SHARED, WAIT_MS, Dashboard, OpenDashboard

pytestmark = pytest.mark.e2e


def dump(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=1, ensure_ascii=False)


async def assert_all_panes_intact(
    dash: Dashboard, summary: dict[str, Any], expected: str, tokens: int
) -> None:
    """Every pane finished the chat with exactly the expected text and no integrity errors."""
    for key in PANES:
        pane = summary["panes"][key]
        assert await dash.pane_text(key) == expected, f"{key} pane text differs"
        assert pane["end"] == "done", dump(summary)
        assert pane["state"] == "closed", dump(summary)
        assert pane["tokens"] == tokens, dump(summary)
        assert (pane["gaps"], pane["duplicates"], pane["out_of_order"]) == (0, 0, 0), dump(summary)
        assert pane["resets"] == 0, dump(summary)
        assert await dash.metric(key, "integrity") == "0\u2009/\u20090\u2009/\u20090"


def expect(prompt: str, seed: int, max_tokens: int) -> tuple[str, int]:
    """The answer the server will stream for this chat, and its number of tokens."""
    text = answer_text(prompt, seed, max_tokens=max_tokens)
    return text, len(answer_tokens(prompt, seed, max_tokens=max_tokens))


async def assert_fetch_pane_had_its_own_chat(
    dash: Dashboard, server: RunningServer, expected: str
) -> str:
    """The fetch pane streamed one chat of its own, to its end, with the shared chat's text;
    its id."""
    shared = await dash.page.evaluate("() => window.lab.app.run.chat.id")
    own = await dash.pane_value("fetch", "chatId")
    assert isinstance(own, str)
    assert own != shared
    # Every response named the same chat: a resume never started another one.
    assert set(await dash.pane_value("fetch", "chatsNamed")) == {own}
    chats = server.app[CHATS_KEY]
    for chat_id in (own, shared):
        assert (chats.get(chat_id).status, chats.get(chat_id).text) == ("done", expected)
    note = await dash.page.get_attribute("#pane-fetch [data-role=note]", "title")
    assert note is not None
    assert "same prompt and seed" in note, note
    return own


async def test_one_chat_reaches_all_five_panes_with_plausible_figures(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    server = await start_server()
    dash = await open_dashboard(server)
    assert await dash.page.is_hidden("#chaos"), "chaos controls shown on a server without --chaos"

    prompt, seed, max_tokens = "Compare the four transports", 0, 40
    expected, tokens = expect(prompt, seed, max_tokens)
    # Tokens far apart compared with a local round trip, polled often: short polling then makes
    # several requests per token, long polling about one, the streams one each, even when the
    # machine is slow.
    await dash.start_chat(
        prompt, seed=seed, max_tokens=max_tokens, token_ms=80, ttft_ms=150, poll_ms=10
    )
    summary = await dash.wait_finished()
    await assert_all_panes_intact(dash, summary, expected, tokens)
    await assert_fetch_pane_had_its_own_chat(dash, server, expected)
    assert await dash.note("fetch") == (
        f"own chat {await dash.pane_value('fetch', 'chatId')}: same prompt, seed and text as "
        f"{summary['run']['channel'].removeprefix('chat.')}"
    )

    panes = summary["panes"]
    for key in PANES:
        pane = panes[key]
        assert pane["reconnects"] == 0, dump(summary)
        assert pane["ttft_ms"] >= 150 - 5, dump(summary)  # the server waits ttft_ms at least
        latency = pane["latency_ms"]
        assert latency["n"] == tokens, dump(summary)
        # Clock-offset corrected on one machine: never much below zero, never absurd.
        assert -50 < latency["p50"] <= latency["p95"] <= latency["max"] < 20_000, dump(summary)
        # The server counted every request the browser made, and every byte of the answers.
        assert pane["requests_server"] == pane["requests_browser"], dump(summary)
        assert pane["bytes"] > 0, dump(summary)
        assert pane["bytes_per_token"] == pytest.approx(pane["bytes"] / tokens), dump(summary)
        assert await dash.metric(key, "tokens") == str(tokens)

    assert panes["sse"]["requests_server"] == 1, dump(summary)
    assert panes["ws"]["requests_server"] == 1, dump(summary)
    assert panes["fetch"]["requests_server"] == 1, dump(summary)
    assert panes["longpoll"]["requests_server"] > 1, dump(summary)
    most_requests = max(PANES, key=lambda key: panes[key]["requests_server"])
    assert most_requests == "poll", dump(summary)
    fewest_bytes = min(PANES, key=lambda key: panes[key]["bytes_per_token"])
    assert fewest_bytes == "ws", dump(summary)
    # A long-poll answer pays a status line and headers; an SSE event a few bytes of framing.
    assert panes["sse"]["bytes_per_token"] < panes["longpoll"]["bytes_per_token"], dump(summary)
    # The fetch stream is SSE too: the same framing, plus its opening chat event.
    assert panes["fetch"]["bytes_per_token"] < panes["longpoll"]["bytes_per_token"], dump(summary)

    # The SSE, long-poll and fetch streams, at most one short poll and the one queue for
    # everything else: within the plan, which is within the browser's six.
    connections = summary["connections"]
    assert connections["plan"] == 5, dump(summary)
    assert connections["plan_by_holder"] == {
        "poll": 1,
        "longpoll": 1,
        "sse": 1,
        "ws": 0,
        "fetch": 1,
        "api": 1,
    }, dump(summary)
    assert 3 <= connections["peak"] <= connections["plan"], dump(summary)
    for holder, peak in connections["peak_by_holder"].items():
        assert peak <= connections["plan_by_holder"][holder], dump(summary)
    assert await dash.page.text_content("#conn-plan") == "5"
    findings = await dash.page.text_content("#findings")
    assert findings is not None
    assert "Short polling made" in findings
    assert "Fetch streaming POSTed the prompt" in findings
    assert "No gaps, duplicates or reordering" in findings
    assert await dash.page.text_content("#run-status") == "done: all five panes finished"
    assert await dash.page.text_content("#send") == "Stream on all five"
    assert dash.errors() == []


async def test_summary_copies_as_markdown_and_downloads_as_json(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    server = await start_server()
    dash = await open_dashboard(server)
    assert await dash.page.is_disabled("#copy-md")
    prompt, seed, max_tokens = "Why does streaming need resume", 0, 30
    expected, tokens = expect(prompt, seed, max_tokens)
    await dash.start_chat(prompt, seed=seed, max_tokens=max_tokens, token_ms=5, ttft_ms=20)
    summary = await dash.wait_finished()
    await assert_all_panes_intact(dash, summary, expected, tokens)

    await dash.page.click("#copy-md")
    await dash.page.wait_for_selector("#summary-md", state="visible", timeout=WAIT_MS)
    markdown = await dash.page.input_value("#summary-md")
    lines = markdown.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 5, markdown  # header, alignment row, one row per transport
    assert table[1].startswith("| --- | ---: |"), markdown
    for label in ("Short poll", "Long poll", "SSE", "WebSocket", "Fetch"):
        row = next(line for line in table if line.startswith(f"| {label} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[6] == str(tokens), row  # tokens
        assert cells[7:10] == ["0", "0", "0"], row  # gaps, dups, out of order
    assert f"seed {seed}" in markdown

    async with dash.page.expect_download() as info:
        await dash.page.click("#download-json")
    download = await info.value
    assert download.suggested_filename.endswith(".json")
    saved = json.loads(Path(await download.path()).read_text(encoding="utf-8"))
    assert saved["run"]["chat"]["prompt"] == prompt
    assert set(saved["panes"]) == set(PANES)
    for key in PANES:
        assert saved["panes"][key]["tokens"] == tokens
        assert saved["panes"][key]["bytes"] == summary["panes"][key]["bytes"]
    assert dash.errors() == []


async def test_cut_connection_on_each_pane_resumes_from_the_last_id(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    server = await start_server()
    dash = await open_dashboard(server)
    prompt, seed, max_tokens = "Cut me off and carry on", 0, 80
    expected, tokens = expect(prompt, seed, max_tokens)
    assert tokens == 80
    await dash.start_chat(prompt, seed=seed, max_tokens=max_tokens, token_ms=50, ttft_ms=50)

    # The fetch pane's cut is tested on its own (tests/e2e/test_fetch_pane.py): the server
    # cancels its chat after a resume that comes this fast.
    for key in SHARED:
        await dash.wait_tokens(key, 5)
        tokens_before = await dash.pane_value(key, "m.tokens")
        assert tokens_before < tokens, f"the chat ended before {key} could be cut"
        await dash.page.click(f"#pane-{key} [data-role=cut]")
        await dash.wait_reconnected(key)

    summary = await dash.wait_finished()
    await assert_all_panes_intact(dash, summary, expected, tokens)
    panes = summary["panes"]
    for key in SHARED:
        assert panes[key]["reconnects"] >= 1, dump(summary)
        assert await dash.metric(key, "reconnects") == str(panes[key]["reconnects"])
    # The streams really were opened twice: once at the start, once resuming after the cut.
    assert panes["sse"]["requests_server"] >= 2, dump(summary)
    assert panes["ws"]["requests_server"] >= 2, dump(summary)
    assert dash.errors() == []


async def test_ticker_switch_and_heartbeat_slider(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    server = await start_server(ticker_rate=40.0, heartbeat=15.0)
    dash = await open_dashboard(server)

    await dash.set_range("heartbeat-s", 7)
    await dash.page.wait_for_function(
        "() => document.getElementById('run-status').textContent === 'heartbeat 7 s set'",
        timeout=WAIT_MS,
    )
    assert server.app[SETTINGS_KEY].heartbeat == 7.0

    await dash.page.check("#ticker")
    assert await dash.page.is_visible("#ticker-rate-label")
    for key in SHARED:
        await dash.wait_tokens(key, 5)
    await dash.page.uncheck("#ticker")
    summary = await dash.wait_finished()
    assert summary["run"]["mode"] == "ticker", dump(summary)
    assert await dash.page.text_content("#run-status") == "stopped"
    # No POST starts the ticker: the fetch pane sits it out, and says why.
    fetch = summary["panes"]["fetch"]
    assert (fetch["skipped"], fetch["state"], fetch["requests_browser"]) == (True, "skipped", 0)
    assert (await dash.note("fetch")).startswith("not on the ticker"), await dash.note("fetch")
    assert await dash.pane_value("fetch", "active") is False
    for key in SHARED:
        pane = summary["panes"][key]
        assert pane["tokens"] >= 5, dump(summary)
        assert (pane["gaps"], pane["duplicates"], pane["out_of_order"]) == (0, 0, 0), dump(summary)
        assert pane["end"] is None, dump(summary)  # the ticker never ends: the switch stopped it
        assert pane["state"] == "closed", dump(summary)
        assert pane["bytes"] > 0, dump(summary)
        assert (await dash.pane_text(key)).strip(), key
    assert dash.errors() == []
