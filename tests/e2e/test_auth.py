"""Auth on (``--auth-secret``) in a real Chromium: the dashboard's "sign in as" box and its panes'
refusals, the session cookie under ``EventSource``, and the browser's own policy across origins.

Cookies are per host, not per port: pages served by a second aiohttp server on other ports of
127.0.0.1 share the server's ``rtl_session`` cookie, and SameSite=Lax counts them as the same
site, so the cookie goes with their requests. What keeps a disallowed origin out is CORS (no
``Access-Control-Allow-Origin``: the browser keeps the stream from the page) and the WebSocket
Origin check (403 at the handshake).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from realtime_lab.auth import TokenAuthority
from realtime_lab.feed.llm import answer_text, answer_tokens
from realtime_lab.transports.keys import CHATS_KEY
from tests.conftest import RunningServer, StartServer
from tests.e2e.conftest import PANES, WAIT_MS, Dashboard, OpenDashboard
from tests.e2e.test_dashboard import assert_all_panes_intact, dump, expect

pytestmark = pytest.mark.e2e

SECRET = "an-e2e-secret-that-is-long-enough-for-hs256"
AUTHORITY = TokenAuthority(SECRET)
ALICE = AUTHORITY.mint("alice", ttl=3600)
BOB = AUTHORITY.mint("bob", ttl=3600)
CHAT = {"prompt": "Who may read this stream", "seed": 4, "max_tokens": 30}
# The panes that hold a stream (the short poll holds none).
STREAMS = ("longpoll", "sse", "ws", "fetch")
BLANK = "<!doctype html><meta charset='utf-8'><title>another origin</title><p>another origin"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create_chat(server: RunningServer, token: str, **params: Any) -> dict[str, Any]:
    """``POST /api/chats`` as the token's user; the 201 answer."""
    body = {**CHAT, "token_ms": 5, "ttft_ms": 20, **params}
    async with (
        aiohttp.ClientSession(headers=bearer(token)) as session,
        session.post(f"{server.url}/api/chats", json=body) as resp,
    ):
        assert resp.status == 201, await resp.text()
        chat: dict[str, Any] = await resp.json()
        return chat


async def follow(dash: Dashboard, chat: dict[str, Any]) -> None:
    """Have every pane of the page stream ``chat`` (a channel the page did not create; the fetch
    pane, which has no parameters to POST, follows it with ``Last-Event-ID: <id>-0``)."""
    await dash.page.evaluate(
        "chat => window.lab.app.begin('chat', chat.channel, {chat})",
        {"id": chat["id"], "channel": chat["channel"]},
    )


async def wait_all_ended(dash: Dashboard) -> None:
    await dash.page.wait_for_function(
        "() => window.lab.panes.every(p => p.ended !== null)", timeout=WAIT_MS
    )


async def pane_ends(dash: Dashboard) -> dict[str, str | None]:
    ends: dict[str, str | None] = await dash.page.evaluate(
        "() => Object.fromEntries(window.lab.panes.map(p => [p.key, p.ended]))"
    )
    return ends


async def run_status(dash: Dashboard) -> str:
    return (await dash.page.text_content("#run-status") or "").strip()


async def session_cookies(context: Any) -> list[dict[str, Any]]:
    cookies: list[dict[str, Any]] = await context.cookies()
    return [cookie for cookie in cookies if cookie["name"] == "rtl_session"]


# The dashboard -----------------------------------------------------------------------------------


async def test_dashboard_shows_401_before_sign_in_then_streams_as_the_user(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    server = await start_server(auth_secret=SECRET)
    dash = await open_dashboard(server)
    assert await dash.page.get_attribute("body", "data-session") == "out"
    assert await dash.page.text_content("#session-status") == "not signed in"
    assert await dash.page.is_visible("#session-token")
    assert await dash.page.is_hidden("#sign-out")

    # Signed out, the page cannot start a chat: it says so instead of streaming nothing.
    await dash.page.click("#send")
    await dash.page.wait_for_function(
        "() => document.getElementById('run-status').textContent === "
        "'401: sign in to start a chat'",
        timeout=WAIT_MS,
    )
    # Nor read anyone's chat: every pane ends on "401: sign in", not hanging, not "error".
    await follow(dash, await create_chat(server, ALICE))
    await wait_all_ended(dash)
    assert await pane_ends(dash) == dict.fromkeys(PANES, "unauthenticated")
    for key in PANES:
        assert await dash.note(key) == "401: sign in", key
        assert await dash.pane_text(key) == ""
    assert await run_status(dash) == "401: sign in to stream this channel"
    await dash.screenshot("auth-401-panes")

    # A token the server did not sign is refused, and the box says why.
    await dash.page.fill("#session-token", AUTHORITY.mint("alice")[:-4] + "AAAA")
    await dash.page.click("#sign-in")
    await dash.page.wait_for_function(
        "() => document.getElementById('session-note').textContent === "
        "'401: not a valid token for this server'",
        timeout=WAIT_MS,
    )
    assert await dash.page.get_attribute("body", "data-session") == "out"
    assert await session_cookies(dash.page.context) == []

    await dash.sign_in(ALICE)
    assert await dash.page.text_content("#session-status") == "signed in as alice"
    assert await dash.page.input_value("#session-token") == "", "the page kept the token"
    assert await dash.page.is_hidden("#session-token")
    assert await dash.page.is_visible("#sign-out")
    [cookie] = await session_cookies(dash.page.context)
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Lax", "/")
    # No script reads the session: it is HttpOnly.
    assert "rtl_session" not in await dash.page.evaluate("() => document.cookie")

    prompt, seed, max_tokens = "Stream this as alice", 1, 40
    expected, tokens = expect(prompt, seed, max_tokens)
    await dash.start_chat(prompt, seed=seed, max_tokens=max_tokens, token_ms=30, ttft_ms=60)
    summary = await dash.wait_finished()
    await assert_all_panes_intact(dash, summary, expected, tokens)
    chat_id = await dash.page.evaluate("() => window.lab.app.run.chat.id")
    assert server.app[CHATS_KEY].get(chat_id).owner == "alice"
    # The fetch pane's POST carried the cookie too: its own chat is alice's.
    fetch_chat = await dash.pane_value("fetch", "chatId")
    assert fetch_chat != chat_id
    assert server.app[CHATS_KEY].get(fetch_chat).owner == "alice"
    for key in PANES:
        # Signed in, the server's figures are the page's again.
        assert summary["panes"][key]["requests_server"] is not None, dump(summary)
    assert await run_status(dash) == "done: all five panes finished"
    shot = await dash.screenshot("auth-signed-in")
    assert shot.stat().st_size > 10_000
    # Chromium reports the refused requests on the console itself; nothing else may.
    assert dash.errors(allow_network=True) == []


async def test_another_users_chat_is_403_and_sign_out_clears_the_cookie(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    server = await start_server(auth_secret=SECRET)
    chat = await create_chat(server, ALICE, token_ms=40, max_tokens=60)
    dash = await open_dashboard(server)
    await dash.sign_in(BOB)
    await follow(dash, chat)
    await wait_all_ended(dash)
    assert await pane_ends(dash) == dict.fromkeys(PANES, "forbidden")
    for key in PANES:
        assert await dash.note(key) == "403: not yours", key
        assert await dash.pane_text(key) == ""
    assert await run_status(dash) == "403: this channel is not yours"

    # Signing out ends what the page streams and clears the cookie.
    await dash.page.check("#ticker")  # the public ticker: open streams to stop
    await dash.page.click("#sign-out")
    await dash.page.wait_for_selector("body[data-session=out]", state="attached", timeout=WAIT_MS)
    assert await dash.page.text_content("#session-note") == "signed out"
    assert await session_cookies(dash.page.context) == []
    assert await dash.page.evaluate("() => window.lab.panes.every(p => !p.active)")
    assert not await dash.page.is_checked("#ticker")
    assert dash.errors(allow_network=True) == []


async def test_panes_wait_out_429_and_then_stream_every_token(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    server = await start_server(auth_secret=SECRET, max_streams_per_client=len(STREAMS))
    dash = await open_dashboard(server)
    await dash.sign_in(ALICE)
    prompt, seed, max_tokens = "Wait your turn", 2, 30
    expected, tokens = expect(prompt, seed, max_tokens)
    async with aiohttp.ClientSession(headers=bearer(ALICE)) as http, AsyncExitStack() as held:
        # Alice holds all four of her streams elsewhere: the page's SSE, WebSocket, long poll
        # and fetch stream are each refused (the short poll holds no stream).
        for _ in range(len(STREAMS)):
            resp = await held.enter_async_context(http.get(f"{server.url}/sse/ticker"))
            assert resp.status == 200
        await dash.start_chat(prompt, seed=seed, max_tokens=max_tokens, token_ms=5, ttft_ms=20)
        wanted = "429: too many streams, retrying in 5 s"
        for key in STREAMS:
            await dash.page.wait_for_function(
                "([key, text]) => document.querySelector(`#pane-${key} [data-role=note]`)"
                ".textContent === text",
                arg=[key, wanted],
                timeout=WAIT_MS,
            )
            assert await dash.page.get_attribute(f"#pane-{key}", "data-state") == "reconnecting"
        await dash.screenshot("auth-429-panes")
    # The streams elsewhere are closed: after Retry-After every pane gets its slot and resumes.
    summary = await dash.wait_finished()
    await assert_all_panes_intact(dash, summary, expected, tokens)
    for key in STREAMS:
        assert summary["panes"][key]["failures"] >= 1, dump(summary)
    assert summary["panes"]["poll"]["failures"] == 0, dump(summary)
    assert dash.errors(allow_network=True) == []


# EventSource with the session cookie --------------------------------------------------------------


@pytest.fixture
async def context(browser: Any) -> AsyncIterator[Any]:
    """A fresh browser context (its own cookie jar), closed after the test."""
    ctx = await browser.new_context()
    try:
        yield ctx
    finally:
        await ctx.close()


# Runs in a page: sign in with a bearer token (the answer sets the cookie), start a chat, and
# read it with `new EventSource(url, init)` to its end. `api` is "" on the server's own origin.
EVENTSOURCE = """
async ([api, token, chat, init]) => {
  const credentials = api ? "include" : "same-origin";
  const signIn = await fetch(api + "/api/session", {
    method: "POST", credentials, headers: {Authorization: "Bearer " + token},
  });
  if (!signIn.ok) throw new Error("sign-in: HTTP " + signIn.status);
  const created = await fetch(api + "/api/chats", {
    method: "POST", credentials,
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(chat),
  });
  if (created.status !== 201) throw new Error("chat: HTTP " + created.status);
  const {id, channel} = await created.json();
  return await new Promise((resolve) => {
    const got = {id, channel, texts: [], indexes: [], ends: [], errors: 0, opens: 0};
    const es = new EventSource(api + "/sse/" + channel, init);
    es.onopen = () => { got.opens += 1; };
    es.onmessage = (m) => {
      const event = JSON.parse(m.data);
      got.texts.push(event.data.text);
      got.indexes.push(event.data.index);
    };
    es.addEventListener("end", () => { got.ends.push(true); es.close(); resolve(got); });
    es.onerror = () => {
      got.errors += 1;
      if (es.readyState === EventSource.CLOSED) resolve(got);
    };
  });
}
"""

# Runs in a page: open `new EventSource(url, init)` and report what happened: messages, and the
# readyState at the first error (CLOSED: the browser gave up for good).
REFUSED_EVENTSOURCE = """
([url, init]) => new Promise((resolve) => {
  const got = {messages: 0, opens: 0, errorState: null};
  const es = new EventSource(url, init);
  es.onopen = () => { got.opens += 1; };
  es.onmessage = () => { got.messages += 1; };
  es.onerror = () => {
    got.errorState = es.readyState;
    es.close();
    resolve(got);
  };
})
"""

# Runs in a page: open a WebSocket and report whether it opened, what came and how it closed.
WEBSOCKET = """
(url) => new Promise((resolve) => {
  const got = {opened: false, messages: [], errors: 0, code: null};
  const ws = new WebSocket(url);
  ws.onopen = () => { got.opened = true; };
  ws.onmessage = (m) => got.messages.push(JSON.parse(m.data));
  ws.onerror = () => { got.errors += 1; };
  ws.onclose = (event) => { got.code = event.code; resolve(got); };
})
"""


def assert_whole_answer(got: dict[str, Any], chat: dict[str, Any]) -> None:
    prompt, seed, max_tokens = chat["prompt"], chat["seed"], chat["max_tokens"]
    expected = answer_tokens(prompt, seed, max_tokens=max_tokens)
    assert got["indexes"] == list(range(len(expected))), got
    assert "".join(got["texts"]) == answer_text(prompt, seed, max_tokens=max_tokens)
    assert got["ends"] == [True], got


async def test_eventsource_on_the_servers_origin_streams_with_the_session_cookie(
    start_server: StartServer, context: Any
) -> None:
    server = await start_server(auth_secret=SECRET)
    page = await context.new_page()

    async def fulfill(route: Any) -> None:
        await route.fulfill(status=200, content_type="text/html", body=BLANK)

    await page.route(server.url + "/auth-test.html", fulfill)
    await page.goto(server.url + "/auth-test.html")
    chat = {**CHAT, "token_ms": 5, "ttft_ms": 20}
    got = await page.evaluate(EVENTSOURCE, ["", ALICE, chat, {}])
    assert_whole_answer(got, chat)
    assert (got["opens"], got["errors"]) == (1, 0), got
    assert server.app[CHATS_KEY].get(got["id"]).owner == "alice"

    # The cookie is what let it in: without it the same stream is refused (401).
    await page.evaluate("() => fetch('/api/session', {method: 'DELETE'})")
    assert await session_cookies(context) == []
    refused = await page.evaluate(REFUSED_EVENTSOURCE, [f"/sse/{got['channel']}", {}])
    assert refused == {"messages": 0, "opens": 0, "errorState": 2}, refused


# Other origins: a second aiohttp server's pages ---------------------------------------------------


@dataclass
class Origins:
    """Pages served on two more ports of 127.0.0.1: one origin allowed, one not."""

    allowed: str
    other: str


@pytest.fixture
async def origins() -> AsyncIterator[Origins]:
    """One tiny aiohttp app serving a blank page on two ports (two origins)."""
    app = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=BLANK, content_type="text/html")

    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    ports = []
    for _ in range(2):
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        ports.append(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
    try:
        yield Origins(f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}")
    finally:
        await asyncio.wait_for(runner.cleanup(), timeout=15)


async def test_an_allowed_origin_reads_sse_and_ws_with_the_shared_cookie(
    start_server: StartServer, context: Any, origins: Origins
) -> None:
    server = await start_server(auth_secret=SECRET, allowed_origins=origins.allowed)
    page = await context.new_page()
    await page.goto(origins.allowed + "/")
    chat = {**CHAT, "token_ms": 5, "ttft_ms": 20}
    got = await page.evaluate(EVENTSOURCE, [server.url, ALICE, chat, {"withCredentials": True}])
    assert_whole_answer(got, chat)
    assert (got["opens"], got["errors"]) == (1, 0), got
    assert server.app[CHATS_KEY].get(got["id"]).owner == "alice"
    # The credentialed cross-origin answer set the cookie for the host, shared by its ports.
    [cookie] = await session_cookies(context)
    assert (cookie["domain"], cookie["httpOnly"], cookie["sameSite"]) == ("127.0.0.1", True, "Lax")

    # A WebSocket from the allowed origin carries the cookie too, and streams the same chat.
    ws = await page.evaluate(WEBSOCKET, f"{server.ws_url}/ws/{got['channel']}")
    assert ws["opened"], ws
    assert ws["code"] == 1000, ws
    tokens = [m["data"]["text"] for m in ws["messages"] if m["type"] == "token"]
    assert "".join(tokens) == answer_text(chat["prompt"], chat["seed"], max_tokens=30)


async def test_a_disallowed_origin_is_refused_on_sse_and_websocket(
    start_server: StartServer, context: Any, origins: Origins
) -> None:
    server = await start_server(auth_secret=SECRET, allowed_origins=origins.allowed)
    chat = await create_chat(server, ALICE)
    # The browser holds a valid session for the host (set from the allowed origin's page), and
    # SameSite=Lax sends it from the other port too: only the Origin policy stands in the way.
    signer = await context.new_page()
    await signer.goto(origins.allowed + "/")
    status = await signer.evaluate(
        "([api, token]) => fetch(api + '/api/session', {method: 'POST', credentials: 'include',"
        " headers: {Authorization: 'Bearer ' + token}}).then(r => r.status)",
        [server.url, ALICE],
    )
    assert status == 200
    assert len(await session_cookies(context)) == 1

    page = await context.new_page()
    await page.goto(origins.other + "/")
    sse_url = f"{server.url}/sse/{chat['channel']}"
    refused = await page.evaluate(REFUSED_EVENTSOURCE, [sse_url, {"withCredentials": True}])
    assert refused == {"messages": 0, "opens": 0, "errorState": 2}, refused
    ws = await page.evaluate(WEBSOCKET, f"{server.ws_url}/ws/{chat['channel']}")
    assert ws == {"opened": False, "messages": [], "errors": 1, "code": 1006}, ws

    # Why, on the wire: the stream itself is served (the cookie is valid) but without
    # Access-Control-Allow-Origin for that origin, so the browser keeps it from the page; the
    # WebSocket handshake is refused with 403 for its Origin.
    async with aiohttp.ClientSession(headers=bearer(ALICE)) as http:
        for origin, allowed in ((origins.other, False), (origins.allowed, True)):
            async with http.get(sse_url, headers={"Origin": origin}) as resp:
                assert resp.status == 200
                assert resp.headers.get("Access-Control-Allow-Origin") == (
                    origin if allowed else None
                ), dict(resp.headers)
                assert ("Access-Control-Allow-Credentials" in resp.headers) is allowed
        with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
            await http.ws_connect(f"{server.ws_url}/ws/{chat['channel']}", origin=origins.other)
        assert refusal.value.status == 403
        async with http.ws_connect(
            f"{server.ws_url}/ws/{chat['channel']}", origin=origins.allowed
        ) as sock:
            first = json.loads((await sock.receive(timeout=WAIT_MS / 1000)).data)
            assert first["type"] == "token"


async def test_with_auth_off_the_page_says_so_and_offers_no_sign_in(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    server = await start_server()
    dash = await open_dashboard(server)
    assert await dash.page.get_attribute("body", "data-session") == "off"
    assert await dash.page.text_content("#session-status") == "auth off: no sign-in needed"
    for control in ("#session-token", "#sign-in", "#sign-out"):
        assert await dash.page.is_hidden(control), control
    assert dash.errors() == []
