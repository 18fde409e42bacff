"""The dashboard's compression switch: one page, one run per mode, set from the page before the
run (``PATCH /api/config``). Each run's summary says its mode and the server's CPU per token,
and the panes' bytes per token shrink where the mode says (Chromium offers permessage-deflate
and accepts gzip, so what it gets is what a browser gets by default)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import StartServer
from tests.e2e.conftest import PANES, WAIT_MS, OpenDashboard

pytestmark = pytest.mark.e2e

MODES = ("off", "message", "connection")


async def run_in_mode(dash: Any, mode: str) -> dict[str, Any]:
    await dash.page.select_option("#compression", mode)
    await dash.page.wait_for_function(
        "mode => document.getElementById('run-status').textContent.startsWith("
        "`compression ${mode} `)",
        arg=mode,
        timeout=WAIT_MS,
    )
    await dash.start_chat("squeeze the feed", seed=2, max_tokens=60, token_ms=20, poll_ms=50)
    summary: dict[str, Any] = await dash.wait_finished()
    return summary


async def test_one_run_per_mode_from_the_switch_shows_its_bytes_and_cpu_per_token(
    start_server: StartServer, open_dashboard: OpenDashboard
) -> None:
    server = await start_server(compression="off")
    dash = await open_dashboard(server)
    assert await dash.page.input_value("#compression") == "off"
    bpt: dict[str, dict[str, float]] = {}
    for mode in MODES:
        summary = await run_in_mode(dash, mode)
        run = summary["run"]
        assert run["compression"] == mode
        cpu = run["server_cpu"]
        assert cpu["tokens"] == 60 * len(PANES)
        assert cpu["us_per_token"] > 0
        shown = await dash.page.text_content("#run-cpu")
        assert (shown or "").endswith(" µs"), shown
        assert await dash.page.text_content("#run-compression") == mode
        bpt[mode] = {key: summary["panes"][key]["bytes_per_token"] for key in PANES}
        for key in PANES:
            assert summary["panes"][key]["tokens"] == 60, (mode, key)
    off, message, connection = (bpt[m] for m in MODES)
    # WebSocket: deflate per message saves a little, a context per connection most.
    assert connection["ws"] < message["ws"] < off["ws"]
    assert connection["ws"] < off["ws"] * 0.5
    # The HTTP streams compress per connection only (message mode leaves them as they were).
    assert abs(message["sse"] - off["sse"]) < off["sse"] * 0.1
    assert connection["sse"] < off["sse"] * 0.6
    assert connection["fetch"] < off["fetch"] * 0.7
    assert dash.errors() == []
