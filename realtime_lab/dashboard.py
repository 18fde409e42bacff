"""The comparison dashboard: ``GET /`` and its static files.

The page (``templates/index.html``, ``static/dashboard.{js,css}``) needs no build step and no
internet: the browser's own ``fetch``, ``EventSource`` and ``WebSocket`` drive the four panes,
and the charts are drawn on plain canvases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import aiohttp_jinja2
from aiohttp import web

from realtime_lab import __version__
from realtime_lab.transports.common import SETTINGS_KEY


@dataclass(frozen=True, slots=True)
class PaneSpec:
    """One pane of the dashboard: the transport it runs and how it is labelled."""

    key: str  # the transport's name, as /api/stats reports it
    label: str
    browser_api: str


PANES: Final = (
    PaneSpec("poll", "Short polling", "fetch() on a timer"),
    PaneSpec("longpoll", "Long polling", "fetch(), one waiting request"),
    PaneSpec("sse", "Server-Sent Events", "EventSource"),
    PaneSpec("ws", "WebSocket", "WebSocket"),
)

#: The figures each pane shows: (data-metric name, label, tooltip).
METRICS: Final = (
    ("ttft", "time to first token", "from sending the prompt to this pane's first token"),
    ("latency", "latency p50/p95/max", "server ts to browser receive, clock-offset corrected"),
    ("tokens", "tokens received", "token events shown (duplicates dropped)"),
    ("integrity", "gaps/dups/reordered", "all 0 unless a reset says history was lost"),
    ("resets", "resets", "reset events: the server said events were lost"),
    ("reconnects", "reconnects", "connections re-established after a cut or failure"),
    (
        "requests",
        "requests page/server",
        "HTTP requests and handshakes, as this page / the server counted them",
    ),
    ("bytes", "bytes on the wire", "server to browser, headers and framing included"),
    ("bpt", "bytes per token", "bytes on the wire / tokens received"),
)


@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict[str, object]:
    """``GET /``: the dashboard page; its script then reads ``/api/config`` and waits for a
    prompt."""
    static = request.app.router["static"]
    return {
        "settings": request.app[SETTINGS_KEY],
        "panes": PANES,
        "metrics": METRICS,
        # The version in the URL makes a browser fetch the new files after an upgrade.
        "css_url": str(static.url_for(filename="dashboard.css").with_query(v=__version__)),
        "js_url": str(static.url_for(filename="dashboard.js").with_query(v=__version__)),
    }


def setup(app: web.Application) -> None:
    """Add the dashboard's routes (``/`` and ``/static/``) to ``app``."""
    from realtime_lab.app import STATIC_DIR

    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR, name="static")
