"""Random connection cuts across a whole chat, every transport streaming it at once.

The fetch client streams a chat of its own, started by its POST with the same request at the
same moment, so the same drops cut it at about the same points of its answer.

The schedule comes from a seeded ``random.Random``: 5 to 8 ``drop all`` faults, each once the
generator has published a randomly chosen number of tokens. Replay a failure with
``RELIABILITY_SEEDS=<seed> pytest tests/reliability/test_random_drops.py`` (every assertion
message names its seed and schedule).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import AsyncIterator

import aiohttp
import pytest

from realtime_lab.transports.keys import CHATS_KEY
from tests.conftest import StartServer
from tests.reliability.helpers import (
    CHANNEL_TRANSPORTS,
    MAX_TOKENS,
    STREAMING,
    assert_exact_answer,
    chaos,
    fetch_reader,
    reader,
    start_chat,
)

SEEDS = [int(s) for s in os.environ.get("RELIABILITY_SEEDS", "20251121,7").split(",")]
TOKEN_MS = 20.0  # 118 tokens: ~2.4 s of generation
MIN_SPACING = 6  # tokens between two drops: longer than a reconnection, so most of them land


def schedule(seed: int) -> list[int]:
    """After how many published tokens each drop comes, ascending."""
    rng = random.Random(seed)
    count = rng.randint(5, 8)
    while True:
        points = sorted(rng.sample(range(3, MAX_TOKENS - 3), count))
        if all(b - a >= MIN_SPACING for a, b in itertools.pairwise(points)):
            return points


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_drops_on_all_transports_lose_nothing(
    start_server: StartServer, session: aiohttp.ClientSession, seed: int
) -> None:
    points = schedule(seed)
    context = f"(seed {seed}, drops after tokens {points})"
    server = await start_server(chaos=True, retry_ms=50)
    chat = await start_chat(session, server, token_ms=TOKEN_MS)
    generated = server.app[CHATS_KEY].get(chat["id"]).parts
    readers = [reader(server, chat["channel"], t) for t in CHANNEL_TRANSPORTS]
    readers.append(fetch_reader(server, token_ms=TOKEN_MS))
    cuts: list[int] = []
    for r in readers:
        await r.__aenter__()
    try:
        async with asyncio.timeout(20):
            for point in points:
                while len(generated) < point:
                    await asyncio.sleep(0.002)  # polling the generator, with the deadline above
                cuts.append((await chaos(session, server, "drop", transport="all"))["dropped"])
            assert len(generated) < MAX_TOKENS, f"the chat ended before the last drop {context}"
            results = [await r.finished() for r in readers]
    finally:
        for r in readers:
            await r.__aexit__(None, None, None)

    for r, events in zip(readers, results, strict=True):
        assert_exact_answer(events, r.client, context=f"{context}, cuts {cuts}")
    by_transport = {r.client.transport: r.client.stats for r in readers}
    # Not a vacuous run: connections were cut, and the streaming clients came back from it.
    assert sum(cuts) >= len(points), f"cuts {cuts} {context}"
    for name in STREAMING:
        assert by_transport[name].reconnects >= 1, f"{name} {context}"
        assert by_transport[name].connections == by_transport[name].reconnects + 1, context
    # No retry of the fetch POST started a chat of its own.
    assert server.app[CHATS_KEY].running == 0, context
