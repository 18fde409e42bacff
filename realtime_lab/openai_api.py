"""``/v1``: the simulated LLM behind an OpenAI-compatible API (what the official clients speak)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web
from aiohttp_sse import sse_response

from realtime_lab.protocol.envelope import TOKEN
from realtime_lab.transports.chatstart import MAX_PROMPT
from realtime_lab.transports.keys import BUS_KEY, CHATS_KEY, SETTINGS_KEY
from realtime_lab.transports.params import body_number, json_body
from realtime_lab.transports.problems import HTTPProblem, json_response


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
        seed=int(body_number(body, "seed", 0, -(2**31), 2**31, integer=True)),
        ttft_ms=settings.ttft_ms,
        token_ms=settings.token_ms,
        max_tokens=int(body_number(body, "max_tokens", settings.max_tokens, 1, 5000, integer=True)),
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
