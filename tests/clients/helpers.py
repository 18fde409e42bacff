"""Helpers of the client tests: start chats, read a client with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from realtime_lab.clients import StreamClient
from realtime_lab.protocol.envelope import Event

TRANSPORTS = ("poll", "longpoll", "sse", "ws")
TIMEOUT = 20.0  # generous: two shared cores, other test runs in parallel

#: Fast options for the clients under test (quick reconnects, short polls).
FAST: dict[str, Any] = {
    "poll_interval": 0.02,
    "longpoll_timeout": 5.0,
    "backoff_initial": 0.02,
    "backoff_max": 0.2,
}


async def start_chat(base: str, prompt: str, **options: Any) -> dict[str, Any]:
    """POST /api/chats; the 201 answer."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/api/chats", json={"prompt": prompt, **options}) as response,
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


def text_of(events: list[Event]) -> str:
    """The concatenated token text."""
    return "".join(e.data["text"] for e in events if e.type == "token")
