"""What Chromium gets from each ``--compression`` mode, with nothing of ours on the client.

On a document of the server's origin, this test's script reads one chat with the browser's own
``WebSocket`` (which offers ``permessage-deflate``), ``EventSource``, ``fetch`` streaming and a
poll (which send ``Accept-Encoding``). Every mode must deliver the same events; the negotiated
extension is the mode's; and the server's byte counts show the compression happened where the
mode says.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningServer, StartServer
from tests.e2e.conftest import WAIT_MS
from tests.transports.collect import poll, start_chat, stats

pytestmark = pytest.mark.e2e

# A document of the server's own (a JSON answer): a page Playwright fulfilled itself would be
# in the public address space, and Chromium's local-network checks block its WebSocket.
PAGE = "/api/health"
SCRIPT = """
const sse = (url) => new Promise((resolve, reject) => {
  const events = [];
  const es = new EventSource(url);
  es.onmessage = (m) => events.push(JSON.parse(m.data));
  es.addEventListener("end", (m) => { events.push(JSON.parse(m.data)); es.close();
                                      resolve(events); });
  es.onerror = () => { es.close(); reject(new Error("EventSource error")); };
});
const ws = (url) => new Promise((resolve, reject) => {
  const events = [];
  const sock = new WebSocket(url);
  sock.onmessage = (m) => events.push(JSON.parse(m.data));
  sock.onclose = (e) => resolve({events, code: e.code, extensions: sock.extensions});
  sock.onerror = () => reject(new Error("WebSocket error"));
});
const streamed = async (tag) => {
  const answer = await fetch(`/api/chats/stream?client=${tag}`, {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({prompt: "zip the stream", seed: 4, max_tokens: 30}),
  });
  const text = await answer.text();
  const data = text.split("\\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6));
  return data.map((d) => JSON.parse(d));
};
window.run = async (channel, tag) => ({
  ws: await ws(`ws://${location.host}/ws/${channel}?client=${tag}-ws`),
  sse: await sse(`/sse/${channel}?client=${tag}-sse`),
  poll: (await (await fetch(`/poll/${channel}?client=${tag}-poll`)).json()).events,
  fetch: await streamed(`${tag}-fetch`),
});
"""


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context()
    try:
        yield await context.new_page()
    finally:
        await context.close()


async def read_in_browser(page: Any, server: RunningServer, mode: str) -> dict[str, Any]:
    await page.goto(server.url + PAGE)
    await page.add_script_tag(content=SCRIPT)
    async with aiohttp.ClientSession() as session:
        chat = await start_chat(session, server.url, "zip it", seed=5, max_tokens=60)
        reference = await poll(session, server.url, chat["channel"])
        got: dict[str, Any] = await page.evaluate(
            "([channel, tag]) => window.run(channel, tag)", [chat["channel"], mode]
        )
        counted = {}
        for transport in ("ws", "sse", "poll", "fetch"):
            mine = (await stats(session, server.url, f"{mode}-{transport}"))["client"]
            assert mine["open"] == 0
            counted[transport] = mine["bytes"]
    assert got["ws"]["events"] == reference
    assert got["ws"]["code"] == 1000
    assert got["sse"] == reference
    assert got["poll"] == reference
    tokens = [e for e in got["fetch"] if e.get("type") == "token"]
    assert len(tokens) == 30
    assert got["fetch"][-1]["type"] == "end"
    return {"extensions": got["ws"]["extensions"], "bytes": counted}


async def test_chromium_reads_every_mode_and_the_bytes_shrink_where_the_mode_says(
    start_server: StartServer, page: Any
) -> None:
    page.set_default_timeout(WAIT_MS)
    seen = {}
    for mode in ("off", "message", "connection"):
        server = await start_server(compression=mode)
        seen[mode] = await read_in_browser(page, server, mode)
    assert seen["off"]["extensions"] == ""
    assert seen["message"]["extensions"] == "permessage-deflate; server_no_context_takeover"
    assert seen["connection"]["extensions"].startswith("permessage-deflate; server_max_window_bits")
    off, message, connection = (seen[m]["bytes"] for m in ("off", "message", "connection"))
    # WebSocket: a little smaller per message, far smaller with the context kept.
    assert connection["ws"] < message["ws"] < off["ws"]
    assert connection["ws"] < off["ws"] * 0.5
    # Streams over HTTP compress per connection only; polls whenever compression is on.
    assert abs(message["sse"] - off["sse"]) < off["sse"] * 0.05
    assert connection["sse"] < off["sse"] * 0.5
    assert connection["fetch"] < off["fetch"] * 0.6
    assert message["poll"] < off["poll"] * 0.5
    assert connection["poll"] < off["poll"] * 0.5
