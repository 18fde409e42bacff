"""Chats across processes: every process can read, inspect and cancel every chat of the bus.

On a bus that several processes share (``redis://``, ``redis+cluster://``), each process's
:class:`~realtime_lab.feed.chats.ChatRegistry` gets a :class:`ChatSharing`:

- Each chat's record (owner, prompt, status, the generating process) is put in the bus backend
  when it starts and when it ends (:class:`~realtime_lab.bus.chatstore.ChatStore`); never per
  token. A process that does not generate a chat answers for it from the record and the channel's
  history (the text so far, and the ``end`` if there is one).
- A cancel reaches the generating process on its control channel, ``!ctl.<process>``, and so
  does the news that a fetch stream of one of its chats opened or ended elsewhere (the abort
  grace is counted where the chat runs): an ordinary bus channel (history, catching up after a
  lost live feed, Redis Cluster moves) whose name no HTTP request can name (``!`` is not in a
  channel name), so no client reads or writes it.
- Each process renews one lease every second (:data:`~realtime_lab.bus.chatstore.LEASE_RENEW_S`)
  and, in the same step, learns which processes stopped renewing theirs: it ends each of their
  running chats with ``end`` and reason ``error``, once, whichever process gets there first. A
  client of a chat whose generator died thus gets its ``end`` within the lease
  (:data:`~realtime_lab.bus.chatstore.LEASE_TTL_S`) plus one renewal.
- The same renewal checks the leases of the processes that hold open fetch streams of this
  process's chats: a stream whose process died without saying it ended counts as cut, so the
  abort grace runs as if that process had said so (a chat read by nobody does not run on).

A process whose own lease passed (a stall longer than the lease, an outage) learns so at its next
renewal and stops, without a second ``end``, the chats that others ended meanwhile. A chat that an
outage ended here (its events could not be stored within the registry's ``outage_s``) had its
``end`` delivered to this process's readers only: the first renewal that reaches the backend
again stores it (:meth:`ChatSharing.end_later`), unless another process's watcher did first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Final

from realtime_lab.bus import Bus, Subscription
from realtime_lab.bus.chatstore import LEASE_RENEW_S, LEASE_TTL_S, ChatStore
from realtime_lab.bus.tasks import cancel_and_wait
from realtime_lab.errors import BusClosed, BusError, SubscriberOverflow, UnknownChat
from realtime_lab.feed.chats import Chat, ChatRegistry
from realtime_lab.protocol.cursor import LIVE, parse_id
from realtime_lab.protocol.envelope import END, TOKEN

log = logging.getLogger(__name__)

#: The control channel of a process is this prefix and its id (not a valid HTTP channel name).
CONTROL_PREFIX: Final = "!ctl."
#: The control event asking a process to cancel one of its chats (``data.chat``: the id).
CANCEL: Final = "cancel"
#: The control event telling a process that a stream of one of its chats opened or ended
#: (``data``: ``chat``, ``open``, ``clean``): the fetch transport's abort grace counts them there.
STREAM: Final = "stream"
#: Owners of other processes' chats remembered (an owner never changes), LRU.
MAX_OWNERS: Final = 10_000
#: Longest wait for a chat's record to be stored before its 201 goes out anyway.
SHARE_TIMEOUT_S: Final = 5.0


class ChatSharing:
    """One process's side of the shared chats (see the module docstring).

    :meth:`open` it at startup; the registry stops it when it closes, before the bus closes.
    """

    def __init__(self, registry: ChatRegistry, bus: Bus, store: ChatStore, ttl: float) -> None:
        self.registry = registry
        self.process = registry.process
        self.store = store
        self._bus = bus
        self._ttl = ttl
        self._owners: OrderedDict[str, str | None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._control: Subscription | None = None
        #: Chats of dead processes this process ended (``end`` reason ``error``).
        self.orphans_ended = 0
        #: This process's chats an outage ended whose ``end`` the bus has not stored yet.
        self._unstored: dict[str, Chat] = {}

    @classmethod
    async def open(cls, registry: ChatRegistry, bus: Bus, ttl: float) -> ChatSharing | None:
        """On a shared bus, make ``registry``'s chats shared (``registry.sharing``): take this
        process's lease, listen to its control channel and watch the others'. Call once at
        startup, after ``bus.start()``; ``None`` (and nothing done) on ``memory://``.

        Raises:
            BusUnavailable: the backend does not answer.
        """
        store = bus.broker.chat_store()
        if store is None:
            return None
        sharing = cls(registry, bus, store, ttl)
        await store.renew(sharing.process, LEASE_TTL_S)
        sharing._control = bus.subscribe(CONTROL_PREFIX + sharing.process, LIVE)
        await sharing._control.__aenter__()
        sharing._spawn(sharing._listen(), "chats-control")
        sharing._spawn(sharing._watch(), "chats-lease")
        registry.sharing = sharing
        return sharing

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop listening and renewing (first step of the registry's close)."""
        await cancel_and_wait(list(self._tasks))
        if self._control is not None:
            self._control.detach()

    async def leave(self) -> None:
        """Give the lease back (last step of the registry's close: its chats have ended)."""
        with contextlib.suppress(BusError, OSError):
            await self.store.leave(self.process)

    # Records -----------------------------------------------------------------------------------
    async def share(self, chat: Chat) -> None:
        """Put the chat's record (as it is now) where every process finds it."""
        try:
            await self.store.put(
                chat.id,
                _record(chat),
                self._ttl,
                process=self.process,
                running=chat.status == "running",
            )
        except (BusError, OSError) as exc:
            log.warning("could not share the state of chat %s: %s", chat.id, exc)
        finally:
            if chat.shared is not None and not chat.shared.done():
                chat.shared.set_result(None)

    async def find(self, chat_id: str) -> Chat:
        """Another process's chat as it is now (its text rebuilt from the channel's history).

        Raises:
            UnknownChat: no process has it.
            BusUnavailable: the backend does not answer.
        """
        return (await self._snapshot(chat_id))[0]

    async def owner_of(self, chat_id: str) -> str | None:
        """The owner of another process's chat (``None``: no owner, or no such chat)."""
        if chat_id in self._owners:
            self._owners.move_to_end(chat_id)
            return self._owners[chat_id]
        record = await self.store.get(chat_id)
        if record is None:
            return None
        owner = record.get("owner") or None
        self._owners[chat_id] = owner
        if len(self._owners) > MAX_OWNERS:
            self._owners.popitem(last=False)
        return owner

    async def cancel(self, chat_id: str, wait: float) -> Chat:
        """Ask the process generating ``chat_id`` to cancel it; wait up to ``wait`` seconds for
        its ``end``; the chat as it is then.

        Raises:
            UnknownChat: no process has it.
            BusUnavailable: the backend does not answer.
        """
        chat, cursor = await self._snapshot(chat_id)
        if chat.status != "running" or not chat.process:
            return chat
        control = CONTROL_PREFIX + chat.process
        if wait <= 0:
            await self._bus.publish(control, CANCEL, {"chat": chat_id})
            return chat
        after = parse_id(cursor) if cursor else None
        async with self._bus.subscribe(chat.channel, after) as events:
            await self._bus.publish(control, CANCEL, {"chat": chat_id})
            with contextlib.suppress(TimeoutError, SubscriberOverflow):
                async with asyncio.timeout(wait):
                    async for event in events:
                        if event.type == END:
                            break
        return (await self._snapshot(chat_id))[0]

    async def stream_changed(self, chat: Chat, *, opened: bool, cleanly: bool) -> None:
        """Tell the process generating ``chat`` (another one) that a stream of it opened, or
        ended (``cleanly``: having seen the end). Await an opening before streaming: the two
        reach the generator in the order they were told.

        Raises:
            BusUnavailable: the backend does not answer.
        """
        if chat.process:
            # "from": the generator counts the stream against this process, and counts it cut
            # if this process's lease passes before it says the stream ended.
            data = {"chat": chat.id, "open": opened, "clean": cleanly, "from": self.process}
            await self._bus.publish(CONTROL_PREFIX + chat.process, STREAM, data)

    def end_later(self, chat: Chat) -> None:
        """Store the ``end`` (reason ``error``) of ``chat``, which an outage ended here, at the
        first renewal that reaches the bus again: the other processes' readers get it then.

        Unless the chat was ended meanwhile: by another process's lease watcher, if this
        process's lease passed first (the same ``end``), or never, if Redis came back empty.
        """
        self._unstored[chat.id] = chat

    async def _store_ends(self) -> None:
        for chat_id in list(self._unstored):
            ended = await self.store.end_orphan(chat_id, self.process)
            await self.store.forget(self.process, [chat_id])
            del self._unstored[chat_id]
            if ended:
                log.warning("stored the end of chat %s, which an outage ended", chat_id)

    async def _snapshot(self, chat_id: str) -> tuple[Chat, str | None]:
        record = await self.store.get(chat_id)
        if record is None:
            raise UnknownChat(f"no chat {chat_id!r}")
        try:
            chat = Chat(
                chat_id,
                record["prompt"],
                int(record["seed"]),
                float(record["ttft_ms"]),
                float(record["token_ms"]),
                int(record["max_tokens"]),
                created=float(record["created"]),
                owner=record.get("owner") or None,
                process=record.get("process") or None,
            )
        except (KeyError, ValueError) as exc:
            raise UnknownChat(f"chat {chat_id!r} has no usable record ({exc})") from None
        status = record.get("status", "running")
        finished = record.get("finished")
        replay = await self._bus.replay(chat.channel, None)
        for event in replay.events:
            if event.type == TOKEN:
                chat.parts.append(str(event.data.get("text", "")))
            elif event.type == END:
                # The channel says how it ended, even before the generator updates the record.
                status = str(event.data.get("reason", status))
                finished = finished or str(event.ts / 1000.0)
        chat.status = status  # type: ignore[assignment]  # a Status, as written by a registry
        chat.finished = float(finished) if finished else None
        return chat, replay.cursor

    # Control channel ---------------------------------------------------------------------------
    async def _listen(self) -> None:
        """Cancel the chats other processes ask this one to cancel."""
        control = self._control
        while control is not None:
            try:
                async for event in control:
                    chat_id = event.data.get("chat")
                    if not isinstance(chat_id, str) or chat_id not in self.registry:
                        continue
                    if event.type == CANCEL:
                        self.registry.cancel(chat_id)
                    elif event.type == STREAM and self.registry.stream_watch is not None:
                        opened, clean = event.data.get("open"), event.data.get("clean")
                        sender = event.data.get("from")
                        self.registry.stream_watch.told(
                            chat_id,
                            opened=opened is True,
                            cleanly=clean is True,
                            process=sender if isinstance(sender, str) else "",
                        )
                return  # the bus closed
            except SubscriberOverflow:
                log.warning("the control channel of process %s overflowed", self.process)
                control.detach()
                control = self._control = self._bus.subscribe(CONTROL_PREFIX + self.process, LIVE)
                await control.__aenter__()
            except BusClosed:
                return

    # Leases ------------------------------------------------------------------------------------
    async def _watch(self) -> None:
        """Every second: renew this process's lease, end the chats of processes that died, and
        count the streams of this process's chats that a dead process held as cut."""
        failing = False
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            watch = self.registry.stream_watch
            try:
                holders = () if watch is None else watch.holders()
                renewal = await self.store.renew(self.process, LEASE_TTL_S, holders)
                if watch is not None and renewal.gone:
                    watch.gone(renewal.gone)
                if self._unstored:
                    await self._store_ends()
                if renewal.lapsed:
                    await self._check_own()
                for dead in renewal.dead:
                    await self._end_orphans(dead)
            except (BusError, OSError) as exc:
                if not failing:  # once per outage
                    log.warning(
                        "renewing the chat lease of process %s failed: %s", self.process, exc
                    )
                failing = True
                continue
            failing = False

    async def _end_orphans(self, dead: str) -> None:
        chat_ids = await self.store.orphans(dead)
        ended = 0
        for chat_id in chat_ids:
            if await self.store.end_orphan(chat_id, dead):
                ended += 1
                self.orphans_ended += 1  # counted as it ends, not after the forget below
        await self.store.forget(dead, chat_ids)
        if ended:
            log.warning(
                "process %s stopped renewing its lease: ended %d of its chats with reason error",
                dead,
                ended,
            )

    async def _check_own(self) -> None:
        """This process's lease had passed: stop the chats that others ended meanwhile."""
        log.warning("the chat lease of process %s had passed; checking its chats", self.process)
        for chat in self.registry.running_chats():
            record = await self.store.get(chat.id)
            if record is not None and record.get("status") != "running":
                chat.ended_elsewhere = True
                self.registry.cancel(chat.id)


def _record(chat: Chat) -> dict[str, str]:
    return {
        "id": chat.id,
        "owner": chat.owner or "",
        "prompt": chat.prompt,
        "seed": str(chat.seed),
        "ttft_ms": repr(chat.ttft_ms),
        "token_ms": repr(chat.token_ms),
        "max_tokens": str(chat.max_tokens),
        "created": repr(chat.created),
        "status": chat.status,
        "finished": "" if chat.finished is None else repr(chat.finished),
        "process": chat.process or "",
        "tokens": str(len(chat.parts)),
    }


__all__ = ["CANCEL", "CONTROL_PREFIX", "STREAM", "ChatSharing"]
