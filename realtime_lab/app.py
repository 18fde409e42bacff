"""The aiohttp application: routes, lifecycle (bus, ticker, heartbeats), graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from realtime_lab import api, dashboard, metrics
from realtime_lab.bus import create_bus
from realtime_lab.config import Settings
from realtime_lab.feed.chats import ChatRegistry
from realtime_lab.feed.ticker import Ticker
from realtime_lab.transports import TRANSPORTS, faults, polling, sse, ws
from realtime_lab.transports.broadcast import BROADCASTS_KEY, Broadcasts
from realtime_lab.transports.common import (
    BUS_KEY,
    CHATS_KEY,
    HUB_KEY,
    SETTINGS_KEY,
    TICKER_KEY,
    Hub,
    json_errors,
)
from realtime_lab.transports.faults import CHAOS_KEY, Chaos
from realtime_lab.transports.stream import StreamConnection

log = logging.getLogger("realtime_lab.server")

PACKAGE_DIR = Path(__file__).resolve().parent
STATIC_DIR = PACKAGE_DIR / "static"


def templates_dir() -> Path:
    """``templates/``: inside the installed wheel, or at the top of a source checkout."""
    shipped = PACKAGE_DIR / "templates"
    return shipped if shipped.is_dir() else PACKAGE_DIR.parent / "templates"


def make_app(settings: Settings | None = None) -> web.Application:
    """Build the application. Serve it with :func:`run` (or an ``AppRunner`` with
    ``handler_cancellation=True``, so that a client hanging up ends its stream at once)."""
    settings = settings or Settings()
    app = web.Application(client_max_size=settings.max_body)
    app.on_response_prepare.append(json_errors)
    app[SETTINGS_KEY] = settings
    bus = create_bus(settings.bus, history=settings.history, ttl=settings.channel_ttl)
    app[BUS_KEY] = bus
    app[CHATS_KEY] = ChatRegistry(bus, ttl=settings.channel_ttl)
    app[TICKER_KEY] = Ticker(bus, settings.ticker_rate)
    app[HUB_KEY] = Hub(TRANSPORTS)
    app[CHAOS_KEY] = Chaos(enabled=settings.chaos)
    app[CHAOS_KEY].on_resume.append(lambda: _release_held(app))
    app[BROADCASTS_KEY] = Broadcasts(bus, app[CHAOS_KEY], settings.coalesce_ms)

    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_end_streams)

    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(templates_dir()), autoescape=True)
    r = app.router
    r.add_get("/poll/{channel}", polling.poll)
    r.add_get("/longpoll/{channel}", polling.longpoll)
    r.add_get("/sse/{channel}", sse.sse)
    r.add_get("/ws/{channel}", ws.ws)
    r.add_post("/api/chats", api.create_chat)
    r.add_get("/api/chats/{chat_id}", api.get_chat)
    r.add_delete("/api/chats/{chat_id}", api.cancel_chat)
    r.add_post("/api/channels/{channel}/events", api.publish_event)
    r.add_get("/api/channels/{channel}", api.channel_info)
    r.add_get("/api/stats", api.stats)
    r.add_get("/api/config", api.get_config)
    r.add_patch("/api/config", api.patch_config)
    r.add_get("/api/health", api.health)
    r.add_post("/v1/chat/completions", api.openai_chat_completions)
    faults.setup_routes(app)
    dashboard.setup(app)
    metrics.setup(app)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    bus, ticker = app[BUS_KEY], app[TICKER_KEY]
    await bus.start()
    ticker.start()
    beat = asyncio.create_task(_heartbeats(app), name="heartbeats")
    try:
        yield
    finally:
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)
        await ticker.stop()
        await app[CHATS_KEY].close()
        app[BROADCASTS_KEY].close()
        await bus.close()


async def _heartbeats(app: web.Application) -> None:
    """One task for every connection's heartbeat: a comment (SSE) or a ping (WebSocket)."""
    hub, settings, chaos = app[HUB_KEY], app[SETTINGS_KEY], app[CHAOS_KEY]
    while True:
        await asyncio.sleep(settings.heartbeat)
        if not chaos.heartbeats:
            continue
        for name in ("sse", "ws"):
            for conn in tuple(hub.stats[name].live.values()):
                conn.heartbeat()


def _release_held(app: web.Application) -> None:
    for conn in app[HUB_KEY].connections():
        if isinstance(conn, StreamConnection):
            conn.release_held()


async def _end_streams(app: web.Application) -> None:
    """On shutdown: end SSE streams, close WebSockets with 1001, answer waiting long-polls."""
    hub = app[HUB_KEY]
    hub.shutting_down = True
    conns = hub.connections()
    log.info("shutting down: ending %d open connections", len(conns))
    for conn in conns:
        conn.shutdown()
    # Let the handlers write their last bytes; aiohttp's shutdown_timeout bounds the rest.
    await asyncio.sleep(0)


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM, then stop within ``settings.shutdown_timeout`` seconds."""
    web.run_app(
        make_app(settings),
        host=settings.host,
        port=settings.port,
        shutdown_timeout=settings.shutdown_timeout,
        handler_cancellation=True,
        access_log=logging.getLogger("realtime_lab.access"),
        print=lambda *args: log.info(" ".join(str(a) for a in args)),
    )
