"""Three dashboard tabs at once, behind nginx with TLS (``deploy/nginx-h2.conf``, ``make h2``).

Over HTTP/2 every request of the three tabs is a stream on one connection: every pane of every
tab finishes, and the page says the limit of six does not apply. Over HTTP/1.1 (the same nginx
and TLS, its HTTP/1.1-only port) the three tabs want more than the six connections a browser
opens to one origin: the second and third tabs warn before they start, requests wait for a free
connection, and the pages measure and show that wait (Resource Timing). Then the remedy over
HTTP/1.1: one tab holds the ticker's streams and relays them to the others over a
BroadcastChannel; when it closes, another tab takes over and resumes without a gap.

All three tabs are pages of one browser context: one profile, so one pool of connections and one
BroadcastChannel, as three tabs of one browser window.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from realtime_lab.feed.llm import answer_text, answer_tokens
from tests.conftest import RunningServer, StartServer
from tests.e2e.conftest import ARTIFACTS, PANES, TEST_HOOK, VIEWPORT, WAIT_MS, Dashboard
from tests.nginx.h2_proxy import H2Proxy, missing, sent_by_client, start_h2_proxy

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.nginx,
    pytest.mark.skipif(missing() is not None, reason=str(missing())),
]

TABS = 3
PROMPT, SEED, MAX_TOKENS = "Why do three tabs stall", 3, 20
# A quiet time before the first token: the streams and long polls of the tabs hold their
# connections all that time (a long poll that answers a token frees its connection for a
# moment). The first tab's is the longest, so that over HTTP/1.1 the three streams of the later
# tabs that find no free connection wait seconds, whenever within it those tabs start.
CHAT = {"token_ms": 40, "ttft_ms": 1500, "poll_ms": 50}
FIRST_TTFT_MS = 3000
STREAMS = ("poll", "longpoll", "sse", "ws")  # the panes that stream the ticker

OpenTabs = Callable[[str], Awaitable[list[Dashboard]]]


@pytest.fixture
async def proxy(
    start_server: StartServer, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[tuple[RunningServer, H2Proxy]]]]:
    """Factory: the app (trusting the proxy's X-Forwarded-Proto) behind the h2 nginx."""
    running: list[H2Proxy] = []

    async def start(**settings: Any) -> tuple[RunningServer, H2Proxy]:
        server = await start_server(trusted_proxies="127.0.0.1", **settings)
        nginx = await start_h2_proxy(tmp_path / f"nginx{len(running)}", server.port)
        running.append(nginx)
        return server, nginx

    yield start
    for nginx in running:
        nginx.stop()


@pytest.fixture
async def open_tabs(browser: Any, request: pytest.FixtureRequest) -> AsyncIterator[OpenTabs]:
    """Factory: ``tabs = await open_tabs(url)``: three tabs of one context, each page loaded
    (and a screenshot of each when the test ends)."""
    opened: list[tuple[str, list[Dashboard]]] = []

    async def open_(url: str) -> list[Dashboard]:
        context = await browser.new_context(viewport=VIEWPORT, ignore_https_errors=True)
        await context.add_init_script(TEST_HOOK)
        tabs = [Dashboard(await context.new_page(), url) for _ in range(TABS)]
        opened.append((url, tabs))
        await asyncio.gather(*(tab.open() for tab in tabs))
        # Each tab knows the other two (they say hello on the BroadcastChannel).
        for tab in tabs:
            await tab.page.wait_for_function(
                "n => window.lab.tabs.census.tabs === n", arg=TABS, timeout=WAIT_MS
            )
        return tabs

    yield open_
    for n, (_, tabs) in enumerate(opened):
        for i, tab in enumerate(tabs):
            if not tab.page.is_closed():  # the viewport only: full pages of 3 tabs take long
                ARTIFACTS.mkdir(exist_ok=True)
                path = ARTIFACTS / f"e2e-{request.node.name}-{n}-tab{i + 1}.png"
                await tab.page.screenshot(path=str(path))
        if tabs:
            await tabs[0].page.context.close()


async def tabs_state(tab: Dashboard) -> dict[str, Any]:
    state: dict[str, Any] = await tab.page.evaluate(
        """() => ({
            protocol: window.lab.tabs.protocol,
            tabs: window.lab.tabs.census.tabs,
            warning: window.lab.tabs.state.warning,
            stalls: window.lab.tabs.stalls.summary(),
            leads: window.lab.tabs.share.leads,
            peaks: window.lab.budget.peaks,
        })"""
    )
    state["warning_shown"] = await tab.page.is_visible("#tabs-warning")
    state["stalls_text"] = await tab.page.text_content("#stalls")
    state["protocol_text"] = await tab.page.text_content("#conn-protocol")
    return state


async def three_chats(tabs: list[Dashboard]) -> list[dict[str, Any]]:
    """A chat in each tab: the first tab starts, the other two together once they see it
    running (a person going from tab to tab). Each tab's summary once all have finished."""
    for i, tab in enumerate(tabs):
        for name, value in CHAT.items():
            await tab.set_range(name.replace("_", "-"), value)
        if i == 0:
            await tab.set_range("ttft-ms", FIRST_TTFT_MS)
        await tab.page.fill("#prompt", PROMPT)
        await tab.page.fill("#seed", str(SEED))
        await tab.page.fill("#max-tokens", str(MAX_TOKENS))
    await tabs[0].page.click("#send")
    for tab in tabs[1:]:
        # The first tab's run counts with its whole plan (five) in the others' census.
        await tab.page.wait_for_function(
            "() => window.lab.tabs.census.othersNeed >= 5", timeout=WAIT_MS
        )
    await asyncio.gather(*(tab.page.click("#send") for tab in tabs[1:]))
    return list(await asyncio.gather(*(tab.wait_finished() for tab in tabs)))


async def assert_every_pane_finished(
    tabs: list[Dashboard], summaries: list[dict[str, Any]]
) -> None:
    expected = answer_text(PROMPT, SEED, max_tokens=MAX_TOKENS)
    tokens = len(answer_tokens(PROMPT, SEED, max_tokens=MAX_TOKENS))
    for tab, summary in zip(tabs, summaries, strict=True):
        for key in PANES:
            pane = summary["panes"][key]
            dump = json.dumps(pane, indent=1, ensure_ascii=False)
            assert pane["end"] == "done", dump
            assert pane["tokens"] == tokens, dump
            assert (pane["gaps"], pane["duplicates"], pane["out_of_order"]) == (0, 0, 0), dump
            assert await tab.pane_text(key) == expected, key
        assert await tab.page.text_content("#run-status") == "done: all five panes finished"
        assert tab.errors() == []


async def wire(nginx: H2Proxy, tabs: list[Dashboard]) -> dict[str, dict[str, float]]:
    """What nginx sent each pane's browser side (its access log's $bytes_sent: over HTTP/2 the
    stream's frames, HPACK headers included), over the three tabs: per token and per request."""
    tokens = len(answer_tokens(PROMPT, SEED, max_tokens=MAX_TOKENS))
    tags = {key: [await tab.pane_value(key, "tag") for tab in tabs] for key in PANES}
    wanted = {tag for per_tab in tags.values() for tag in per_tab}
    # nginx logs a request when it ends; the streams end with their chat, or just after.
    async with asyncio.timeout(15):
        while not wanted <= set(sent_by_client(nginx.access_log())):
            await asyncio.sleep(0.05)  # polling a file nginx appends to, with a deadline
    sent = sent_by_client(nginx.access_log())
    out = {}
    for key, per_tab in tags.items():
        total = sum(sent[tag].bytes for tag in per_tab)
        body = sum(sent[tag].body for tag in per_tab)
        requests = sum(sent[tag].requests for tag in per_tab)
        out[key] = {
            "bytes_per_token": total / (tokens * len(per_tab)),
            "head_bytes_per_request": (total - body) / requests,  # headers and framing
            "requests": requests,
        }
    return out


def ttfts(summaries: list[dict[str, Any]]) -> list[float]:
    """The slowest pane's time to first token, per tab."""
    return [max(s["panes"][k]["ttft_ms"] for k in PANES) for s in summaries]


async def test_three_tabs_over_http_2_finish_every_pane_and_over_http_1_1_they_stall(
    proxy: Callable[..., Awaitable[tuple[RunningServer, H2Proxy]]], open_tabs: OpenTabs
) -> None:
    _, nginx = await proxy()

    # HTTP/2: the three tabs' fifteen panes at once, on one connection.
    h2_tabs = await open_tabs(nginx.h2_url)
    h2_summaries = await three_chats(h2_tabs)
    await assert_every_pane_finished(h2_tabs, h2_summaries)
    h2 = [await tabs_state(tab) for tab in h2_tabs]
    for summary in h2_summaries:  # "Download JSON" says beside what it was measured
        assert summary["tabs"]["protocol"] == "h2", summary["tabs"]
        assert summary["tabs"]["limit_applies"] is False, summary["tabs"]
        assert summary["tabs"]["count"] == TABS, summary["tabs"]
    for state in h2:
        assert state["protocol"] == "h2", state
        assert state["protocol_text"].startswith("HTTP/2: one connection for all tabs"), state
        assert not state["warning_shown"], state
        assert set(state["stalls"]["protocols"]) == {"h2"}, state
    h2_wire = await wire(nginx, h2_tabs)
    await asyncio.gather(*(tab.page.close() for tab in h2_tabs))

    # HTTP/1.1: the same three tabs, the same chats, through the same nginx and TLS.
    h1_tabs = await open_tabs(nginx.h1_url)
    h1_summaries = await three_chats(h1_tabs)
    await assert_every_pane_finished(h1_tabs, h1_summaries)
    h1 = [await tabs_state(tab) for tab in h1_tabs]
    h1_wire = await wire(nginx, h1_tabs)
    for state in h1:
        assert state["protocol"] == "http/1.1", state
        assert state["protocol_text"].startswith("HTTP/1.1: at most 6 per origin"), state
        assert set(state["stalls"]["protocols"]) == {"http/1.1"}, state
    # The first tab started alone: no warning. The others saw it running (five connections at
    # most) and would add five: they warned before opening their streams.
    assert not h1[0]["warning_shown"], h1[0]
    for state in h1[1:]:
        assert state["warning_shown"], state
        assert "more than the 6 a browser opens over HTTP/1.1" in state["warning"], state
        assert await h1_tabs[1].page.is_visible("#share-offer")

    # The stall, measured by the pages themselves: nine streams wanted six connections, so
    # some requests waited for one, through the quiet time to the first token.
    h1_longest = max(s["stalls"]["longest_ms"] for s in h1)
    h2_longest = max(s["stalls"]["longest_ms"] for s in h2)
    started = [s["run"]["started_at"] for s in h1_summaries]
    assert sum(s["stalls"]["stalled"] for s in h1) >= 1, (started, h1)
    assert h1_longest >= 500, (started, h1)
    assert h1_longest > h2_longest, (h1, h2)
    waited = [s for s in h1 if s["stalls"]["stalled"]]
    assert "waited for a connection" in waited[0]["stalls_text"], waited[0]
    # What nginx sent the browsers. Every poll answer repeats its headers, which HPACK codes
    # in fewer bytes (nginx's encoder uses the static table and Huffman codes, not the dynamic
    # table: about half here). Per token the figures also depend on how often the pages polled,
    # and how many tokens a long poll carried, which the stall changes.
    measured = {"h2": h2_wire, "http/1.1": h1_wire}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "h2-bytes-per-token.json").write_text(json.dumps(measured, indent=1))
    for key in ("poll", "longpoll"):
        h2_head = h2_wire[key]["head_bytes_per_request"]
        assert h2_head < h1_wire[key]["head_bytes_per_request"] * 0.75, measured
    print("\nnginx to browser (TLS records not counted), HTTP/2 | HTTP/1.1:")
    for key in PANES:
        h2w, h1w = h2_wire[key], h1_wire[key]
        print(
            f"  {key:9} bytes/token {h2w['bytes_per_token']:6.1f} | {h1w['bytes_per_token']:6.1f}"
            f"   headers+framing/request {h2w['head_bytes_per_request']:6.1f} | "
            f"{h1w['head_bytes_per_request']:6.1f}   requests {h2w['requests']} | {h1w['requests']}"
        )
    for name, states, summaries in (("HTTP/2", h2, h2_summaries), ("HTTP/1.1", h1, h1_summaries)):
        print(
            f"\n{name}: {sum(s['stalls']['stalled'] for s in states)} of "
            f"{sum(s['stalls']['requests'] for s in states)} requests waited for a connection, "
            f"longest {max(s['stalls']['longest_ms'] for s in states):.0f} ms; short polls per "
            f"tab {[s['panes']['poll']['requests_browser'] for s in summaries]}; slowest TTFT "
            f"per tab {[round(t) for t in ttfts(summaries)]} ms"
        )


async def test_over_http_1_1_one_tab_holds_the_ticker_for_all_three(
    proxy: Callable[..., Awaitable[tuple[RunningServer, H2Proxy]]], open_tabs: OpenTabs
) -> None:
    _, nginx = await proxy(ticker_rate=20.0)
    tabs = await open_tabs(nginx.h1_url)

    # One click shares in every tab.
    await tabs[0].page.click("#share-tabs")
    for tab in tabs:
        await tab.page.wait_for_function("() => window.lab.tabs.sharing.on", timeout=WAIT_MS)
    for tab in tabs:
        await tab.page.click("#ticker")
        await tab.page.wait_for_function(
            "() => window.lab.app.run && window.lab.app.run.mode === 'ticker'", timeout=WAIT_MS
        )

    async def every_stream_gets(tab: Dashboard, more: int) -> None:
        for key in STREAMS:
            now = await tab.pane_value(key, "m.tokens")
            await tab.wait_tokens(key, now + more)

    await asyncio.gather(*(every_stream_gets(tab, 5) for tab in tabs))
    states = [await tabs_state(tab) for tab in tabs]
    # The first tab holds the four streams; the other two never held a connection for one.
    assert sorted(states[0]["leads"]) == sorted(f"realtime-lab:{k}:ticker" for k in STREAMS)
    for state in states[1:]:
        assert state["leads"] == [], state
        assert not set(state["peaks"]) & set(STREAMS), state  # only the API queue's
    for tab in tabs[1:]:
        assert "relayed from tab" in await tab.note("sse")
        assert await tab.page.is_disabled("#pane-sse [data-role=cut]")  # nothing to cut

    # The holder closes: another tab takes each stream over and resumes from its last id.
    await tabs[0].page.close()
    rest = tabs[1:]
    await asyncio.gather(*(every_stream_gets(tab, 5) for tab in rest))
    leads = [set((await tabs_state(tab))["leads"]) for tab in rest]
    assert leads[0] | leads[1] == {f"realtime-lab:{k}:ticker" for k in STREAMS}, leads
    assert not leads[0] & leads[1], leads
    for tab in rest:
        for key in STREAMS:
            summary = (await tab.summary())["panes"][key]
            assert (summary["gaps"], summary["duplicates"], summary["out_of_order"]) == (0, 0, 0), (
                key,
                summary,
            )
        assert tab.errors() == []
