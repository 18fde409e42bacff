"""The ``/v1`` API driven by the official ``openai`` package, sync and async.

The sync client (``openai.OpenAI``) blocks, so it runs in a thread (``asyncio.to_thread``) while
the test's event loop serves it; the async one (``openai.AsyncOpenAI``) runs in the loop. Both
are built with ``max_retries=0``: a test sees every error as it was answered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import openai
import pytest

from realtime_lab import openai_api
from realtime_lab.auth.tokens import TokenAuthority
from realtime_lab.errors import LimitReached
from realtime_lab.feed import chats as chats_module
from realtime_lab.feed.chats import Chat
from realtime_lab.feed.llm import answer_text, answer_tokens
from realtime_lab.openai_api import MODEL_ID, StopScanner
from realtime_lab.openai_errors import error_type
from realtime_lab.transports.keys import CHATS_KEY
from tests.conftest import RunningServer, StartServer
from tests.transports.collect import running, wait_for

PROMPT, SEED = "Summarise SSE", 6
#: The whole simulated answer for PROMPT and SEED, and its length in tokens.
FULL = answer_tokens(PROMPT, SEED, max_tokens=5000)
N = len(FULL)
USER = [{"role": "user", "content": PROMPT}]
TIMEOUT = 20.0


def sync_client(server: RunningServer, api_key: str = "test") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT
    )


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="test", max_retries=0, timeout=TIMEOUT
    ) as value:
        yield value


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as value:
        yield value


def record_chats(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> list[Chat]:
    """Every chat ``server`` starts from now on, in order (to act on the one a request made)."""
    registry = server.app[CHATS_KEY]
    chats: list[Chat] = []
    start = registry.start

    def spy(*args: Any, **kwargs: Any) -> Chat:
        chat = start(*args, **kwargs)
        chats.append(chat)
        return chat

    monkeypatch.setattr(registry, "start", spy)
    return chats


def error_of(exc: openai.APIError) -> dict[str, Any]:
    """The error object the client parsed, checked to have exactly OpenAI's four fields."""
    assert isinstance(exc.body, dict)
    assert set(exc.body) == {"message", "type", "param", "code"}
    assert exc.body["message"] in exc.message
    return exc.body


async def read_deltas(
    stream: Any, pieces: list[str], then: Callable[[Any], None] | None = None
) -> None:
    """Read a stream's content deltas into ``pieces``, calling ``then(chunk)`` after each."""
    async for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        if then is not None:
            then(chunk)


# Models -----------------------------------------------------------------------------------------


async def test_models_list_and_retrieve(server: RunningServer, client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [m.id for m in page.data] == [MODEL_ID]
    model = await client.models.retrieve(MODEL_ID)
    assert (model.id, model.object, model.owned_by) == (MODEL_ID, "model", "realtime-lab")
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("gpt-nope")
    body = error_of(caught.value)
    assert (body["type"], body["code"], body["param"]) == (
        "not_found_error",
        "model_not_found",
        "model",
    )

    def in_thread() -> list[str]:
        with sync_client(server) as sync:
            assert sync.models.retrieve(MODEL_ID).id == MODEL_ID
            return [m.id for m in sync.models.list()]

    assert await asyncio.to_thread(in_thread) == [MODEL_ID]


# Answers ----------------------------------------------------------------------------------------


async def test_async_stream_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        seed=SEED,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert len({c.id for c in chunks}) == 1
    assert all(c.model == "gpt-4o-mini" and c.object == "chat.completion.chunk" for c in chunks)
    *answer, last = chunks
    assert answer[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in answer) == "".join(FULL)
    assert [c.choices[0].finish_reason for c in answer] == [None] * (len(answer) - 1) + ["stop"]
    assert all(c.usage is None for c in answer)
    # The usage chunk: no choices, the counts.
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, N)
    assert last.usage.total_tokens == 2 + N


async def test_sync_stream_and_non_stream(server: RunningServer) -> None:
    def in_thread() -> tuple[str, str | None, Any, Any]:
        with sync_client(server) as sync:
            stream = sync.chat.completions.create(
                model="m",
                messages=USER,
                seed=SEED,
                stream=True,
            )
            text, finish = "", None
            for chunk in stream:
                assert chunk.usage is None  # no include_usage, no usage chunk
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            whole = sync.chat.completions.create(model="m", messages=USER, seed=SEED)
            return text, finish, whole, stream.response.headers

    text, finish, whole, headers = await asyncio.to_thread(in_thread)
    assert (text, finish) == ("".join(FULL), "stop")
    assert headers["content-type"].startswith("text/event-stream")
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == "".join(FULL)
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == N


async def test_async_non_stream(client: openai.AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(model="m", messages=USER, seed=SEED + 1)
    expected = answer_tokens(PROMPT, SEED + 1, max_tokens=5000)
    assert whole.choices[0].message.content == "".join(expected)
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (2, len(expected))


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_length_when_the_limit_cuts_the_answer(
    client: openai.AsyncOpenAI, field: str
) -> None:
    cut = await client.chat.completions.create(
        model="m", messages=USER, seed=SEED, **{field: N - 1}
    )
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content == "".join(FULL[: N - 1])
    assert cut.usage is not None
    assert cut.usage.completion_tokens == N - 1
    # A limit the answer just fits in does not cut it: the model stopped by itself.
    exact = await client.chat.completions.create(model="m", messages=USER, seed=SEED, **{field: N})
    assert exact.choices[0].finish_reason == "stop"
    assert exact.choices[0].message.content == "".join(FULL)

    stream = await client.chat.completions.create(
        model="m", messages=USER, seed=SEED, stream=True, **{field: 10}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(FULL[:10])


async def test_the_server_setting_bounds_a_request_without_a_limit(
    start_server: StartServer,
) -> None:
    server = await start_server(max_tokens=5)
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="k", max_retries=0, timeout=TIMEOUT
    ) as client:
        cut = await client.chat.completions.create(model="m", messages=USER, seed=SEED)
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content == "".join(FULL[:5])


def _stop_case() -> tuple[list[str], str, int]:
    """Stop sequences for FULL (one spans two tokens, one never occurs), the text before the
    first occurrence, and how many tokens had been generated when it completed."""
    text = "".join(FULL)
    at = len("".join(FULL[:6])) - 2  # the last 2 characters of token 5 and the start of token 6
    spanning = text[at : at + 4]
    later = text[len("".join(FULL[:12])) :][:5]  # occurs later: the earliest one wins
    assert text.find(spanning) == at
    assert text.find(later) > at
    generated = next(k for k in range(N) if len("".join(FULL[:k])) >= at + len(spanning))
    return [later, "\x00never", spanning], text[:at], generated


async def test_stop_cuts_before_the_first_occurrence(
    server: RunningServer, client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = record_chats(server, monkeypatch)
    stops, expected, generated = _stop_case()
    whole = await client.chat.completions.create(model="m", messages=USER, seed=SEED, stop=stops)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == generated
    # The generation was stopped there, not run to the end.
    chat = started[-1]
    await wait_for(lambda: chat.status != "running")
    assert chat.status == "cancelled"
    assert len(chat.parts) < N

    stream = await client.chat.completions.create(
        model="m", messages=USER, seed=SEED, stop=stops[-1], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("stops", "pieces", "sent", "stopped"),
    [
        pytest.param(["cd"], ["ab", "c", "de"], ["ab", "", ""], True, id="spans-pieces"),
        pytest.param(["cx"], ["ab", "c", "de"], ["ab", "", "cde", ""], False, id="false-start"),
        pytest.param(["aab"], ["aa", "ab"], ["", "a"], True, id="overlapping-prefix"),
        pytest.param(["xyz"], ["ab", "xy"], ["ab", "", "xy"], False, id="flushed-at-end"),
        pytest.param(["b", "abc"], ["ab"], ["a"], True, id="first-completed-wins"),
    ],
)
def test_stop_scanner(stops: list[str], pieces: list[str], sent: list[str], stopped: bool) -> None:
    scanner = StopScanner(stops)
    out: list[str] = []
    hit = False
    for piece in pieces:
        text, hit = scanner.feed(piece)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(scanner.flush())
    # "sent": what each feed released, then (when no stop was reached) what flush released.
    assert (out, hit) == (sent, stopped)


async def test_content_arrays_and_null_assistant_content(client: openai.AsyncOpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": None},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Summarise"}, {"type": "text", "text": "SSE"}],
        },
    ]
    whole = await client.chat.completions.create(model="m", messages=messages, seed=SEED)
    assert whole.choices[0].message.content == answer_text("Summarise\nSSE", SEED, max_tokens=5000)
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == 2 + 2 + 0 + 2


# Errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        pytest.param({"messages": []}, "messages", "invalid_parameter", id="no-messages"),
        pytest.param(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "look"},
                            {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                        ],
                    }
                ]
            },
            "messages[0].content[1].type",
            "unsupported_content",
            id="image-part",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": None}]},
            "messages[0].content",
            "invalid_parameter",
            id="null-user-content",
        ),
        pytest.param(
            {"messages": [{"role": "wizard", "content": "hi"}]},
            "messages[0].role",
            "invalid_parameter",
            id="unknown-role",
        ),
        pytest.param({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_parameter", id="stop-5"),
        pytest.param({"max_tokens": 0}, "max_tokens", "invalid_parameter", id="max-tokens-0"),
        pytest.param(
            {"max_completion_tokens": 5001},
            "max_completion_tokens",
            "invalid_parameter",
            id="max-completion-tokens-high",
        ),
        pytest.param({"seed": 1.5}, "seed", "invalid_parameter", id="seed-float"),
        pytest.param({"n": 2}, "n", "invalid_parameter", id="n-2"),
        pytest.param(
            {"stream_options": {"include_usage": True}},
            "stream_options",
            "invalid_parameter",
            id="stream-options-without-stream",
        ),
    ],
)
async def test_bad_requests_raise_bad_request_error(
    client: openai.AsyncOpenAI, change: dict[str, Any], param: str, code: str
) -> None:
    request: dict[str, Any] = {"model": "m", "messages": USER, **change}
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(**request)
    exc = caught.value
    assert (exc.status_code, exc.type, exc.param, exc.code) == (
        400,
        "invalid_request_error",
        param,
        code,
    )
    assert error_of(exc)["param"] == param


async def test_sync_client_raises_bad_request_error_too(server: RunningServer) -> None:
    def in_thread() -> openai.BadRequestError:
        with sync_client(server) as sync, pytest.raises(openai.BadRequestError) as caught:
            sync.chat.completions.create(model="m", messages=[], seed=1)
        return caught.value

    exc = await asyncio.to_thread(in_thread)
    assert (exc.type, exc.param) == ("invalid_request_error", "messages")


async def _raw(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, dict[str, Any], str]:
    async with session.request(method, url, **kwargs) as resp:
        return resp.status, await resp.json(), resp.content_type


async def test_every_v1_error_has_openai_shape(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(max_body=1024)
    v1 = f"{server.url}/v1"
    cases: list[tuple[str, str, dict[str, Any], int, str, str | None]] = [
        ("GET", f"{v1}/nowhere", {}, 404, "not_found_error", "unknown_url"),
        ("GET", f"{v1}", {}, 404, "not_found_error", "unknown_url"),
        ("GET", f"{v1}/chat/completions", {}, 405, "invalid_request_error", "method_not_allowed"),
        (
            "POST",
            f"{v1}/chat/completions",
            {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_request_error",
            "invalid_json",
        ),
        (
            "POST",
            f"{v1}/chat/completions",
            {"data": b"{}", "headers": {"Content-Type": "text/plain"}},
            415,
            "invalid_request_error",
            "unsupported_media_type",
        ),
        (
            "POST",
            f"{v1}/chat/completions",
            {"json": {"messages": USER, "pad": "x" * 2000}},
            413,
            "invalid_request_error",
            "body_too_large",
        ),
        ("GET", f"{v1}/models/a/b", {}, 404, "not_found_error", "model_not_found"),
    ]
    for method, url, kwargs, status, kind, code in cases:
        got, body, content_type = await _raw(session, method, url, **kwargs)
        assert (got, content_type) == (status, "application/json"), (method, url, body)
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert (body["error"]["type"], body["error"]["code"]) == (kind, code), (method, url)
        assert body["error"]["message"]
    # 405 keeps its Allow header.
    async with session.get(f"{v1}/chat/completions") as resp:
        assert resp.headers["Allow"] == "POST"
    # The rest of the API keeps its own shape.
    got, body, _ = await _raw(session, "GET", f"{server.url}/api/nowhere")
    assert got == 404
    assert set(body["error"]) == {"code", "message"}


async def test_a_bad_api_key_raises_authentication_error(start_server: StartServer) -> None:
    secret = "s" * 32
    server = await start_server(auth_secret=secret)
    token = TokenAuthority(secret).mint("ada")
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="not-a-token", max_retries=0, timeout=TIMEOUT
    ) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.models.list()
    assert error_of(caught.value)["type"] == "authentication_error"
    # The api_key is the server's bearer token.
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key=token, max_retries=0, timeout=TIMEOUT
    ) as client:
        assert [m.id async for m in client.models.list()] == [MODEL_ID]


async def test_a_chat_limit_raises_rate_limit_error(
    client: openai.AsyncOpenAI, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Chat:
        raise LimitReached("you run as many chats as you may", "too-many-chats", 429, 2.5)

    monkeypatch.setattr(server.app[CHATS_KEY], "start", refuse)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="m", messages=USER)
    body = error_of(caught.value)
    assert (body["type"], body["code"]) == ("rate_limit_error", "too_many_chats")
    assert caught.value.response.headers["Retry-After"] == "3"  # kept, for the client's backoff


async def test_a_crash_is_a_server_error(
    client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(openai_api, "parse_request", crash)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="m", messages=USER)
    assert caught.value.status_code == 500
    assert error_of(caught.value)["type"] == "server_error"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (409, "conflict_error"),
        (413, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (503, "server_error"),
    ],
)
def test_error_type_follows_the_status(status: int, kind: str) -> None:
    assert error_type(status) == kind


# How an answer ends when it does not complete ---------------------------------------------------


async def test_closing_an_async_stream_cancels_the_generation(
    start_server: StartServer,
) -> None:
    server = await start_server(token_ms=20.0)
    async with (
        openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="k", max_retries=0, timeout=TIMEOUT
        ) as client,
        aiohttp.ClientSession() as session,
    ):
        stream = await client.chat.completions.create(
            model="m", messages=USER, seed=SEED, stream=True
        )
        seen = 0
        async for chunk in stream:
            seen += bool(chunk.choices[0].delta.content)
            if seen == 3:
                break
        await stream.close()
        chat_id = chunk.id.removeprefix("chatcmpl-")

        async def state() -> dict[str, Any] | None:
            async with session.get(f"{server.url}/api/chats/{chat_id}") as resp:
                value: dict[str, Any] = await resp.json()
            return value if value["status"] != "running" else None

        final = await wait_for(state, timeout=TIMEOUT)
    assert final["status"] == "cancelled"
    assert 3 <= final["tokens"] < N


async def test_closing_a_sync_stream_cancels_the_generation(start_server: StartServer) -> None:
    server = await start_server(token_ms=20.0)
    registry = server.app[CHATS_KEY]

    def in_thread() -> str:
        with sync_client(server) as sync:
            stream = sync.chat.completions.create(model="m", messages=USER, seed=SEED, stream=True)
            with stream:
                for chunk in stream:
                    if chunk.choices[0].delta.content:
                        break
            return chunk.id.removeprefix("chatcmpl-")

    chat = registry.get(await asyncio.to_thread(in_thread))
    await wait_for(lambda: chat.status != "running", timeout=TIMEOUT)
    assert chat.status == "cancelled"
    assert len(chat.parts) < N


async def test_hanging_up_on_a_non_stream_request_cancels_the_generation(
    start_server: StartServer, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(token_ms=20.0)
    chats = record_chats(server, monkeypatch)
    body = {"model": "m", "messages": USER, "seed": SEED}
    async with running(_raw(session, "POST", f"{server.url}/v1/chat/completions", json=body)):
        await wait_for(lambda: chats and chats[0].parts, timeout=TIMEOUT)
    # Leaving the block cancelled the request: the client hung up.
    await wait_for(lambda: chats[0].status != "running", timeout=TIMEOUT)
    assert chats[0].status == "cancelled"


@pytest.fixture
async def slow_client(
    start_server: StartServer,
) -> AsyncIterator[tuple[RunningServer, openai.AsyncOpenAI]]:
    server = await start_server(token_ms=20.0)
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="k", max_retries=0, timeout=TIMEOUT
    ) as client:
        yield server, client


async def test_a_chat_cancelled_elsewhere_raises_api_error(
    slow_client: tuple[RunningServer, openai.AsyncOpenAI],
) -> None:
    server, client = slow_client
    registry = server.app[CHATS_KEY]
    stream = await client.chat.completions.create(model="m", messages=USER, seed=SEED, stream=True)
    pieces: list[str] = []

    def cancel_once(chunk: Any) -> None:
        chat = registry.get(chunk.id.removeprefix("chatcmpl-"))
        if "".join(pieces) and chat.status == "running":
            registry.cancel(chat.id)  # as DELETE /api/chats/{id} does

    with pytest.raises(openai.APIError) as caught:
        await read_deltas(stream, pieces, cancel_once)
    text = "".join(pieces)
    exc = caught.value
    assert not isinstance(exc, openai.APIStatusError)  # the stream had started: in-band
    assert (exc.type, exc.code) == ("server_error", "generation_cancelled")
    assert error_of(exc)["code"] == "generation_cancelled"
    assert text
    assert "".join(FULL).startswith(text)
    assert text != "".join(FULL)


async def test_a_non_stream_chat_cancelled_elsewhere_is_a_503(
    slow_client: tuple[RunningServer, openai.AsyncOpenAI], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, client = slow_client
    registry = server.app[CHATS_KEY]
    chats = record_chats(server, monkeypatch)
    async with running(client.chat.completions.create(model="m", messages=USER)) as request:
        await wait_for(lambda: chats and chats[0].parts, timeout=TIMEOUT)
        registry.cancel(chats[0].id)
        with pytest.raises(openai.InternalServerError) as caught:
            await request
    exc = caught.value
    assert (exc.status_code, exc.type, exc.code) == (503, "server_error", "generation_cancelled")


def _failing_plan(*args: Any, **kwargs: Any) -> Iterator[tuple[str, float]]:
    yield "Half", 0.0
    raise RuntimeError("the simulated model broke")


async def test_a_failed_generation_raises_api_error(
    client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chats_module.SimulatedSource, "plan", _failing_plan)
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
    pieces: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        await read_deltas(stream, pieces)
    assert "".join(pieces) == "Half"
    assert (caught.value.type, caught.value.code) == ("server_error", "generation_failed")

    with pytest.raises(openai.InternalServerError) as status_error:
        await client.chat.completions.create(model="m", messages=USER)
    assert (status_error.value.status_code, status_error.value.code) == (500, "generation_failed")


# Framing ----------------------------------------------------------------------------------------


async def test_stream_is_framed_with_lf_like_the_rest(
    server: RunningServer, session: aiohttp.ClientSession
) -> None:
    body = {"model": "m", "messages": USER, "seed": SEED, "stream": True}
    async with session.post(f"{server.url}/v1/chat/completions", json=body) as resp:
        raw = await resp.read()
    assert b"\r" not in raw
    # What a fetch reader does: split on blank lines, one "data: " line per block.
    blocks = raw.decode().split("\n\n")
    assert blocks.pop() == ""
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks)
    assert blocks[-1] == "data: [DONE]"
    deltas = [json.loads(b[len("data: ") :])["choices"][0]["delta"] for b in blocks[:-1]]
    assert "".join(d.get("content", "") for d in deltas) == "".join(FULL)
