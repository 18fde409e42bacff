"""What every transport costs and does: counters, the registry of live connections, metering.

The :class:`Hub` knows every open streaming connection (to send heartbeats, to end them on
shutdown, to drop them on a chaos request) and keeps the byte/event accounting. Accounting is
paid once per write as two integer additions on the connection; totals per transport and per
dashboard client are summed when someone asks (``GET /api/stats``), not on the hot path.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Final

from aiohttp import web

log = logging.getLogger("realtime_lab.server")

MAX_CLIENTS: Final = 1024  # per-client counters kept (least recently used dropped first)


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

    def outcome(self) -> str:
        """How it ended (``done``, ``client-gone``, ...); asked once, when it is unregistered."""
        return "done"

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
        # How streams ended, per transport: {"sse": Counter({"done": 3, "client-gone": 1})}.
        self.outcomes: dict[str, Counter[str]] = {name: Counter() for name in transports}
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
            self.ended(conn, conn.outcome())

    def ended(self, conn: LiveConnection, outcome: str) -> None:
        """Count how ``conn``'s stream ended, and say it in the log, once."""
        self.outcomes[conn.transport][outcome] += 1
        log.info("%s %d on %r ended: %s", conn.transport, conn.id, conn.channel, outcome)

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
        hub: Hub,
        *,
        status: int = 200,
        content_type: str | None = "application/json",
    ) -> None:
        super().__init__(body=body, status=status, headers={"Cache-Control": "no-store"})
        if content_type is not None:
            self.content_type = content_type
        self._meter = (transport, client, counters, hub)

    async def write_eof(self, data: bytes = b"") -> None:
        await super().write_eof(data)
        transport, client, counters, hub = self._meter
        counters.bytes += self.body_length  # aiohttp's output_size: headers + body as written
        hub.record(transport, client, counters)
