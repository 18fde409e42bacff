"""The JSON API: chats, publishing application events, stats, settings, and an OpenAI-compatible
streaming endpoint.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any, Final

from aiohttp import web
from aiohttp_sse import sse_response

from realtime_lab.errors import UnknownChat
from realtime_lab.feed.chats import CHAT_PREFIX, Chat
from realtime_lab.feed.ticker import TICKER_CHANNEL
from realtime_lab.protocol.envelope import CONTROL_TYPES, TOKEN, dumps
from realtime_lab.transports.common import (
    BUS_KEY,
    CHATS_KEY,
    HUB_KEY,
    SETTINGS_KEY,
    TICKER_KEY,
    HTTPProblem,
    channel_name,
    client_tag,
    json_response,
)

EVENT_TYPE_RE: Final = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
MAX_PROMPT: Final = 4000


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body.

    Raises:
        HTTPProblem: 415 when not ``application/json``, 400 when not a JSON object; aiohttp's
            own 413 when larger than ``max_body``.
    """
    if request.content_type != "application/json":
        raise HTTPProblem(415, "unsupported-media-type", "send Content-Type: application/json")
    raw = await request.read()
    try:
        value = json.loads(raw or b"{}")
    except (ValueError, RecursionError) as exc:
        raise HTTPProblem(400, "invalid-json", f"body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise HTTPProblem(400, "invalid-json", "body must be a JSON object")
    try:
        dumps(value)  # NaN, Infinity and lone surrogates parse but could never be sent on
    except (ValueError, UnicodeEncodeError) as exc:
        raise HTTPProblem(400, "invalid-json", f"body is not strict JSON: {exc}") from exc
    return value


def _number(
    body: dict[str, Any],
    name: str,
    default: float,
    low: float,
    high: float,
    *,
    integer: bool = False,
) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise HTTPProblem(
            400, "invalid-parameter", f"{name} must be {kind} between {low:g} and {high:g}"
        )
    return float(value)


def transport_urls(request: web.Request, channel: str) -> dict[str, str]:
    """Where each transport serves ``channel``, as absolute URLs."""
    http = f"{request.scheme}://{request.host}"
    ws = ("wss" if request.scheme == "https" else "ws") + f"://{request.host}"
    return {
        "poll": f"{http}/poll/{channel}",
        "longpoll": f"{http}/longpoll/{channel}",
        "sse": f"{http}/sse/{channel}",
        "ws": f"{ws}/ws/{channel}",
    }


def _chat_json(request: web.Request, chat: Chat) -> dict[str, Any]:
    return {**chat.to_dict(), "urls": transport_urls(request, chat.channel)}


async def create_chat(request: web.Request) -> web.Response:
    """``POST /api/chats``: start a simulated generation; answer 201 with where to stream it."""
    body = await json_body(request)
    settings = request.app[SETTINGS_KEY]
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT:
        raise HTTPProblem(
            400,
            "invalid-parameter",
            f"prompt must be a non-empty string of at most {MAX_PROMPT} characters",
        )
    chat = request.app[CHATS_KEY].start(
        prompt,
        seed=int(_number(body, "seed", 0, -(2**31), 2**31, integer=True)),
        ttft_ms=_number(body, "ttft_ms", settings.ttft_ms, 0, 60_000),
        token_ms=_number(body, "token_ms", settings.token_ms, 0, 10_000),
        max_tokens=int(_number(body, "max_tokens", settings.max_tokens, 1, 5000, integer=True)),
    )
    await request.app[BUS_KEY].declare(chat.channel)
    return json_response(_chat_json(request, chat), 201, Location=f"/api/chats/{chat.id}")


def _chat(request: web.Request) -> Chat:
    try:
        return request.app[CHATS_KEY].get(request.match_info["chat_id"])
    except UnknownChat as exc:
        raise HTTPProblem(404, "unknown-chat", str(exc)) from exc


async def get_chat(request: web.Request) -> web.Response:
    """``GET /api/chats/{id}``: the chat's state and its text so far."""
    return json_response(_chat_json(request, _chat(request)))


async def cancel_chat(request: web.Request) -> web.Response:
    """``DELETE /api/chats/{id}``: cancel the generation; the stream ends with ``cancelled``."""
    chat = _chat(request)
    request.app[CHATS_KEY].cancel(chat.id)
    if chat.task is not None and not chat.task.done():
        # Wait (briefly) so the answer shows the final state.
        await asyncio.wait([chat.task], timeout=2.0)
    return json_response(_chat_json(request, chat))


async def publish_event(request: web.Request) -> web.Response:
    """``POST /api/channels/{channel}/events``: publish an application event; 201 with it."""
    channel = channel_name(request)
    if channel.startswith(CHAT_PREFIX) or channel == TICKER_CHANNEL:
        raise HTTPProblem(
            403, "reserved-channel", f"{channel!r} is fed by the server; publish to another channel"
        )
    body = await json_body(request)
    kind = body.get("type")
    if not isinstance(kind, str) or not EVENT_TYPE_RE.fullmatch(kind):
        raise HTTPProblem(400, "invalid-type", "type must match [a-z][a-z0-9_.-]{0,31}")
    if kind in CONTROL_TYPES or kind == TOKEN:
        raise HTTPProblem(
            400, "reserved-type", f"{kind!r} is reserved for the server; use an application type"
        )
    data = body.get("data", {})
    if not isinstance(data, dict):
        raise HTTPProblem(400, "invalid-data", "data must be a JSON object")
    event = await request.app[BUS_KEY].publish(channel, kind, data)
    return json_response(event.to_dict(), 201)


async def channel_info(request: web.Request) -> web.Response:
    """``GET /api/channels/{channel}``: history bounds and subscriber count."""
    channel = channel_name(request)
    info = await request.app[BUS_KEY].info(channel)
    if info is None:
        raise HTTPProblem(404, "unknown-channel", f"no events on {channel!r} yet")
    return json_response(
        {
            "channel": channel,
            "epoch": info.epoch,
            "last_id": info.last_id,
            "oldest_id": f"{info.epoch}-{info.first_seq}"
            if info.first_seq <= info.last_seq
            else None,
            "retained": max(info.last_seq - info.first_seq + 1, 0),
            "finished": info.finished,
            "subscribers": info.subscribers,
        }
    )


async def stats(request: web.Request) -> web.Response:
    """``GET /api/stats[?client=TAG]``: per-transport accounting (and one client's)."""
    hub = request.app[HUB_KEY]
    body = hub.snapshot(client_tag(request))
    body["server_time_ms"] = time.time() * 1000.0
    body["chats_running"] = request.app[CHATS_KEY].running
    return json_response(body)


TUNABLE: Final = {
    # name: (low, high); the dashboard's sliders change these while the server runs
    "heartbeat": (0.2, 300.0),
    "ticker_rate": (0.0, 1000.0),
    "ttft_ms": (0.0, 60_000.0),
    "token_ms": (0.0, 10_000.0),
    "longpoll_timeout": (0.0, 60.0),
}


def _config(request: web.Request) -> dict[str, Any]:
    settings = request.app[SETTINGS_KEY]
    return {
        **{name: getattr(settings, name) for name in TUNABLE},
        "retry_ms": settings.retry_ms,
        "history": settings.history,
        "bus": settings.bus.split("?")[0].split("@")[-1],  # no credentials
        "chaos": settings.chaos,
        "server_time_ms": time.time() * 1000.0,
    }


async def get_config(request: web.Request) -> web.Response:
    """``GET /api/config``: the live settings (and the server clock, for offset correction)."""
    return json_response(_config(request))


async def patch_config(request: web.Request) -> web.Response:
    """``PATCH /api/config``: change live settings (heartbeat, ticker rate, chat pacing)."""
    body = await json_body(request)
    settings = request.app[SETTINGS_KEY]
    unknown = set(body) - set(TUNABLE)
    if unknown:
        raise HTTPProblem(400, "invalid-parameter", f"not tunable: {sorted(unknown)}")
    for name, (low, high) in TUNABLE.items():
        if name in body:
            setattr(settings, name, _number(body, name, 0, low, high))
    request.app[TICKER_KEY].rate = settings.ticker_rate
    return json_response(_config(request))


async def health(request: web.Request) -> web.Response:
    """``GET /api/health``: 200 while the server accepts work."""
    return json_response({"ok": not request.app[HUB_KEY].shutting_down})


async def openai_chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: the simulated LLM behind an OpenAI-compatible API.

    With ``"stream": true`` the answer is SSE: ``data: {chat.completion.chunk}`` per token and a
    final ``data: [DONE]``, as OpenAI's clients expect. Without it, one ``chat.completion``.
    """
    body = await json_body(request)
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
    ):
        raise HTTPProblem(
            400, "invalid-parameter", "messages must be a non-empty list of {role, content} objects"
        )
    prompt = messages[-1]["content"][:MAX_PROMPT] or " "
    settings = request.app[SETTINGS_KEY]
    chat = request.app[CHATS_KEY].start(
        prompt,
        seed=int(_number(body, "seed", 0, -(2**31), 2**31, integer=True)),
        ttft_ms=settings.ttft_ms,
        token_ms=settings.token_ms,
        max_tokens=int(_number(body, "max_tokens", settings.max_tokens, 1, 5000, integer=True)),
    )
    model = str(body.get("model") or "realtime-lab-sim")
    created = int(time.time())
    ident = f"chatcmpl-{chat.id}"
    bus = request.app[BUS_KEY]
    if not body.get("stream"):
        assert chat.task is not None
        await chat.task
        return json_response(
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": chat.text},
                    }
                ],
                "usage": {
                    "prompt_tokens": len(prompt.split()),
                    "completion_tokens": len(chat.parts),
                    "total_tokens": len(prompt.split()) + len(chat.parts),
                },
            }
        )

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return json.dumps(
            {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )

    # allow_all_methods: aiohttp-sse answers anything but GET with 405 by default, and OpenAI's
    # API is a POST.
    async with sse_response(
        request, headers={"X-Accel-Buffering": "no"}, allow_all_methods=True
    ) as stream:
        await stream.send(chunk({"role": "assistant", "content": ""}))
        try:
            async with bus.subscribe(chat.channel) as events:
                async for event in events:
                    if event.type == TOKEN:
                        await stream.send(chunk({"content": event.data["text"]}))
                    elif event.type == "end":
                        reason = event.data.get("reason")
                        await stream.send(chunk({}, "stop" if reason == "done" else reason))
                        break
        except asyncio.CancelledError:
            request.app[CHATS_KEY].cancel(chat.id)  # the caller hung up: stop generating
            raise
        await stream.send("[DONE]")
    return stream
