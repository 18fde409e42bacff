"""What the reliability tests share: a client read in the background, chaos calls, the zero-loss
assertion.

Server and clients run in the test's own event loop, so a loaded machine slows both together;
every wait is on a condition with a deadline, never on the clock alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from realtime_lab.clients import StreamClient, open_stream
from realtime_lab.feed.llm import answer_tokens
from realtime_lab.protocol.channels import chat_id_of
from realtime_lab.protocol.envelope import Event
from tests.conftest import RunningServer

TRANSPORTS = ("poll", "longpoll", "sse", "ws", "fetch")
#: The transports that read a channel by name (fetch streams the chat its POST creates).
CHANNEL_TRANSPORTS = ("poll", "longpoll", "sse", "ws")
#: The transports that hold one stream open (the others ask again and again).
STREAMING = ("sse", "ws", "fetch")
TIMEOUT = 20.0  # generous: two shared cores, other test runs in parallel

#: Client options for fast recoveries: quick reconnects, short polls.
FAST: dict[str, Any] = {
    "poll_interval": 0.02,
    "longpoll_timeout": 5.0,
    "backoff_initial": 0.02,
    "backoff_max": 0.2,
}

#: The longest answer among a few prompts and seeds: 118 tokens, English and CJK mixed.
PROMPT, SEED, MAX_TOKENS = "reliability matrix", 30, 118


class Reader:
    """Iterates one client in a background task and lets the test wait on its progress.

    Use as ``async with Reader(client) as reader:``; :meth:`wait_tokens` to act mid-stream,
    :meth:`finished` for the whole stream. Leaving the block closes the client and the task.
    """

    def __init__(self, client: StreamClient) -> None:
        self.client = client
        self.events: list[Event] = []
        self.arrivals: list[float] = []  # loop time each event was yielded
        self.error: BaseException | None = None
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Reader:
        await self.client.__aenter__()
        self._task = asyncio.create_task(self._run(), name=f"reader-{self.client.transport}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.close()
        if self._task is not None:
            self._task.cancel()
            # asyncio.wait: the task's own end is not raised here, a cancellation of ours is.
            await asyncio.wait((self._task,), timeout=10)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for event in self.client:
                self.events.append(event)
                self.arrivals.append(loop.time())
                async with self._changed:
                    self._changed.notify_all()
        except Exception as exc:  # reported to the waiting test, which fails with it
            self.error = exc
        finally:
            async with self._changed:
                self._changed.notify_all()

    @property
    def done(self) -> bool:
        """The iteration stopped (after ``end``, or with :attr:`error`)."""
        return self._task is not None and self._task.done()

    @property
    def tokens(self) -> list[Event]:
        return [e for e in self.events if e.type == "token"]

    @property
    def chat_id(self) -> str:
        """The id of the chat this reader streams (a fetch stream knows it once it named it)."""
        chat_id = chat_id_of(self.client.channel)
        assert chat_id is not None, f"no chat known yet: {self}"
        return chat_id

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """Wait until ``predicate()`` holds (checked at every event), or fail saying where the
        stream got to."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                while not predicate():
                    if self.done:
                        raise AssertionError(f"the stream stopped first: {self}")
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"still waiting after {timeout} s: {self}") from None

    def __str__(self) -> str:
        last = self.events[-1] if self.events else None
        return (
            f"{self.client.transport}: {len(self.events)} events, last "
            f"{None if last is None else (last.type, last.id)}, error {self.error!r}, "
            f"{self.client.stats.summary()}"
        )

    async def wait_tokens(self, count: int, timeout: float = TIMEOUT) -> None:
        """Wait until ``count`` tokens have arrived, the stream still running."""
        await self.wait_for(lambda: len(self.tokens) >= count, timeout)

    async def finished(self, timeout: float = TIMEOUT) -> list[Event]:
        """Wait for the end of the iteration; every event, or the failure it raised."""
        assert self._task is not None
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._task)
        if self.error is not None:
            raise self.error
        return self.events


def reader(server: RunningServer, channel: str, transport: str, **options: Any) -> Reader:
    """A :class:`Reader` of ``channel`` over ``transport`` with :data:`FAST` options."""
    return Reader(open_stream(server.url, channel, transport, **{**FAST, **options}))


def fetch_reader(server: RunningServer, *, token_ms: float, **options: Any) -> Reader:
    """A :class:`Reader` of a new chat (the one of :func:`chat_request`) over ``fetch``: its
    POST starts the chat. :data:`FAST` options."""
    request = chat_request(token_ms=token_ms)
    return Reader(open_stream(server.url, None, "fetch", chat=request, **{**FAST, **options}))


def chat_request(
    *,
    token_ms: float,
    prompt: str = PROMPT,
    seed: int = SEED,
    max_tokens: int = MAX_TOKENS,
    ttft_ms: float = 20.0,
) -> dict[str, Any]:
    """The body of ``POST /api/chats`` (and of a fetch stream's POST) for the test's chat."""
    return {
        "prompt": prompt,
        "seed": seed,
        "max_tokens": max_tokens,
        "token_ms": token_ms,
        "ttft_ms": ttft_ms,
    }


async def post(
    session: aiohttp.ClientSession, url: str, body: Any = None, status: int = 200
) -> dict[str, Any]:
    async with session.post(url, json=body) as resp:
        answer: dict[str, Any] = await resp.json()
        assert resp.status == status, answer
        return answer


async def get(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer


async def chaos(
    session: aiohttp.ClientSession, server: RunningServer, action: str, **body: Any
) -> dict[str, Any]:
    """``POST /api/chaos/<action>`` and its answer."""
    return await post(session, f"{server.url}/api/chaos/{action}", body)


async def drop_until_cut(
    session: aiohttp.ClientSession,
    server: RunningServer,
    transport: str,
    reader: Reader | None = None,
    timeout: float = TIMEOUT,
) -> int:
    """Drop ``transport``'s open connections until at least one was cut; how many were.

    A client between two connections (or a long poll between two requests) has nothing open
    to cut, so the call is repeated until the fault lands. With ``reader``, fail if its stream
    ends first: a drop after the end would test nothing.
    """
    async with asyncio.timeout(timeout):
        while True:
            if reader is not None and reader.done:
                raise AssertionError(f"{transport}: the stream ended before the drop landed")
            dropped = int((await chaos(session, server, "drop", transport=transport))["dropped"])
            if dropped:
                return dropped
            await asyncio.sleep(0.005)  # polling the condition, with the deadline above


async def start_chat(
    session: aiohttp.ClientSession,
    server: RunningServer,
    *,
    token_ms: float,
    prompt: str = PROMPT,
    seed: int = SEED,
    max_tokens: int = MAX_TOKENS,
    ttft_ms: float = 20.0,
) -> dict[str, Any]:
    """``POST /api/chats``; the 201 answer."""
    body = chat_request(
        token_ms=token_ms, prompt=prompt, seed=seed, max_tokens=max_tokens, ttft_ms=ttft_ms
    )
    return await post(session, f"{server.url}/api/chats", body, status=201)


async def wait_chat_finished(
    session: aiohttp.ClientSession, server: RunningServer, chat_id: str, timeout: float = TIMEOUT
) -> dict[str, Any]:
    """Wait until the server's generator has published the chat's ``end``; the chat."""
    async with asyncio.timeout(timeout):
        while True:
            chat = await get(session, f"{server.url}/api/chats/{chat_id}")
            if chat["status"] != "running":
                return chat
            await asyncio.sleep(0.02)  # polling the condition, with the deadline above


def assert_exact_answer(
    events: list[Event],
    client: StreamClient,
    *,
    prompt: str = PROMPT,
    seed: int = SEED,
    max_tokens: int = MAX_TOKENS,
    context: str = "",
) -> None:
    """The zero-loss assertion: the whole answer, each token once, in order, then ``end``."""
    where = f"{client.transport}{' ' + context if context else ''}"
    stats = client.stats
    expected = answer_tokens(prompt, seed, max_tokens=max_tokens)
    tokens = [e for e in events if e.type == "token"]
    assert [e.data["index"] for e in tokens] == list(range(len(expected))), (
        f"{where}: token indexes {[e.data['index'] for e in tokens]}; {stats.summary()}"
    )
    assert "".join(e.data["text"] for e in tokens) == "".join(expected), where
    assert [e.type for e in events] == ["token"] * len(expected) + ["end"], (
        f"{where}: {[e.type for e in events if e.type != 'token']}"
    )
    assert events[-1].data["reason"] == "done", where
    # Ids are consecutive from the first token: nothing missing, nothing repeated.
    seqs = [e.seq for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{where}: seqs {seqs}"
    assert (stats.gaps, stats.duplicates, stats.out_of_order) == (0, 0, 0), (
        f"{where}: {stats.summary()}"
    )
    assert stats.resets == 0, f"{where}: {stats.summary()}"
    assert stats.events == len(events), f"{where}: {stats.summary()}"
