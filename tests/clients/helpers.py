"""Helpers of the client tests: start chats, read a client with a deadline."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import aiohttp

from realtime_lab.clients import StreamClient, open_stream
from realtime_lab.protocol.envelope import Event
from tests.conftest import free_port

TRANSPORTS = ("poll", "longpoll", "sse", "ws", "fetch")
#: The transports that read a channel by name (fetch streams the chat it creates).
CHANNEL_TRANSPORTS = ("poll", "longpoll", "sse", "ws")
TIMEOUT = 20.0  # generous: two shared cores, other test runs in parallel

#: Fast options for the clients under test (quick reconnects, short polls).
FAST: dict[str, Any] = {
    "poll_interval": 0.02,
    "longpoll_timeout": 5.0,
    "backoff_initial": 0.02,
    "backoff_max": 0.2,
}


async def start_chat(
    base: str, prompt: str, *, bearer: str | None = None, **options: Any
) -> dict[str, Any]:
    """POST /api/chats (as the user of the ``bearer`` token, if any); the 201 answer."""
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/api/chats", json={"prompt": prompt, **options}, headers=headers
        ) as response,
    ):
        assert response.status == 201, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


async def collect(client: StreamClient, timeout: float = TIMEOUT) -> list[Event]:
    """Every event ``client`` yields until its iteration stops (after ``end``)."""
    events: list[Event] = []
    async with asyncio.timeout(timeout):
        async for event in client:
            events.append(event)
    return events


async def next_event(iterator: AsyncIterator[Event], timeout: float = TIMEOUT) -> Event:
    """The next event of a running iteration, within ``timeout``."""
    return await asyncio.wait_for(anext(iterator), timeout)


async def rest_of(iterator: AsyncIterator[Event], timeout: float = TIMEOUT) -> list[Event]:
    """The remaining events of a running iteration, until it stops, within ``timeout``."""
    events: list[Event] = []
    async with asyncio.timeout(timeout):
        async for event in iterator:
            events.append(event)
    return events


def text_of(events: list[Event]) -> str:
    """The concatenated token text."""
    return "".join(e.data["text"] for e in events if e.type == "token")


async def chat_stream(
    base: str,
    transport: str,
    prompt: str,
    *,
    owner: str | None = None,
    client: dict[str, Any] | None = None,
    **chat: Any,
) -> StreamClient:
    """A client (not yet entered) of a new chat over ``transport``.

    ``fetch`` creates the chat with its own POST; the other transports read the channel of a
    chat ``POST /api/chats`` started first, as the user of the ``owner`` token (the fetch POST
    sends the client's ``token``). ``client``: options for :func:`open_stream`.
    """
    options = client or {}
    body = {"prompt": prompt, **chat}
    if transport == "fetch":
        return open_stream(base, None, "fetch", chat=body, **options)
    answer = await start_chat(base, prompt, bearer=owner, **chat)
    return open_stream(base, answer["channel"], transport, **options)


@contextmanager
def serve_process(env: Mapping[str, str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``realtime-lab serve`` in a subprocess with ``env``; its URL and process, once it answers.

    Stopped after (SIGTERM, SIGKILL if it lingers), unless the test ended it itself.
    """
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "realtime_lab", "serve", "--port", str(port), "--ticker-rate", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(env),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/api/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert process.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.05)  # polling the condition, within the deadline above
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def served(env: Mapping[str, str]) -> Iterator[str]:
    """``realtime-lab serve`` in a subprocess with ``env``; its URL, once it answers."""
    with serve_process(env) as (url, _):
        yield url
