"""``GET /metrics``: the hub's accounting in the Prometheus text format (``prometheus-client``).

A custom collector reads the totals when Prometheus scrapes, so the transports' hot paths pay
nothing for it; each app gets its own registry (several apps can live in one test process).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from realtime_lab.transports.access import Handler
from realtime_lab.transports.accounting import Hub
from realtime_lab.transports.keys import BUS_KEY, CHATS_KEY, HUB_KEY, REGISTRY_KEY, SLOTS_KEY
from realtime_lab.transports.stream import OUTCOMES

_COUNTERS: Final = {
    "requests": "HTTP requests (WebSocket handshakes included)",
    "bytes": "bytes written: status line, headers, body, chunk and frame overhead",
    "events": "events delivered",
    "heartbeats": "SSE heartbeat comments and WebSocket pings sent",
    "reconnects": "requests that resumed from an event id",
    "connections": "streaming connections opened (SSE, WebSocket, waiting long-polls)",
    "overflows": "connections ended for falling too far behind",
    "errors": "requests answered with an error",
}


class HubCollector(Collector):
    """Exposes :meth:`Hub.snapshot` as ``realtime_lab_*`` metrics labelled by transport."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterator[Metric]:
        hub: Hub = self._app[HUB_KEY]
        totals = hub.snapshot()["transports"]
        for name, help_text in _COUNTERS.items():
            family = CounterMetricFamily(f"realtime_lab_{name}", help_text, labels=["transport"])
            for transport, values in totals.items():
                family.add_metric([transport], values[name])
            yield family
        open_conns = GaugeMetricFamily(
            "realtime_lab_open_connections", "connections open now", labels=["transport"]
        )
        for transport, values in totals.items():
            open_conns.add_metric([transport], values["open"])
        yield open_conns
        yield GaugeMetricFamily(
            "realtime_lab_chats_running", "chats generating now", value=self._app[CHATS_KEY].running
        )
        chats = self._app[CHATS_KEY]
        failed = CounterMetricFamily(
            "realtime_lab_chats_failed",
            "chats this process ended with reason error, by cause: outage (the bus backend "
            "stayed away longer than the outage window), orphan (a chat of a process whose lease "
            "passed, ended by this process's lease watcher)",
            labels=["cause"],
        )
        failed.add_metric(["outage"], chats.outage_ended)
        failed.add_metric(["orphan"], chats.sharing.orphans_ended if chats.sharing else 0)
        yield failed
        outcomes = CounterMetricFamily(
            "realtime_lab_stream_outcomes",
            "streams (SSE, WebSocket, fetch, long-poll waits) ended, by transport and how",
            labels=["transport", "outcome"],
        )
        for transport, counts in self._app[HUB_KEY].outcomes.items():
            for outcome in OUTCOMES:
                outcomes.add_metric([transport, outcome], counts[outcome])
        yield outcomes
        refusals: Counter[str] = Counter()
        refusals.update(self._app[BUS_KEY].limits)
        refusals.update(self._app[CHATS_KEY].limits)
        slots = self._app[SLOTS_KEY]
        for why in ("per-client", "total"):
            refusals[f"streams-{why}"] += slots.refused[why]
        family = CounterMetricFamily(
            "realtime_lab_refusals",
            "requests refused at a bound (channels, history bytes, tickets, chats, open streams), "
            "by kind",
            labels=["kind"],
        )
        for kind, count in sorted(refusals.items()):
            family.add_metric([kind], count)
        yield family


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text exposition."""
    body = generate_latest(request.app[REGISTRY_KEY])
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def setup(
    app: web.Application,
    guard: Callable[[Handler], Handler],
) -> None:
    """Register the collector and the ``/metrics`` route (wrapped in ``guard``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(app))
    app[REGISTRY_KEY] = registry
    app.router.add_get("/metrics", guard(metrics))
