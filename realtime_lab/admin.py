"""The admin side of the HTTP API: live settings (``/api/config``) and fault injection
(``/api/chaos/*``, with ``--chaos``)."""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from aiohttp import web

from realtime_lab.config import COMPRESSION_MODES
from realtime_lab.transports import TRANSPORTS
from realtime_lab.transports.chaos import Chaos
from realtime_lab.transports.keys import (
    CHAOS_KEY,
    HEARTBEAT_KEY,
    HUB_KEY,
    SETTINGS_KEY,
    TICKER_KEY,
)
from realtime_lab.transports.params import json_body, number
from realtime_lab.transports.problems import HTTPProblem, json_response

log = logging.getLogger("realtime_lab.chaos")


TUNABLE: Final = {
    # name: (low, high); the dashboard's sliders change these while the server runs
    "heartbeat": (0.2, 300.0),
    "ticker_rate": (0.0, 1000.0),
    "ttft_ms": (0.0, 60_000.0),
    "token_ms": (0.0, 10_000.0),
    "longpoll_timeout": (0.0, 60.0),
}


def _config(request: web.Request) -> dict[str, Any]:
    settings = request.app[SETTINGS_KEY]
    return {
        **{name: getattr(settings, name) for name in TUNABLE},
        "retry_ms": settings.retry_ms,
        "history": settings.history,
        "bus": settings.bus.split("?")[0].split("@")[-1],  # no credentials
        "chaos": settings.chaos,
        "generator": settings.generator,
        "compression": settings.compression,
        "server_time_ms": time.time() * 1000.0,
    }


async def get_config(request: web.Request) -> web.Response:
    """``GET /api/config``: the live settings (and the server clock, for offset correction)."""
    return json_response(_config(request))


async def patch_config(request: web.Request) -> web.Response:
    """``PATCH /api/config``: change live settings (heartbeat, ticker rate, chat pacing, the
    compression mode).

    A new ``compression`` applies to connections and requests opened from then on; an open
    stream keeps the mode it was opened with (its handshake or headers said so). Open the
    streams to measure after the answer.
    """
    body = await json_body(request)
    settings = request.app[SETTINGS_KEY]
    unknown = set(body) - set(TUNABLE) - {"compression"}
    if unknown:
        raise HTTPProblem(400, "invalid-parameter", f"not tunable: {sorted(unknown)}")
    if "compression" in body:
        mode = body["compression"]
        if not isinstance(mode, str) or mode not in COMPRESSION_MODES:
            raise HTTPProblem(
                400,
                "invalid-parameter",
                f"compression must be one of: {', '.join(COMPRESSION_MODES)}",
            )
    for name, (low, high) in TUNABLE.items():
        if name in body:
            setattr(settings, name, _number(body, name, low, high))
    if "compression" in body:
        settings.compression = body["compression"]
    request.app[TICKER_KEY].rate = settings.ticker_rate
    if "heartbeat" in body:
        request.app[HEARTBEAT_KEY].reschedule()  # not after the old interval has run out
    return json_response(_config(request))


# Fault injection ---------------------------------------------------------------------------------

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


def _number(body: dict[str, Any], name: str, low: float, high: float, **how: bool) -> float:
    return number(body.get(name), name, low, high, **how)


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
    seconds = _number(await json_body(request), "seconds", 0, MAX_PAUSE_S, above_low=True)
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
