"""Every transport's client against a real server: delivery, stats, resume, resets, errors,
cancellation, closing, and reconnecting across a server restart."""

from __future__ import annotations

import asyncio

import pytest

from realtime_lab.clients import (
    CLIENTS,
    TRANSPORTS,
    ClientError,
    ReconnectsExhausted,
    ServerRefused,
    open_stream,
)
from realtime_lab.feed.llm import answer_text
from realtime_lab.transports.keys import BUS_KEY
from tests.clients.helpers import FAST, collect, next_event, start_chat, text_of
from tests.conftest import StartServer, free_port

PROMPT = "Explain resumable streams 可恢复的流"


def test_the_registry_covers_every_server_transport() -> None:
    from realtime_lab.transports import TRANSPORTS as SERVER_TRANSPORTS

    assert TRANSPORTS == SERVER_TRANSPORTS
    assert set(CLIENTS) == set(TRANSPORTS)
    with pytest.raises(ClientError):
        open_stream("http://127.0.0.1:1", "x", "carrier-pigeon")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_whole_chat_arrives_and_iteration_stops_after_end(
    transport: str, start_server: StartServer
) -> None:
    server = await start_server()
    chat = await start_chat(server.url, PROMPT, seed=3, max_tokens=60)
    async with open_stream(server.url, chat["channel"], transport, **FAST) as client:
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


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resume_after_an_id(transport: str, start_server: StartServer) -> None:
    server = await start_server()
    chat = await start_chat(server.url, PROMPT, seed=4, max_tokens=40)
    async with open_stream(server.url, chat["channel"], "sse") as reference:
        everything = await collect(reference)

    middle = everything[9]
    async with open_stream(
        server.url, chat["channel"], transport, after=middle.id, **FAST
    ) as client:
        rest = await collect(client)

    assert [e.id for e in rest] == [e.id for e in everything[10:]]
    assert client.stats.gaps == 0
    assert client.stats.resets == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
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


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_4xx_raises_server_refused(transport: str, start_server: StartServer) -> None:
    server = await start_server()
    client = open_stream(server.url, "chat.doesnotexist", transport, **FAST)
    async with client:
        with pytest.raises(ServerRefused) as info:
            await collect(client)
    assert info.value.status == 404
    assert isinstance(info.value, ClientError)
    assert client.stats.reconnects == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_malformed_cursor_is_refused(transport: str, start_server: StartServer) -> None:
    server = await start_server()
    async with open_stream(server.url, "news", transport, after="not a cursor", **FAST) as client:
        with pytest.raises(ServerRefused) as info:
            await collect(client)
    assert info.value.status == 400


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_gives_up_after_max_reconnects(transport: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    async with open_stream(url, "news", transport, max_reconnects=2, **FAST) as client:
        with pytest.raises(ReconnectsExhausted):
            await collect(client)
    assert client.stats.reconnects == 2
    assert client.stats.connections == 0
    assert len(client.stats.reconnect_delays_s) == 2
    assert all(0 <= d <= FAST["backoff_max"] for d in client.stats.reconnect_delays_s)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cancel_ends_the_chat(transport: str, start_server: StartServer) -> None:
    server = await start_server()
    chat = await start_chat(server.url, PROMPT, seed=6, ttft_ms=0, token_ms=100, max_tokens=200)
    async with open_stream(server.url, chat["channel"], transport, **FAST) as client:
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


async def test_cancel_refuses_a_channel_that_is_not_a_chat(start_server: StartServer) -> None:
    server = await start_server()
    async with open_stream(server.url, "news", "ws") as client:
        with pytest.raises(ClientError):
            await client.cancel()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_close_from_another_task_stops_iteration(
    transport: str, start_server: StartServer
) -> None:
    server = await start_server()
    await server.app[BUS_KEY].publish("quiet", "note", {"n": 1})
    client = open_stream(server.url, "quiet", transport, **FAST)
    async with client:
        iterator = aiter(client)
        assert (await next_event(iterator)).data == {"n": 1}
        reader = asyncio.create_task(anext(iterator, None))
        # The reader is blocked on a quiet channel (a waiting request, an open stream).
        done, _ = await asyncio.wait([reader], timeout=0.2)
        assert not done
        await client.close()
        assert await asyncio.wait_for(reader, 10) is None
    assert client.closed


@pytest.mark.parametrize("transport", TRANSPORTS)
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
