"""What every client shares: the reconnect loop, resume, de-duplication and the accounting.

A transport client only says how to open one connection and read events from it
(:meth:`StreamClient._connect`, an async generator). This module turns that into the stream the
caller iterates: it reconnects with exponential backoff and full jitter, resumes after the last
event it yielded, drops events it already yielded, counts gaps, and stops after ``end``.

Why the backoff is written here rather than taken from ``tenacity`` or ``backoff``: those
libraries retry a call (or a generator's *start*) with a fixed policy, while this loop retries a
stream that is yielding to the caller, resets its backoff as soon as a connection delivers,
takes its base delay from the server (SSE ``retry:``, ``retry_after_ms``) while running, and must
stop the moment ``close()`` is called from another task; "full jitter" itself is one line.

Credentials: a bearer token on every request, or (``use_tickets``) a fresh single-use ticket
from ``POST /api/tickets`` before each stream request, as a browser-like component does. A
refusal for load (HTTP 429, a WebSocket closed 1013 for the stream bound) is retried no sooner
than the server's ``Retry-After``, bounded by ``retry_after_max``; a 401 or 403 is final.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import random
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, ClassVar, Final, NoReturn

import aiohttp
from yarl import URL

from realtime_lab.clients.stats import ClientStats
from realtime_lab.errors import (
    ClientError,
    InvalidEnvelope,
    ReconnectsExhausted,
    ServerRefused,
)
from realtime_lab.protocol.channels import chat_id_of
from realtime_lab.protocol.envelope import END, RESET, Event
from realtime_lab.protocol.sequence import Sequence, Verdict

log = logging.getLogger("realtime_lab.client")

#: HTTP statuses that are worth retrying although they are 4xx.
RETRYABLE_4XX: Final = frozenset({408, 429})
#: The answer of a server at its bound of open streams (or of anything else it rations).
TOO_MANY_REQUESTS: Final = 429
#: The longest ``Retry-After`` honoured by default, in seconds (a longer one is cut to this).
RETRY_AFTER_MAX_S: Final = 60.0
#: ``POST /api/tickets`` answers this ``error.code`` (with 404) when the server has auth off.
AUTH_OFF: Final = "auth-off"
_TICKET_PARAM: Final = re.compile(r"(ticket=)[^&\s'\"#]+")
#: Failures of one connection that a reconnect may cure.
TRANSIENT: Final = (aiohttp.ClientError, OSError, TimeoutError, asyncio.IncompleteReadError)

#: One event as a transport read it, with the wall-clock time (ms) it arrived.
Received = tuple[Event, float]


def now_ms() -> float:
    """Wall-clock milliseconds, the clock of ``Event.ts``."""
    return time.time() * 1000.0


def http_header_bytes(response: aiohttp.ClientResponse) -> int:
    """The size of the status line and headers of ``response`` as they were received."""
    version = response.version
    proto = f"HTTP/{version.major}.{version.minor}" if version is not None else "HTTP/1.1"
    status_line = len(f"{proto} {response.status} {response.reason or ''}\r\n")
    # "Name: value\r\n" per header, then the blank line.
    return status_line + sum(len(k) + len(v) + 4 for k, v in response.raw_headers) + 2


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` value (delay-seconds or an HTTP-date, RFC 9110 section 10.2.3) in
    seconds from now; ``None`` when absent or not a delay that can be honoured."""
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)  # "-0000": UTC, with no claim about local time
        seconds = max((when - datetime.now(UTC)).total_seconds(), 0.0)
    return seconds if 0.0 <= seconds < math.inf else None  # NaN, negative, infinite: no


def redact(text: str) -> str:
    """``text`` with any ``ticket=`` value cut out, for logs and error messages.

    A ticket is single use and short lived, but until it is spent it opens a stream.
    """
    return _TICKET_PARAM.sub(r"\1...", text)


def _running(iterator: AsyncGenerator[Event, None]) -> bool:
    # True while a task is inside the generator (awaiting I/O), not when it waits at a yield.
    return bool(getattr(iterator, "ag_running", False))


class Retry(Exception):
    """Raised by a transport: this connection is over, reconnect and resume.

    Attributes:
        delay: the server's requested delay in seconds (``retry_after_ms``, ``Retry-After``),
            if it gave one.
        throttled: the server refused for load (HTTP 429, WebSocket 1013 at its stream bound):
            wait at least ``delay`` (or the longest backoff) and count it in the stats.
    """

    def __init__(self, reason: str, delay: float | None = None, *, throttled: bool = False) -> None:
        super().__init__(reason)
        self.delay = delay
        self.throttled = throttled


class Finished(Exception):
    """Raised by a transport: the stream is over without an ``end`` to yield (SSE 204)."""


class Sequencer:
    """De-duplication and gap counting for one client, by the protocol's continuity rule.

    :class:`~realtime_lab.protocol.sequence.Sequence` judges each id (a jump counts one gap per
    skipped id, an unannounced epoch change one gap, a late arrival that fills a gap is
    "reordered", anything else at or below the last id a duplicate); this adds the verdicts to
    the client's :class:`ClientStats` (``out_of_order`` counts the reordered ones).
    """

    def __init__(self, stats: ClientStats, after: str | None = None) -> None:
        self.stats = stats
        self.sequence = Sequence(after)

    def accept(self, event: Event) -> bool:
        """Account for ``event``; ``True`` when it must be yielded, ``False`` to drop it."""
        sequence = self.sequence
        gaps = sequence.gaps
        verdict = sequence.observe(event.id, reset=event.type == RESET)
        stats = self.stats
        stats.gaps += sequence.gaps - gaps
        if verdict is Verdict.RESET:
            stats.resets += 1
        elif verdict is Verdict.DUPLICATE:
            stats.duplicates += 1
            return False
        elif verdict is Verdict.REORDERED:
            stats.out_of_order += 1
            return False
        # new, reset, and foreign ids (not ours to judge: Event.from_dict validated the envelope)
        return True

    def forget(self) -> None:
        """Start over: the next event sets the base, as at the start without a position."""
        self.sequence.forget()


class StreamClient(ABC):
    """One channel over one transport, as an async iterator of events that survives reconnects.

    Create it with :func:`realtime_lab.clients.open_stream`, then::

        async with client:
            async for event in client:
                ...

    Iteration yields each event once, in order, including ``reset`` events (history was lost:
    the caller decides what to do); it yields ``end`` and then stops. Between connections it
    waits ``uniform(0, min(cap, base * 2**attempt))`` seconds and resumes after :attr:`last_id`.
    Read :attr:`stats` at any time.

    Credentials (see :func:`realtime_lab.clients.open_stream`): ``token`` is sent as
    ``Authorization: Bearer`` on every request; with ``use_tickets`` each stream request instead
    carries a fresh ``?ticket=`` that the client takes first with ``POST /api/tickets``.
    """

    transport: ClassVar[str] = ""

    def __init__(
        self,
        base_url: str,
        channel: str,
        *,
        after: str | None = None,
        session: aiohttp.ClientSession | None = None,
        client_tag: str | None = None,
        poll_interval: float = 0.25,
        longpoll_timeout: float = 25.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        max_reconnects: int | None = None,
        connect_timeout: float = 10.0,
        idle_timeout: float | None = None,
        token: str | None = None,
        use_tickets: bool = False,
        retry_after_max: float = RETRY_AFTER_MAX_S,
    ) -> None:
        self.base_url = URL(base_url.rstrip("/"))
        self.channel = channel
        self.after = after
        self.client_tag = client_tag
        self.poll_interval = poll_interval
        self.longpoll_timeout = longpoll_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_reconnects = max_reconnects
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.token = token
        self.use_tickets = use_tickets
        self.retry_after_max = retry_after_max
        self.stats = ClientStats(transport=self.transport)
        self.last_id: str | None = None
        self._session = session
        self._owns_session = session is None
        # Where the next connection resumes: the last event yielded, or a poll answer's cursor.
        self._resume: str | None = after
        self._sequencer = Sequencer(self.stats, after)
        self._failures = 0  # consecutive failed connections; resets once one delivers
        self._server_base: float | None = None  # a base delay the server asked for (SSE retry)
        self._closed = False
        self._closing = asyncio.Event()
        self._finished = False
        self._started: float | None = None
        self._iterator: AsyncGenerator[Event, None] | None = None
        self._response: aiohttp.ClientResponse | None = None  # the open HTTP response, if any
        self._tickets_off = False  # the server said auth is off: no ticket is needed

    def __repr__(self) -> str:
        # Never the token: a repr ends up in logs and tracebacks.
        auth = "tickets" if self.use_tickets else "token" if self.token else "none"
        return f"<{type(self).__name__} {self.base_url} {self.channel} auth={auth}>"

    # Public API ----------------------------------------------------------------------------------

    @property
    def backoff_base(self) -> float:
        """The base reconnection delay in seconds: the server's (SSE ``retry:``) if it sent one."""
        return self._server_base if self._server_base is not None else self.backoff_initial

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` was called."""
        return self._closed

    async def __aenter__(self) -> StreamClient:
        self.session  # noqa: B018 - create the owned session now, inside the caller's loop
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Event]:
        if self._closed:
            raise ClientError("this client is closed")
        if self._iterator is not None and _running(self._iterator):
            raise ClientError("this client is already being iterated")
        self._iterator = self._events()
        return self._iterator

    async def close(self) -> None:
        """Stop iterating and release the connection (and the session, if the client made it).

        Safe to call from another task while one iterates: its ``async for`` then ends
        (``StopAsyncIteration``) instead of reconnecting. Idempotent.
        """
        if not self._closed:
            self._closed = True
            self._closing.set()
            await self._abort()
        iterator = self._iterator
        if iterator is not None and not _running(iterator):
            await iterator.aclose()
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def cancel(self) -> None:
        """Cancel the chat this client streams; keep iterating to receive its ``end``.

        Raises:
            ServerRefused: the chat is unknown to the server (404), or it is not this user's
                (401 without a valid token, 403).
            ClientError: the channel is not a chat (``chat.<id>``), or the server could not be
                reached or failed; the chat may still be running.
        """
        chat_id = self._chat_id()
        url = self.base_url / "api" / "chats" / chat_id
        timeout = self._http_timeout(self.connect_timeout)
        try:
            async with self.session.delete(
                url, headers=self._bearer(), timeout=timeout
            ) as response:
                body = await response.read()
                self.stats.requests += 1
                self.stats.bytes_received += http_header_bytes(response) + len(body)
                if response.status >= 400:
                    self._http_error(response, body)
        except Retry as exc:
            raise ClientError(f"cancelling {self.channel} failed: {exc}") from exc
        except TRANSIENT as exc:
            raise ClientError(f"cancelling {self.channel} failed: {exc!r}") from exc

    # For transports ------------------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP session in use (created on first use when none was given)."""
        if self._session is None:
            if self._closed:
                raise ClientError("this client is closed")
            self._session = aiohttp.ClientSession()
        return self._session

    @abstractmethod
    def _connect(self, resume: str | None, first: bool) -> AsyncGenerator[Received, None]:
        """Open one connection resuming after ``resume`` and yield what it delivers.

        Return when the server ends the connection; raise :class:`Retry` (or any
        :data:`TRANSIENT` error) to reconnect, :class:`Finished` when the stream is over,
        :class:`ServerRefused` when retrying cannot help.
        """

    def _bearer(self) -> dict[str, str]:
        """The ``Authorization`` header of ``token`` (none without one)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _credentials(self) -> tuple[dict[str, str], dict[str, str]]:
        """Headers and query parameters that authenticate the next stream request.

        With ``use_tickets``, a fresh ticket (``?ticket=``) and no header: the stream request
        carries only what a browser's EventSource or WebSocket could. Else the bearer header.

        Raises:
            ServerRefused: the server refused the ticket (401, 403).
            Retry: it could not give one now (429, 5xx, a malformed answer).
        """
        if self.use_tickets and not self._tickets_off:
            ticket = await self._take_ticket()
            if ticket is not None:
                return {}, {"ticket": ticket}
        return self._bearer(), {}

    async def _take_ticket(self) -> str | None:
        """``POST /api/tickets {"channel"}`` with the bearer token: a ticket for one stream.

        ``None`` when the server has auth off (404 ``auth-off``): no ticket is needed, and the
        client stops asking.
        """
        stats = self.stats
        url = self.base_url / "api" / "tickets"
        async with self.session.post(
            url,
            json={"channel": self.channel},
            headers=self._bearer(),
            timeout=self._http_timeout(self.connect_timeout),
        ) as response:
            body = await response.read()
        stats.requests += 1
        stats.bytes_received += http_header_bytes(response) + len(body)
        if response.status == 201:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                ticket = json.loads(body)["ticket"]
                if isinstance(ticket, str) and ticket:
                    stats.tickets += 1
                    return ticket
            raise Retry(f"{self.transport} {url}: a ticket answer without a ticket")
        if response.status == 404 and _error_fields(body)[0] == AUTH_OFF:
            log.info(
                "%s %s: the server has auth off; streaming without tickets",
                self.transport,
                self.channel,
            )
            self._tickets_off = True
            return None
        self._http_error(response, body)

    async def _abort(self) -> None:
        """Close whatever connection is open, so a blocked read returns (see :meth:`close`)."""
        response, self._response = self._response, None
        if response is not None:
            response.close()

    def _params(self, **extra: str | None) -> dict[str, str]:
        params = {k: v for k, v in extra.items() if v is not None}
        if self.client_tag is not None:
            params["client"] = self.client_tag
        return params

    def _http_timeout(self, read: float | None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=read)

    def _delivered(self) -> None:
        """A connection works (an event, or a successful poll answer): reset the backoff."""
        self._failures = 0

    def _http_error(self, response: aiohttp.ClientResponse, body: bytes) -> NoReturn:
        """Raise what an error answer means: :class:`Retry` or :class:`ServerRefused`.

        Any 4xx but 408 and 429 is final (401/403: the credential or the permission is wrong).
        A 429 is a refusal for load: retried no sooner than its ``Retry-After``.
        """
        status = response.status
        code, message, delay = _error_fields(body)
        code = code or "http-error"
        message = message or response.reason or ""
        if delay is None:
            delay = retry_after_seconds(response.headers.get("Retry-After"))
        if delay is not None and not 0.0 <= delay < math.inf:
            delay = None  # NaN, negative or infinite: not a delay we can honour
        text = redact(f"{self.transport} {response.url}: HTTP {status} {code}: {message}")
        if 400 <= status < 500 and status not in RETRYABLE_4XX:
            raise ServerRefused(text, status, code)
        if status == TOO_MANY_REQUESTS:
            after = "no Retry-After" if delay is None else f"Retry-After {delay:g} s"
            raise Retry(f"{text} ({after})", delay, throttled=True)
        raise Retry(text, delay)

    async def _sleep(self, delay: float) -> bool:
        """Wait ``delay`` seconds; ``False`` (at once) when the client is closed meanwhile."""
        if self._closed:
            return False
        if delay <= 0:
            await asyncio.sleep(0)  # still a point where close() can get in
            return not self._closed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._closing.wait()
        return not self._closed

    # The loop ----------------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        base = self.backoff_base
        cap = max(self.backoff_max, base)  # a server asking for more than our cap wins
        return random.uniform(0.0, min(cap, base * 2 ** min(attempt, 32)))

    async def _events(self) -> AsyncGenerator[Event, None]:
        if self._started is None:
            self._started = time.monotonic()
        first = True
        while not (self._closed or self._finished):
            hint: float | None = None
            throttled = False
            try:
                async with contextlib.aclosing(self._connect(self._resume, first)) as stream:
                    first = False
                    async for event, received in stream:
                        self._delivered()
                        if not self._sequencer.accept(event):
                            continue
                        self._account(event, received)
                        yield event
                        if event.type == END:
                            self._finished = True
                            return
                reason = "the server closed the stream without an end event"
            except Finished:
                self._finished = True
                return
            except Retry as exc:
                reason, hint, throttled = str(exc), exc.delay, exc.throttled
            except TRANSIENT as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                reason = redact(reason)  # aiohttp's messages may quote the URL
            except ServerRefused:
                raise
            except Exception:
                if self._closed:
                    return  # close() pulled the session from under a request
                raise
            if self._closed:
                return
            if throttled:
                self.stats.throttled += 1
            if self.max_reconnects is not None and self._failures >= self.max_reconnects:
                raise ReconnectsExhausted(
                    f"{self.transport} {self.channel}: gave up after {self._failures} "
                    f"reconnection attempts in a row; {self._throttled_note()}"
                    f"last failure: {reason}"
                )
            delay = self._backoff(self._failures)
            if hint is not None:
                # The server's Retry-After / retry_after_ms, up to our bound; never sooner.
                delay = max(min(hint, self.retry_after_max), delay)
            elif throttled:
                # Refused for load without a figure (a WebSocket close): our longest backoff.
                delay = max(min(self.backoff_max, self.retry_after_max), delay)
            self._failures += 1
            self.stats.reconnects += 1
            self.stats.add_delay(delay)
            log.log(
                logging.WARNING if throttled else logging.INFO,
                "%s %s: %s%s; reconnecting in %.3f s after %s",
                self.transport,
                self.channel,
                "the server refused for load: " if throttled else "",
                reason,
                delay,
                self._resume,
            )
            if not await self._sleep(delay):
                return

    def _throttled_note(self) -> str:
        count = self.stats.throttled
        if not count:
            return ""
        return f"{count} of them refused for load (HTTP 429 / WebSocket 1013: too many streams); "

    def _account(self, event: Event, received: float) -> None:
        self.last_id = self._resume = event.id
        stats = self.stats
        stats.events += 1
        stats.add_latency(received - event.ts)
        if stats.first_event_s is None and self._started is not None:
            stats.first_event_s = time.monotonic() - self._started

    def _chat_id(self) -> str:
        chat_id = chat_id_of(self.channel)
        if chat_id is None:
            raise ClientError(
                f"{self.channel!r} is not a chat channel; only chats can be cancelled"
            )
        return chat_id


def _error_fields(body: bytes) -> tuple[str | None, str | None, float | None]:
    """``error.code``, ``error.message`` and ``error.retry_after_ms`` (as seconds) of an error
    answer's JSON body; ``None`` for each that is missing."""
    code: str | None = None
    message: str | None = None
    delay: float | None = None
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
        error = json.loads(body)["error"]
        if error.get("code") is not None:
            code = str(error["code"])
        if error.get("message") is not None:
            message = str(error["message"])
        if error.get("retry_after_ms") is not None:
            delay = float(error["retry_after_ms"]) / 1000.0
    return code, message, delay


def decode_envelope(value: Any, where: str) -> Event | None:
    """An envelope from decoded JSON, or ``None`` (logged) when it is not one.

    A server's ``--stream-timeout`` notice (an ``end`` with no id, reason ``timeout``) is not
    an event of the channel: the stream closes after it, and the client resumes from its last
    id on a new connection, losing nothing.
    """
    if (
        isinstance(value, dict)
        and value.get("id") is None
        and value.get("type") == END
        and isinstance(value.get("data"), dict)
        and value["data"].get("reason") == "timeout"
    ):
        log.info("%s: the server ended the stream (its stream timeout); resuming", where)
        return None
    try:
        return Event.from_dict(value)
    except InvalidEnvelope as exc:
        log.warning("%s: ignoring a message that is not an event envelope: %s", where, exc)
        return None
