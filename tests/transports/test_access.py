"""Who may read and publish what, tried the way an attacker would, on every transport."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from realtime_lab.auth import TokenAuthority
from tests.conftest import RunningServer, StartServer

SECRET = "s" * 40
AUTHORITY = TokenAuthority(SECRET)


def bearer(user: str, *scopes: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + AUTHORITY.mint(user, scopes)}


ALICE, BOB = bearer("alice"), bearer("bob")
PUBLISHER, ADMIN = bearer("app", "publish"), bearer("ops", "admin")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe: keep cookies set by an IP-address host (127.0.0.1), as a browser does.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        yield client


@pytest.fixture
async def secured(start_server: StartServer) -> RunningServer:
    return await start_server(auth_secret=SECRET, chaos=True, max_streams_per_client=3)


async def status_of(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with session.request(method, url, **kwargs) as resp:
        body = await resp.json() if resp.content_type == "application/json" else {}
        return resp.status, body


async def alice_chat(session: aiohttp.ClientSession, server: RunningServer) -> str:
    async with session.post(
        f"{server.url}/api/chats", json={"prompt": "hi", "max_tokens": 5}, headers=ALICE
    ) as resp:
        assert resp.status == 201
        return str((await resp.json())["id"])


STREAM_PATHS = ("/poll/{ch}", "/longpoll/{ch}?timeout=0", "/sse/{ch}")


async def test_no_credential_is_401_everywhere_but_the_public_parts(
    secured: RunningServer, session: aiohttp.ClientSession
) -> None:
    url = secured.url
    for method, path in [
        ("POST", "/api/chats"),
        ("GET", "/api/stats"),
        ("GET", "/api/config"),
        ("POST", "/api/channels/user.42/events"),
        ("POST", "/api/tickets"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/poll/news"),
        ("GET", "/sse/news"),
    ]:
        status, body = await status_of(session, method, url + path, json={})
        assert status == 401, (method, path, status)
        assert body["error"]["code"] == "unauthenticated"
    # Public: health, the dashboard page, and the ticker.
    for path in ("/api/health", "/", "/poll/ticker", "/api/session"):
        async with session.get(url + path) as resp:
            assert resp.status == 200, path


async def test_bad_tokens_are_401_with_a_reason(
    secured: RunningServer, session: aiohttp.ClientSession
) -> None:
    expired = TokenAuthority(SECRET).mint("alice", ttl=1)
    forged = TokenAuthority("x" * 40).mint("alice")
    cases = {
        "Bearer " + forged: "invalid-token",
        "Bearer nonsense": "invalid-token",
        "Basic YWxpY2U6cHc=": "invalid-token",
        "Bearer " + expired.rsplit(".", 1)[0] + ".AAAA": "invalid-token",
    }
    for header, code in cases.items():
        status, body = await status_of(
            session, "GET", f"{secured.url}/api/stats", headers={"Authorization": header}
        )
        assert (status, body["error"]["code"]) == (401, code), header


async def test_publishing_needs_the_publish_scope(
    secured: RunningServer, session: aiohttp.ClientSession
) -> None:
    event = {"type": "note", "data": {"x": 1}}
    url = f"{secured.url}/api/channels/user.42/events"
    assert (await status_of(session, "POST", url, json=event, headers=ALICE))[0] == 403
    assert (await status_of(session, "POST", url, json=event, headers=PUBLISHER))[0] == 201
    push = f"{secured.url}/api/users/42/events"
    assert (await status_of(session, "POST", push, json=event, headers=ALICE))[0] == 403
    status, body = await status_of(session, "POST", push, json=event, headers=PUBLISHER)
    assert status == 201
    assert body["channel"] == "user.42"


async def test_a_chat_is_its_owners_on_every_transport(
    secured: RunningServer, session: aiohttp.ClientSession
) -> None:
    chat = await alice_chat(session, secured)
    channel = f"chat.{chat}"
    for path in STREAM_PATHS:
        url = secured.url + path.format(ch=channel)
        async with session.get(url, headers=BOB) as resp:
            assert resp.status == 403, path
            assert (await resp.json())["error"]["code"] == "forbidden"
        async with session.get(url, headers=ALICE) as resp:
            assert resp.status == 200, path
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(f"{secured.ws_url}/ws/{channel}", headers=BOB)
    assert refused.value.status == 403
    for method in ("GET", "DELETE"):
        status, _ = await status_of(session, method, f"{secured.url}/api/chats/{chat}", headers=BOB)
        assert status == 403
    status, _ = await status_of(session, "GET", f"{secured.url}/api/chats/{chat}", headers=ALICE)
    assert status == 200


async def test_websocket_cancel_of_someone_elses_chat_is_refused(
    secured: RunningServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{secured.url}/api/chats",
        json={"prompt": "a long one", "max_tokens": 200, "token_ms": 50},
        headers=ALICE,
    ) as resp:
        chat = (await resp.json())["id"]
    # Bob, with the admin scope taken away, cannot open Alice's chat, so he cannot cancel it:
    # his socket is refused at the handshake (above). Here: Alice's own socket may cancel.
    async with session.ws_connect(f"{secured.ws_url}/ws/chat.{chat}", headers=ALICE) as sock:
        await sock.send_json({"type": "cancel"})
        async with asyncio.timeout(10):
            async for message in sock:
                envelope = message.json()
                if envelope["type"] == "end":
                    assert envelope["data"]["reason"] == "cancelled"
                    break


async def test_user_channels_are_read_by_their_user_only(
    secured: RunningServer, session: aiohttp.ClientSession
) -> None:
    for path in STREAM_PATHS:
        url = secured.url + path.format(ch="user.alice")
        async with session.get(url, headers=BOB) as resp:
            assert resp.status == 403, path
        async with session.get(url, headers=ALICE) as resp:
            assert resp.status == 200, path


async def test_admin_side_needs_the_admin_scope(
    secured: RunningServer, session: aiohttp.ClientSession
) -> None:
    for method, path, body in [
        ("PATCH", "/api/config", {"ticker_rate": 1000}),
        ("POST", "/api/chaos/drop", {"transport": "all"}),
        ("GET", "/metrics", None),
    ]:
        url = secured.url + path
        assert (await status_of(session, method, url, json=body, headers=ALICE))[0] == 403
        assert (await status_of(session, method, url, json=body, headers=ADMIN))[0] == 200


async def test_tickets_are_single_use_and_bound_to_their_channel(
    secured: RunningServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    chat = await alice_chat(session, secured)
    status, issued = await status_of(
        session,
        "POST",
        f"{secured.url}/api/tickets",
        json={"channel": f"chat.{chat}"},
        headers=ALICE,
    )
    assert status == 201
    assert issued["expires_in"] == 30
    ticket = issued["ticket"]
    url = f"{secured.url}/poll/chat.{chat}?ticket={ticket}"
    async with session.get(url) as resp:
        assert resp.status == 200
    async with session.get(url) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "ticket-used"
    status, other = await status_of(
        session, "POST", f"{secured.url}/api/tickets", json={"channel": "ticker"}, headers=ALICE
    )
    async with session.get(f"{secured.url}/sse/chat.{chat}?ticket={other['ticket']}") as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "ticket-wrong-channel"
    # Bob cannot get a ticket for Alice's chat.
    status, _ = await status_of(
        session, "POST", f"{secured.url}/api/tickets", json={"channel": f"chat.{chat}"}, headers=BOB
    )
    assert status == 403
    # Tokens and tickets never appear in the log.
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert ticket not in logged
    assert other["ticket"] not in logged
    assert ALICE["Authorization"].split()[1] not in logged


async def test_session_cookie_serves_eventsource_and_is_cleared(
    secured: RunningServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{secured.url}/api/session", headers=ALICE) as resp:
        assert resp.status == 200
        cookie = resp.cookies["rtl_session"]
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Lax"
        assert cookie["path"] == "/"
        assert not cookie["secure"]  # plain HTTP, and no trusted proxy said otherwise
        assert int(cookie["max-age"]) > 3000
    # The session cookie alone now opens streams (what EventSource sends).
    async with session.get(f"{secured.url}/sse/user.alice") as resp:
        assert resp.status == 200
    _, who = await status_of(session, "GET", f"{secured.url}/api/session")
    assert who["user"] == "alice"
    async with session.delete(f"{secured.url}/api/session") as resp:
        assert resp.status == 200
    session.cookie_jar.clear()
    async with session.get(f"{secured.url}/sse/user.alice") as resp:
        assert resp.status == 401


async def test_secure_cookie_only_behind_a_trusted_proxy(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(auth_secret=SECRET, trusted_proxies="127.0.0.1")
    headers = {**ALICE, "X-Forwarded-Proto": "https"}
    async with session.post(f"{server.url}/api/session", headers=headers) as resp:
        assert resp.cookies["rtl_session"]["secure"] is True
    untrusting = await start_server(auth_secret=SECRET)
    async with session.post(f"{untrusting.url}/api/session", headers=headers) as resp:
        assert not resp.cookies["rtl_session"]["secure"]


async def test_websocket_from_a_foreign_origin_is_refused_before_the_upgrade(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(allowed_origins="https://app.example")
    url = f"{server.ws_url}/ws/ticker"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(url, headers={"Origin": "https://evil.example"})
    assert refused.value.status == 403
    for origin in ("https://app.example", server.url):
        sock = await session.ws_connect(url, headers={"Origin": origin})
        await sock.close()


async def test_cors_answers_allowed_origins_only(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(allowed_origins="https://app.example")
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "Authorization, Last-Event-ID",
    }
    async with session.options(f"{server.url}/sse/ticker", headers=preflight) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
        allowed = resp.headers["Access-Control-Allow-Headers"].lower()
        assert "authorization" in allowed
        assert "last-event-id" in allowed
    async with session.get(
        f"{server.url}/poll/ticker", headers={"Origin": "https://app.example"}
    ) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
        assert "Origin" in resp.headers.getall("Vary")
    async with session.get(
        f"{server.url}/poll/ticker", headers={"Origin": "https://evil.example"}
    ) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_unknown_host_is_421_and_urls_use_the_allowed_host(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    for path in ("/api/stats", "/sse/ticker", "/poll/ticker"):
        async with session.get(server.url + path, headers={"Host": "evil.example"}) as resp:
            assert resp.status == 421, path
    async with session.post(
        f"{server.url}/api/chats",
        json={"prompt": "hi"},
        headers={"Host": f"localhost:{server.port}"},
    ) as resp:
        urls = (await resp.json())["urls"]
        assert urls["sse"].startswith(f"http://localhost:{server.port}/")


async def test_open_streams_are_capped_per_client_and_counted(
    secured: RunningServer, session: aiohttp.ClientSession
) -> None:
    streams = []
    for _ in range(3):
        resp = await session.get(f"{secured.url}/sse/user.alice", headers=ALICE)
        assert resp.status == 200
        streams.append(resp)
    async with session.get(f"{secured.url}/sse/user.alice", headers=ALICE) as resp:
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) >= 1
        assert (await resp.json())["error"]["code"] == "too-many-streams"
    sock = await session.ws_connect(f"{secured.ws_url}/ws/user.alice", headers=ALICE)
    message = await sock.receive()
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert sock.close_code == 1013
    assert (message.extra or "").startswith("too-many-streams:")
    # Bob is another client: he is not counted with Alice.
    async with session.get(f"{secured.url}/poll/user.bob", headers=BOB) as resp:
        assert resp.status == 200
    for resp in streams:
        resp.close()
    async with session.get(f"{secured.url}/metrics", headers=ADMIN) as resp:
        text = await resp.text()
    assert 'realtime_lab_refusals_total{kind="streams-per-client"} 2.0' in text


async def test_junk_websocket_messages_close_the_socket_with_1008(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    sock = await session.ws_connect(f"{server.ws_url}/ws/ticker")
    errors = 0
    for _ in range(50):
        if sock.closed:
            break
        await sock.send_str("not json")
    async with asyncio.timeout(5):
        async for message in sock:
            if message.type == aiohttp.WSMsgType.TEXT:
                errors += 1
    assert sock.close_code == 1008
    assert errors == 9  # the first nine are answered; the tenth closes


async def test_a_changed_heartbeat_takes_effect_at_once(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(heartbeat=300)
    async with session.get(f"{server.url}/sse/ticker") as resp:
        async with asyncio.timeout(3):
            assert await resp.content.readline() == b"retry: 1000\n"
        async with session.patch(f"{server.url}/api/config", json={"heartbeat": 0.2}) as patch:
            assert patch.status == 200
        async with asyncio.timeout(3):  # not 300 s
            # (a ping line: no event has ended the block retry: opened yet)
            assert await resp.content.readline() == b": ping\n"


async def test_a_push_to_a_user_reaches_every_open_stream_of_theirs(
    secured: RunningServer, session: aiohttp.ClientSession
) -> None:
    sse_resp = await session.get(f"{secured.url}/sse/user.alice?after=now", headers=ALICE)
    sock = await session.ws_connect(f"{secured.ws_url}/ws/user.alice?after=now", headers=ALICE)
    info = f"{secured.url}/api/channels/user.alice"
    async with asyncio.timeout(5):
        while (await status_of(session, "GET", info, headers=ALICE))[1].get("subscribers") != 2:
            await asyncio.sleep(0)  # polling the condition, with the deadline above
    waiting = asyncio.ensure_future(
        status_of(session, "GET", f"{secured.url}/longpoll/user.alice?after=now", headers=ALICE)
    )
    async with asyncio.timeout(5):
        while (await status_of(session, "GET", info, headers=ALICE))[1].get("subscribers") != 3:
            await asyncio.sleep(0)  # polling the condition, with the deadline above
    push = {"type": "notice", "data": {"text": "hi alice"}}
    status, pushed = await status_of(
        session, "POST", f"{secured.url}/api/users/alice/events", json=push, headers=PUBLISHER
    )
    assert status == 201
    async with asyncio.timeout(5):
        block = (await sse_resp.content.readuntil(b"\n\n")).decode()
        while pushed["id"] not in block:
            block = (await sse_resp.content.readuntil(b"\n\n")).decode()
        assert '"hi alice"' in block
        assert (await sock.receive_json())["id"] == pushed["id"]
        status, polled = await waiting
    assert [e["id"] for e in polled["events"]] == [pushed["id"]]
    sse_resp.close()
    await sock.close()


async def test_every_stream_ends_with_one_outcome_counted_per_transport(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(chaos=True)
    async with session.post(f"{server.url}/api/chats", json={"prompt": "hi", "max_tokens": 3}) as r:
        chat = (await r.json())["id"]
    async with session.get(f"{server.url}/sse/chat.{chat}") as resp:
        await resp.read()  # to the end of the chat: done
    cut = await session.get(f"{server.url}/sse/ticker")
    async with session.post(f"{server.url}/api/chaos/drop", json={"transport": "sse"}) as r:
        assert (await r.json())["dropped"] == 1
    cut.close()
    async with session.get(f"{server.url}/longpoll/ticker?after=now&timeout=0.05") as resp:
        assert resp.status == 200

    async def outcomes() -> dict[tuple[str, str], float]:
        async with session.get(f"{server.url}/metrics") as resp:
            text = await resp.text()
        found = {}
        for line in text.splitlines():
            if line.startswith("realtime_lab_stream_outcomes_total{"):
                labels, value = line.split("} ")
                transport = labels.split('transport="')[1].split('"')[0]
                outcome = labels.split('outcome="')[1].split('"')[0]
                found[(transport, outcome)] = float(value)
        return found

    async with asyncio.timeout(5):
        while (await outcomes()).get(("sse", "client-gone")) != 1:
            await asyncio.sleep(0)  # polling the condition, with the deadline above
    counted = await outcomes()
    assert counted[("sse", "done")] == 1
    assert counted[("longpoll", "timeout")] == 1
    assert sum(v for (t, _), v in counted.items() if t == "sse") == 2  # exactly one each


def test_with_auth_off_the_admin_side_answers_loopback_only() -> None:
    from aiohttp.test_utils import make_mocked_request

    from realtime_lab.auth import MemoryTicketStore
    from realtime_lab.config import Settings
    from realtime_lab.transports.access import Access, Need
    from realtime_lab.transports.problems import HTTPProblem

    access = Access(Settings(), MemoryTicketStore())

    def request(peer: str) -> Any:
        transport = type("T", (), {"get_extra_info": lambda self, name, default=None: (peer, 1)})
        return make_mocked_request(
            "PATCH", "/api/config", headers={"Host": "127.0.0.1:8080"}, transport=transport()
        )

    assert access.require(request("127.0.0.1"), Need.ADMIN) is None
    assert access.require(request("::1"), Need.ADMIN) is None
    with pytest.raises(HTTPProblem) as refused:
        access.require(request("192.0.2.7"), Need.ADMIN)
    assert refused.value.status == 403
    # The rest of the open lab stays open from anywhere it can be reached.
    assert access.require(request("192.0.2.7"), Need.PUBLISH) is None
