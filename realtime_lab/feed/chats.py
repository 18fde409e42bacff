"""Chats: one simulated generation per chat, streamed onto the chat's own channel.

A chat's channel is ``chat.<id>``. Its events are ``token`` (``data``: ``text``, ``index``) and,
last, ``end`` (``data.reason``: ``done``, ``cancelled`` or ``error``). A chat whose
:class:`TokenSource` failed with :class:`~realtime_lab.errors.UpstreamError` also gets an
``error`` event (``data``: ``code``, ``message``, ``status``?, ``retry_after``?) before its ``end``.

The answer's text comes from a :class:`TokenSource`: :class:`SimulatedSource` (the default, the
deterministic stand-in of :mod:`realtime_lab.feed.llm`) or a real model
(:class:`realtime_lab.feed.upstream.UpstreamSource`).

Every operation of :class:`ChatRegistry` is O(1) in the number of chats: running chats are
counted (in total and per owner) as they start and finish, and finished chats wait in a deque in
the order they finished, so forgetting them pops from its front.

How a chat runs: a real model's answer is an async iterator, read by one task per chat. The
simulated model's answer is known in advance, only paced, so on a bus that publishes without
awaiting (``memory://``) its chats need no task at all: each is a job of one
:class:`~realtime_lab.feed.pacer.Pacer`, and a token is one plain call on a timer shared by
every chat due in the same millisecond (a thousand chats at 50 tokens/s cost no task switch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from realtime_lab.bus import Bus
from realtime_lab.bus.base import now_ms
from realtime_lab.bus.chatstore import LEASE_TTL_S
from realtime_lab.errors import (
    BusUnavailable,
    LimitReached,
    RealtimeLabError,
    TooManyChats,
    UnknownChat,
    UpstreamError,
)
from realtime_lab.feed.llm import paced_plan
from realtime_lab.feed.pacer import PacedJob, Pacer
from realtime_lab.protocol.channels import CHAT_PREFIX as CHAT_PREFIX  # re-exported
from realtime_lab.protocol.cursor import format_id
from realtime_lab.protocol.envelope import END, ERROR, TOKEN, Event

log = logging.getLogger(__name__)

Status = Literal["running", "done", "cancelled", "error"]

#: Running chats one owner may have at once (``ChatRegistry(max_running_per_owner=)``).
DEFAULT_MAX_RUNNING_PER_OWNER: Final = 20
#: ``retry_after`` of a :class:`TooManyChats`: chats are short, a slot frees up soon.
RETRY_AFTER_S: Final = 1.0
#: How long a chat waits for an unreachable bus backend before it ends with ``error``
#: (``ChatRegistry(outage_s=)``): the lease, after which other processes end it anyway.
OUTAGE_S: Final = LEASE_TTL_S
#: Pauses between a waiting chat's tries: the first, and the longest.
OUTAGE_RETRY_S: Final = (0.05, 0.5)


class _Outage(RealtimeLabError):
    """The bus backend stayed away longer than the outage window: the chat ends with error."""


@dataclass(slots=True)
class Chat:
    """State of one chat, as ``GET /api/chats/{id}`` shows it.

    ``owner`` is the user who started it (``None``: started without an identity).
    """

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
    owner: str | None = None
    #: The pacer's job generating a simulated chat (``None``: a task generates it, :attr:`task`).
    job: PacedJob | None = field(default=None, repr=False)
    #: Resolved once the chat's ``end`` is published (``None`` until the registry starts it).
    done: asyncio.Future[None] | None = field(default=None, repr=False)
    #: The id of the process generating it (``None``: the bus is not shared).
    process: str | None = None
    #: Resolved once other processes can find it (``None``: the bus is not shared).
    shared: asyncio.Future[None] | None = field(default=None, repr=False)
    #: Another process ended it (this one's lease had passed): no second ``end``.
    ended_elsewhere: bool = field(default=False, repr=False)
    #: Waiting for the bus backend to come back (an outage): its next event is not stored yet.
    stalled: bool = field(default=False, repr=False)

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
            "process": self.process,
        }


class TokenSource(Protocol):
    """Where chats' answers come from; :class:`ChatRegistry` iterates one per chat."""

    def tokens(self, chat: Chat) -> AsyncGenerator[str, None]:
        """The answer's pieces for ``chat``, each as soon as it exists.

        The registry iterates it inside ``contextlib.aclosing`` and cancels the chat's task to
        stop it, so release what the generation holds in ``finally``. Raise
        :class:`~realtime_lab.errors.UpstreamError` to end the chat with an ``error`` event.
        """
        ...

    async def close(self) -> None:
        """Release what the source holds (connections); called by :meth:`ChatRegistry.close`."""
        ...


class SimulatedSource:
    """The deterministic stand-in LLM, paced by the chat's ``ttft_ms`` and ``token_ms``."""

    def plan(self, chat: Chat) -> Iterator[tuple[str, float]]:
        """The answer's tokens, each with the pause in seconds before it (what :meth:`tokens`
        sleeps): pairs, not objects, as a paced chat takes one per token."""
        texts, delays = paced_plan(
            chat.prompt,
            chat.seed,
            ttft_ms=chat.ttft_ms,
            token_ms=chat.token_ms,
            max_tokens=chat.max_tokens,
        )
        return zip(texts, delays, strict=True)

    async def tokens(self, chat: Chat) -> AsyncGenerator[str, None]:
        for text, delay in self.plan(chat):
            if delay > 0:
                await asyncio.sleep(delay)
            yield text

    async def close(self) -> None:
        """Nothing to release."""


class StreamWatch(Protocol):
    """Who follows the fetch streams other processes hold of this process's chats (the fetch
    transport's abort grace): told when one opens or ends, and when its process went away."""

    def told(self, chat_id: str, *, opened: bool, cleanly: bool, process: str) -> None:
        """Process ``process`` opened (or ended; ``cleanly``: having seen the end) a stream."""
        ...

    def holders(self) -> Collection[str]:
        """The processes holding open streams of this process's chats: check they are alive."""
        ...

    def gone(self, processes: Collection[str]) -> None:
        """These processes went away (their lease passed): their streams ended, not cleanly."""
        ...


class Sharing(Protocol):
    """What the registry asks of :class:`realtime_lab.feed.shared.ChatSharing`."""

    #: Chats of dead processes this process's lease watcher ended (``end`` reason ``error``).
    orphans_ended: int

    async def share(self, chat: Chat) -> None:
        """Put the chat's record where every process finds it."""
        ...

    async def find(self, chat_id: str) -> Chat:
        """Another process's chat as it is now."""
        ...

    async def owner_of(self, chat_id: str) -> str | None:
        """The owner of another process's chat."""
        ...

    async def cancel(self, chat_id: str, wait: float) -> Chat:
        """Have another process's chat cancelled."""
        ...

    async def stream_changed(self, chat: Chat, *, opened: bool, cleanly: bool) -> None:
        """Tell the process generating ``chat`` that a stream of it opened (or ended)."""
        ...

    def end_later(self, chat: Chat) -> None:
        """Store the ``end`` (reason ``error``) of a chat an outage ended, once the bus is back."""
        ...

    async def stop(self) -> None:
        """Stop listening and renewing."""
        ...

    async def leave(self) -> None:
        """Give the lease back."""
        ...


class ChatRegistry:
    """Starts, cancels and remembers chats; forgets finished ones after ``ttl`` seconds.

    At most ``max_running`` chats run at once, and at most ``max_running_per_owner`` of one
    owner (``None``: no per-owner bound); :meth:`start` refuses more with :class:`TooManyChats`.
    Refusals are counted in :attr:`limits` by code. ``clock`` (monotonic seconds) times the
    forgetting; tests inject one. ``source`` generates the answers (default: a
    :class:`SimulatedSource`); the registry closes it in :meth:`close`.

    A chat whose event the bus backend cannot store (``BusUnavailable``: Redis is away) pauses:
    its source is not read further and the one event is tried again, for at most ``outage_s``
    seconds. Back in time, the chat goes on where it stood; not, it ends with reason ``error``
    (see :meth:`_ride_out`), counted in :attr:`outage_ended`.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        ttl: float = 300.0,
        max_running: int = 1000,
        max_running_per_owner: int | None = DEFAULT_MAX_RUNNING_PER_OWNER,
        clock: Callable[[], float] = time.monotonic,
        source: TokenSource | None = None,
        outage_s: float = OUTAGE_S,
    ) -> None:
        self._bus = bus
        self._source: TokenSource = SimulatedSource() if source is None else source
        self._ttl = ttl
        self._max_running = max_running
        self._max_per_owner = max_running_per_owner
        self._clock = clock
        self._chats: dict[str, Chat] = {}
        self._running = 0
        self._running_by_owner: Counter[str] = Counter()
        self._finished: deque[tuple[float, str]] = deque()  # (finish time, id), oldest first
        self._enders: set[asyncio.Task[None]] = set()
        self._pacer: Pacer | None = None
        #: Longest wait for the bus backend before a chat ends with ``error`` (seconds).
        self.outage_s = outage_s
        #: Chats ended with ``error`` because the bus backend stayed away too long.
        self.outage_ended = 0
        #: Refusals so far by code (``too-many-chats``, ``too-many-chats-per-owner``).
        self.limits: Counter[str] = Counter({"too-many-chats": 0, "too-many-chats-per-owner": 0})
        #: This process's id among those sharing the bus (what a chat's ``process`` names).
        self.process = secrets.token_hex(6)
        #: The chats shared with other processes: set by
        #: :meth:`realtime_lab.feed.shared.ChatSharing.open` on a shared bus, else ``None``.
        self.sharing: Sharing | None = None
        #: Told when another process says a stream of one of this process's chats opened or
        #: ended, or when such a process went away (set by the fetch transport's abort grace).
        self.stream_watch: StreamWatch | None = None

    def start(
        self,
        prompt: str,
        *,
        seed: int = 0,
        ttft_ms: float = 100.0,
        token_ms: float = 15.0,
        max_tokens: int = 120,
        owner: str | None = None,
    ) -> Chat:
        """Start generating; tokens appear on ``chat.channel`` as they are produced.

        Raises:
            TooManyChats: ``max_running`` chats run already (code ``too-many-chats``), or
                ``max_running_per_owner`` of ``owner``'s (code ``too-many-chats-per-owner``).
                Answer its ``status`` (429); nothing was started.
        """
        self._forget_expired()
        if self._running >= self._max_running:
            raise self._refuse(
                f"{self._running} chats are running, the most this server runs at once",
                "too-many-chats",
            )
        if (
            owner is not None
            and self._max_per_owner is not None
            and self._running_by_owner[owner] >= self._max_per_owner
        ):
            raise self._refuse(
                f"{owner!r} already runs {self._max_per_owner} chats, the most one owner may",
                "too-many-chats-per-owner",
            )
        chat = Chat(secrets.token_hex(6), prompt, seed, ttft_ms, token_ms, max_tokens, owner=owner)
        loop = asyncio.get_running_loop()
        chat.done = loop.create_future()
        if self.sharing is not None:
            chat.process = self.process
            chat.shared = loop.create_future()
        self._chats[chat.id] = chat
        self._running += 1
        if owner is not None:
            self._running_by_owner[owner] += 1
        if isinstance(self._source, SimulatedSource) and self._bus.synchronous:
            self._pace(chat, self._source.plan(chat), loop)
        else:
            chat.task = asyncio.create_task(self._generate(chat), name=f"chat-{chat.id}")
            chat.task.add_done_callback(lambda _: self._task_done(chat))
        return chat

    def _pace(
        self, chat: Chat, plan: Iterator[tuple[str, float]], loop: asyncio.AbstractEventLoop
    ) -> None:
        """Run a simulated chat as a job of the shared pacer (see the module docstring)."""
        try:
            self._bus.declare_now(chat.channel, epoch=chat.id)  # as _generate does, see there
        except LimitReached as exc:
            log.warning("chat %s stopped: %s", chat.id, exc)
            self._finish_now(chat, "error")
            return
        try:
            upcoming = next(plan, None)
        except Exception:
            log.exception("chat %s failed", chat.id)
            self._finish_now(chat, "error")
            return
        if upcoming is None:
            self._finish_now(chat, "done")
            return
        bus, channel, parts = self._bus, chat.channel, chat.parts

        def step() -> float | None:
            nonlocal upcoming
            assert upcoming is not None
            text = upcoming[0]
            parts.append(text)
            try:
                bus.publish_now(channel, TOKEN, {"text": text, "index": len(parts) - 1})
                upcoming = next(plan, None)
            except LimitReached as exc:
                log.warning("chat %s stopped: %s", chat.id, exc)
                self._finish_now(chat, "error")
                return None
            except Exception:
                log.exception("chat %s failed", chat.id)
                self._finish_now(chat, "error")
                return None
            if upcoming is None:
                self._finish_now(chat, "done")
                return None
            return upcoming[1]

        if self._pacer is None:
            self._pacer = Pacer(loop)
        chat.job = self._pacer.add(upcoming[1], step)

    def _finish_now(self, chat: Chat, reason: Status) -> None:
        """End a paced chat: settle it and publish its ``end`` (once)."""
        if chat.status != "running":
            return
        if chat.job is not None:
            chat.job.cancel()
        self._settle(chat, reason)
        try:
            self._bus.publish_now(
                chat.channel, END, {"reason": chat.status, "tokens": len(chat.parts)}
            )
        except LimitReached as exc:
            log.warning("could not publish the end of chat %s: %s", chat.id, exc)
        except Exception:
            log.exception("could not publish the end of chat %s", chat.id)
        self._mark_done(chat)

    @staticmethod
    def _mark_done(chat: Chat) -> None:
        if chat.done is not None and not chat.done.done():
            chat.done.set_result(None)

    def _refuse(self, message: str, code: str) -> TooManyChats:
        self.limits[code] += 1
        return TooManyChats(message, code, 429, RETRY_AFTER_S)

    @property
    def running(self) -> int:
        """How many chats are generating now."""
        return self._running

    def running_for(self, owner: str) -> int:
        """How many of ``owner``'s chats are generating now."""
        return self._running_by_owner.get(owner, 0)

    def get(self, chat_id: str) -> Chat:
        """The chat with this id.

        Raises:
            UnknownChat: no such chat (never started, or forgotten after its ttl).
        """
        self._forget_expired()
        chat = self._chats.get(chat_id)
        if chat is None:
            raise UnknownChat(f"no chat {chat_id!r}")
        return chat

    def __contains__(self, chat_id: object) -> bool:
        return chat_id in self._chats

    def running_chats(self) -> list[Chat]:
        """The chats this process is generating now."""
        return [chat for chat in self._chats.values() if chat.status == "running"]

    async def find(self, chat_id: str) -> Chat:
        """The chat, on whichever process of the bus it runs: this one's own, or a snapshot of
        another's (its text rebuilt from the channel's history).

        Raises:
            UnknownChat: no such chat on any process (never started, or forgotten).
            BusUnavailable: the shared backend does not answer.
        """
        self._forget_expired()
        chat = self._chats.get(chat_id)
        if chat is not None:
            return chat
        if self.sharing is None:
            raise UnknownChat(f"no chat {chat_id!r}")
        return await self.sharing.find(chat_id)

    async def owner_of(self, chat_id: str) -> str | None:
        """Who owns the chat, on whichever process it runs (``None``: nobody, or no such chat).

        Raises:
            BusUnavailable: the shared backend does not answer.
        """
        self._forget_expired()
        chat = self._chats.get(chat_id)
        if chat is not None:
            return chat.owner
        if self.sharing is None:
            return None
        return await self.sharing.owner_of(chat_id)

    async def cancel_anywhere(self, chat_id: str, *, wait: float = 0.0) -> Chat:
        """Cancel the chat on whichever process generates it; wait up to ``wait`` seconds for
        its ``end`` (0: not at all); the chat as it is then.

        Raises:
            UnknownChat: no such chat on any process.
            BusUnavailable: the shared backend does not answer.
        """
        self._forget_expired()
        chat = self._chats.get(chat_id)
        if chat is None:
            if self.sharing is None:
                raise UnknownChat(f"no chat {chat_id!r}")
            return await self.sharing.cancel(chat_id, wait)
        self.cancel(chat_id)
        if wait > 0 and chat.done is not None and not chat.done.done():
            await asyncio.wait([chat.done], timeout=wait)
        return chat

    async def announced(self, chat: Chat) -> None:
        """Return once other processes can find ``chat`` (at once on an unshared bus): await it
        before telling a client about the chat, which may ask another process next."""
        if chat.shared is not None and not chat.shared.done():
            await asyncio.wait([chat.shared], timeout=5.0)

    def cancel(self, chat_id: str) -> Chat:
        """Stop the generation; the stream ends with ``end`` and ``reason: cancelled``.

        Raises:
            UnknownChat: no such chat.
        """
        chat = self.get(chat_id)
        if chat.status == "running":
            if chat.job is not None:
                self._finish_now(chat, "cancelled")
            elif chat.task is not None:
                chat.task.cancel()
        return chat

    async def _generate(self, chat: Chat) -> None:
        reason: Status = "done"
        storable = True
        try:
            if self.sharing is not None:
                await self.sharing.share(chat)
            # The channel's life is named by the chat: an event id then says which chat it is
            # from (a fetch stream resumes by Last-Event-ID alone). Idempotent: the API may
            # have declared it already.
            await self._bus.declare(chat.channel, epoch=chat.id)
            async with contextlib.aclosing(self._source.tokens(chat)) as tokens:
                async for text in tokens:
                    index = len(chat.parts)
                    chat.parts.append(text)
                    data = {"text": text, "index": index}
                    try:
                        await self._bus.publish(chat.channel, TOKEN, data)
                    except BusUnavailable:
                        # The source waits meanwhile: one unstored token at most.
                        await self._ride_out(chat, TOKEN, data, index + 1)
                        if chat.ended_elsewhere:
                            reason = "error"
                            break
        except _Outage:
            chat.parts.pop()  # never stored: the text is what every reader has
            reason, storable = "error", False
        except asyncio.CancelledError:
            # Ended elsewhere: another process found this one's lease passed and ended it.
            reason = "error" if chat.ended_elsewhere else "cancelled"
            # The stream must still end, so the cancellation is re-raised only after `end`.
            await self._finish(chat, reason)
            raise
        except LimitReached as exc:
            # The bus is full (or the token too large): an expected refusal, not a bug.
            log.warning("chat %s stopped: %s", chat.id, exc)
            reason = "error"
        except UpstreamError as exc:
            # The model failed, not the lab: say why on the stream, where the reader looks.
            log.warning("chat %s stopped: %s: %s", chat.id, exc.code, exc)
            reason = "error"
            await self._publish_error(chat, exc)
        except Exception:
            log.exception("chat %s failed", chat.id)
            reason = "error"
        await self._finish(chat, reason, storable=storable)

    def _settle(self, chat: Chat, reason: Status) -> None:
        """Mark the chat finished and free its running slot (once)."""
        if chat.status != "running":
            return
        chat.status = reason
        chat.finished = time.time()
        self._running -= 1
        if chat.owner is not None:
            self._running_by_owner[chat.owner] -= 1
            if self._running_by_owner[chat.owner] <= 0:
                del self._running_by_owner[chat.owner]
        self._finished.append((self._clock(), chat.id))

    async def _finish(self, chat: Chat, reason: Status, *, storable: bool = True) -> None:
        self._settle(chat, reason)
        await self._publish_end(chat, storable=storable)

    async def _publish_error(self, chat: Chat, exc: UpstreamError) -> None:
        data: dict[str, Any] = {"code": exc.code, "message": str(exc)}
        if exc.status is not None:
            data["status"] = exc.status
        if exc.retry_after is not None:
            data["retry_after"] = exc.retry_after
        try:
            await self._bus.publish(chat.channel, ERROR, data)
        except LimitReached as limit:
            log.warning("could not publish the error of chat %s: %s", chat.id, limit)
        except Exception:
            log.exception("could not publish the error of chat %s", chat.id)

    async def _publish_end(self, chat: Chat, *, storable: bool = True) -> None:
        """Publish the chat's ``end`` (``storable``: false when an outage ended it, then its
        ``end`` goes to this process's readers only, the bus takes it later)."""
        stored = not chat.ended_elsewhere
        try:
            if stored and not storable:
                raise _Outage
            if stored:
                data = {"reason": chat.status, "tokens": len(chat.parts)}
                try:
                    await self._bus.publish(chat.channel, END, data)
                except BusUnavailable:
                    await self._ride_out(chat, END, data, len(chat.parts) + 1)
                    if chat.ended_elsewhere:
                        stored = False
                        chat.status = "error"  # what the end another process stored says
        except _Outage:
            stored = False
            self._end_here(chat)
        except LimitReached as exc:
            log.warning("could not publish the end of chat %s: %s", chat.id, exc)
        except Exception:
            log.exception("could not publish the end of chat %s", chat.id)
        finally:
            try:
                if self.sharing is not None and stored:
                    await self.sharing.share(chat)
            finally:
                self._mark_done(chat)

    async def _ride_out(self, chat: Chat, kind: str, data: dict[str, Any], seq: int) -> None:
        """Store event ``seq`` of ``chat``, whose publish found the bus backend away: try again
        until it is stored, for at most :attr:`outage_s` seconds (only this chat waits; its
        source is not read meanwhile).

        The failed try may have been stored after all (its answer lost): the channel's last
        seq says so, and the event is not published twice. The channel ended meanwhile (this
        process's lease passed and another process ended the chat as an orphan): it returns
        with :attr:`Chat.ended_elsewhere` set, the caller stops the chat without an ``end`` of
        its own. The channel gone (Redis came back empty): nothing of the chat is left to
        continue, the chat ends as after a long outage.

        Raises:
            _Outage: not stored in time; the chat ends with ``error``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.outage_s
        pause, longest = OUTAGE_RETRY_S
        log.warning(
            "chat %s waits for the bus (at most %.1f s): cannot store its event %d",
            chat.id,
            self.outage_s,
            seq,
        )
        chat.stalled = True
        try:
            while (left := deadline - loop.time()) > 0:
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, longest)
                try:
                    async with asyncio.timeout(max(deadline - loop.time(), 0.001)):
                        info = await self._bus.info(chat.channel)
                        if info is None or info.epoch != chat.id:
                            break  # the channel is gone, or a new life: the chat is lost
                        if info.finished:
                            log.warning("chat %s was ended by another process", chat.id)
                            chat.ended_elsewhere = True
                            return
                        if info.last_seq < seq:
                            await self._bus.publish(chat.channel, kind, data)
                except (BusUnavailable, TimeoutError):
                    continue
                log.warning("chat %s goes on: the bus stored its event %d", chat.id, seq)
                return
        finally:
            chat.stalled = False
        raise _Outage

    def _end_here(self, chat: Chat) -> None:
        """End a chat the bus cannot store events of (an outage): its status becomes ``error``;
        this process's readers get its ``end`` from the hub at once, the other processes' once
        the bus is back (:meth:`Sharing.end_later`, or their lease watcher)."""
        chat.status = "error"
        self.outage_ended += 1
        tokens = len(chat.parts)
        seq = tokens + 1
        log.warning(
            "chat %s ended with error: the bus was away more than %.1f s", chat.id, self.outage_s
        )
        end = Event(
            chat.channel,
            format_id(chat.id, seq),
            END,
            {"reason": "error", "tokens": tokens},
            now_ms(),
            seq,
        )
        try:
            # What the live feed would have done with the stored end: this process's sinks.
            self._bus.on_event(chat.channel, end)
        except Exception:
            log.exception("could not end the local streams of chat %s", chat.id)
        if self.sharing is not None:
            self.sharing.end_later(chat)

    def _task_done(self, chat: Chat) -> None:
        # A task cancelled before its first step never runs _generate: settle it here, or its
        # running slot would be held forever, and still end its stream.
        if chat.status == "running":
            self._settle(chat, "cancelled")
            ender = asyncio.create_task(self._publish_end(chat), name=f"chat-end-{chat.id}")
            self._enders.add(ender)
            ender.add_done_callback(self._enders.discard)

    def _forget_expired(self) -> None:
        cutoff = self._clock() - self._ttl
        finished = self._finished
        while finished and finished[0][0] <= cutoff:
            self._chats.pop(finished.popleft()[1], None)

    async def close(self) -> None:
        """Cancel every running generation, wait for them to publish their ``end``, then close
        the token source."""
        if self.sharing is not None:
            await self.sharing.stop()
        for chat in [c for c in self._chats.values() if c.job is not None]:
            self._finish_now(chat, "cancelled")
        if self._pacer is not None:
            self._pacer.close()
        tasks = [c.task for c in self._chats.values() if c.task is not None and not c.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._enders:
            await asyncio.gather(*self._enders, return_exceptions=True)
        if self.sharing is not None:
            await self.sharing.leave()
        await self._source.close()
