"""The ``ticker`` channel: a steady, never-ending token stream at a configurable rate."""

from __future__ import annotations

import asyncio
import logging

from realtime_lab.bus import Bus
from realtime_lab.feed.llm import ticker_word
from realtime_lab.protocol.envelope import TOKEN

log = logging.getLogger(__name__)

TICKER_CHANNEL = "ticker"
MAX_BURST = 1000  # tokens published at once after a stall, at most


class Ticker:
    """Publishes ``token`` events on :data:`TICKER_CHANNEL` at ``rate`` per second.

    The schedule is absolute (token ``n`` is due at ``start + n / rate``) so that the rate does
    not drift under load; when the loop falls behind, the due tokens are published together.
    Change ``rate`` at any time; ``rate <= 0`` pauses the feed.
    """

    def __init__(self, bus: Bus, rate: float = 10.0, channel: str = TICKER_CHANNEL) -> None:
        self.bus = bus
        self.rate = rate
        self.channel = channel
        self.index = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start publishing in a background task."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ticker")

    async def stop(self) -> None:
        """Stop publishing and wait for the task to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        rate = self.rate
        origin, sent = loop.time(), 0
        while True:
            if self.rate != rate:  # re-anchor the schedule when the rate changes
                rate, origin, sent = self.rate, loop.time(), 0
            if rate <= 0:
                await asyncio.sleep(0.1)
                continue
            due = int((loop.time() - origin) * rate) + 1
            behind = due - sent
            if behind > MAX_BURST:
                # A stall (a suspended process, a saturated loop) must not turn into a flood
                # that saturates it further: skip ahead and say so.
                log.warning("ticker fell %d tokens behind; skipping %d", behind, behind - MAX_BURST)
                sent = due - MAX_BURST
            while sent < due:
                await self.bus.publish(
                    self.channel, TOKEN, {"text": ticker_word(self.index), "index": self.index}
                )
                self.index += 1
                sent += 1
            await asyncio.sleep(max(origin + sent / rate - loop.time(), 0.0))
