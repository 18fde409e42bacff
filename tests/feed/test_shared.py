"""Chats across processes: read, inspect and cancel a chat from any process of a shared bus; a
dead generator's chats end with ``error`` within the lease.

Two apps on one private Redis (or Redis Cluster) stand for two server processes; the death of a
generator is a real ``realtime-lab serve`` subprocess killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from typing import Any

import aiohttp
import pytest

from realtime_lab.auth import TokenAuthority
from realtime_lab.bus import create_bus
from realtime_lab.bus.chatstore import LEASE_RENEW_S, LEASE_TTL_S
from realtime_lab.protocol.envelope import END, TOKEN, Event
from realtime_lab.transports.keys import BUS_KEY, CHATS_KEY
from tests.bus.conftest import cluster_url, redis_cluster  # noqa: F401 - fixtures
from tests.clients.helpers import serve_process
from tests.conftest import RunningServer, StartServer

pytestmark = pytest.mark.redis

SECRET = "a test secret that is at least 32 bytes long"
AUTHORITY = TokenAuthority(SECRET)
ALICE = AUTHORITY.mint("alice")
BOB = AUTHORITY.mint("bob")
WAIT = 15.0  # generous: two shared cores
#: A dead generator's chats end within its lease plus one renewal of the watcher (and slack).
ORPHAN_BOUND_S = LEASE_TTL_S + LEASE_RENEW_S + 2.0


@pytest.fixture(params=["redis", "cluster"])
def shared_url(request: pytest.FixtureRequest) -> str:
    """A bus URL two apps share: a private Redis or a private Redis Cluster."""
    name = "cluster_url" if request.param == "cluster" else "redis_url"
    return str(request.getfixturevalue(name))


async def two(start_server: StartServer, url: str, **settings: Any) -> tuple[RunningServer, ...]:
    return (await start_server(bus=url, **settings), await start_server(bus=url, **settings))


async def call(
    method: str, url: str, *, token: str | None = None, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, headers=headers, **kwargs) as response,
    ):
        return response.status, await response.json()


async def until_end(server: RunningServer, channel: str, timeout: float = WAIT) -> list[Event]:
    """Every event of ``channel`` as ``server``'s bus delivers it, up to its ``end``."""
    events: list[Event] = []
    async with asyncio.timeout(timeout), server.app[BUS_KEY].subscribe(channel) as sub:
        async for event in sub:
            events.append(event)
            if event.type == END:
                return events
    raise AssertionError("the subscription stopped before the end")


async def first_token(server: RunningServer, channel: str) -> None:
    async with asyncio.timeout(WAIT), server.app[BUS_KEY].subscribe(channel) as sub:
        async for event in sub:
            if event.type == TOKEN:
                return


async def test_a_chat_is_read_and_cancelled_from_another_process(
    start_server: StartServer, shared_url: str
) -> None:
    a, b = await two(start_server, shared_url)
    status, chat = await call(
        "POST",
        a.url + "/api/chats",
        json={"prompt": "far away", "token_ms": 300, "max_tokens": 2000},
    )
    assert status == 201
    # At once, before its first token: B finds the chat A generates.
    status, seen = await call("GET", f"{b.url}/api/chats/{chat['id']}")
    assert status == 200, seen
    assert (seen["status"], seen["prompt"], seen["process"]) == (
        "running",
        "far away",
        a.app[CHATS_KEY].process,
    )
    await first_token(b, chat["channel"])
    reader = asyncio.create_task(until_end(b, chat["channel"]))
    status, seen = await call("GET", f"{b.url}/api/chats/{chat['id']}")
    assert seen["tokens"] >= 1
    assert seen["text"]

    status, cancelled = await call("DELETE", f"{b.url}/api/chats/{chat['id']}")
    assert status == 200
    assert cancelled["status"] == "cancelled"
    generated = a.app[CHATS_KEY].get(chat["id"])
    assert generated.status == "cancelled"
    events = await reader
    assert events[-1].data["reason"] == "cancelled"
    # The text B rebuilds from the channel is the text A generated.
    status, seen = await call("GET", f"{b.url}/api/chats/{chat['id']}")
    assert (seen["text"], seen["tokens"]) == (generated.text, len(generated.parts))
    assert seen["finished"] is not None


async def test_a_finished_chat_reads_the_same_on_every_process(
    start_server: StartServer, redis_url: str
) -> None:
    a, b = await two(start_server, redis_url)
    _, chat = await call("POST", a.url + "/api/chats", json={"prompt": "short", "max_tokens": 8})
    done = a.app[CHATS_KEY].get(chat["id"]).done
    assert done is not None
    await asyncio.wait_for(done, WAIT)
    status, there = await call("GET", f"{b.url}/api/chats/{chat['id']}")
    _, here = await call("GET", f"{a.url}/api/chats/{chat['id']}")
    assert status == 200
    for key in ("status", "text", "tokens", "prompt", "seed", "process", "channel"):
        assert there[key] == here[key], key
    assert there["status"] == "done"
    status, _ = await call("GET", f"{b.url}/api/chats/nosuchchat")
    assert status == 404


async def test_websocket_cancel_reaches_the_generating_process(
    start_server: StartServer, shared_url: str
) -> None:
    a, b = await two(start_server, shared_url)
    _, chat = await call(
        "POST", a.url + "/api/chats", json={"prompt": "ws", "token_ms": 300, "max_tokens": 2000}
    )
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{b.ws_url}/ws/{chat['channel']}") as ws,
    ):
        async with asyncio.timeout(WAIT):
            cancelled = False
            async for message in ws:
                event = json.loads(message.data)
                if event["type"] == TOKEN and not cancelled:
                    await ws.send_json({"type": "cancel"})
                    cancelled = True
                if event["type"] == END:
                    break
    assert event["data"]["reason"] == "cancelled"
    assert a.app[CHATS_KEY].get(chat["id"]).status == "cancelled"


async def test_owners_tickets_and_sessions_hold_on_every_process(
    start_server: StartServer, redis_url: str
) -> None:
    a, b = await two(start_server, redis_url, auth_secret=SECRET)
    status, chat = await call(
        "POST",
        a.url + "/api/chats",
        token=ALICE,
        json={"prompt": "mine", "token_ms": 300, "max_tokens": 2000},
    )
    assert status == 201
    chat_url = f"{b.url}/api/chats/{chat['id']}"
    assert (await call("GET", chat_url, token=BOB))[0] == 403
    assert (await call("DELETE", chat_url, token=BOB))[0] == 403
    status, seen = await call("GET", chat_url, token=ALICE)
    assert (status, seen["status"]) == (200, "running")
    # Bob may not read alice's chat on B either (the stream's access check).
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{b.url}/poll/{chat['channel']}", headers={"Authorization": f"Bearer {BOB}"}
        ) as response:
            assert response.status == 403
        # A ticket issued by A opens the stream on B, once.
        status, ticket = await call(
            "POST", a.url + "/api/tickets", token=ALICE, json={"channel": chat["channel"]}
        )
        assert status == 201
        poll = f"{b.url}/poll/{chat['channel']}?ticket={ticket['ticket']}"
        async with http.get(poll) as response:
            assert response.status == 200
        async with http.get(poll) as response:
            assert response.status == 401  # spent
        # A session cookie set by A is valid on B.
        async with http.post(
            a.url + "/api/session", headers={"Authorization": f"Bearer {ALICE}"}
        ) as response:
            assert response.status == 200
            cookie = response.cookies["rtl_session"].value
    async with aiohttp.ClientSession(cookies={"rtl_session": cookie}) as http:
        async with http.get(b.url + "/api/session") as response:
            assert (await response.json())["user"] == "alice"
        async with http.delete(chat_url) as response:
            assert response.status == 200
            assert (await response.json())["status"] == "cancelled"


async def test_a_dead_generators_chat_ends_once_with_error(shared_url: str) -> None:
    """The store's step, on both backends: a lease that passed, two watchers, one ``end``."""
    generator = create_bus(shared_url)
    watchers = [create_bus(shared_url), create_bus(shared_url)]
    for bus in (generator, *watchers):
        await bus.start()
    try:
        store = generator.broker.chat_store()
        assert store is not None
        channel, chat_id, dead = "chat.c0ffee", "c0ffee", uuid.uuid4().hex[:12]
        await generator.declare(channel, epoch=chat_id)
        record = {"id": chat_id, "status": "running", "process": dead, "prompt": "p"}
        await store.put(chat_id, record, 60, process=dead, running=True)
        for index in range(3):
            await generator.publish(channel, TOKEN, {"text": "x", "index": index})
        await store.renew(dead, -1.0)  # a lease that has passed, never renewed again
        stores = [w.broker.chat_store() for w in watchers]
        assert stores[0] is not None
        assert stores[1] is not None
        renewal = await stores[0].renew("watcher", LEASE_TTL_S)
        assert dead in renewal.dead
        assert await store.orphans(dead) == [chat_id]
        ended = await asyncio.gather(*(s.end_orphan(chat_id, dead) for s in stores))
        assert sorted(ended) == [False, True]  # once
        replay = await watchers[1].replay(channel, None)
        assert [e.type for e in replay.events] == [TOKEN] * 3 + [END]
        assert replay.events[-1].data == {"reason": "error", "tokens": 3}
        assert replay.events[-1].id == f"{chat_id}-4"
        assert (await stores[1].get(chat_id) or {})["status"] == "error"
        await stores[0].forget(dead, [chat_id])
        assert dead not in (await stores[1].renew("watcher", LEASE_TTL_S)).dead
        # A chat that ended by itself is never ended again.
        assert not await stores[0].end_orphan(chat_id, dead)
    finally:
        for bus in (generator, *watchers):
            await bus.close()


async def test_a_renewal_says_which_watched_processes_are_gone(shared_url: str) -> None:
    """Streams' holders are checked in the renewal: a passed lease and no lease are gone."""
    bus = create_bus(shared_url)
    await bus.start()
    try:
        store = bus.broker.chat_store()
        assert store is not None
        alive, passed, never = (uuid.uuid4().hex[:12] for _ in range(3))
        await store.renew(alive, LEASE_TTL_S)
        await store.renew(passed, -1.0)
        renewal = await store.renew("watcher", LEASE_TTL_S, [alive, passed, never])
        assert sorted(renewal.gone) == sorted([passed, never])
        assert passed in renewal.dead  # and still listed apart, for its chats' orphan ends
        assert never not in renewal.dead
        assert (await store.renew("watcher", LEASE_TTL_S)).gone == []
        await store.leave(alive)  # a clean shutdown drops the lease: gone too
        assert (await store.renew("watcher", LEASE_TTL_S, [alive])).gone == [alive]
    finally:
        await bus.close()


async def test_killing_the_generator_ends_its_chat_with_error_on_the_other_process(
    start_server: StartServer, redis_url: str
) -> None:
    reader_side = await start_server(bus=redis_url)
    with serve_process({**os.environ, "REALTIME_LAB_BUS": redis_url}) as (url, process):
        status, chat = await call(
            "POST",
            url + "/api/chats",
            json={"prompt": "doomed", "token_ms": 300, "max_tokens": 5000},
        )
        assert status == 201
        await first_token(reader_side, chat["channel"])
        reader = asyncio.create_task(until_end(reader_side, chat["channel"], timeout=30))
        await asyncio.sleep(0)  # let the reader attach before the kill
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        events = await reader
        took = time.monotonic() - killed
    assert events[-1].type == END
    assert events[-1].data["reason"] == "error"
    assert [e.type for e in events].count(END) == 1
    assert took < ORPHAN_BOUND_S, f"the end came {took:.1f} s after the kill"
    status, seen = await call("GET", f"{reader_side.url}/api/chats/{chat['id']}")
    assert (status, seen["status"]) == (200, "error")
    assert seen["tokens"] == events[-1].data["tokens"] >= 1


async def test_a_process_whose_lease_passed_stops_the_chats_others_ended(
    start_server: StartServer, redis_url: str
) -> None:
    a, b = await two(start_server, redis_url)
    _, chat = await call(
        "POST",
        a.url + "/api/chats",
        json={"prompt": "stalled", "token_ms": 300, "max_tokens": 2000},
    )
    await first_token(b, chat["channel"])
    sharing_a, sharing_b = a.app[CHATS_KEY].sharing, b.app[CHATS_KEY].sharing
    assert sharing_a is not None
    assert sharing_b is not None
    # B ends it as it would a dead process's; A then learns its lease had passed.
    assert await sharing_b.store.end_orphan(chat["id"], sharing_a.process)
    await sharing_a._check_own()
    generated = a.app[CHATS_KEY].get(chat["id"])
    assert generated.done is not None
    await asyncio.wait_for(generated.done, WAIT)
    assert generated.status == "error"
    replay = await b.app[BUS_KEY].replay(chat["channel"], None)
    ends = [e for e in replay.events if e.type == END]
    assert [e.data["reason"] for e in ends] == ["error"]  # one end: A published none
    status, seen = await call("GET", f"{a.url}/api/chats/{chat['id']}")
    assert (status, seen["status"]) == (200, "error")
