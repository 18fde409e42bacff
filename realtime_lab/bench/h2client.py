"""The load clients that go through nginx (``bench --via h1,h2``): HTTP/2 streams, and
HTTP/1.1 over TLS.

HTTP/2 is the pure-Python ``h2`` library (sans-I/O: it turns bytes into events and requests into
bytes) over an asyncio TLS connection that offers ALPN ``h2`` and verifies no certificate (the
proxy's is self-signed). One :class:`H2Link` is one connection carrying the streams of up to
:data:`TAB_CLIENTS` clients at once, as a browser tab's requests share its one connection to the
origin: each SSE stream, each poll and long poll, each fetch stream and each ``POST /api/chats``
is a stream of it. The link counts every byte it receives and sends (frame headers, HPACK-coded
headers, SETTINGS, WINDOW_UPDATE and PING frames: what the browser's HTTP/2 layer sees; TLS
records not) into the worker's :class:`~realtime_lab.bench.loadgen.Tally`. Its settings are
Chromium's (no push, a 6 MiB stream window, a 15 MiB connection window), so flow control costs
about as many WINDOW_UPDATE frames as a browser's.

WebSocket stays HTTP/1.1 through nginx (it does not do RFC 8441's extended CONNECT): the ``ws``
clients open a TLS connection of their own with ALPN ``http/1.1``, on the HTTP/2 port too, as a
browser does; they and every ``--via h1`` client are :mod:`.loadgen`'s own HTTP/1.1 clients over
TLS, counting the plain HTTP bytes.

:class:`ProxyWorker` is a load worker (:class:`~realtime_lab.bench.loadgen.Worker`) that opens
these for a point whose spec says ``via``; a direct point it runs as any worker does. Each client
of a proxied point also counts the tokens it received over its whole life (not only in the
window), and the ``close`` reply says how many: nginx logs what it sent per request when the
request ends, so its bytes per token are its whole log over those tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from multiprocessing.connection import Connection
from typing import Any, Final
from urllib.parse import quote

import aiohttp
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import H2Error, StreamClosedError
from h2.settings import SettingCodes, Settings

from realtime_lab.bench import wire
from realtime_lab.bench.loadgen import (
    _CONTROL,
    CHAT_EVENT,
    FETCH_PATH,
    Client,
    FetchClient,
    PollClient,
    Polling,
    SSEClient,
    Tally,
    Worker,
    WSClient,
    _now_ms,
)
from realtime_lab.bench.server import raise_fd_limit
from realtime_lab.errors import WebSocketProtocolError

#: Clients whose streams share one HTTP/2 connection at once: a dashboard tab holds at most five.
TAB_CLIENTS: Final = 5
#: Chromium's HTTP/2 settings and connection window.
CHROMIUM_SETTINGS: Final = {
    SettingCodes.HEADER_TABLE_SIZE: 65_536,
    SettingCodes.ENABLE_PUSH: 0,
    SettingCodes.INITIAL_WINDOW_SIZE: 6 * 1024 * 1024,
    SettingCodes.MAX_HEADER_LIST_SIZE: 256 * 1024,
}
CONNECTION_WINDOW: Final = 15 * 1024 * 1024
DEFAULT_WINDOW: Final = 65_535
CONNECT_TIMEOUT: Final = 30.0


class H2LinkError(wire.BenchProtocolError):
    """The HTTP/2 connection failed: no ``h2`` in the ALPN answer, a protocol error, a GOAWAY."""


def tls_context(alpn: str) -> ssl.SSLContext:
    """A client TLS context offering ``alpn`` (``h2`` or ``http/1.1``) that verifies nothing:
    the bench's nginx has a self-signed certificate made on the spot."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([alpn])
    return context


class Life:
    """Tokens the clients of one point received over their whole lives."""

    def __init__(self) -> None:
        self.tokens = 0


class Lifetime(Client):
    """A client that also counts, into :attr:`life`, every token it delivers, in the window or
    not (the window counts of :class:`Client` are unchanged)."""

    life: Life | None = None

    def items(self, items: list[wire.Item], now: float) -> None:
        life = self.life
        if life is None:
            super().items(items, now)
            return
        run = self.run
        dropped = run.duplicates + run.reordered
        tokens = 0
        for item in items:
            if item.kind is None or (item.kind not in _CONTROL and item.kind != CHAT_EVENT):
                tokens += 1
        super().items(items, now)
        life.tokens += tokens - (run.duplicates + run.reordered - dropped)


# HTTP/1.1 over TLS: loadgen's clients, counting their lives ----------------------------------


class TLSSSEClient(Lifetime, SSEClient):
    """:class:`~realtime_lab.bench.loadgen.SSEClient` through nginx."""


class TLSFetchClient(Lifetime, FetchClient):
    """:class:`~realtime_lab.bench.loadgen.FetchClient` through nginx."""


class TLSWSClient(Lifetime, WSClient):
    """:class:`~realtime_lab.bench.loadgen.WSClient` through nginx (HTTP/1.1 either way)."""


class TLSPollClient(Lifetime, PollClient):
    """:class:`~realtime_lab.bench.loadgen.PollClient` through nginx."""


# HTTP/2 -----------------------------------------------------------------------------------------


class H2Handler:
    """What a stream of an :class:`H2Link` is told (the link calls these, in order)."""

    def on_response(self, status: int, headers: dict[str, str]) -> None:
        """The response's HEADERS arrived."""

    def on_data(self, data: bytes, now: float) -> None:
        """DATA arrived at ``now`` (ms)."""

    def on_end(self) -> None:
        """The server ended the stream (END_STREAM)."""

    def on_gone(self, reason: str) -> None:
        """The stream was reset, or its connection was lost."""


class H2Link(asyncio.Protocol):
    """One HTTP/2 connection: requests in, streams out, every byte counted into ``tally``.

    Open it with ``loop.create_connection(lambda: link, host, port, ssl=tls_context("h2"))``,
    await :attr:`ready`, then :meth:`request`. :attr:`members` are the clients that use it
    (:class:`ProxyWorker` puts at most :data:`TAB_CLIENTS` on one).
    """

    def __init__(self, tally: Tally, authority: str) -> None:
        self.tally = tally
        self.authority = authority.encode("ascii")
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.local_settings = Settings(client=True, initial_values=CHROMIUM_SETTINGS)
        self.streams: dict[int, H2Handler] = {}
        self.members: set[Client] = set()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        tls = transport.get_extra_info("ssl_object")
        alpn = tls.selected_alpn_protocol() if tls is not None else None
        if alpn != "h2":
            self._lose(f"the proxy chose {alpn!r}, not h2, in ALPN")
            transport.close()
            return
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)
        self.flush()
        self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        tally = self.tally
        if tally.in_window:
            tally.bytes += len(data)
        try:
            events = self.h2.receive_data(data)
        except H2Error as exc:
            self._lose(f"HTTP/2 protocol error: {exc!r}")
            if self.transport is not None:
                self.transport.close()
            return
        now = _now_ms()
        streams = self.streams
        for event in events:
            if isinstance(event, DataReceived):
                length = event.flow_controlled_length or 0
                if length:
                    self.h2.acknowledge_received_data(length, event.stream_id)
                handler = streams.get(event.stream_id)
                if handler is not None and event.data:
                    handler.on_data(event.data, now)
                if event.stream_ended is not None:
                    self._ended(event.stream_id)
            elif isinstance(event, ResponseReceived):
                handler = streams.get(event.stream_id)
                if handler is not None:
                    handler.on_response(*_head(event.headers))
                if event.stream_ended is not None:
                    self._ended(event.stream_id)
            elif isinstance(event, StreamEnded):
                self._ended(event.stream_id)
            elif isinstance(event, StreamReset):
                handler = streams.pop(event.stream_id, None)
                if handler is not None:
                    handler.on_gone(f"stream reset by the proxy ({event.error_code!r})")
            elif isinstance(event, ConnectionTerminated):
                self._lose(f"GOAWAY {event.error_code!r}")
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(f"connection lost: {exc!r}")

    # Requests -------------------------------------------------------------------------------
    def request(
        self,
        handler: H2Handler,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None = None,
    ) -> int:
        """Open a stream for ``method path`` (with ``body``); return its id.

        Raises:
            H2LinkError: the connection is gone.
        """
        if self.lost or self.transport is None or self.transport.is_closing():
            raise H2LinkError("the HTTP/2 connection is gone")
        stream_id = self.h2.get_next_available_stream_id()
        pseudo = [
            (b":method", method.encode("ascii")),
            (b":scheme", b"https"),
            (b":authority", self.authority),
            (b":path", path.encode("ascii")),
        ]
        self.h2.send_headers(stream_id, pseudo + headers, end_stream=body is None)
        if body is not None:
            self.h2.send_data(stream_id, body, end_stream=True)
        self.streams[stream_id] = handler
        if self.tally.in_window:
            self.tally.requests += 1
        self.flush()
        return stream_id

    def cancel(self, stream_id: int) -> None:
        """Reset a stream the client no longer wants (RST_STREAM CANCEL, as a browser's abort)."""
        if self.streams.pop(stream_id, None) is None or self.lost:
            return
        with contextlib.suppress(StreamClosedError):
            self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        self.flush()

    def flush(self) -> None:
        """Write what the state machine has to send."""
        data = self.h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            if self.tally.in_window:
                self.tally.bytes_up += len(data)

    def close(self) -> None:
        """GOAWAY, then close the connection; its open streams are gone."""
        if not self.lost and self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(H2Error):
                self.h2.close_connection()
            self.flush()
            self.transport.close()
        self._lose("closed by the client")

    def _ended(self, stream_id: int) -> None:
        handler = self.streams.pop(stream_id, None)
        if handler is not None:
            handler.on_end()

    def _lose(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(H2LinkError(reason))
        self.lost = True
        streams, self.streams = self.streams, {}
        for handler in streams.values():
            handler.on_gone(reason)


def _head(headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[str, str]]:
    status = 0
    fields: dict[str, str] = {}
    for name, value in headers:
        if name == b":status":
            status = int(value)
        else:
            fields[name.decode("latin-1")] = value.decode("latin-1")
    return status, fields


class H2Client(Lifetime, H2Handler):
    """A client whose requests are streams of an :class:`H2Link` (no connection of its own).

    :meth:`attach` it to a link; it then sends its first request, as a connected
    :class:`~realtime_lab.bench.loadgen.Client` does. The server ending a stream before the
    transport's end event counts as a disconnect.
    """

    link: H2Link | None = None
    stream_id: int | None = None

    def attach(self, link: H2Link) -> None:
        """Become a member of ``link`` (until done) and send the first request."""
        self.link = link
        link.members.add(self)
        self.done.add_done_callback(lambda _: link.members.discard(self))
        self.start()

    def submit(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes | None = None
    ) -> None:
        """Send one request (a new stream) for this client."""
        assert self.link is not None
        self.head = None
        try:
            self.stream_id = self.link.request(self, method, path, headers, body)
        except H2LinkError as exc:
            self.on_gone(str(exc))

    def on_response(self, status: int, headers: dict[str, str]) -> None:
        if status != self.expected_status:
            self.fail(f"{type(self).__name__}: HTTP {status} for {self.channel}")
            return
        self.head = wire.Head(status, headers)
        self.on_head(self.head)
        if not self.ready.done():
            self.ready.set_result(None)

    def on_data(self, data: bytes, now: float) -> None:
        if self.head is None or self.closing:
            return
        try:
            self.body(data, now)
        except (wire.BenchProtocolError, WebSocketProtocolError) as exc:
            self.fail(str(exc))

    def on_end(self) -> None:
        self.stream_id = None
        if not self.closing:
            self.on_gone("the stream ended before its end event")

    def on_gone(self, reason: str) -> None:
        self.stream_id = None
        if self.closing:
            return
        self.closing = True
        if self.ready.done():
            self.tally.disconnects += 1
        else:
            self.tally.failures += 1
        self.tally.error(f"{type(self).__name__}: {reason}")
        self._settle()

    def close(self) -> None:
        """Stop reading: a stream past its end event is left to end; any other is reset."""
        self.closing = True
        if self.stream_id is not None and self.link is not None and not self.saw_end:
            self.link.cancel(self.stream_id)
            self.stream_id = None
        self._settle()


class H2SSEClient(H2Client):
    """``GET /sse/{channel}`` as a stream: DATA frames carry the event stream, no chunking."""

    def start(self) -> None:
        self._parser = wire.SSEParser()
        path = f"/sse/{self.channel}?{self._query()}"
        self.submit("GET", path, [(b"accept", b"text/event-stream")])

    def body(self, data: bytes, now: float) -> None:
        items = self._parser.feed(data)
        if items:
            self.items(items, now)


class H2FetchClient(H2SSEClient):
    """``POST /api/chats/stream`` as a stream: the request starts a chat, the answer streams it
    (its opening ``chat`` event not counted, as :class:`~realtime_lab.bench.loadgen.FetchClient`
    does)."""

    def __init__(self, *args: Any, request: bytes, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request = request

    def start(self) -> None:
        self._parser = wire.SSEParser()
        path = f"{FETCH_PATH}?client={quote(self.tag, safe='')}"
        headers = [
            (b"accept", b"text/event-stream"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.request)).encode()),
        ]
        self.submit("POST", path, headers, self.request)

    def items(self, items: list[wire.Item], now: float) -> None:
        super().items([item for item in items if item.kind != CHAT_EVENT], now)


class H2PollClient(H2Client, Polling):
    """``GET /poll`` or ``/longpoll``, one stream per request on the shared connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pieces: list[bytes] = []

    def request(self, path: str) -> None:
        self._pieces = []
        self.submit("GET", path, [])

    def body(self, data: bytes, now: float) -> None:
        self._pieces.append(data)

    def on_end(self) -> None:
        self.stream_id = None
        if self.closing or self.head is None:
            return
        try:
            self.answered(b"".join(self._pieces), _now_ms())
        except wire.BenchProtocolError as exc:
            self.fail(str(exc))

    def close(self) -> None:
        self.stop_timer()  # H2Client.close ends the stream; Polling's close is not on its way
        super().close()


class H2Call(H2Handler):
    """One request whose whole answer is awaited: ``status, body = await call.result``."""

    def __init__(self) -> None:
        self.status = 0
        self.pieces: list[bytes] = []
        self.result: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

    def on_response(self, status: int, headers: dict[str, str]) -> None:
        self.status = status

    def on_data(self, data: bytes, now: float) -> None:
        self.pieces.append(data)

    def on_end(self) -> None:
        if not self.result.done():
            self.result.set_result((self.status, b"".join(self.pieces)))

    def on_gone(self, reason: str) -> None:
        if not self.result.done():
            self.result.set_exception(H2LinkError(reason))


def make_proxied_client(
    via: str,
    transport: str,
    tally: Tally,
    host: str,
    channel: str,
    after: str,
    tag: str,
    *,
    from_start: bool = False,
    poll_interval: float = 1.0,
    request: bytes = b"",
) -> Client:
    """A not yet connected client of ``transport`` through nginx over ``via`` (``h1``, ``h2``;
    ``ws`` is HTTP/1.1 either way)."""
    started = _now_ms()
    args = (tally, host, channel, after, tag, started)
    h2 = via == "h2"
    if transport == "ws":
        return TLSWSClient(*args, from_start=from_start)
    if transport == "sse":
        return (H2SSEClient if h2 else TLSSSEClient)(*args, from_start=from_start)
    if transport == "fetch":
        fetch = H2FetchClient if h2 else TLSFetchClient
        return fetch(*args, from_start=from_start, request=request)
    if transport in ("poll", "longpoll"):
        poll = H2PollClient if h2 else TLSPollClient
        return poll(*args, from_start=from_start, kind=transport, interval=poll_interval)
    raise ValueError(f"{transport!r} does not go through nginx in the bench")


class ProxyWorker(Worker):
    """A load worker whose clients of a ``via`` point go through nginx (see the module doc)."""

    def __init__(self, conn: Connection, index: int) -> None:
        super().__init__(conn, index)
        self.via = "direct"
        self.life = Life()
        self.links: list[H2Link] = []
        self.tls_session: aiohttp.ClientSession | None = None
        self._link_lock = asyncio.Lock()
        self._tls = {"h2": tls_context("h2"), "h1": tls_context("http/1.1")}

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        if command["op"] == "close" and self.via != "direct":
            await self.close_all()
            return {"op": "closed", "life_tokens": self.life.tokens}
        return await super().handle(command)

    async def open(self, spec: dict[str, Any]) -> dict[str, Any]:
        await self.close_all()
        self.via = str(spec.get("via", "direct"))
        self.life = Life()
        return await super().open(spec)

    def client(
        self,
        tally: Tally,
        channel: str,
        after: str,
        *,
        from_start: bool = False,
        request: bytes = b"",
    ) -> Client:
        if self.via == "direct":
            return super().client(tally, channel, after, from_start=from_start, request=request)
        spec = self.spec
        probe = tally is not self.tally  # a late joiner: its own tag, apart in nginx's log
        client = make_proxied_client(
            self.via,
            spec["transport"],
            tally,
            spec["host_header"],
            channel,
            after,
            spec["tag"] + ("-probe" if probe else ""),
            from_start=from_start,
            poll_interval=float(spec["poll_interval"]),
            request=request,
        )
        if not probe and isinstance(client, Lifetime):
            client.life = self.life
        return client

    async def connect(self, client: Client, *, restart_clock: bool = True) -> bool:
        if self.via == "direct":
            return await super().connect(client, restart_clock=restart_clock)
        loop = asyncio.get_running_loop()
        spec = self.spec
        async with self._connect_gate:
            if restart_clock:
                client.started_ms = _now_ms()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    if isinstance(client, H2Client):
                        await self._attach(client)
                    else:  # HTTP/1.1 over TLS: WebSocket (either way) and every --via h1 client
                        await loop.create_connection(
                            lambda: client,
                            spec["host"],
                            spec["port"],
                            ssl=self._tls["h1"],
                            server_hostname="localhost",
                        )
                    if (
                        not isinstance(client, H2PollClient | PollClient)
                        or client.kind != "longpoll"
                    ):
                        await asyncio.shield(client.ready)
            except (OSError, TimeoutError, H2LinkError) as exc:
                client.tally.failures += 1
                client.tally.error(f"connect via {self.via}: {exc!r}")
                client.closing = True
                client._settle()
                return False
        return not client.done.done()

    async def _link(self, tally: Tally, room: bool) -> H2Link:
        """A live link of ``tally``'s, with room for one more member if ``room``, or a new one."""
        live = [link for link in self.links if link.tally is tally and not link.lost]
        best = min(live, key=lambda link: len(link.members), default=None)
        if best is not None and (not room or len(best.members) < TAB_CLIENTS):
            return best
        spec = self.spec
        link = H2Link(tally, spec["host_header"])
        await asyncio.get_running_loop().create_connection(
            lambda: link,
            spec["host"],
            spec["port"],
            ssl=self._tls["h2"],
            server_hostname="localhost",
        )
        self.links.append(link)  # closed with the others, even if its handshake failed
        await link.ready
        return link

    async def _attach(self, client: H2Client) -> None:
        async with self._link_lock:
            link = await self._link(client.tally, room=True)
            client.attach(link)

    async def post_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/chats?client=TAG`` through nginx (direct: as any worker); the chat it made.

        Raises:
            aiohttp.ClientError, H2LinkError, TimeoutError, ValueError: it failed.
        """
        if self.via == "direct":
            return await super().post_chat(body)
        spec = self.spec
        path = f"/api/chats?client={quote(spec['tag'], safe='')}"
        raw = json.dumps(body, separators=(",", ":")).encode()
        if self.via == "h2":
            async with self._link_lock:
                link = await self._link(self.tally, room=False)
            call = H2Call()
            fields = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
            ]
            link.request(call, "POST", path, fields, raw)
            async with asyncio.timeout(CONNECT_TIMEOUT):
                status, answer = await call.result
            if not 200 <= status < 300:
                raise H2LinkError(f"HTTP {status}: {answer[:200]!r}")
            chat: dict[str, Any] = json.loads(answer)
            return chat
        if self.tls_session is None:
            connector = aiohttp.TCPConnector(limit=0, ssl=self._tls["h1"])
            self.tls_session = aiohttp.ClientSession(connector=connector, raise_for_status=True)
        url = f"https://{spec['host']}:{spec['port']}{path}"
        headers = {"Host": spec["host_header"], "Content-Type": "application/json"}
        async with self.tls_session.post(url, data=raw, headers=headers) as response:
            answer = await response.read()
            self.count_request(response, answer)
        chat = json.loads(answer)
        return chat

    POST_ERRORS = (*Worker.POST_ERRORS, H2LinkError)

    @property
    def route(self) -> str:
        return "" if self.via == "direct" else f" via {self.via}"

    async def close_all(self) -> None:
        await super().close_all()
        links, self.links = self.links, []
        for link in links:
            link.close()
        session, self.tls_session = self.tls_session, None
        if session is not None:
            await session.close()
        await asyncio.sleep(0)  # let the transports write their last frames and close


def proxy_worker_main(conn: Connection, index: int) -> None:
    """Entry point of a :class:`ProxyWorker` process (the runner's pool with ``--via``)."""
    raise_fd_limit()
    try:
        asyncio.run(ProxyWorker(conn, index).serve())
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()


__all__ = [
    "TAB_CLIENTS",
    "H2Call",
    "H2Client",
    "H2Link",
    "H2LinkError",
    "ProxyWorker",
    "make_proxied_client",
    "proxy_worker_main",
    "tls_context",
]
