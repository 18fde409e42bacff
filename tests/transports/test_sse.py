"""What only Server-Sent Events does: headers, framing, heartbeats, the end of a stream."""

from __future__ import annotations

import json

import aiohttp

from realtime_lab.protocol.sse import SSEDecoder
from tests.conftest import RunningServer, StartServer
from tests.transports.collect import longpoll, publish, raw_get, sse, start_chat, until_count


async def finished_chat(server: RunningServer, session: aiohttp.ClientSession) -> list[dict]:
    chat = await start_chat(session, server.url, "frame me", seed=5, max_tokens=12)
    return await longpoll(session, server.url, chat["channel"])


async def test_headers_and_exact_framing(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    events = await finished_chat(server, session)
    channel = events[0]["channel"]

    got = await raw_get(server.port, f"/sse/{channel}")

    assert got.status == 200
    assert got.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert got.headers["cache-control"] == "no-cache"
    assert got.headers["x-accel-buffering"] == "no"
    assert got.headers["transfer-encoding"] == "chunked"
    body = got.body.decode()
    # The reconnection time comes first, in the first event's block (a block of its own would be
    # an empty event to httpx-sse and openai's decoder).
    assert body.startswith("retry: 1000\n")
    blocks = body[len("retry: 1000\n") :].split("\n\n")
    assert blocks.pop() == ""  # the body ends with a complete block
    assert len(blocks) == len(events)
    for block, event in zip(blocks, events, strict=True):
        lines = block.split("\n")
        if event["type"] == "token":
            # Unnamed, so an EventSource's onmessage gets it.
            assert lines[0] == f"id: {event['id']}"
            assert len(lines) == 2
        else:
            assert lines[0] == f"event: {event['type']}"
            assert lines[1] == f"id: {event['id']}"
            assert len(lines) == 3
        assert lines[-1].startswith("data: ")
        assert json.loads(lines[-1][len("data: ") :]) == event


async def test_reset_is_a_named_event(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(history=3)
    events = await finished_chat(server, session)
    # The end's id, not the count read: with 3 events kept, a reader of a 2 ms/token chat may
    # itself have been reset on the way.
    epoch, last = events[-1]["id"].split("-")

    got = await raw_get(server.port, f"/sse/{events[-1]['channel']}?after={epoch}-1")

    messages = SSEDecoder().feed(got.body)
    assert [m.event for m in messages] == ["reset", "message", "message", "end"]
    assert messages[0].id == f"{epoch}-{int(last) - 3}"
    assert json.loads(messages[0].data)["type"] == "reset"


async def test_heartbeat_comment_arrives(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(heartbeat=0.2)
    decoder = SSEDecoder()
    raw = b""
    async with session.get(
        f"{server.url}/sse/quiet", timeout=aiohttp.ClientTimeout(total=15)
    ) as resp:
        assert resp.status == 200
        # Nothing is published on this channel: only heartbeats can arrive.
        async for chunk in resp.content.iter_any():
            raw += chunk
            decoder.feed(chunk)
            if decoder.comments >= 2:
                break
    # Before the first event the pings are lines of the block retry: opened (no empty event).
    assert raw == b"retry: 1000\n" + b": ping\n" * decoder.comments


async def test_stream_closes_after_end_and_reconnect_gets_204(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    chat = await start_chat(session, server.url, "close me", seed=1, max_tokens=15)
    live = await sse(session, server.url, chat["channel"])
    assert live.closed_by_server
    end = live.events[-1]
    assert end["type"] == "end"
    assert live.decoder.last_event_id == end["id"]
    assert live.decoder.retry == 1000

    # What an EventSource does next: reconnect with Last-Event-ID; 204 tells it to stop.
    again = await sse(session, server.url, chat["channel"], last_event_id=end["id"])
    assert again.status == 204
    via_query = await sse(session, server.url, chat["channel"], after=end["id"])
    assert via_query.status == 204
    # The id before the end still resumes normally.
    before_end = live.events[-2]["id"]
    rest = await sse(session, server.url, chat["channel"], last_event_id=before_end)
    assert rest.status == 200
    assert rest.events == [end]


async def test_header_wins_over_query(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    events = await finished_chat(server, session)
    channel = events[0]["channel"]
    got = await sse(
        session, server.url, channel, after=events[1]["id"], last_event_id=events[-3]["id"]
    )
    assert got.events == events[-2:]


async def test_application_events_are_named_by_their_type(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    sent = await publish(session, server.url, "room.named", "chat.message", {"text": "hi"})
    got = await sse(session, server.url, "room.named", stop=until_count(1), read_to_eof=False)
    (message,) = got.messages
    assert message.event == "chat.message"
    assert message.id == sent["id"]
    assert json.loads(message.data) == sent
