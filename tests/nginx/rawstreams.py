"""Raw SSE and WebSocket readers for the fault-injection and reverse-proxy tests.

They speak the wire formats directly (``aiohttp`` and
:class:`~realtime_lab.protocol.sse.SSEDecoder`) and never reconnect on their own: the tests watch
exactly what one connection carried, in order, heartbeats included. Each reader runs in a
background task and appends to :attr:`log`:

- ``("event", envelope)`` for every event;
- ``("beat", None)`` for every SSE comment or WebSocket ping (answered with a pong);
- last, ``("eof", detail)`` when the server ended the stream cleanly (SSE: the body ended;
  WebSocket: a close frame arrived, ``detail`` is its code) or ``("cut", detail)`` when the
  connection broke without that (SSE: truncated chunked body; WebSocket: no close frame, 1006).

Used by ``tests/test_chaos.py`` and ``tests/nginx/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import aiohttp

from realtime_lab.protocol.sse import SSEDecoder

Envelope = dict[str, Any]
Entry = tuple[str, Any]


class _Reader:
    """What both readers share: the log and waiting on it."""

    def __init__(self) -> None:
        self.log: list[Entry] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _add(self, kind: str, value: Any = None) -> None:
        self.log.append((kind, value))
        self._changed.set()

    @property
    def events(self) -> list[Envelope]:
        """The envelopes received so far, in order."""
        return [value for kind, value in self.log if kind == "event"]

    @property
    def beats(self) -> int:
        """How many heartbeats arrived so far."""
        return sum(1 for kind, _ in self.log if kind == "beat")

    @property
    def ended(self) -> Entry | None:
        """The final ``("eof" | "cut", detail)`` entry, once the connection is over."""
        if self.log and self.log[-1][0] in ("eof", "cut"):
            return self.log[-1]
        return None

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Return once ``predicate()`` holds; fail with ``TimeoutError`` after ``timeout`` s."""
        async with asyncio.timeout(timeout):
            while not predicate():
                if self.ended is not None and not predicate():
                    raise AssertionError(f"connection ended first: {self.log[-3:]}")
                self._changed.clear()
                await self._changed.wait()

    async def wait_events(self, count: int, timeout: float = 10.0) -> list[Envelope]:
        """The first ``count`` events, waiting for them to arrive."""
        await self.wait_for(lambda: len(self.events) >= count, timeout)
        return self.events[:count]

    async def wait_beats(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` heartbeats arrived in total."""
        await self.wait_for(lambda: self.beats >= count, timeout)

    async def wait_ended(self, timeout: float = 10.0) -> Entry:
        """Wait for the connection to end; returns the final entry."""
        async with asyncio.timeout(timeout):
            while self.ended is None:
                self._changed.clear()
                await self._changed.wait()
        assert self.ended is not None
        return self.ended

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class SSEStream(_Reader):
    """``async with SSEStream(session, url) as s:`` reads one event stream in the background."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__()
        self._session = session
        self._url = url
        self._headers = headers or {}
        self.response: aiohttp.ClientResponse | None = None
        self.decoder = SSEDecoder()

    async def __aenter__(self) -> SSEStream:
        self.response = await self._session.get(self._url, headers=self._headers)
        if self.response.status != 200:
            body = await self.response.text()
            self.response.release()
            raise AssertionError(f"GET {self._url} -> {self.response.status}: {body}")
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()
        if self.response is not None:
            self.response.close()

    async def _read(self) -> None:
        assert self.response is not None
        decoder, pending = self.decoder, b""
        try:
            async for chunk in self.response.content.iter_any():
                pending += chunk
                # Feed block by block so heartbeats and events keep their relative order even
                # when TCP delivers several blocks in one read.
                while (end := pending.find(b"\n\n")) >= 0:
                    block, pending = pending[: end + 2], pending[end + 2 :]
                    comments = decoder.comments
                    for message in decoder.feed(block):
                        self._add("event", json.loads(message.data))
                    for _ in range(decoder.comments - comments):
                        self._add("beat")
            self._add("eof", None)
        except aiohttp.ClientError as exc:  # a chunked body cut short: ClientPayloadError
            self._add("cut", repr(exc))


class WSStream(_Reader):
    """``async with WSStream(session, url) as s:`` reads one WebSocket in the background."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        super().__init__()
        self._session = session
        self._url = url
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.close_reason: str | None = None  # of the server's close frame, if one came

    async def __aenter__(self) -> WSStream:
        # autoping off, so pings show up in the log; the reader answers them itself.
        self.ws = await self._session.ws_connect(self._url, autoping=False)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()
        if self.ws is not None:
            await self.ws.close()

    async def send(self, value: Any) -> None:
        """Send a JSON message to the server."""
        assert self.ws is not None
        await self.ws.send_str(json.dumps(value))

    async def _read(self) -> None:
        ws = self.ws
        assert ws is not None
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                self._add("event", json.loads(msg.data))
            elif msg.type == aiohttp.WSMsgType.PING:
                self._add("beat")
                await ws.pong(msg.data)
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                self.close_reason = msg.extra
                self._add("eof", msg.data)
                return
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                self._add("cut", ws.close_code)
                return


def ids(events: list[Envelope]) -> list[str]:
    """The ids of ``events``."""
    return [event["id"] for event in events]


def seqs(events: list[Envelope]) -> list[int]:
    """The sequence numbers of ``events`` (the part after the epoch)."""
    return [int(event["id"].rsplit("-", 1)[1]) for event in events]
