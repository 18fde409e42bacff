"""The comparison dashboard: ``GET /`` and its static files.

The page (``templates/index.html``, ``static/*.js``, ``static/dashboard.css``) needs no build
step and no internet: ES modules loaded by the browser itself, whose own ``fetch``,
``EventSource`` and ``WebSocket`` drive the panes; the charts are drawn on plain canvases.

Each :data:`PANES` entry is one pane on the page and names the module that runs it: a new
transport pane is a new ``static/pane-*.js`` module plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp_jinja2
from aiohttp import web

from realtime_lab import __version__
from realtime_lab.transports.access import Handler
from realtime_lab.transports.keys import ACCESS_KEY, SETTINGS_KEY

#: The dashboard's CSS and ES modules, served under ``/static/``.
STATIC_DIR: Final = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True, slots=True)
class PaneSpec:
    """One pane of the dashboard: the transport it runs, how it is labelled, and its module."""

    key: str  # the transport's name, as /api/stats reports it
    label: str  # the pane's heading
    short: str  # its name in the charts, the summary table and the findings
    browser_api: str
    color: str  # CSS colour of its heading and chart series
    module: str  # the file in static/ whose default export is its Pane class
    remark: str = ""  # what sets it apart, shown when the pointer is on its browser API


PANES: Final = (
    PaneSpec(
        key="poll",
        label="Short polling",
        short="Short poll",
        browser_api="fetch() on a timer",
        color="#d9480f",
        module="pane-poll.js",
    ),
    PaneSpec(
        key="longpoll",
        label="Long polling",
        short="Long poll",
        browser_api="fetch(), one waiting request",
        color="#7048e8",
        module="pane-longpoll.js",
    ),
    PaneSpec(
        key="sse",
        label="Server-Sent Events",
        short="SSE",
        browser_api="EventSource",
        color="#1971c2",
        module="pane-sse.js",
    ),
    PaneSpec(
        key="ws",
        label="WebSocket",
        short="WebSocket",
        browser_api="WebSocket",
        color="#2f9e44",
        module="pane-ws.js",
    ),
    PaneSpec(
        key="fetch",
        label="Fetch streaming",
        short="Fetch",
        browser_api="fetch() POST, body.getReader()",
        color="#c2255c",
        module="pane-fetch.js",
        remark="POSTs the prompt to /api/chats/stream and reads SSE from the same response, as "
        "ChatGPT does: its own chat, with the same prompt and seed as the other panes' chat, so "
        "the same text; resumes a cut stream with Last-Event-ID",
    ),
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


def import_map(static: web.AbstractResource) -> dict[str, dict[str, str]]:
    """The page's import map: every module's URL to the same URL with ``?v=<version>``.

    The entry point's ``?v=`` does not reach the modules it imports (a relative import drops
    the query), so without this a browser would keep running old modules after an upgrade.
    """
    names = sorted(path.relative_to(STATIC_DIR).as_posix() for path in STATIC_DIR.rglob("*.js"))
    return {"imports": {str(static.url_for(filename=n)): versioned(static, n) for n in names}}


def versioned(static: web.AbstractResource, filename: str) -> str:
    """The URL of a static file, with the version that makes browsers fetch it anew."""
    return str(static.url_for(filename=filename).with_query(v=__version__))


@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict[str, object]:
    """``GET /``: the dashboard page; its script then reads ``/api/config`` and waits for a
    prompt."""
    static = request.app.router["static"]
    return {
        "settings": request.app[SETTINGS_KEY],
        "generator": request.app[SETTINGS_KEY].generator,
        # Whether to show the "sign in as" box at once (the page then asks GET /api/session).
        "auth": request.app[ACCESS_KEY].on,
        "panes": PANES,
        "metrics": METRICS,
        "css_url": versioned(static, "dashboard.css"),
        "js_url": versioned(static, "dashboard.js"),
        "import_map": import_map(static),
    }


def setup(
    app: web.Application,
    guard: Callable[[Handler], Handler],
) -> None:
    """Add the dashboard's routes (``/`` and ``/static/``) to ``app``."""
    app.router.add_get("/", guard(index))
    app.router.add_static("/static/", STATIC_DIR, name="static")
