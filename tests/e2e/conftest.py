"""Browser fixtures: Debian's Chromium driven through Playwright, against a real TCP server.

Every test gets a fresh browser at 1280x800 and a :class:`Dashboard` helper. Console errors and
uncaught page errors are collected from the start; a screenshot of the page as the test left
it is saved to ``test-artifacts/`` (pass or fail) so a human can look at it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from realtime_lab.dashboard import PANES as DASHBOARD_PANES
from tests.conftest import RunningServer

playwright_api = pytest.importorskip(
    "playwright.async_api", reason="the playwright package is not installed"
)

CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
VIEWPORT = {"width": 1280, "height": 800}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# The panes' transports, in page order: one per realtime_lab.dashboard.PANES entry.
PANES = tuple(spec.key for spec in DASHBOARD_PANES)
#: The panes that read the one chat the page starts with POST /api/chats (the fetch pane POSTs
#: its own), and that can follow the ticker.
SHARED = tuple(key for key in PANES if key != "fetch")
# The dashboard installs its test hook, `window.lab`, only when asked to.
TEST_HOOK = "window.__RTL_TEST__ = true;"
WAIT_MS = 30_000  # generous: two shared cores, other test suites running at the same time

# What Chromium itself logs when a request fails on the network or with an error status. A chaos
# test causes these on purpose; anywhere else they are errors like any other.
NETWORK_ERRORS = re.compile(
    r"Failed to load resource|WebSocket connection to .* failed|EventSource's response has"
    r"|net::ERR_"
)


class Dashboard:
    """The dashboard page in a real browser, with the few actions the tests need."""

    def __init__(self, page: Any, url: str) -> None:
        self.page = page
        self.url = url
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))

    def _on_console(self, message: Any) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    async def open(self) -> None:
        """Load the page and wait until it has read /api/config (its sliders are set then)."""
        await self.page.goto(self.url + "/")
        await self.page.wait_for_selector("body[data-ready=true]", timeout=WAIT_MS)

    async def set_range(self, element_id: str, value: float) -> None:
        """Move a slider as a user would (input and change events), and check it took."""
        actual = await self.page.evaluate(
            """([id, value]) => {
                const el = document.getElementById(id);
                el.value = String(value);
                el.dispatchEvent(new Event("input", {bubbles: true}));
                el.dispatchEvent(new Event("change", {bubbles: true}));
                return Number(el.value);
            }""",
            [element_id, value],
        )
        assert actual == value, f"slider #{element_id} took {actual}, not {value}"

    async def start_chat(
        self,
        prompt: str,
        *,
        seed: int = 0,
        max_tokens: int = 60,
        token_ms: int = 20,
        ttft_ms: int = 50,
        poll_ms: int = 50,
    ) -> None:
        """Fill in the form and press the button that streams one chat on all five panes (the
        fetch pane POSTs the same prompt and seed itself: its own chat, the same text)."""
        await self.set_range("token-ms", token_ms)
        await self.set_range("ttft-ms", ttft_ms)
        await self.set_range("poll-ms", poll_ms)
        await self.page.fill("#prompt", prompt)
        await self.page.fill("#seed", str(seed))
        await self.page.fill("#max-tokens", str(max_tokens))
        runs = await self.page.evaluate("() => window.lab.app.runs")
        await self.page.click("#send")
        # A new run, not the one before it (which may have been a chat too).
        await self.page.wait_for_function(
            "runs => window.lab.app.runs > runs && window.lab.app.run.mode === 'chat'",
            arg=runs,
            timeout=WAIT_MS,
        )

    async def wait_finished(self, timeout_ms: int = WAIT_MS) -> dict[str, Any]:
        """Wait until every pane has ended and the final server stats are in; the summary."""
        # data-run=final is set when the page has rendered the final figures; data-run-id says
        # of which run (an earlier run's "final" may still be on the page for 100 ms).
        await self.page.wait_for_function(
            """() => {
                const run = window.lab.app.run;
                const body = document.body.dataset;
                return run !== null && run.statsFinal && body.run === "final"
                    && body.runId === run.id;
            }""",
            timeout=timeout_ms,
        )
        summary = await self.summary()
        assert summary["finished"], summary
        assert summary["stats_final"], summary
        return summary

    async def summary(self) -> dict[str, Any]:
        """What "Download JSON" would save."""
        value: dict[str, Any] = await self.page.evaluate("() => window.lab.summary()")
        return value

    async def pane_text(self, transport: str) -> str:
        """The answer text as the pane shows it (read from the DOM)."""
        text = await self.page.text_content(f"#pane-{transport} [data-role=answer]")
        return text or ""

    async def metric(self, transport: str, name: str) -> str:
        """One figure as the pane shows it."""
        text = await self.page.text_content(f"#pane-{transport} [data-metric={name}]")
        return (text or "").strip()

    async def note(self, transport: str) -> str:
        """The line under a pane's answer: what last happened to its connection."""
        text = await self.page.text_content(f"#pane-{transport} [data-role=note]")
        return (text or "").strip()

    async def sign_in(self, token: str) -> None:
        """Paste ``token`` into the "sign in as" box, press Sign in, and wait until the page
        says it is signed in."""
        await self.page.fill("#session-token", token)
        await self.page.click("#sign-in")
        await self.page.wait_for_selector(
            "body[data-session=in]", state="attached", timeout=WAIT_MS
        )

    async def wait_tokens(self, transport: str, count: int) -> None:
        """Wait until a pane has shown ``count`` tokens."""
        await self.page.wait_for_function(
            "([key, n]) => window.lab.panes.find(p => p.key === key).m.tokens >= n",
            arg=[transport, count],
            timeout=WAIT_MS,
        )

    async def pane_value(self, transport: str, path: str) -> Any:
        """A property of a pane object, e.g. ``m.failures`` or ``chatId``."""
        return await self.page.evaluate(
            f"key => window.lab.panes.find(p => p.key === key).{path}", transport
        )

    async def wait_reconnected(
        self, transport: str, times: int = 1, *, or_ended: bool = False
    ) -> None:
        """Wait until a pane has re-established its connection ``times`` times (with
        ``or_ended``, or has ended: a cut that came as its last event was on its way)."""
        await self.page.wait_for_function(
            """([key, n, orEnded]) => {
                const pane = window.lab.panes.find(p => p.key === key);
                return pane.m.reconnects >= n || (orEnded && pane.ended !== null);
            }""",
            arg=[transport, times, or_ended],
            timeout=WAIT_MS,
        )

    def errors(self, *, allow_network: bool = False) -> list[str]:
        """Console errors and uncaught exceptions; with ``allow_network``, minus the browser's
        own reports of failed requests."""
        console = [
            text
            for text in self.console_errors
            if not (allow_network and NETWORK_ERRORS.search(text))
        ]
        return console + [f"uncaught: {text}" for text in self.page_errors]

    async def screenshot(self, name: str) -> Path:
        """Save the viewport (1280x800) and the full page to ``test-artifacts/``."""
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path))
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}-full.png"), full_page=True)
        return path


OpenDashboard = Callable[[RunningServer], Awaitable[Dashboard]]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A headless Chromium, closed after the test."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (/usr/bin/chromium, Debian package 'chromium')")
    async with playwright_api.async_playwright() as driver:
        instance = await driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            await asyncio.wait_for(instance.close(), timeout=15)


@pytest.fixture
async def open_dashboard(
    browser: Any, request: pytest.FixtureRequest
) -> AsyncIterator[OpenDashboard]:
    """Factory: ``dash = await open_dashboard(server)`` opens the page in a fresh 1280x800
    context, with the page's test hook (``window.lab``) asked for. The page is screenshot when
    the test ends, whatever the outcome."""
    opened: list[Dashboard] = []

    async def open_(server: RunningServer) -> Dashboard:
        context = await browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        await context.add_init_script(TEST_HOOK)
        page = await context.new_page()
        dash = Dashboard(page, server.url)
        opened.append(dash)
        await dash.open()
        return dash

    yield open_
    for i, dash in enumerate(opened):
        if not dash.page.is_closed():
            suffix = f"-{i}" if i else ""
            await dash.screenshot(f"e2e-{request.node.name}{suffix}")
            await dash.page.context.close()
