"""A real model behind the lab (``--upstream``): relayed exactly, and every upstream failure ends
the chat with an ``error`` event and ``end`` reason ``error``.

The real upstream is a second instance of this server (its ``/v1/chat/completions`` with a seed
gives a known answer); the failures come from scripted aiohttp upstreams on port 0.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from realtime_lab.errors import UpstreamError
from realtime_lab.feed.llm import answer_text
from realtime_lab.feed.upstream import (
    API_KEY_ENV,
    MAX_EVENT_BYTES,
    READ_CHUNK,
    delta_text,
    parse_retry_after,
)
from tests.conftest import StartServer, refusing_port
from tests.transports.collect import Envelope, sse, start_chat, text_of, until_count

Script = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Scripted:
    """A scripted upstream: ``url`` is its ``/v1`` base; what it was asked is recorded."""

    url: str = ""
    requests: list[tuple[dict[str, str], Any]] = field(default_factory=list)
    #: Set when a streaming answer's connection was closed by the lab (the handler cancelled).
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[Scripted]]]:
    runners: list[web.AppRunner] = []

    async def start(script: Script) -> Scripted:
        state = Scripted()

        async def handler(request: web.Request) -> web.StreamResponse:
            state.requests.append((dict(request.headers), await request.json()))
            try:
                return await script(request)
            except asyncio.CancelledError:
                state.hung_up.set()
                raise

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        state.url = f"http://127.0.0.1:{port}/v1"
        return state

    yield start
    for runner in runners:
        await asyncio.wait_for(runner.cleanup(), timeout=10)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def chunk(content: str | None = None, **delta: Any) -> bytes:
    if content is not None:
        delta["content"] = content
    body = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def stream(request: web.Request, *parts: bytes, then: str = "return") -> web.StreamResponse:
    """Answer an SSE stream of ``parts``; then return, hang (until cancelled) or reset."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for part in parts:
        await resp.write(part)
    if then == "hang":
        await asyncio.Event().wait()
    if then == "reset":
        assert request.transport is not None
        request.transport.abort()
    return resp


async def chat_events(
    session: aiohttp.ClientSession, base: str, prompt: str = "Hi there", **body: Any
) -> tuple[Envelope, list[Envelope]]:
    chat = await start_chat(session, base, prompt, **body)
    result = await sse(session, base, chat["channel"], timeout=15)
    return chat, result.events


def failure(events: list[Envelope]) -> dict[str, Any]:
    """The data of the ``error`` event right before ``end`` (reason ``error``)."""
    assert [e["type"] for e in events[-2:]] == ["error", "end"], events
    assert events[-1]["data"]["reason"] == "error"
    data: dict[str, Any] = events[-2]["data"]
    assert isinstance(data["message"], str)
    assert data["message"]
    return data


# A real upstream: a second instance of this server ------------------------------------------------


async def test_relays_a_second_server_exactly(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    upstream = await start_server()
    lab = await start_server(upstream=f"{upstream.url}/v1", upstream_model="sim-2")
    prompt = "Explain streaming tokens 流式"
    chat, events = await chat_events(session, lab.url, prompt, seed=11, max_tokens=40)

    assert text_of(events) == answer_text(prompt, 11, max_tokens=40)
    tokens = [e for e in events if e["type"] == "token"]
    assert [e["data"]["index"] for e in tokens] == list(range(len(tokens)))
    assert events[-1]["type"] == "end"
    assert events[-1]["data"]["reason"] == "done"
    async with session.get(f"{lab.url}/api/chats/{chat['id']}") as resp:
        assert (await resp.json())["text"] == answer_text(prompt, 11, max_tokens=40)
    async with session.get(f"{lab.url}/api/config") as resp:
        assert (await resp.json())["generator"] == "upstream:sim-2"
    async with session.get(f"{upstream.url}/api/config") as resp:
        assert (await resp.json())["generator"] == "simulated"


async def test_upstream_text_cannot_break_the_labs_framing(
    start_server: StartServer,
    scripted: Callable[[Script], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pieces = ["a\n\ndata: x", "\r", "event: end\r\n\r\nid: 9", " 流\x00式 "]
    # The pieces are cut mid-line and mid-character: the decoder must see them whole.
    body = b"".join([chunk("", role="assistant"), *(chunk(p) for p in pieces)])
    body += chunk(None) + b": keep-alive\n\n" + b'data: {"choices": []}\n\n' + b"data: [DONE]\n\n"

    async def script(request: web.Request) -> web.StreamResponse:
        return await stream(request, *(body[i : i + 7] for i in range(0, len(body), 7)))

    upstream = await scripted(script)
    monkeypatch.setenv(API_KEY_ENV, "sk-lab-test")
    lab = await start_server(upstream=upstream.url)
    _chat, events = await chat_events(session, lab.url, "Frame me", seed=3, max_tokens=17)

    assert [e["data"]["text"] for e in events if e["type"] == "token"] == pieces
    assert events[-1]["type"] == "end"
    assert events[-1]["data"]["reason"] == "done"
    headers, sent = upstream.requests[0]
    assert headers["Authorization"] == "Bearer sk-lab-test"
    assert sent == {
        "model": "realtime-lab-sim",
        "messages": [{"role": "user", "content": "Frame me"}],
        "stream": True,
        "max_tokens": 17,
        "seed": 3,
    }


# Failures ---------------------------------------------------------------------------------------


async def test_a_refused_connection_is_an_error_event(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    with refusing_port() as port:
        lab = await start_server(upstream=f"http://127.0.0.1:{port}/v1")
        _, events = await chat_events(session, lab.url)
    assert failure(events)["code"] == "upstream-unreachable"
    assert [e["type"] for e in events] == ["error", "end"]


async def test_a_5xx_before_the_stream_is_an_error_event(
    start_server: StartServer,
    scripted: Callable[[Script], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
) -> None:
    async def script(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "the GPU caught fire"}}, status=503)

    lab = await start_server(upstream=(await scripted(script)).url)
    _, events = await chat_events(session, lab.url)
    data = failure(events)
    assert data["code"] == "upstream-status"
    assert data["status"] == 503
    assert "the GPU caught fire" in data["message"]
    assert "retry_after" not in data


async def test_a_429_keeps_its_retry_after(
    start_server: StartServer,
    scripted: Callable[[Script], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
) -> None:
    async def script(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "7"}
        )

    lab = await start_server(upstream=(await scripted(script)).url)
    _, events = await chat_events(session, lab.url)
    data = failure(events)
    assert (data["code"], data["status"], data["retry_after"]) == ("upstream-rate-limited", 429, 7)


@pytest.mark.parametrize("then", ["return", "reset"])
async def test_a_stream_cut_before_done_is_an_error_event(
    then: str,
    start_server: StartServer,
    scripted: Callable[[Script], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
) -> None:
    async def script(request: web.Request) -> web.StreamResponse:
        return await stream(request, chunk("", role="assistant"), chunk("Hel"), then=then)

    lab = await start_server(upstream=(await scripted(script)).url)
    _, events = await chat_events(session, lab.url)
    assert failure(events)["code"] == "upstream-cut"
    assert text_of(events) == "Hel"


@pytest.mark.parametrize(
    "bad",
    [
        b"data: {nope\n\n",
        b"data: [1, 2]\n\n",
        b'data: {"choices": "x"}\n\n',
        b'data: {"choices": [{"delta": "x"}]}\n\n',
        b'data: {"choices": [{"delta": {"content": 5}}]}\n\n',
        b"data: " + b"x" * (MAX_EVENT_BYTES + READ_CHUNK + 1),  # never ends
    ],
    ids=["not-json", "not-object", "choices", "delta", "content", "too-large"],
)
async def test_an_invalid_chunk_is_an_error_event(
    bad: bytes,
    start_server: StartServer,
    scripted: Callable[[Script], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
) -> None:
    async def script(request: web.Request) -> web.StreamResponse:
        return await stream(request, chunk("ok"), bad, then="hang")

    upstream = await scripted(script)
    lab = await start_server(upstream=upstream.url)
    _, events = await chat_events(session, lab.url)
    assert failure(events)["code"] == "upstream-invalid-chunk"
    assert text_of(events) == "ok"
    await asyncio.wait_for(upstream.hung_up.wait(), timeout=5)


async def test_an_in_band_error_is_an_error_event(
    start_server: StartServer,
    scripted: Callable[[Script], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
) -> None:
    error = b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'

    async def script(request: web.Request) -> web.StreamResponse:
        return await stream(request, chunk("ok"), error)

    lab = await start_server(upstream=(await scripted(script)).url)
    _, events = await chat_events(session, lab.url)
    data = failure(events)
    assert data["code"] == "upstream-error"
    assert "overloaded" in data["message"]


async def test_no_first_token_in_time_is_an_error_event(
    start_server: StartServer,
    scripted: Callable[[Script], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
) -> None:
    async def script(request: web.Request) -> web.StreamResponse:
        # A role chunk and heartbeats are not a token: they must not stop the TTFT clock.
        return await stream(request, chunk("", role="assistant"), b": hi\n\n", then="hang")

    upstream = await scripted(script)
    lab = await start_server(
        upstream=upstream.url, upstream_ttft_timeout=0.3, upstream_idle_timeout=60.0
    )
    _, events = await chat_events(session, lab.url)
    assert failure(events)["code"] == "upstream-ttft-timeout"
    await asyncio.wait_for(upstream.hung_up.wait(), timeout=5)


async def test_silence_mid_answer_is_an_error_event(
    start_server: StartServer,
    scripted: Callable[[Script], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
) -> None:
    async def script(request: web.Request) -> web.StreamResponse:
        return await stream(request, chunk("one"), chunk(" two"), then="hang")

    upstream = await scripted(script)
    lab = await start_server(
        upstream=upstream.url, upstream_ttft_timeout=60.0, upstream_idle_timeout=0.3
    )
    _, events = await chat_events(session, lab.url)
    assert failure(events)["code"] == "upstream-idle-timeout"
    assert text_of(events) == "one two"
    await asyncio.wait_for(upstream.hung_up.wait(), timeout=5)


async def test_cancelling_a_chat_closes_the_upstream_request(
    start_server: StartServer,
    scripted: Callable[[Script], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
) -> None:
    async def script(request: web.Request) -> web.StreamResponse:
        return await stream(request, chunk("first"), then="hang")

    upstream = await scripted(script)
    lab = await start_server(upstream=upstream.url)
    chat = await start_chat(session, lab.url, "Never mind")
    first = await sse(session, lab.url, chat["channel"], stop=until_count(1), read_to_eof=False)
    assert text_of(first.events) == "first"
    assert not upstream.hung_up.is_set()

    async with session.delete(f"{lab.url}/api/chats/{chat['id']}") as resp:
        assert resp.status == 200
    await asyncio.wait_for(upstream.hung_up.wait(), timeout=5)
    rest = await sse(session, lab.url, chat["channel"], timeout=10)
    assert rest.events[-1]["type"] == "end"
    assert rest.events[-1]["data"]["reason"] == "cancelled"


# Parsing, without a loop ------------------------------------------------------------------------


def test_delta_text_reads_content_and_skips_chunks_without() -> None:
    assert delta_text('{"choices": [{"delta": {"content": "hé"}}]}') == "hé"
    assert delta_text('{"choices": [{"delta": {"role": "assistant", "content": ""}}]}') is None
    assert delta_text('{"choices": [{"delta": {}, "finish_reason": "stop"}]}') is None
    assert delta_text('{"choices": [], "usage": {"total_tokens": 3}}') is None
    with pytest.raises(UpstreamError) as caught:
        delta_text('{"object": "chat.completion.chunk"}')
    assert caught.value.code == "upstream-invalid-chunk"


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412500.0) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None
    assert parse_retry_after(None) is None


async def test_v1_through_the_relay_reports_length_only_at_the_limit(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    upstream = await start_server(token_ms=0, ttft_ms=0)
    relay = await start_server(upstream=upstream.url + "/v1")
    for max_tokens, reason in ((5, "length"), (5000, "stop")):
        body = {
            "model": "m",
            "seed": 2,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "how long is it"}],
        }
        async with session.post(relay.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["choices"][0]["finish_reason"] == reason, max_tokens
