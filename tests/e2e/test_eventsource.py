"""The SSE endpoint, unchanged, under a browser's own ``EventSource``.

A bare page (no dashboard, no code of ours on the client) opens ``new EventSource(url)`` on a
chat. The browser alone must reconnect after a cut, sending ``Last-Event-ID``, wait the
``retry:`` the stream began with, resume exactly, and stop for good either because the page
closes it on the ``end`` event or because the server answers the reconnection after the end
with ``204 No Content``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from realtime_lab.feed.llm import answer_tokens
from tests.conftest import RunningServer, StartServer
from tests.e2e.conftest import WAIT_MS
from tests.reliability.helpers import drop_until_cut, get, start_chat

pytestmark = pytest.mark.e2e

RETRY_MS = 300
PAGE = "/eventsource-test.html"
# What the page records: token indexes and the id each arrived with, and when (performance.now)
# every open and error happened, with the readyState at the error.
HTML = """<!doctype html>
<meta charset="utf-8">
<title>EventSource</title>
<script>
window.lab = {indexes: [], ids: [], texts: [], opens: [], errors: [], ends: []};
window.start = (url, closeOnEnd) => {
  const es = new EventSource(url);
  window.es = es;
  es.onopen = () => lab.opens.push(performance.now());
  es.onerror = () => lab.errors.push({t: performance.now(), state: es.readyState,
                                      seen: lab.ids.length});
  es.onmessage = (m) => {
    const event = JSON.parse(m.data);
    lab.indexes.push(event.data.index);
    lab.texts.push(event.data.text);
    lab.ids.push(m.lastEventId);
  };
  es.addEventListener("end", (m) => {
    lab.ends.push({id: m.lastEventId, data: JSON.parse(m.data), t: performance.now()});
    if (closeOnEnd) es.close();
  });
};
</script>
"""


class SSERequests:
    """Every request the page makes to ``/sse/``: the headers as sent, and the answer's status.

    The headers come from the DevTools protocol's ``requestWillBeSentExtraInfo``, which has
    what went on the wire; Playwright's own request headers leave ``Last-Event-ID`` out.
    """

    def __init__(self, page: Any, cdp: Any) -> None:
        self.ids: list[str] = []  # DevTools request ids of /sse/ requests, in order
        self.headers: dict[str, dict[str, str]] = {}
        self.statuses: list[int] = []
        cdp.on("Network.requestWillBeSent", self._sent)
        cdp.on("Network.requestWillBeSentExtraInfo", self._extra)
        page.on("response", self._response)

    def _sent(self, event: dict[str, Any]) -> None:
        if "/sse/" in event["request"]["url"] and event["requestId"] not in self.ids:
            self.ids.append(event["requestId"])

    def _extra(self, event: dict[str, Any]) -> None:
        headers = {k.lower(): v for k, v in event["headers"].items()}
        self.headers[event["requestId"]] = headers

    def _response(self, response: Any) -> None:
        if "/sse/" in response.url:
            self.statuses.append(response.status)

    async def last_event_ids(self, count: int) -> list[str | None]:
        """The ``Last-Event-ID`` of each of the first ``count`` requests (``None``: absent)."""
        async with asyncio.timeout(WAIT_MS / 1000):
            while len(self.ids) < count or any(i not in self.headers for i in self.ids[:count]):
                await asyncio.sleep(0.01)  # DevTools events trail the page a little
        return [self.headers[i].get("last-event-id") for i in self.ids[:count]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context()
    try:
        yield await context.new_page()
    finally:
        await context.close()


async def open_page(page: Any, server: RunningServer) -> SSERequests:
    """Serve the bare page from the server's own origin (EventSource is same-origin here)."""

    async def fulfill(route: Any) -> None:
        await route.fulfill(status=200, content_type="text/html", body=HTML)

    await page.route(server.url + PAGE, fulfill)
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("Network.enable")
    requests = SSERequests(page, cdp)
    await page.goto(server.url + PAGE)
    return requests


async def lab(page: Any) -> dict[str, Any]:
    value: dict[str, Any] = await page.evaluate("() => window.lab")
    return value


async def test_eventsource_reconnects_with_last_event_id_and_stops_on_end(
    start_server: StartServer, page: Any, session: aiohttp.ClientSession
) -> None:
    server = await start_server(chaos=True, retry_ms=RETRY_MS)
    requests = await open_page(page, server)
    chat = await start_chat(session, server, token_ms=15)
    expected = answer_tokens(chat["prompt"], chat["seed"], max_tokens=118)
    await page.evaluate("url => window.start(url, true)", f"/sse/{chat['channel']}")

    await page.wait_for_function("() => lab.indexes.length >= 20", timeout=WAIT_MS)
    assert await page.evaluate("() => lab.ends.length") == 0, "the chat ended before the cut"
    await drop_until_cut(session, server, "sse")  # a network cut: no end, no final chunk
    await page.wait_for_function("() => lab.ends.length === 1", timeout=WAIT_MS)
    state = await lab(page)

    # Resumed exactly: every token once, in order, whatever the cut interrupted.
    assert state["indexes"] == list(range(len(expected))), state["indexes"]
    assert "".join(state["texts"]) == "".join(expected)
    assert state["ends"][0]["data"]["data"]["reason"] == "done"
    # One cut, one reconnection, made by the browser with the last id it had seen.
    assert len(state["errors"]) == 1, state["errors"]
    assert len(state["opens"]) == 2, state["opens"]
    error = state["errors"][0]
    assert error["state"] == 0  # CONNECTING: the browser is going to reconnect by itself
    ids = await requests.last_event_ids(2)
    assert ids == [None, state["ids"][error["seen"] - 1]], (ids, error)
    # retry: honoured: the reconnection waited the stream's 300 ms, and not the 1000 ms of the
    # server's default or Chromium's own 3000 ms (it takes ~310 ms, also on a loaded machine).
    waited = state["opens"][1] - error["t"]
    assert RETRY_MS - 50 <= waited < 1000, f"reconnected {waited:.0f} ms after the cut"
    stats = (await get(session, f"{server.url}/api/stats"))["transports"]["sse"]
    assert (stats["requests"], stats["reconnects"]) == (2, 1), stats

    # The page closed the EventSource on `end`: no reconnection, however long we wait. The
    # server closed the stream too, so without the close() a request would come after 300 ms.
    await asyncio.sleep(3 * RETRY_MS / 1000)  # an observation window, not a synchronisation
    assert await page.evaluate("() => es.readyState") == 2
    assert len(requests.ids) == 2
    assert len((await lab(page))["errors"]) == 1


async def test_eventsource_is_told_to_stop_by_the_204_after_the_end(
    start_server: StartServer, page: Any, session: aiohttp.ClientSession
) -> None:
    server = await start_server(retry_ms=RETRY_MS)
    requests = await open_page(page, server)
    chat = await start_chat(session, server, token_ms=5, max_tokens=30)
    await page.evaluate("url => window.start(url, false)", f"/sse/{chat['channel']}")

    # The server closes the stream after `end`; the browser reconnects with the end's id, gets
    # 204 and gives up: readyState CLOSED without the page doing anything.
    await page.wait_for_function("() => es.readyState === 2", timeout=WAIT_MS)
    state = await lab(page)
    assert state["indexes"] == list(range(30))
    assert len(state["ends"]) == 1
    end_id = state["ends"][0]["id"]
    assert requests.statuses == [200, 204]
    assert await requests.last_event_ids(2) == [None, end_id]
    assert len(requests.ids) == 2
    # First error: the stream closed (CONNECTING, will retry); second: the 204 (CLOSED).
    assert [e["state"] for e in state["errors"]] == [0, 2], state["errors"]
    waited = state["errors"][1]["t"] - state["errors"][0]["t"]
    assert RETRY_MS - 50 <= waited < 1000, f"came back {waited:.0f} ms after the close"
    assert state["ends"][0]["data"]["data"]["reason"] == "done"
