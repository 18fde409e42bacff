"""The dashboard as ES modules: every module the browser loads carries the version that makes
it fetch new files after an upgrade, and the test hook is there only when a test asks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from yarl import URL

from realtime_lab import __version__
from realtime_lab.dashboard import PANES
from tests.conftest import StartServer
from tests.e2e.conftest import VIEWPORT, WAIT_MS

pytestmark = pytest.mark.e2e


class Loaded:
    """A page without the test hook asked for: the scripts it requested and its errors."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.scripts: list[URL] = []
        self.errors: list[str] = []
        page.on("request", self._request)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def _request(self, request: Any) -> None:
        if request.resource_type == "script":
            self.scripts.append(URL(request.url))

    async def open(self, url: str) -> None:
        await self.page.goto(url)
        await self.page.wait_for_selector("body[data-ready=true]", timeout=WAIT_MS)


@pytest.fixture
async def bare_page(browser: Any) -> AsyncIterator[Loaded]:
    context = await browser.new_context(viewport=VIEWPORT)
    try:
        yield Loaded(await context.new_page())
    finally:
        await context.close()


async def test_every_module_is_versioned_and_the_hook_is_not_installed_unasked(
    start_server: StartServer, bare_page: Loaded
) -> None:
    server = await start_server()
    await bare_page.open(server.url + "/")

    assert await bare_page.page.evaluate("() => typeof window.lab") == "undefined"
    paths = {url.path for url in bare_page.scripts}
    # The entry point, a pane's modules and what they import: relative imports, each versioned.
    modules = ["dashboard.js", "pane.js", "sequence.js", "sse-reader.js"]
    for module in [*modules, *(p.module for p in PANES)]:
        assert f"/static/{module}" in paths, sorted(paths)
    unversioned = [str(url) for url in bare_page.scripts if url.query.get("v") != __version__]
    assert unversioned == [], unversioned
    # A pane object per PANES entry, built from its module: the summary table has their rows.
    rows = await bare_page.page.eval_on_selector_all(
        "#summary-table tbody tr", "rows => rows.map(row => row.dataset.transport)"
    )
    assert rows == [spec.key for spec in PANES]
    assert bare_page.errors == []


async def test_the_hook_is_installed_for_test_1_in_the_url(
    start_server: StartServer, bare_page: Loaded
) -> None:
    server = await start_server()
    await bare_page.open(server.url + "/?test=1")
    keys = await bare_page.page.evaluate("() => window.lab.panes.map(p => p.key)")
    assert keys == [spec.key for spec in PANES]
    summary = await bare_page.page.evaluate("() => window.lab.summary()")
    assert summary["run"] is None
    assert set(summary["panes"]) == {spec.key for spec in PANES}
    assert bare_page.errors == []
