"""Chats whose fetch stream was cut: cancelled after a grace, unless the stream resumes.

The count of a chat's open fetch streams is kept by the process that generates the chat, on
whichever process the streams are: a stream of another process's chat (a resume the load
balancer sent elsewhere) tells the generator when it opens and when it ends, on the generator's
control channel (:meth:`realtime_lab.feed.shared.ChatSharing.stream_changed`). So the rule is
the same behind a load balancer as on one process: the chat is cancelled ``grace`` seconds after
its last fetch stream, wherever it was, went away without seeing the end. A process that dies
cannot say its streams ended: the generator counts each stream against the process that told it,
and when that process's lease passes (:meth:`AbortGrace.gone`) its streams count as cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Collection

from realtime_lab.errors import BusError, UnknownChat
from realtime_lab.feed.chats import Chat, ChatRegistry

log = logging.getLogger(__name__)


class AbortGrace:
    """Chats whose fetch streams were cut, to be cancelled unless a stream comes back in time.

    It counts each chat's open fetch streams: a resume can reach the server before the server
    has noticed the old stream end (a browser retries on an idle keep-alive socket at once), so
    only the last stream's end may schedule the cancel. Streams of chats another process
    generates are counted there (see the module docstring).
    """

    def __init__(self, chats: ChatRegistry, grace_s: float) -> None:
        self._chats = chats
        self._grace = grace_s
        self._open: Counter[str] = Counter()
        self._pending: dict[str, asyncio.TimerHandle] = {}
        #: Open streams of this process whose chat another process generates (told it).
        self._remote: Counter[str] = Counter()
        self._telling: set[asyncio.Task[None]] = set()
        #: The generator's side: open streams other processes told it about, by process.
        self._held: dict[str, Counter[str]] = {}
        chats.stream_watch = self

    async def opened(self, chat: Chat) -> None:
        """A fetch stream of the chat opened: it is not abandoned. Pair it with one
        :meth:`closed` when the stream ends.

        Raises:
            BusUnavailable: the chat runs on another process, which could not be told.
        """
        sharing = self._chats.sharing
        if chat.id in self._chats or sharing is None:
            self._opened_here(chat.id)
        elif chat.status == "running" and chat.process:
            await sharing.stream_changed(chat, opened=True, cleanly=False)
            self._remote[chat.id] += 1

    def closed(self, chat: Chat, *, cleanly: bool) -> None:
        """A fetch stream of ``chat`` ended; ``cleanly``: it saw the chat's end (or shutdown).

        When it was the chat's last open stream and it did not end cleanly, the chat is
        cancelled after the grace, unless a stream opens again first.
        """
        if self._remote[chat.id] > 0:
            self._remote[chat.id] -= 1
            if not self._remote[chat.id]:
                del self._remote[chat.id]
            self._spawn_tell(chat, cleanly)
            return
        self._closed_here(chat, cleanly=cleanly)

    def _opened_here(self, chat_id: str) -> None:
        self._open[chat_id] += 1
        handle = self._pending.pop(chat_id, None)
        if handle is not None:
            handle.cancel()

    def _closed_here(self, chat: Chat, *, cleanly: bool, streams: int = 1) -> None:
        left = self._open[chat.id] - streams
        if left > 0:
            self._open[chat.id] = left
            return
        self._open.pop(chat.id, None)
        if cleanly or chat.status != "running" or chat.id in self._pending:
            return
        loop = asyncio.get_running_loop()
        self._pending[chat.id] = loop.call_later(self._grace, self._cancel, chat.id)

    def cancelling(self, chat_id: str) -> bool:
        """Whether the chat is to be cancelled when its grace ends (no stream of it is open)."""
        return chat_id in self._pending

    # StreamWatch: the generator's side ---------------------------------------------------------
    def told(self, chat_id: str, *, opened: bool, cleanly: bool, process: str) -> None:
        """Another process opened (or ended) a fetch stream of a chat this one generates."""
        if opened:
            self._held.setdefault(process, Counter())[chat_id] += 1
            self._opened_here(chat_id)
            return
        held = self._held.get(process)
        if held is None or held[chat_id] <= 0:
            # Counted as cut already: its process's lease passed (an outage) before it told.
            return
        held[chat_id] -= 1
        if not held[chat_id]:
            del held[chat_id]
            if not held:
                del self._held[process]
        self._closed_remote(chat_id, cleanly=cleanly)

    def holders(self) -> Collection[str]:
        """The processes holding open streams of this process's chats."""
        return [process for process in self._held if process]

    def gone(self, processes: Collection[str]) -> None:
        """Those processes died: each stream they held ends, not cleanly (the grace starts)."""
        for process in processes:
            held = self._held.pop(process, None)
            if not held:
                continue
            log.warning(
                "process %s went away holding %d fetch stream(s) of this process's chats: "
                "they count as cut",
                process,
                held.total(),
            )
            for chat_id, count in held.items():
                self._closed_remote(chat_id, cleanly=False, streams=count)

    def _closed_remote(self, chat_id: str, *, cleanly: bool, streams: int = 1) -> None:
        with contextlib.suppress(UnknownChat):  # forgotten: nothing left to cancel
            self._closed_here(self._chats.get(chat_id), cleanly=cleanly, streams=streams)

    def _spawn_tell(self, chat: Chat, cleanly: bool) -> None:
        # In a task: a stream's end must not wait for the bus (nor fail for it).
        task = asyncio.create_task(self._tell_closed(chat, cleanly), name=f"grace-{chat.id}")
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    async def _tell_closed(self, chat: Chat, cleanly: bool) -> None:
        sharing = self._chats.sharing
        if sharing is None:
            return
        try:
            await sharing.stream_changed(chat, opened=False, cleanly=cleanly)
        except (BusError, OSError) as exc:
            # The generator keeps counting the stream as open: the chat runs to its own end.
            log.warning(
                "could not tell process %s a stream of chat %s ended: %s",
                chat.process,
                chat.id,
                exc,
            )

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
        self._remote.clear()
        self._held.clear()
        for task in self._telling:
            task.cancel()
