"""``GET /metrics`` exposes the same accounting as ``/api/stats``, in Prometheus text format."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer


async def _samples(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    async with session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, sample.labels.get("transport", ""))] = sample.value
    return out


async def test_metrics_follow_the_stats(server: RunningServer) -> None:
    async with aiohttp.ClientSession() as session:
        before = await _samples(session, server.url)
        assert before[("realtime_lab_requests_total", "poll")] == 0
        async with session.post(
            f"{server.url}/api/channels/news/events", json={"type": "note", "data": {"n": 1}}
        ) as resp:
            assert resp.status == 201
        for _ in range(3):
            async with session.get(f"{server.url}/poll/news") as resp:
                assert resp.status == 200
                await resp.read()
        after = await _samples(session, server.url)
        async with session.get(f"{server.url}/api/stats") as resp:
            stats = (await resp.json())["transports"]
    assert after[("realtime_lab_requests_total", "poll")] == 3
    assert after[("realtime_lab_events_total", "poll")] == 3
    assert after[("realtime_lab_bytes_total", "poll")] == stats["poll"]["bytes"] > 0
    assert after[("realtime_lab_open_connections", "sse")] == 0
