"""Fault injection ("chaos") state: what a misbehaving network or server looks like, on demand.

Off unless the server runs with ``--chaos``; then the admin endpoints (:mod:`realtime_lab.admin`)
can drop connections abruptly, pause delivery, slow every write, fail the next requests with 503
and silence heartbeats. Without ``--chaos`` this state never changes, so the transports' hot
paths only pay one attribute check (:attr:`Chaos.active`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from realtime_lab.transports import TRANSPORTS
from realtime_lab.transports.problems import HTTPProblem


class Chaos:
    """The fault-injection switches every transport consults."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self.active = False  # any of pause/delay on: streaming writes take the slow path
        self.paused_until = 0.0
        self.write_delay = 0.0
        self.heartbeats = True
        self.fail_next: dict[str, int] = dict.fromkeys(TRANSPORTS, 0)
        self.on_resume: list[Callable[[], None]] = []
        self._resume_handle: asyncio.TimerHandle | None = None
        self._unpaused: asyncio.Future[None] | None = None

    @property
    def paused(self) -> bool:
        """``True`` while delivery is paused."""
        return self._resume_handle is not None

    def maybe_fail(self, transport: str) -> None:
        """Raise a 503 if a fault asked this transport's next request to fail."""
        if self.fail_next.get(transport, 0) > 0:
            self.fail_next[transport] -= 1
            raise HTTPProblem(
                503, "chaos-unavailable", "injected failure (chaos)", retry_after_ms=100
            )

    def pause(self, seconds: float) -> None:
        """Hold back every delivery for ``seconds``; held events are sent when it ends."""
        loop = asyncio.get_running_loop()
        if self._resume_handle is not None:
            self._resume_handle.cancel()
        self.paused_until = loop.time() + seconds
        self._resume_handle = loop.call_later(seconds, self.resume)
        if self._unpaused is None or self._unpaused.done():
            self._unpaused = loop.create_future()
        self._update()

    def resume(self) -> None:
        """End a pause now and flush what it held back."""
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        self.paused_until = 0.0
        if self._unpaused is not None and not self._unpaused.done():
            self._unpaused.set_result(None)
        self._update()
        for callback in self.on_resume:
            callback()

    def unpaused(self) -> asyncio.Future[None]:
        """A future done when no pause is in force (at once when none is).

        Wait on it with ``asyncio.wait`` or ``asyncio.shield``: it is shared, never cancel it.
        """
        if self._unpaused is None or self._unpaused.done():
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return self._unpaused

    async def wait_unpaused(self) -> None:
        """Return when no pause is in force."""
        await asyncio.shield(self.unpaused())

    def set_delay(self, ms: float) -> None:
        """Delay every streaming write by ``ms`` milliseconds (0 turns it off)."""
        self.write_delay = max(ms, 0.0) / 1000.0
        self._update()

    def reset(self) -> None:
        """Turn every fault off."""
        self.resume()
        self.set_delay(0)
        self.heartbeats = True
        self.fail_next = dict.fromkeys(TRANSPORTS, 0)

    def _update(self) -> None:
        self.active = self.paused or self.write_delay > 0

    def state(self) -> dict[str, Any]:
        """The switches, as ``GET /api/chaos`` shows them."""
        loop = asyncio.get_running_loop()
        return {
            "enabled": self.enabled,
            "paused_for_s": max(self.paused_until - loop.time(), 0.0) if self.paused else 0.0,
            "write_delay_ms": self.write_delay * 1000.0,
            "heartbeats": self.heartbeats,
            "fail_next": dict(self.fail_next),
        }
