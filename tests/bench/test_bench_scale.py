"""The scale scenario: connections over several source addresses, limits reported, a small run."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from realtime_lab.bench import fleet, native, scale
from realtime_lab.bench.target import BenchConfig

needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


def test_source_addresses_cover_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet, "port_range", lambda: (32768, 60999))
    assert fleet.source_addresses(100) == ["127.0.0.2"]
    assert len(fleet.source_addresses(50_000)) == 2
    assert len(fleet.source_addresses(60_000)) == 3
    assert fleet.source_addresses(10, wanted=3) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def test_plan_says_when_the_port_range_caps_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet, "port_range", lambda: (40000, 40009))  # 9 usable per address
    capacity = fleet.plan(50, 2, sources=3)
    assert capacity.allowed == 27
    assert len(capacity.limits) == 1
    assert "ip_local_port_range 40000-40009" in capacity.limits[0]


def test_plan_says_when_the_descriptor_limit_caps_the_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fleet, "raise_nofile", lambda wanted: fleet.FD_SPARE + 100)
    capacity = fleet.plan(500, 2, sources=1)
    assert capacity.allowed == 100
    assert "RLIMIT_NOFILE" in capacity.limits[0]
    assert fleet.plan(50, 2, sources=1).limits == []


def test_plan_counts_every_server_process_and_adds_load_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fleet, "raise_nofile", lambda wanted: fleet.FD_SPARE + 100)
    # Three processes hold 300 together, though one may hold only 100; each of the four load
    # clients needed for 350 holds at most 100 too.
    capacity = fleet.plan(350, 2, sources=1, servers=3)
    assert capacity.allowed == 300
    assert "3 server process(es) can hold about 300" in capacity.limits[0]
    assert capacity.processes == 4
    capacity = fleet.plan(300, 2, sources=1, servers=3)
    assert (capacity.allowed, capacity.limits, capacity.processes) == (300, [], 3)
    assert fleet.plan(150, 2, sources=1).processes == 2


def test_raise_nofile_reaches_at_least_the_soft_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert fleet.raise_nofile(soft) >= soft


@needs_cc
async def test_connections_spread_over_the_source_addresses() -> None:
    peers: Counter[str] = Counter()
    held: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            peers[writer.get_extra_info("peername")[0]] += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            held.append(writer)

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    binary = str(native.build().path)
    sources = fleet.source_addresses(50, wanted=3)
    group = fleet.Fleet(
        binary, "127.0.0.1", port, "sse", "/sse/x", f"127.0.0.1:{port}", 50, 2, sources
    )
    try:
        async with asyncio.timeout(20):
            opened = await asyncio.to_thread(group.open, 20.0)
    finally:
        await asyncio.to_thread(group.close)
        for writer in held:
            writer.close()
        srv.close()
        await srv.wait_closed()
    assert opened["failures"] == 0, opened
    assert opened["clients"] == 50
    assert set(peers) == set(sources)
    assert sum(peers.values()) == 50
    assert min(peers.values()) >= 15, peers


@needs_cc
def test_a_bad_source_address_fails_clearly(tmp_path: Path) -> None:
    binary = str(native.build().path)
    # 192.0.2.1 (TEST-NET-1) is on no interface of this machine: bind() refuses it, and no
    # packet is sent anywhere.
    group = fleet.Fleet(binary, "127.0.0.1", 9, "sse", "/sse/x", "h", 2, 1, ["192.0.2.1"])
    with group:
        opened = group.open(10.0)
    assert opened["clients"] == 0
    assert opened["failures"] == 2
    assert "bind 192.0.2.1" in opened["errors"][0]


def _small(tmp_path: Path, **settings: Any) -> BenchConfig:
    """A scale scenario of 60 idle connections and short windows, with ``settings``."""
    base: dict[str, Any] = {"duration": 1.0, "warmup": 0.5, "workers": 2, "scale_idle": 60}
    return BenchConfig(out=tmp_path, scale=True, progress=False, **{**base, **settings})


@pytest.mark.slow
@needs_cc
def test_a_small_scale_run(tmp_path: Path) -> None:
    config = _small(tmp_path, scale_subscribers=40, scale_rate=20.0, sources=3)
    result = scale.run_scale(config, str(native.build().path))
    subs, idle = result["subscribers"], result["idle"]
    assert subs["errors"] == []
    assert subs["clients_open"] == 40
    assert subs["lost"] == subs["dup"] == subs["reordered"] == 0
    assert 15 <= subs["channel_rate"] <= 25, subs
    assert subs["delivered_pct"] is not None
    assert 85 <= subs["delivered_pct"] <= 115, subs
    assert subs["sources"] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert idle["clients_open"] == idle["held_by_server"] == idle["still_open_after"] == 60
    assert idle["failures"] == idle["disconnects"] == 0
    assert idle["accept_per_s"] is not None
    assert idle["accept_per_s"] > 0
    assert idle["rss_kb_per_conn"] is not None
    assert idle["server_cpu_pct_heartbeat"] is not None
    md = scale.markdown(result)
    assert "**40 SSE subscribers**" in md
    assert "**60 idle SSE connections**" in md
    assert scale.bad_runs(result) == []


@pytest.mark.slow
@needs_cc
def test_the_scale_scenario_runs_its_subscribers_against_the_floor_too(tmp_path: Path) -> None:
    config = _small(
        tmp_path,
        scale_subscribers=40,
        scale_rate=20.0,
        scale_idle=0,
        sources=2,
        baseline="floor",
    )
    result = scale.run_scale(config, str(native.build().path))
    lab, floor = result["subscribers"], result["floor"]
    assert result["idle"] is None
    for part in (lab, floor):
        assert part["errors"] == []
        assert part["clients_open"] == 40
        assert part["lost"] == part["dup"] == part["reordered"] == part["disconnects"] == 0
        assert 15 <= part["channel_rate"] <= 25, part
        assert 85 <= part["delivered_pct"] <= 115, part
        assert part["p99_ms"] is not None
    assert floor["feed"] == "floor.c's timer"
    md = scale.markdown(result)
    assert "| realtime-lab | " in md
    assert "| floor.c (bare C fan-out) | " in md
    assert "then 40 of `floor.c`" in md
    assert scale.bad_runs(result) == []
    assert scale.bad_runs({**result, "floor": {**floor, "dup": 2}}) == [
        "scale floor: lost 0, dup 2"
    ]


@pytest.mark.slow
@needs_cc
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
def test_idle_connections_spread_over_the_processes_of_a_shared_bus(tmp_path: Path) -> None:
    from realtime_lab.bench.buses import BusBackends

    config = _small(tmp_path, scale_subscribers=0, sources=1, buses=["redis"], processes=2)
    with BusBackends() as buses:
        result = scale.run_scale(config, str(native.build().path), buses=buses)
    idle = result["idle"]
    assert result["subscribers"] is None
    assert (idle["bus"], idle["processes"]) == ("redis", 2)
    assert idle["clients_open"] == idle["held_by_server"] == idle["still_open_after"] == 60
    assert idle["held_each"] == [30, 30]
    assert idle["failures"] == idle["disconnects"] == 0
    assert idle["server_cpu_pct_heartbeat"] is not None
    assert "30 + 30 per process" in scale.markdown(result)
    assert "2 server processes on redis://" in scale.markdown(result)
