"""Fault injection ("chaos"): what a misbehaving network or server looks like, on demand.

Off unless the server runs with ``--chaos``; then ``/api/chaos/*`` can drop connections
abruptly, pause delivery, slow every write, fail the next requests with 503 and silence
heartbeats. Without ``--chaos`` those endpoints answer 404 and this state never changes, so the
transports' hot paths only pay one attribute check (:attr:`Chaos.active`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web

from realtime_lab.api import json_body
from realtime_lab.transports import TRANSPORTS
from realtime_lab.transports.common import HUB_KEY, HTTPProblem, json_response

log = logging.getLogger("realtime_lab.chaos")


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


CHAOS_KEY: Final = web.AppKey("chaos", Chaos)


# HTTP endpoints ----------------------------------------------------------------------------------

#: What ``drop`` and ``fail`` accept as their ``transport``.
TARGETS: Final = (*TRANSPORTS, "all")
MAX_PAUSE_S: Final = 60.0
MAX_DELAY_MS: Final = 10_000.0
MAX_FAIL_COUNT: Final = 1000


def _chaos(request: web.Request) -> Chaos:
    chaos = request.app[CHAOS_KEY]
    if not chaos.enabled:
        raise HTTPProblem(404, "not-found", "fault injection is off; start the server with --chaos")
    return chaos


def _transport(body: dict[str, Any]) -> str:
    value = body.get("transport")
    if not isinstance(value, str) or value not in TARGETS:
        raise HTTPProblem(
            400, "invalid-parameter", f"transport must be one of: {', '.join(TARGETS)}"
        )
    return value


def _number(
    body: dict[str, Any],
    name: str,
    low: float,
    high: float,
    *,
    low_inclusive: bool = True,
    integer: bool = False,
) -> float:
    value = body.get(name)
    kind = "an integer" if integer else "a number"
    # bool is an int subclass; NaN fails every comparison and so the range check too.
    if (
        isinstance(value, bool)
        or not isinstance(value, int if integer else int | float)
        or not low <= value <= high
    ):
        raise HTTPProblem(
            400, "invalid-parameter", f"{name} must be {kind} between {low:g} and {high:g}"
        )
    if not low_inclusive and value == low:
        raise HTTPProblem(
            400, "invalid-parameter", f"{name} must be more than {low:g} and at most {high:g}"
        )
    return float(value)


async def get_state(request: web.Request) -> web.Response:
    """``GET /api/chaos``: the current switches."""
    return json_response(_chaos(request).state())


async def drop(request: web.Request) -> web.Response:
    """``POST /api/chaos/drop {"transport"}``: abort every open connection of a transport.

    The sockets are aborted with no ``end`` event, close frame or final chunk, as a network cut
    would leave them; clients are expected to notice and resume from their last event id.
    """
    _chaos(request)
    transport = _transport(await json_body(request))
    conns = request.app[HUB_KEY].connections(None if transport == "all" else transport)
    for conn in conns:
        conn.drop()
    log.warning("chaos: dropped %d open %s connection(s)", len(conns), transport)
    return json_response({"dropped": len(conns), "transport": transport})


async def pause(request: web.Request) -> web.Response:
    """``POST /api/chaos/pause {"seconds"}``: hold every delivery back, then send it all."""
    chaos = _chaos(request)
    seconds = _number(await json_body(request), "seconds", 0, MAX_PAUSE_S, low_inclusive=False)
    chaos.pause(seconds)
    log.warning("chaos: delivery paused for %gs", seconds)
    return json_response({"paused_for_s": seconds})


async def delay(request: web.Request) -> web.Response:
    """``POST /api/chaos/delay {"ms"}``: delay every streaming write (``0`` turns it off)."""
    chaos = _chaos(request)
    ms = _number(await json_body(request), "ms", 0, MAX_DELAY_MS)
    chaos.set_delay(ms)
    log.warning("chaos: streaming writes delayed by %gms", ms)
    return json_response({"write_delay_ms": ms})


async def fail(request: web.Request) -> web.Response:
    """``POST /api/chaos/fail {"transport", "count"}``: the next requests answer 503.

    With ``"all"`` each transport fails its own next ``count`` requests. ``count`` replaces
    what was left of an earlier request's count; ``0`` cancels it.
    """
    chaos = _chaos(request)
    body = await json_body(request)
    transport = _transport(body)
    count = int(_number(body, "count", 0, MAX_FAIL_COUNT, integer=True))
    for name in TRANSPORTS if transport == "all" else (transport,):
        chaos.fail_next[name] = count
    log.warning("chaos: the next %d %s request(s) will fail with 503", count, transport)
    return json_response(
        {"transport": transport, "count": count, "fail_next": dict(chaos.fail_next)}
    )


async def heartbeats(request: web.Request) -> web.Response:
    """``POST /api/chaos/heartbeats {"enabled"}``: silence (or restore) SSE comments and pings."""
    chaos = _chaos(request)
    enabled = (await json_body(request)).get("enabled")
    if not isinstance(enabled, bool):
        raise HTTPProblem(400, "invalid-parameter", "enabled must be true or false")
    chaos.heartbeats = enabled
    log.warning("chaos: heartbeats %s", "on" if enabled else "off")
    return json_response({"heartbeats": enabled})


async def reset(request: web.Request) -> web.Response:
    """``POST /api/chaos/reset``: every fault off; a pause ends and releases what it held."""
    chaos = _chaos(request)
    chaos.reset()
    log.warning("chaos: reset")
    return json_response(chaos.state())


def setup_routes(app: web.Application) -> None:
    """Add ``/api/chaos`` and its actions to ``app``.

    They are always routed, so a server without ``--chaos`` answers them with an explicit 404
    rather than a bare "no such route".
    """
    r = app.router
    r.add_get("/api/chaos", get_state)
    r.add_post("/api/chaos/drop", drop)
    r.add_post("/api/chaos/pause", pause)
    r.add_post("/api/chaos/delay", delay)
    r.add_post("/api/chaos/fail", fail)
    r.add_post("/api/chaos/heartbeats", heartbeats)
    r.add_post("/api/chaos/reset", reset)
