"""What a client did and what it cost: the numbers ``tail``, ``chat`` and the benchmark print.

Every client fills one :class:`ClientStats` as it runs; read ``client.stats`` at any time (it is
live) and call :meth:`ClientStats.summary` for a flat, JSON-ready dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Final

#: How many recent latencies (and reconnect delays) are kept; older ones are dropped.
MAX_LATENCIES: Final = 10_000
MAX_DELAYS: Final = 100


def percentile(ordered: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of an ascending list, nearest-rank; ``None`` if empty."""
    if not ordered:
        return None
    rank = max(math.ceil(q / 100.0 * len(ordered)), 1)
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(slots=True)
class ClientStats:
    """Counters of one client, across all its (re)connections.

    Attributes:
        transport: ``poll``, ``longpoll``, ``sse``, ``ws`` or ``fetch``.
        connections: streams established: accepted SSE/WebSocket/fetch streams; for the polling
            transports, the first successful answer after the start or after a failure.
        reconnects: reconnection attempts (each one waited a backoff delay first).
        requests: HTTP requests sent (a WebSocket handshake counts as one, and so does each
            fetch ``POST /api/chats/stream`` and each ``POST /api/tickets``).
        bytes_received: bytes read off the wire, estimated: status line and headers as received,
            body, chunked-encoding framing (HTTP); handshake answer, frame headers and payloads
            (WebSocket). Compressed sizes if the server compressed.
        events: events yielded to the caller (duplicates not included).
        gaps: ids skipped inside one epoch (one per id), plus one per epoch change that no
            ``reset`` announced (see :mod:`realtime_lab.protocol.sequence`).
        duplicates: events dropped because their id was already delivered.
        out_of_order: events dropped because they arrived after a later one (the gap they fill
            was already reported).
        resets: ``reset`` events received (each one was yielded).
        overflows: times the server ended the connection because the client fell behind.
        throttled: times the server refused a connection for load (HTTP 429 with
            ``Retry-After``, a WebSocket closed 1013 at its stream bound); each was retried.
        tickets: single-use tickets taken (``use_tickets``), one per stream request.
        first_event_s: seconds from the start of iteration to the first event, or ``None``.
        latencies_ms: per event, receive time minus the envelope's ``ts`` (both wall clocks, so
            only meaningful with synchronised clocks); the most recent :data:`MAX_LATENCIES`.
        reconnect_delays_s: the backoff delays actually waited; the most recent few.
    """

    transport: str = ""
    connections: int = 0
    reconnects: int = 0
    requests: int = 0
    bytes_received: int = 0
    events: int = 0
    gaps: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    resets: int = 0
    overflows: int = 0
    throttled: int = 0
    tickets: int = 0
    first_event_s: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    reconnect_delays_s: list[float] = field(default_factory=list)

    def add_latency(self, ms: float) -> None:
        """Record one event's latency, forgetting the oldest beyond :data:`MAX_LATENCIES`."""
        latencies = self.latencies_ms
        latencies.append(ms)
        # Trim in batches: deleting from the front of a list is O(n).
        if len(latencies) > MAX_LATENCIES + MAX_LATENCIES // 10:
            del latencies[: len(latencies) - MAX_LATENCIES]

    def add_delay(self, seconds: float) -> None:
        """Record one reconnection delay."""
        self.reconnect_delays_s.append(seconds)
        if len(self.reconnect_delays_s) > MAX_DELAYS:
            del self.reconnect_delays_s[0]

    def summary(self) -> dict[str, Any]:
        """Every counter plus latency percentiles, as a flat JSON-ready dict.

        Keys: the counters above, ``first_event_s``, and ``latency_p50_ms``,
        ``latency_p95_ms``, ``latency_p99_ms``, ``latency_max_ms`` (``None`` without events).
        """
        out: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("latencies_ms", "reconnect_delays_s")
        }
        ordered = sorted(self.latencies_ms[-MAX_LATENCIES:])
        for q in (50, 95, 99):
            out[f"latency_p{q}_ms"] = percentile(ordered, q)
        out["latency_max_ms"] = ordered[-1] if ordered else None
        return out

    def format(self) -> str:
        """A short human-readable report (what ``realtime-lab tail`` prints at the end)."""
        s = self.summary()

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}"

        first = "-" if self.first_event_s is None else f"{self.first_event_s:.3f} s"
        return (
            f"{self.transport}: {self.events} events, {self.requests} requests, "
            f"{self.bytes_received} bytes received, {self.connections} connections, "
            f"{self.reconnects} reconnects\n"
            f"  gaps {self.gaps}, duplicates {self.duplicates}, out of order "
            f"{self.out_of_order}, resets {self.resets}, overflows {self.overflows}, "
            f"throttled {self.throttled}, tickets {self.tickets}\n"
            f"  first event after {first}; latency ms p50 {ms(s['latency_p50_ms'])} "
            f"p95 {ms(s['latency_p95_ms'])} p99 {ms(s['latency_p99_ms'])} "
            f"max {ms(s['latency_max_ms'])}"
        )
