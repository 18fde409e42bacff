"""Starting a chat from a request body: shared by ``POST /api/chats`` and the fetch stream."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from realtime_lab.errors import LimitReached
from realtime_lab.feed.chats import Chat
from realtime_lab.transports.access import identity_of
from realtime_lab.transports.keys import BUS_KEY, CHATS_KEY, SETTINGS_KEY
from realtime_lab.transports.params import field
from realtime_lab.transports.problems import HTTPProblem, limit_problem

MAX_PROMPT: Final = 4000


async def start_chat(request: web.Request, body: dict[str, Any]) -> Chat:
    """Validate a chat request body and start the chat, owned by the caller.

    Raises:
        HTTPProblem: 400 for a bad field, 429 when the caller (or the server) runs as many
            chats as it may.
    """
    settings = request.app[SETTINGS_KEY]
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT:
        raise HTTPProblem(
            400,
            "invalid-parameter",
            f"prompt must be a non-empty string of at most {MAX_PROMPT} characters",
        )
    identity = identity_of(request)
    seed = int(field(body, "seed", 0, -(2**31), 2**31, integer=True))
    ttft_ms = field(body, "ttft_ms", settings.ttft_ms, 0, 60_000)
    token_ms = field(body, "token_ms", settings.token_ms, 0, 10_000)
    max_tokens = int(field(body, "max_tokens", settings.max_tokens, 1, 5000, integer=True))
    chats = request.app[CHATS_KEY]
    try:
        chat = chats.start(
            prompt,
            seed=seed,
            ttft_ms=ttft_ms,
            token_ms=token_ms,
            max_tokens=max_tokens,
            owner=None if identity is None else identity.user,
        )
    except LimitReached as exc:
        raise limit_problem(exc) from None
    try:
        await request.app[BUS_KEY].declare(chat.channel, epoch=chat.id)
    except LimitReached as exc:
        chats.cancel(chat.id)  # no channel for it (the bus is full): it cannot run
        raise limit_problem(exc) from None
    await chats.announced(chat)  # the client may ask another process about it next
    return chat
