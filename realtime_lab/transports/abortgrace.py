"""Chats whose fetch stream was cut: cancelled after a grace, unless the stream resumes."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from realtime_lab.errors import UnknownChat
from realtime_lab.feed.chats import Chat, ChatRegistry


class AbortGrace:
    """Chats whose fetch streams were cut, to be cancelled unless a stream comes back in time.

    It counts each chat's open fetch streams: a resume can reach the server before the server
    has noticed the old stream end (a browser retries on an idle keep-alive socket at once), so
    only the last stream's end may schedule the cancel.
    """

    def __init__(self, chats: ChatRegistry, grace_s: float) -> None:
        self._chats = chats
        self._grace = grace_s
        self._open: Counter[str] = Counter()
        self._pending: dict[str, asyncio.TimerHandle] = {}

    def opened(self, chat_id: str) -> None:
        """A fetch stream of the chat opened: it is not abandoned."""
        self._open[chat_id] += 1
        handle = self._pending.pop(chat_id, None)
        if handle is not None:
            handle.cancel()

    def closed(self, chat: Chat, *, cleanly: bool) -> None:
        """A fetch stream of ``chat`` ended; ``cleanly``: it saw the chat's end (or shutdown).

        When it was the chat's last open stream and it did not end cleanly, the chat is
        cancelled after the grace, unless a stream opens again first.
        """
        left = self._open[chat.id] - 1
        if left > 0:
            self._open[chat.id] = left
            return
        del self._open[chat.id]
        if cleanly or chat.status != "running" or chat.id in self._pending:
            return
        loop = asyncio.get_running_loop()
        self._pending[chat.id] = loop.call_later(self._grace, self._cancel, chat.id)

    def _cancel(self, chat_id: str) -> None:
        self._pending.pop(chat_id, None)
        with contextlib.suppress(UnknownChat):  # already forgotten: nothing to cancel
            self._chats.cancel(chat_id)

    def close(self) -> None:
        """Forget every pending cancel (at shutdown: the chats are cancelled anyway)."""
        for handle in self._pending.values():
            handle.cancel()
        self._pending.clear()
        self._open.clear()
