"""What every transport shares: app keys, request parsing, JSON errors, the connection hub.

The :class:`Hub` knows every open streaming connection (to send heartbeats, to end them on
shutdown, to drop them on a chaos request) and keeps the byte/event accounting. Accounting is
paid once per write as two integer additions on the connection; totals per transport and per
dashboard client are summed when someone asks (``GET /api/stats``), not on the hot path.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Final

from aiohttp import hdrs, web

from realtime_lab.bus.base import After, Bus
from realtime_lab.config import Settings
from realtime_lab.errors import InvalidCursor
from realtime_lab.feed.chats import CHAT_PREFIX, ChatRegistry
from realtime_lab.feed.ticker import Ticker
from realtime_lab.protocol.cursor import Cursor, parse_after
from realtime_lab.protocol.envelope import dumps

log = logging.getLogger("realtime_lab.server")

CHANNEL_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
CLIENT_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_CLIENTS: Final = 1024  # per-client counters kept (least recently used dropped first)


class HTTPProblem(web.HTTPException):
    """An error answered as ``{"error": {"code", "message"}}`` with an HTTP status.

    Raise it from a handler: aiohttp answers with it as it answers any ``HTTPException``, and
    :func:`json_errors` logs it. (Errors are answered without a middleware on purpose: a
    middleware keeps a frame alive for the whole life of every SSE and WebSocket connection.)
    """

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        self.status_code = status
        super().__init__(
            body=None,
            text=dumps(error_body(code, message, **extra)).decode(),
            content_type="application/json",
        )
        self.code = code
        self.message = message
        self.extra = extra

    def __str__(self) -> str:
        return self.message


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON error shape every endpoint uses."""
    return {"error": {"code": code, "message": message, **extra}}


def json_response(value: Any, status: int = 200, **headers: str) -> web.Response:
    """A compact UTF-8 JSON response."""
    return web.Response(
        body=dumps(value), status=status, content_type="application/json", headers=headers
    )


_AIOHTTP_CODES: Final = {
    404: "not-found",
    405: "method-not-allowed",
    413: "body-too-large",
    415: "unsupported-media-type",
}


async def json_errors(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare``: log every error answer; give aiohttp's own a JSON body too.

    aiohttp answers unknown paths (404), wrong methods (405), oversized bodies (413) and crashes
    (500) with plain text; they get the same ``{"error": {...}}`` shape as ours.
    """
    if response.status < 400:
        return
    if isinstance(response, HTTPProblem):
        log.warning(
            "%s %s -> %d %s: %s",
            request.method,
            request.path_qs,
            response.status,
            response.code,
            response.message,
        )
        return
    log.warning("%s %s -> %d %s", request.method, request.path_qs, response.status, response.reason)
    if isinstance(response, web.Response) and response.content_type == "text/plain":
        code = _AIOHTTP_CODES.get(response.status, "http-error")
        body = dumps(error_body(code, response.text or response.reason))
        response.body = body
        response.content_type = "application/json"
        response.headers[hdrs.CONTENT_LENGTH] = str(len(body))  # set already, for the text


# Request parsing ---------------------------------------------------------------------------------


def channel_name(request: web.Request) -> str:
    """The ``{channel}`` path segment, validated.

    Raises:
        HTTPProblem: 400 when it is not a short ``[A-Za-z0-9_.:-]`` name.
    """
    name = request.match_info.get("channel", "")
    if not CHANNEL_RE.fullmatch(name):
        raise HTTPProblem(
            400, "invalid-channel", "channel names are 1-64 characters of A-Z a-z 0-9 _ . : -"
        )
    return name


async def existing_channel(request: web.Request) -> str:
    """A channel a client may subscribe to: any valid name, but ``chat.*`` only for real chats.

    Raises:
        HTTPProblem: 400 for a malformed name, 404 for a chat that does not exist (anymore).
    """
    name = channel_name(request)
    if name.startswith(CHAT_PREFIX):
        chat_id = name[len(CHAT_PREFIX) :]
        known = chat_id in request.app[CHATS_KEY]
        if not known and await request.app[BUS_KEY].info(name) is None:
            raise HTTPProblem(404, "unknown-channel", f"no chat channel {name!r}")
    return name


def after_param(value: str | None, source: str = "after") -> After:
    """Parse a resume position.

    Raises:
        HTTPProblem: 400 ``invalid-cursor`` when malformed.
    """
    try:
        return parse_after(value)
    except InvalidCursor as exc:
        raise HTTPProblem(400, "invalid-cursor", f"{source}: {exc}") from exc


def number_param(
    request: web.Request,
    name: str,
    default: float,
    low: float,
    high: float,
    *,
    integer: bool = False,
) -> float:
    """A numeric query parameter within ``[low, high]``.

    Raises:
        HTTPProblem: 400 ``invalid-parameter`` when not a number or out of range.
    """
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(int(raw)) if integer else float(raw)
    except ValueError as exc:
        kind = "an integer" if integer else "a number"
        raise HTTPProblem(400, "invalid-parameter", f"{name} must be {kind}") from exc
    if not low <= value <= high:  # also rejects NaN
        raise HTTPProblem(400, "invalid-parameter", f"{name} must be between {low:g} and {high:g}")
    return value


def client_tag(request: web.Request) -> str | None:
    """The optional ``client`` query tag that groups a dashboard pane's requests."""
    tag = request.query.get("client")
    if tag is None:
        return None
    if not CLIENT_RE.fullmatch(tag):
        raise HTTPProblem(400, "invalid-parameter", "client must be 1-64 of A-Z a-z 0-9 _ . : -")
    return tag


# Accounting ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Counters:
    """What a transport (or one connection, or one client) cost and did."""

    requests: int = 0  # HTTP requests, WebSocket handshakes included
    bytes: int = 0  # written: status line, headers, body, chunk and frame overhead
    events: int = 0  # events delivered
    heartbeats: int = 0  # SSE comments / WebSocket pings sent
    reconnects: int = 0  # requests that resumed from an event id
    connections: int = 0  # streaming connections opened (SSE, WebSocket, long-poll waits)
    overflows: int = 0  # connections ended because they fell too far behind
    errors: int = 0  # 4xx/5xx answers

    def add(self, other: Counters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class TransportStats:
    """Totals of one transport: finished work plus whatever live connections have done."""

    done: Counters = field(default_factory=Counters)
    live: dict[int, LiveConnection] = field(default_factory=dict)

    def total(self) -> Counters:
        total = Counters()
        total.add(self.done)
        for conn in self.live.values():
            total.add(conn.totals())
        return total


class LiveConnection:
    """A long-lived connection the hub tracks (SSE stream, WebSocket, waiting long-poll)."""

    # Slots: a server holds thousands of these, mostly idle; a __dict__ each would add ~1 KB.
    __slots__ = ("channel", "client", "counters", "id")
    transport: ClassVar[str] = ""
    _ids = 0

    def __init__(self, channel: str, client: str | None) -> None:
        LiveConnection._ids += 1
        self.id = LiveConnection._ids
        self.channel = channel
        self.client = client
        self.counters = Counters()

    def totals(self) -> Counters:
        """What this connection has cost so far (a streaming one adds its broadcast share)."""
        return self.counters

    def heartbeat(self) -> None:
        """Send one heartbeat if this transport has them."""

    def shutdown(self) -> None:
        """End the connection cleanly because the server is stopping."""

    def drop(self) -> None:
        """Cut the connection abruptly, as a network failure would (chaos)."""


class Hub:
    """Registry of live connections and the accounting of every transport."""

    def __init__(self, transports: Iterable[str]) -> None:
        self.stats: dict[str, TransportStats] = {name: TransportStats() for name in transports}
        self.clients: OrderedDict[str, Counters] = OrderedDict()
        self.shutting_down = False

    def register(self, conn: LiveConnection) -> None:
        """Track a connection; its counters count toward its transport from now on."""
        conn.counters.connections += 1
        self.stats[conn.transport].live[conn.id] = conn

    def unregister(self, conn: LiveConnection) -> None:
        """Stop tracking a connection and fold its counters into the totals. Idempotent."""
        stats = self.stats[conn.transport]
        if stats.live.pop(conn.id, None) is not None:
            self.record(conn.transport, conn.client, conn.totals())

    def record(self, transport: str, client: str | None, counters: Counters) -> None:
        """Fold finished work (a whole request, a closed connection) into the totals."""
        self.stats[transport].done.add(counters)
        if client is not None:
            self._client(client).add(counters)

    def _client(self, client: str) -> Counters:
        counters = self.clients.get(client)
        if counters is None:
            counters = self.clients[client] = Counters()
            if len(self.clients) > MAX_CLIENTS:
                self.clients.popitem(last=False)
        else:
            self.clients.move_to_end(client)
        return counters

    def connections(self, transport: str | None = None) -> list[LiveConnection]:
        """The live connections of one transport, or of all."""
        names = self.stats if transport is None else (transport,)
        return [conn for name in names for conn in self.stats[name].live.values()]

    def snapshot(self, client: str | None = None) -> dict[str, Any]:
        """Per-transport totals (and one client's, when asked) as JSON-ready dicts."""
        out: dict[str, Any] = {}
        for name, stats in self.stats.items():
            entry: dict[str, Any] = stats.total().to_dict()
            entry["open"] = len(stats.live)
            out[name] = entry
        result: dict[str, Any] = {"transports": out}
        if client is not None:
            mine = Counters()
            done = self.clients.get(client)
            if done is not None:
                mine.add(done)
            live = [conn for conn in self.connections() if conn.client == client]
            for conn in live:
                mine.add(conn.totals())
            result["client"] = {"id": client, "open": len(live), **mine.to_dict()}
        return result


class MeteredResponse(web.Response):
    """A response that, once sent, adds its size on the wire (status line and headers included)
    to ``counters`` and folds them into the hub's totals."""

    def __init__(
        self,
        body: bytes,
        transport: str,
        client: str | None,
        counters: Counters,
        app: web.Application,
        *,
        status: int = 200,
        content_type: str | None = "application/json",
    ) -> None:
        super().__init__(body=body, status=status, headers={"Cache-Control": "no-store"})
        if content_type is not None:
            self.content_type = content_type
        self._meter = (transport, client, counters, app)

    async def write_eof(self, data: bytes = b"") -> None:
        await super().write_eof(data)
        transport, client, counters, app = self._meter
        counters.bytes += self.body_length  # aiohttp's output_size: headers + body as written
        app[HUB_KEY].record(transport, client, counters)


# App keys --------------------------------------------------------------------------------

SETTINGS_KEY: Final = web.AppKey("settings", Settings)
BUS_KEY: Final = web.AppKey("bus", Bus)
CHATS_KEY: Final = web.AppKey("chats", ChatRegistry)
TICKER_KEY: Final = web.AppKey("ticker", Ticker)
HUB_KEY: Final = web.AppKey("hub", Hub)


def cursor_or_none(after: After) -> Cursor | None:
    """``after`` when it is an id (a resume), else ``None``."""
    return after if isinstance(after, Cursor) else None
