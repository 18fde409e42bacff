"""The HTTP/1.1 server, hardened: every byte from the network is untrusted.

aiohttp's ``RequestHandler`` (one per TCP connection) and ``web.Server`` (its factory), with:

* **A request header timeout**, like nginx's ``client_header_timeout``: a connection that has not
  sent complete request headers within ``header_timeout`` seconds of opening, or of the previous
  response on a keep-alive connection, is closed. With some bytes of a request received it is
  answered ``408`` first and logged at WARNING (a slowloris client); an idle keep-alive
  connection is closed silently (so a proxy's idle upstream connections must time out sooner:
  nginx's ``keepalive_timeout`` in the ``upstream`` block). Once the headers are in, the timer
  is off: a slow body, a slow handler, a long poll, an SSE stream or a WebSocket take as long as
  they take. (aiohttp's own ``keepalive_timeout`` closes a connection whose request never
  completes too, but silently and, under ``web.run_app``, only after 75 s.)
* **Malformed requests answered in the project's shape**: ``{"error": {"code", "message"}}``
  with ``400 bad-request``, or ``505 http-version-not-supported`` for an HTTP version other than
  1.0 and 1.1 (a request line ``PRI * HTTP/2.0`` too). Each is logged as one WARNING line
  without a traceback (aiohttp logs an ERROR with a traceback).
* **The HTTP/2 connection preface answered in HTTP/2** (``curl --http2-prior-knowledge``, an
  h2c client): a client that opened with the preface cannot read an HTTP/1.1 answer ("Empty
  reply from server"), so it gets the two frames it can read, an empty ``SETTINGS`` (the
  server's preface) and a ``GOAWAY`` with ``HTTP_1_1_REQUIRED`` (RFC 9113 section 7) whose
  debug data is the same JSON error, and the connection closes: curl says ``received GOAWAY,
  error=13``. One WARNING line, no access-log line (aiohttp never sees a request). For HTTP/2
  put a proxy in front (``docs/http2.md``: nginx with TLS and HTTP/2).

Serve an app with :func:`run_app` (what ``realtime-lab serve`` runs) or, in tests and embedders,
with :class:`HardenedAppRunner` and a ``web.TCPSite``, as with ``web.AppRunner``.

aiohttp documents no hook for either; the ones used are marked "private hook" below, and
``tests/test_httpserver.py`` fails if one of them stops being called.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import BadStatusLine, HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from realtime_lab.protocol.envelope import dumps
from realtime_lab.transports.problems import HTTPProblem, error_body

log = logging.getLogger("realtime_lab.http")

DEFAULT_HEADER_TIMEOUT: Final = 10.0  # seconds, like nginx's client_header_timeout (60 s there)
DEFAULT_KEEPALIVE_TIMEOUT: Final = 75.0  # web.run_app's
SUPPORTED_VERSIONS: Final = frozenset({HttpVersion10, HttpVersion11})
H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# A connection's first bytes once an HTTP/1.x request is served: never the preface again (and as
# long as the preface, so nothing more is appended). Shared, not 57 bytes kept per connection.
_HTTP1_HEAD: Final = b"\0" * len(H2_PREFACE)
H2_HTTP_1_1_REQUIRED: Final = 0xD  # RFC 9113 section 7: "use HTTP/1.1 instead"
H2_REFUSAL: Final = "HTTP/2 is not supported: speak HTTP/1.1 (no --http2-prior-knowledge)"
_MAX_REASON: Final = 200  # characters of a parser's complaint kept in the answer and the log

RequestFactory = Callable[
    [RawRequestMessage, StreamReader, RequestHandler, AbstractStreamWriter, "asyncio.Task[None]"],
    web.BaseRequest,
]
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def h2_frame(kind: int, payload: bytes, *, flags: int = 0, stream: int = 0) -> bytes:
    """One HTTP/2 frame (RFC 9113 section 4.1): 24-bit length, type, flags, stream id."""
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


def h2_refusal(code: str, message: str) -> bytes:
    """What an HTTP/2 client that sent the preface is answered: SETTINGS, then GOAWAY.

    The empty SETTINGS is the server's connection preface, which must come first; the GOAWAY
    says no stream was processed (last stream id 0), why (``HTTP_1_1_REQUIRED``), and carries
    the project's JSON error as its debug data.
    """
    goaway = (0).to_bytes(4, "big") + H2_HTTP_1_1_REQUIRED.to_bytes(4, "big")
    return h2_frame(0x4, b"") + h2_frame(0x7, goaway + dumps(error_body(code, message)))


def _raw_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = dumps(error_body(code, message))
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _RequestQueue(list[Any]):
    """aiohttp's queue of a connection's parsed requests, as a list (it needs ``append``,
    ``popleft`` and ``len``).

    A connection holds one parsed request at a time but for pipelining, which aiohttp bounds
    (``max_msg_queue_size``), so ``pop(0)`` is cheap; an empty deque is 760 bytes, which was 6%
    of what an idle stream costs the server, and this is 64.
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class HardenedRequestHandler(RequestHandler):
    """One connection: aiohttp's handler plus the header timer and JSON answers to bad requests.

    Made by :class:`HardenedServer`; ``header_timeout`` comes through its keyword arguments
    like aiohttp's own (``keepalive_timeout``, ``max_line_size``, ...).
    """

    __slots__ = (
        "_head",
        "_header_bytes",
        "_header_timer",
        "_lingering",
        "_opening",
        "_refused_version",
        "header_timeout",
    )

    def __init__(
        self, manager: web.Server, *, header_timeout: float = DEFAULT_HEADER_TIMEOUT, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        # Private: RequestHandler.__init__ makes _messages a deque, and only appends, poplefts
        # and counts it.
        self._messages = _RequestQueue()  # type: ignore[assignment]
        self.header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # received since the timer was armed
        self._head = b""  # the first bytes of the connection, to recognise the HTTP/2 preface
        self._lingering: StreamReader | None = None  # an unread body aiohttp is draining
        # The connection's first bytes while they may still be the HTTP/2 preface (held back
        # from the parser); None once they cannot be.
        self._opening: bytes | None = b""
        self._refused_version: tuple[int, int] | None = None

    # Called by asyncio -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None:
            self._header_bytes += len(data)
        if len(self._head) < len(H2_PREFACE):
            self._head += data[: len(H2_PREFACE) - len(self._head)]
        if self._opening is not None:
            # At most the preface's 24 bytes are held, and only while they match it: an
            # HTTP/1.1 request (whose method is never "PRI") passes at its first byte.
            data = self._opening + data
            if len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
                self._opening = data
                return
            self._opening = None
            if data.startswith(H2_PREFACE):
                self._refuse_h2()
                return
        super().data_received(data)

    def _refuse_h2(self) -> None:
        transport = self.transport
        if transport is None:
            return
        peer = self.peername
        host = peer[0] if isinstance(peer, tuple) else peer
        log.warning(
            "refused a connection from %s: HTTP/2 connection preface, answered GOAWAY "
            "HTTP_1_1_REQUIRED: %s",
            host,
            H2_REFUSAL,
        )
        transport.write(h2_refusal("http-version-not-supported", H2_REFUSAL))
        self.force_close()  # closes once the frames are written

    # Called by aiohttp ---------------------------------------------------------------------------

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """After each response: the next request's headers are due within ``header_timeout``."""
        # Private hook: RequestHandler.finish_response is aiohttp's "response written" step.
        result = await super().finish_response(request, resp, start_time)
        content = request.content
        if content.exception() is not None:
            # A broken body (handle_error's 400): there is nothing left to drain, and aiohttp's
            # draining read would raise the error again, logged as an "Unhandled exception".
            content.feed_eof()
        self._lingering = None if content.is_eof() else content
        self._arm()
        return result

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request the parser refused: a JSON 400 (505 for ``PRI * HTTP/2.0``), one WARNING line.

        A body that breaks its framing or encoding, found while a handler reads it, is a 400 too;
        that request reached the app, whose ``json_errors`` logs it. Other errors (a handler's
        crash: 500, a handler's timeout: 504) keep aiohttp's answer and its ERROR traceback:
        they are bugs of ours, not of the client.
        """
        # Private hook: aiohttp calls handle_error with the parser's HttpProcessingError, and
        # with whatever a handler raised.
        if isinstance(exc, web.RequestPayloadError):
            cause = exc.__cause__
            text = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
            problem = HTTPProblem(400, "bad-request", f"malformed request body: {one_line(text)}")
            problem.force_close()
            return problem
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:  # as aiohttp: too late for another answer
            raise ConnectionError("a response was sent already; cannot send the error") from exc
        reason = one_line(exc.message or str(exc))
        if self._head.startswith(H2_PREFACE[:14]):  # "PRI * HTTP/2.0"
            return self.refuse(request, 505, "http-version-not-supported", H2_REFUSAL)
        if isinstance(exc, BadStatusLine) and "Invalid HTTP version" in reason:  # llhttp: 1.2, 3.0
            return self.refuse(request, 505, "http-version-not-supported", reason)
        return self.refuse(request, 400, "bad-request", f"malformed HTTP request: {reason}")

    def refuse(
        self, request: web.BaseRequest, status: int, code: str, message: str
    ) -> web.Response:
        """Log one WARNING line and return the JSON error that ends the connection."""
        log.warning("refused a request from %s: %d %s: %s", request.remote, status, code, message)
        resp = web.Response(
            body=dumps(error_body(code, message)), status=status, content_type="application/json"
        )
        resp.force_close()
        return resp

    # Called by HardenedServer --------------------------------------------------------------------

    def request_started(self, message: RawRequestMessage) -> RawRequestMessage:
        """The headers of a request are in: stop the timer; give the message to build it from.

        An HTTP version other than 1.0 and 1.1 is noted (:meth:`take_refused_version`) and the
        message is rewritten to HTTP/1.1, so that the 505 that answers it is HTTP/1.1.
        """
        self._disarm()
        self._lingering = None
        if message.version in SUPPORTED_VERSIONS:
            return message
        self._refused_version = (message.version.major, message.version.minor)
        replaced: RawRequestMessage = message._replace(version=HttpVersion11, should_close=True)
        return replaced

    def serving(self) -> None:
        """An HTTP/1.x request reaches the app: the connection's first bytes are not needed."""
        self._head = _HTTP1_HEAD

    def take_refused_version(self) -> tuple[int, int] | None:
        """The unsupported version of the request being handled (once), or None."""
        version, self._refused_version = self._refused_version, None
        return version

    # The timer -----------------------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        if self.transport is not None:
            self._header_bytes = 0
            loop = asyncio.get_running_loop()
            self._header_timer = loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None:
            return
        if self._lingering is not None and not self._lingering.is_eof():
            # aiohttp is still draining a body the handler did not read (for at most its
            # lingering_time): the next request's headers cannot have started yet.
            self._arm()
            return
        peer = self.peername
        host = peer[0] if isinstance(peer, tuple) else peer
        if not self._header_bytes:
            log.debug("closing an idle connection from %s", host)
        else:
            log.warning(
                "closing a connection from %s: request headers not complete within %gs "
                "(%d bytes received)",
                host,
                self.header_timeout,
                self._header_bytes,
            )
            transport.write(
                _raw_response(
                    408,
                    "Request Timeout",
                    "request-timeout",
                    f"request headers not complete within {self.header_timeout:g}s",
                )
            )
        self.force_close()


def one_line(text: str, limit: int = _MAX_REASON) -> str:
    """``text`` as one printable line of at most ``limit`` characters (for logs and answers).

    The C parser's complaints span lines, with a caret line under the offending byte; the bytes
    are the client's, so anything unprintable is escaped.
    """
    parts = [p.strip() for p in text.splitlines()]
    flat = " ".join(p for p in parts if p and set(p) != {"^"})
    safe = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in flat)
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


class HardenedServer(web.Server):
    """``web.Server`` whose connections are :class:`HardenedRequestHandler` s.

    Takes ``web.Server``'s arguments plus ``header_timeout``. Usable directly with
    ``web.ServerRunner``; :class:`HardenedAppRunner` makes one for an application.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        request_factory: RequestFactory | None = None,
        **kwargs: Any,
    ) -> None:
        if not header_timeout > 0:
            raise ValueError(f"header_timeout must be > 0, not {header_timeout!r}")
        super().__init__(handler, request_factory=request_factory, **kwargs)
        self.header_timeout = header_timeout
        # request_handler and request_factory are web.Server's public attributes; each
        # connection reads them when it is made.
        self._app_handler: Handler = self.request_handler
        self._app_factory: RequestFactory = self.request_factory
        self.request_handler = self._handle
        self.request_factory = self._make_hardened_request

    def __call__(self) -> RequestHandler:
        """A new connection's protocol (asyncio calls this for each accepted connection)."""
        # Private hook: web.Server.__call__ is RequestHandler(self, loop=self._loop, **self._kwargs)
        # and nothing lets one choose the class.
        return HardenedRequestHandler(
            self, loop=self._loop, header_timeout=self.header_timeout, **self._kwargs
        )

    def _make_hardened_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if isinstance(protocol, HardenedRequestHandler):
            message = protocol.request_started(message)
        return self._app_factory(message, payload, protocol, writer, task)

    def _handle(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # Not a coroutine: the app's handler coroutine is returned as it is, so that no frame of
        # this wrapper stays alive for the life of every stream.
        protocol = request.protocol
        if isinstance(protocol, HardenedRequestHandler):
            version = protocol.take_refused_version()
            if version is not None:
                major, minor = version
                return _answer(
                    protocol.refuse(
                        request,
                        505,
                        "http-version-not-supported",
                        f"HTTP/{major}.{minor} is not supported: speak HTTP/1.1",
                    )
                )
            protocol.serving()
        return self._app_handler(request)


async def _answer(response: web.StreamResponse) -> web.StreamResponse:
    return response


class HardenedAppRunner(web.AppRunner):
    """``web.AppRunner`` serving through a :class:`HardenedServer`.

    Use it as ``web.AppRunner`` (``await runner.setup()``, a ``web.TCPSite``, ``await
    runner.cleanup()``), with ``header_timeout`` in seconds among its keyword arguments.
    """

    __slots__ = ("header_timeout",)

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        if not header_timeout > 0:
            raise ValueError(f"header_timeout must be > 0, not {header_timeout!r}")
        super().__init__(app, **kwargs)
        self.header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        # Private hook: BaseRunner.setup() builds its server here; AppRunner's (via the app)
        # is a plain web.Server, remade as a HardenedServer with the same arguments.
        plain = await super()._make_server()
        return HardenedServer(
            plain.request_handler,
            header_timeout=self.header_timeout,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            **plain._kwargs,
        )


async def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    shutdown_timeout: float = 60.0,
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
    handler_cancellation: bool = True,
    print: Callable[[str], object] | None = print,
    stop_signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
    **runner_kwargs: Any,
) -> None:
    """Serve ``app`` on ``host:port`` until one of ``stop_signals``, then clean up.

    ``print`` is given one line with the URLs once the server listens (with the real port when
    ``port`` is 0). A second signal during the shutdown is not caught: it ends the process.
    Other keyword arguments go to :class:`HardenedAppRunner` (``access_log``, ...).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = tuple(stop_signals)
    runner = HardenedAppRunner(
        app,
        header_timeout=header_timeout,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=keepalive_timeout,
        handler_cancellation=handler_cancellation,
        **runner_kwargs,
    )
    await runner.setup()
    try:
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        await web.TCPSite(runner, host, port).start()
        if print is not None:
            urls = ", ".join(f"http://{a[0]}:{a[1]}" for a in runner.addresses)
            print(f"Running on {urls} (press Ctrl+C to quit)")
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def run_app(app: web.Application, **kwargs: Any) -> None:
    """``web.run_app`` for a hardened server: ``asyncio.run(serve(app, **kwargs))``."""
    asyncio.run(serve(app, **kwargs))
