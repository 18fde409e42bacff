"""The aiohttp application: routes, lifecycle (bus, ticker, heartbeats), graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

import aiohttp_jinja2
import jinja2
from aiohttp import web

from realtime_lab import admin, api, dashboard, httpserver, metrics, openai_api
from realtime_lab.auth import RedactingFilter
from realtime_lab.bus import Bus, create_bus
from realtime_lab.config import Settings
from realtime_lab.cors import setup_cors
from realtime_lab.feed.chats import ChatRegistry
from realtime_lab.feed.shared import ChatSharing
from realtime_lab.feed.ticker import Ticker
from realtime_lab.feed.upstream import upstream_source
from realtime_lab.transports import TRANSPORTS, fetch, polling, sse, ws
from realtime_lab.transports.abortgrace import AbortGrace
from realtime_lab.transports.access import Access, Handler, Need, guarded
from realtime_lab.transports.accounting import Hub
from realtime_lab.transports.broadcast import Broadcasts
from realtime_lab.transports.chaos import Chaos
from realtime_lab.transports.heartbeat import Heartbeat
from realtime_lab.transports.keys import (
    ABORT_GRACE_KEY,
    ACCESS_KEY,
    BROADCASTS_KEY,
    BUS_KEY,
    CHAOS_KEY,
    CHATS_KEY,
    HEARTBEAT_KEY,
    HUB_KEY,
    SETTINGS_KEY,
    SLOTS_KEY,
    TICKER_KEY,
)
from realtime_lab.transports.problems import json_errors
from realtime_lab.transports.slots import StreamSlots
from realtime_lab.transports.stream import StreamConnection

log = logging.getLogger("realtime_lab.server")

PACKAGE_DIR = Path(__file__).resolve().parent


def templates_dir() -> Path:
    """``templates/``: inside the installed wheel, or at the top of a source checkout."""
    shipped = PACKAGE_DIR / "templates"
    return shipped if shipped.is_dir() else PACKAGE_DIR.parent / "templates"


#: The access logs: ``run``'s, and aiohttp's default (test servers, other runners).
ACCESS_LOGGER = "realtime_lab.access"
_ACCESS_LOGGERS = (ACCESS_LOGGER, "aiohttp.access")


def redact_access_logs() -> None:
    """Keep tokens and tickets out of the access logs (idempotent)."""
    for name in _ACCESS_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())


def make_app(settings: Settings | None = None) -> web.Application:
    """Build the application. Serve it with :func:`run` (or an ``AppRunner`` with
    ``handler_cancellation=True``, so that a client hanging up ends its stream at once)."""
    settings = settings or Settings()
    redact_access_logs()
    app = web.Application(client_max_size=settings.max_body)
    app.on_response_prepare.append(json_errors)
    mount_transports(app, settings)
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(templates_dir()), autoescape=True)
    add_routes(app)
    setup_cors(app, [o for o in settings.allowed_origins.split(",") if o.strip()])
    return app


def mount_transports(
    app: web.Application,
    settings: Settings,
    *,
    bus: Bus | None = None,
    prefix: str = "",
) -> None:
    """Serve the five transports from ``app``, an aiohttp application of your own.

    Adds ``{prefix}/poll/{channel}``, ``/longpoll/``, ``/sse/``, ``/ws/`` and
    ``POST {prefix}/api/chats/stream``, with everything they need: the bus (``bus``, or the one
    ``settings.bus`` names; publish to it with ``await app[BUS_KEY].publish(...)``), chats,
    heartbeats, access checks (``settings.auth_secret``, ``allowed_origins``, ...), stream
    bounds, and their start and stop with the application. Serve ``app`` with
    ``handler_cancellation=True`` (aiohttp's ``web.run_app`` default), so a client hanging up
    ends its stream at once.
    """
    if bus is None:
        bus = create_bus(
            settings.bus,
            history=settings.history,
            ttl=settings.channel_ttl,
            history_bytes=settings.history_bytes,
            max_channels=settings.max_channels,
        )
    app[SETTINGS_KEY] = settings
    app[BUS_KEY] = bus
    app[CHATS_KEY] = ChatRegistry(
        bus,
        ttl=settings.channel_ttl,
        max_running=settings.max_chats,
        max_running_per_owner=settings.max_chats_per_user,
        source=upstream_source(
            settings.upstream,
            model=settings.upstream_model,
            ttft_timeout=settings.upstream_ttft_timeout,
            idle_timeout=settings.upstream_idle_timeout,
        ),
    )
    app[TICKER_KEY] = Ticker(bus, settings.ticker_rate)
    app[HUB_KEY] = Hub(TRANSPORTS)
    app[CHAOS_KEY] = Chaos(enabled=settings.chaos)
    app[CHAOS_KEY].on_resume.append(lambda: _release_held(app))
    app[BROADCASTS_KEY] = Broadcasts(bus, app[CHAOS_KEY], settings.coalesce_ms)
    app[HEARTBEAT_KEY] = Heartbeat(app[HUB_KEY], settings, app[CHAOS_KEY])
    app[ACCESS_KEY] = Access(settings, bus)
    app[SLOTS_KEY] = StreamSlots(settings.max_streams, settings.max_streams_per_client)
    app[ABORT_GRACE_KEY] = AbortGrace(app[CHATS_KEY], settings.fetch_abort_grace)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_end_streams)
    r = app.router
    r.add_get(prefix + "/poll/{channel}", polling.poll)
    r.add_get(prefix + "/longpoll/{channel}", polling.longpoll)
    r.add_get(prefix + "/sse/{channel}", sse.sse)
    r.add_get(prefix + "/ws/{channel}", ws.ws)
    r.add_post(prefix + "/api/chats/stream", fetch.fetch_stream)  # checks access itself


def add_routes(app: web.Application) -> None:
    """The JSON API, the admin side, ``/v1``, the dashboard and ``/metrics``, each route with
    what it needs of its caller (see ``access.Need``). The transports (:func:`mount_transports`)
    check access in their own preamble: no wrapper stays on a stream's stack."""

    def guard(need: Need) -> Callable[[Handler], Handler]:
        return guarded(need, lambda request: request.app[ACCESS_KEY])

    nobody, user, publisher, admin_only = (
        guard(Need.NOBODY),
        guard(Need.USER),
        guard(Need.PUBLISH),
        guard(Need.ADMIN),
    )
    r = app.router
    r.add_post("/api/chats", user(api.create_chat))
    r.add_get("/api/chats/{chat_id}", user(api.get_chat))
    r.add_delete("/api/chats/{chat_id}", user(api.cancel_chat))
    r.add_post("/api/channels/{channel}/events", publisher(api.publish_event))
    r.add_get("/api/channels/{channel}", user(api.channel_info))
    r.add_post("/api/users/{user}/events", publisher(api.push_to_user))
    r.add_get("/api/stats", user(api.stats))
    r.add_get("/api/health", nobody(api.health))
    r.add_get("/api/session", nobody(api.get_session))
    r.add_post("/api/session", nobody(api.open_session))
    r.add_delete("/api/session", nobody(api.close_session))
    r.add_post("/api/tickets", user(api.create_ticket))
    r.add_get("/api/config", user(admin.get_config))
    r.add_patch("/api/config", admin_only(admin.patch_config))
    # Always routed: without --chaos they answer an explicit 404, not a bare "no such route".
    r.add_get("/api/chaos", admin_only(admin.get_state))
    for action in ("drop", "pause", "delay", "fail", "heartbeats", "reset"):
        r.add_post(f"/api/chaos/{action}", admin_only(getattr(admin, action)))
    openai_api.setup(app, user)
    dashboard.setup(app, nobody)
    metrics.setup(app, admin_only)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    bus, ticker = app[BUS_KEY], app[TICKER_KEY]
    await bus.start()
    # Chats readable and cancellable on every process of a shared bus (none on memory://).
    await ChatSharing.open(app[CHATS_KEY], bus, app[SETTINGS_KEY].channel_ttl)
    ticker.start()
    app[HEARTBEAT_KEY].start()
    try:
        yield
    finally:
        await app[HEARTBEAT_KEY].stop()
        await ticker.stop()
        app[ABORT_GRACE_KEY].close()
        await app[CHATS_KEY].close()
        app[BROADCASTS_KEY].close()
        await bus.close()


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


#: Allocations between two youngest-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD: Final = 20_000


def tune_gc() -> None:
    """Collect less often, and never look at what exists at startup again.

    Every connection and request allocates a few hundred objects, so the default threshold
    runs a collection every few requests, and the older generations' passes walk every live
    connection: measured, about 30% of the CPU of opening a connection (732 against 500 µs
    with the collector off). Frozen startup objects (modules, the app) are skipped by every
    pass; a higher threshold keeps the collector for what it is for, cycles.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM, then stop within ``settings.shutdown_timeout`` seconds.

    The server is aiohttp's, hardened (:mod:`realtime_lab.httpserver`): a client has
    ``settings.header_timeout`` seconds to send its request headers, and malformed requests get
    a JSON error and one log line. The access log never shows a token or a ticket.
    """
    access_log = logging.getLogger(ACCESS_LOGGER)
    app = make_app(settings)
    tune_gc()
    httpserver.run_app(
        app,
        host=settings.host,
        port=settings.port,
        header_timeout=settings.header_timeout,
        shutdown_timeout=settings.shutdown_timeout,
        # A logger that would drop every line still costs an AccessLogger per connection (and
        # a clock read per request): none at all when its level hides them.
        access_log=access_log if access_log.isEnabledFor(logging.INFO) else None,
        print=log.info,
    )
