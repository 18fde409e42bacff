"""Bus fixtures: ``make_bus`` / ``bus`` parametrized over the memory, Redis and Redis Cluster
backends.

Redis tests share one private ``redis-server`` per session (started on a free port, never the
shared one on 6379) and get their own key prefix each, so they never see each other's keys. The
cluster ones share one private cluster (three primaries with a replica each,
:class:`~realtime_lab.bench.redisproc.RedisClusterServers`, the launcher the benchmark uses
too) the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from realtime_lab.bench.redisproc import (
    RedisClusterServers,
    redis_cli_binary,
    redis_server_binary,
)
from realtime_lab.bus import Bus, create_bus
from realtime_lab.protocol.envelope import END, Event

MakeBus = Callable[..., Awaitable[Bus]]

BACKENDS = [
    "memory",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("cluster", marks=pytest.mark.redis),
]


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """One private Redis Cluster for the session; skips when the binaries are not installed."""
    if redis_server_binary() is None or redis_cli_binary() is None:
        pytest.skip("redis-server and redis-cli are not installed (apt-get install redis-server)")
    with RedisClusterServers(primaries=3, replicas=1) as cluster:
        yield cluster


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterServers) -> str:
    """A ``redis+cluster://`` bus URL with a key prefix of its own for this test."""
    return redis_cluster.url(prefix=f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The bus URL of this parametrization (the Redis ones have their own prefix)."""
    if request.param == "memory":
        return "memory://"
    if request.param == "cluster":
        return str(request.getfixturevalue("cluster_url"))
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def make_bus(backend: str) -> AsyncIterator[MakeBus]:
    """Factory of started buses of the current backend, closed at the end of the test.

    Every bus a test makes shares the backend: two Redis buses see the same keys, as two server
    processes would; two memory buses are two independent processes. ``options`` are the other
    keyword arguments of :func:`create_bus` (``history_bytes``, ``max_channels``).
    """
    made: list[Bus] = []

    async def make(history: int = 1000, ttl: float = 300.0, **options: int) -> Bus:
        bus = create_bus(backend, history=history, ttl=ttl, **options)
        await bus.start()
        made.append(bus)
        return bus

    yield make
    for bus in reversed(made):
        await bus.close()


@pytest.fixture
async def bus(make_bus: MakeBus) -> Bus:
    """A started bus of the current backend (history 1000, ttl 300 s)."""
    return await make_bus()


class Recorder:
    """A sink that records what it is given (import it as ``from .conftest import Recorder``)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.closed: str | None = None
        self._changed = asyncio.Event()

    def deliver(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    def close(self, reason: str) -> None:
        self.closed = reason
        self._changed.set()

    @property
    def seqs(self) -> list[int]:
        return [event.seq for event in self.events]

    async def wait_for(self, predicate: Callable[[Recorder], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate(self)`` holds (bounded: fails the test after ``timeout``)."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

    async def wait_end(self, timeout: float = 5.0) -> None:
        """Wait for an ``end`` event."""
        await self.wait_for(lambda rec: any(e.type == END for e in rec.events), timeout)


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, interval: float = 0.02
) -> None:
    """Poll ``check()`` (sync or async) until it returns ``True``; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not await _checked(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def _checked(check: Callable[[], bool | Awaitable[bool]]) -> bool:
    value = check()
    return await value if inspect.isawaitable(value) else value
