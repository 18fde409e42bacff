"""Every transport's client against a real server: delivery, stats, resume, resets, errors,
cancellation, closing, and reconnecting across a server restart.

The fetch client streams the chat its own POST creates: where the others read a chat started
with ``POST /api/chats`` it starts one (:func:`tests.clients.helpers.chat_stream`), and where
they read an application channel (``news``) it has a case of its own.
"""

from __future__ import annotations

import asyncio

import pytest

from realtime_lab.clients import (
    CHANNEL_TRANSPORTS,
    CLIENTS,
    TRANSPORTS,
    ClientError,
    FetchClient,
    ReconnectsExhausted,
    ServerRefused,
    open_stream,
)
from realtime_lab.feed.llm import answer_text
from realtime_lab.transports.keys import BUS_KEY, CHATS_KEY
from tests.clients.helpers import (
    FAST,
    chat_stream,
    collect,
    next_event,
    rest_of,
    start_chat,
    text_of,
)
from tests.conftest import StartServer, refusing_port

PROMPT = "Explain resumable streams 可恢复的流"


def test_the_registry_covers_every_server_transport() -> None:
    from realtime_lab.transports import TRANSPORTS as SERVER_TRANSPORTS

    assert TRANSPORTS == SERVER_TRANSPORTS
    assert set(CLIENTS) == set(TRANSPORTS)
    assert set(CHANNEL_TRANSPORTS) == set(TRANSPORTS) - {"fetch"}
    with pytest.raises(ClientError):
        open_stream("http://127.0.0.1:1", "x", "carrier-pigeon")


def test_fetch_takes_a_chat_request_and_the_others_a_channel() -> None:
    url = "http://127.0.0.1:1"
    client = open_stream(url, None, "fetch", chat={"prompt": "hi"}, token="secret-token")
    assert isinstance(client, FetchClient)
    assert client.request == {"prompt": "hi"}
    assert (client.channel, client.chat, client.chat_id) == ("", None, None)
    assert "secret-token" not in repr(client)
    with pytest.raises(ClientError, match="chat="):
        open_stream(url, None, "fetch")
    with pytest.raises(ClientError, match="channel=None"):
        open_stream(url, "chat.ab12", "fetch", chat={"prompt": "hi"})
    for transport in CHANNEL_TRANSPORTS:
        with pytest.raises(ClientError, match="POST /api/chats"):
            open_stream(url, "chat.ab12", transport, chat={"prompt": "hi"})
        with pytest.raises(ClientError, match="needs a channel"):
            open_stream(url, None, transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_whole_chat_arrives_and_iteration_stops_after_end(
    transport: str, start_server: StartServer
) -> None:
    server = await start_server()
    client = await chat_stream(server.url, transport, PROMPT, seed=3, max_tokens=60, client=FAST)
    async with client:
        events = await collect(client)

    assert text_of(events) == answer_text(PROMPT, 3, max_tokens=60)
    assert events[-1].type == "end"
    assert events[-1].data["reason"] == "done"
    assert [e.type for e in events[:-1]] == ["token"] * (len(events) - 1)
    assert client.last_id == events[-1].id
    stats = client.stats
    assert stats.transport == transport
    assert stats.events == len(events)
    assert stats.requests >= 1
    assert stats.connections >= 1
    assert stats.bytes_received > sum(len(e.json) for e in events)
    assert stats.first_event_s is not None
    assert stats.first_event_s > 0
    assert len(stats.latencies_ms) == len(events)
    assert (stats.gaps, stats.duplicates, stats.resets, stats.reconnects) == (0, 0, 0, 0)
    assert stats.summary()["latency_p99_ms"] is not None
    assert all(e.channel == client.channel for e in events)
    if transport == "fetch":
        assert isinstance(client, FetchClient)
        assert client.chat is not None
        assert client.channel == f"chat.{client.chat['id']}" == client.chat["channel"]
        assert client.chat["prompt"] == PROMPT
        assert stats.requests == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resume_after_an_id(transport: str, start_server: StartServer) -> None:
    server = await start_server()
    chat = await start_chat(server.url, PROMPT, seed=4, max_tokens=40)
    async with open_stream(server.url, chat["channel"], "sse") as reference:
        everything = await collect(reference)

    middle = everything[9]
    if transport == "fetch":
        # The id names the chat: the fetch client resumes it, whoever started it.
        client = open_stream(
            server.url, None, "fetch", chat={"prompt": PROMPT}, after=middle.id, **FAST
        )
    else:
        client = open_stream(server.url, chat["channel"], transport, after=middle.id, **FAST)
    async with client:
        rest = await collect(client)

    assert [e.id for e in rest] == [e.id for e in everything[10:]]
    assert client.stats.gaps == 0
    assert client.stats.resets == 0
    assert client.channel == chat["channel"]


@pytest.mark.parametrize("transport", CHANNEL_TRANSPORTS)
async def test_a_reset_is_yielded_when_resuming_from_another_epoch(
    transport: str, start_server: StartServer
) -> None:
    server = await start_server()
    chat = await start_chat(server.url, PROMPT, seed=5, max_tokens=30)
    async with open_stream(
        server.url, chat["channel"], transport, after="zzzz-5", **FAST
    ) as client:
        events = await collect(client)

    assert events[0].type == "reset"
    assert events[0].data["reason"] == "unknown-epoch"
    assert events[0].data["requested"] == "zzzz-5"
    assert text_of(events) == answer_text(PROMPT, 5, max_tokens=30)
    assert client.stats.resets == 1
    assert client.stats.gaps == 0


async def test_fetch_resuming_an_id_of_no_chat_is_refused(start_server: StartServer) -> None:
    server = await start_server()
    client = open_stream(server.url, None, "fetch", chat={"prompt": "x"}, after="zzzz-5", **FAST)
    async with client:
        with pytest.raises(ServerRefused) as info:
            await collect(client)
    assert (info.value.status, info.value.code) == (404, "unknown-chat")
    assert server.app[CHATS_KEY].running == 0  # and no chat was started instead


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_4xx_raises_server_refused(transport: str, start_server: StartServer) -> None:
    server = await start_server()
    if transport == "fetch":
        client = open_stream(server.url, None, "fetch", chat={"prompt": ""}, **FAST)
        status = 400  # an empty prompt
    else:
        client = open_stream(server.url, "chat.doesnotexist", transport, **FAST)
        status = 404
    async with client:
        with pytest.raises(ServerRefused) as info:
            await collect(client)
    assert info.value.status == status
    assert isinstance(info.value, ClientError)
    assert client.stats.reconnects == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_malformed_cursor_is_refused(transport: str, start_server: StartServer) -> None:
    server = await start_server()
    channel = None if transport == "fetch" else "news"
    chat = {"prompt": "x"} if transport == "fetch" else None
    async with open_stream(
        server.url, channel, transport, chat=chat, after="not a cursor", **FAST
    ) as client:
        with pytest.raises(ServerRefused) as info:
            await collect(client)
    assert info.value.status == 400
    assert server.app[CHATS_KEY].running == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_gives_up_after_max_reconnects(transport: str) -> None:
    channel = None if transport == "fetch" else "news"
    chat = {"prompt": "x"} if transport == "fetch" else None
    with refusing_port() as port:
        url = f"http://127.0.0.1:{port}"  # nobody listens there
        async with open_stream(
            url, channel, transport, chat=chat, max_reconnects=2, **FAST
        ) as client:
            with pytest.raises(ReconnectsExhausted):
                await collect(client)
    assert client.stats.reconnects == 2
    assert client.stats.connections == 0
    assert len(client.stats.reconnect_delays_s) == 2
    assert all(0 <= d <= FAST["backoff_max"] for d in client.stats.reconnect_delays_s)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cancel_ends_the_chat(transport: str, start_server: StartServer) -> None:
    server = await start_server()
    client = await chat_stream(
        server.url, transport, PROMPT, seed=6, ttft_ms=0, token_ms=100, max_tokens=200, client=FAST
    )
    async with client:
        iterator = aiter(client)
        first = await next_event(iterator)
        assert first.type == "token"
        await client.cancel()
        events = [first]
        async with asyncio.timeout(20):
            async for event in iterator:
                events.append(event)
    assert events[-1].type == "end"
    assert events[-1].data["reason"] == "cancelled"
    assert len(events) < 200
    assert server.app[CHATS_KEY].running == 0


async def test_cancel_refuses_a_channel_that_is_not_a_chat(start_server: StartServer) -> None:
    server = await start_server()
    async with open_stream(server.url, "news", "ws") as client:
        with pytest.raises(ClientError):
            await client.cancel()
    # A fetch stream knows its chat once the stream named it, not before.
    async with open_stream(server.url, None, "fetch", chat={"prompt": "x"}) as fetching:
        with pytest.raises(ClientError, match="not known yet"):
            await fetching.cancel()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_close_from_another_task_stops_iteration(
    transport: str, start_server: StartServer
) -> None:
    server = await start_server()
    if transport == "fetch":
        # A first token at once, then the chat's next one 10 s later: a quiet stream.
        client = open_stream(
            server.url,
            None,
            "fetch",
            chat={"prompt": "quiet", "ttft_ms": 0, "token_ms": 10_000},
            **FAST,
        )
    else:
        await server.app[BUS_KEY].publish("quiet", "note", {"n": 1})
        client = open_stream(server.url, "quiet", transport, **FAST)
    async with client:
        iterator = aiter(client)
        first = await next_event(iterator)
        assert first.type == "token" if transport == "fetch" else first.data == {"n": 1}
        reader = asyncio.create_task(anext(iterator, None))
        # The reader is blocked on a quiet channel (a waiting request, an open stream).
        done, _ = await asyncio.wait([reader], timeout=0.2)
        assert not done
        await client.close()
        assert await asyncio.wait_for(reader, 10) is None
    assert client.closed


@pytest.mark.parametrize("transport", CHANNEL_TRANSPORTS)
async def test_reconnects_to_a_restarted_server_and_surfaces_the_reset(
    transport: str, start_server: StartServer
) -> None:
    server = await start_server()
    await server.app[BUS_KEY].publish("news", "note", {"n": 1})
    async with open_stream(server.url, "news", transport, **FAST) as client:
        iterator = aiter(client)
        first = await next_event(iterator)
        assert first.data == {"n": 1}

        await server.stop()
        # Same port, new memory bus: the channel's history (and epoch) is gone.
        restarted = await start_server(port=server.port)
        await restarted.app[BUS_KEY].publish("news", "note", {"n": 2})

        reset = await next_event(iterator)
        assert reset.type == "reset"
        assert reset.data["reason"] == "unknown-epoch"
        assert reset.data["requested"] == first.id
        second = await next_event(iterator)
        assert second.data == {"n": 2}
        await restarted.app[BUS_KEY].publish("news", "note", {"n": 3})
        assert (await next_event(iterator)).data == {"n": 3}

    stats = client.stats
    if transport in ("sse", "ws"):
        # A stream breaks; a short poll may just find the new server on its next request.
        assert stats.reconnects >= 1
        assert stats.connections >= 2
    assert stats.resets == 1
    assert stats.gaps == 0
    assert stats.events == 4


async def test_fetch_stops_loudly_when_its_chat_went_with_the_server(
    start_server: StartServer,
) -> None:
    """After a restart the chat is gone: the resume is refused (404), no new chat is started."""
    server = await start_server()
    client = open_stream(
        server.url,
        None,
        "fetch",
        chat={"prompt": PROMPT, "ttft_ms": 0, "token_ms": 50, "max_tokens": 100},
        **FAST,
    )
    async with client:
        iterator = aiter(client)
        first = await next_event(iterator)
        assert first.type == "token"
        await server.stop()
        restarted = await start_server(port=server.port)
        with pytest.raises(ServerRefused) as info:
            await rest_of(iterator)
    assert (info.value.status, info.value.code) == (404, "unknown-chat")
    assert restarted.app[CHATS_KEY].running == 0
    assert client.stats.reconnects >= 1
