"""Chats whose fetch stream was cut: cancelled after a grace, unless the stream resumes."""

from __future__ import annotations

import asyncio
import contextlib

from realtime_lab.errors import UnknownChat
from realtime_lab.feed.chats import Chat, ChatRegistry


class AbortGrace:
    """Chats whose stream was cut, to be cancelled unless a resume comes in time."""

    def __init__(self, chats: ChatRegistry, grace_s: float) -> None:
        self._chats = chats
        self._grace = grace_s
        self._pending: dict[str, asyncio.TimerHandle] = {}

    def client_gone(self, chat: Chat) -> None:
        """The stream of ``chat`` ended before the chat did: cancel it after the grace."""
        if chat.status != "running" or chat.id in self._pending:
            return
        loop = asyncio.get_running_loop()
        self._pending[chat.id] = loop.call_later(self._grace, self._cancel, chat.id)

    def resumed(self, chat_id: str) -> None:
        """A stream of the chat is back: it is not abandoned."""
        handle = self._pending.pop(chat_id, None)
        if handle is not None:
            handle.cancel()

    def _cancel(self, chat_id: str) -> None:
        self._pending.pop(chat_id, None)
        with contextlib.suppress(UnknownChat):  # already forgotten: nothing to cancel
            self._chats.cancel(chat_id)

    def close(self) -> None:
        """Forget every pending cancel (at shutdown: the chats are cancelled anyway)."""
        for handle in self._pending.values():
            handle.cancel()
        self._pending.clear()
