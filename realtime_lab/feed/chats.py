"""Chats: one simulated generation per chat, streamed onto the chat's own channel.

A chat's channel is ``chat.<id>``. Its events are ``token`` (``data``: ``text``, ``index``) and,
last, ``end`` (``data.reason``: ``done``, ``cancelled`` or ``error``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from realtime_lab.bus import Bus
from realtime_lab.errors import UnknownChat
from realtime_lab.feed.llm import paced_tokens
from realtime_lab.protocol.channels import CHAT_PREFIX as CHAT_PREFIX  # re-exported
from realtime_lab.protocol.envelope import END, TOKEN

log = logging.getLogger(__name__)

Status = Literal["running", "done", "cancelled", "error"]


@dataclass(slots=True)
class Chat:
    """State of one chat, as ``GET /api/chats/{id}`` shows it."""

    id: str
    prompt: str
    seed: int
    ttft_ms: float
    token_ms: float
    max_tokens: int
    created: float = field(default_factory=time.time)
    status: Status = "running"
    parts: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    finished: float | None = None

    @property
    def channel(self) -> str:
        return CHAT_PREFIX + self.id

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channel": self.channel,
            "prompt": self.prompt,
            "seed": self.seed,
            "ttft_ms": self.ttft_ms,
            "token_ms": self.token_ms,
            "status": self.status,
            "tokens": len(self.parts),
            "text": self.text,
            "created": self.created,
            "finished": self.finished,
        }


class ChatRegistry:
    """Starts, cancels and remembers chats; forgets finished ones after ``ttl`` seconds."""

    def __init__(self, bus: Bus, *, ttl: float = 300.0, max_running: int = 1000) -> None:
        self._bus = bus
        self._ttl = ttl
        self._max_running = max_running
        self._chats: dict[str, Chat] = {}

    def start(
        self,
        prompt: str,
        *,
        seed: int = 0,
        ttft_ms: float = 100.0,
        token_ms: float = 15.0,
        max_tokens: int = 120,
    ) -> Chat:
        """Start generating; tokens appear on ``chat.channel`` as they are produced."""
        self._forget_expired()
        chat = Chat(secrets.token_hex(6), prompt, seed, ttft_ms, token_ms, max_tokens)
        self._chats[chat.id] = chat
        chat.task = asyncio.create_task(self._generate(chat), name=f"chat-{chat.id}")
        return chat

    @property
    def running(self) -> int:
        """How many chats are generating now."""
        return sum(1 for chat in self._chats.values() if chat.status == "running")

    def get(self, chat_id: str) -> Chat:
        """The chat with this id.

        Raises:
            UnknownChat: no such chat (never started, or forgotten after its ttl).
        """
        chat = self._chats.get(chat_id)
        if chat is None:
            raise UnknownChat(f"no chat {chat_id!r}")
        return chat

    def __contains__(self, chat_id: object) -> bool:
        return chat_id in self._chats

    def cancel(self, chat_id: str) -> Chat:
        """Stop the generation; the stream ends with ``end`` and ``reason: cancelled``.

        Raises:
            UnknownChat: no such chat.
        """
        chat = self.get(chat_id)
        if chat.status == "running" and chat.task is not None:
            chat.task.cancel()
        return chat

    async def _generate(self, chat: Chat) -> None:
        reason: Status = "done"
        try:
            for token in paced_tokens(
                chat.prompt,
                chat.seed,
                ttft_ms=chat.ttft_ms,
                token_ms=chat.token_ms,
                max_tokens=chat.max_tokens,
            ):
                if token.delay_s > 0:
                    await asyncio.sleep(token.delay_s)
                chat.parts.append(token.text)
                await self._bus.publish(
                    chat.channel, TOKEN, {"text": token.text, "index": token.index}
                )
        except asyncio.CancelledError:
            reason = "cancelled"
            # The stream must still end, so the cancellation is re-raised only after `end`.
            await self._finish(chat, reason)
            raise
        except Exception:
            log.exception("chat %s failed", chat.id)
            reason = "error"
        await self._finish(chat, reason)

    async def _finish(self, chat: Chat, reason: Status) -> None:
        chat.status = reason
        chat.finished = time.time()
        try:
            await self._bus.publish(
                chat.channel, END, {"reason": reason, "tokens": len(chat.parts)}
            )
        except Exception:
            log.exception("could not publish the end of chat %s", chat.id)

    def _forget_expired(self) -> None:
        cutoff = time.time() - self._ttl
        for chat_id, chat in tuple(self._chats.items()):
            if chat.finished is not None and chat.finished < cutoff:
                del self._chats[chat_id]

    async def close(self) -> None:
        """Cancel every running generation and wait for them to publish their ``end``."""
        tasks = [c.task for c in self._chats.values() if c.task is not None and not c.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
