"""The exception tree. Every error the package raises on purpose derives from RealtimeLabError.

RealtimeLabError
├── ProtocolError           bytes or values that break a wire format (sans-I/O layer)
│   ├── InvalidCursor       a malformed ``after`` / ``Last-Event-ID``
│   ├── InvalidEnvelope     JSON that is not an event envelope
│   ├── SSEEncodeError      a field the SSE format cannot carry (CR, LF or NUL in ``id``/``event``)
│   └── WebSocketProtocolError  a frame or value that breaks RFC 6455 (``code``: the close code)
├── BusError                the event bus failed or refused
│   ├── UnknownBusBackend   a bus URL whose scheme no backend serves
│   ├── SubscriberOverflow  a subscriber fell more than its bound behind and was ended
│   └── BusClosed           the bus was closed under a subscriber
├── LimitReached            a bound on held resources (channels, history bytes, chats)
│   ├── TooManyChannels
│   ├── EventTooLarge
│   └── TooManyChats
├── FeedError               the simulated LLM / chat registry
│   ├── UnknownChat
│   └── UpstreamError       the upstream model (``--upstream``) failed a chat's generation
├── ClientError             the Python clients (reconnect budget spent, server refused, ...)
│   ├── StreamEnded         raised by helpers that expected more events after ``end``
│   ├── ServerRefused       a 4xx answer (other than 408/429): retrying cannot help
│   └── ReconnectsExhausted ``max_reconnects`` attempts in a row failed
└── AuthError               identity and browser policy; ``code`` names the reason
    ├── Unauthenticated     no, invalid or expired credential (token, ticket): answer 401
    └── Forbidden           authenticated, but not allowed to do this: answer 403
"""

from __future__ import annotations


class RealtimeLabError(Exception):
    """Root of every error raised on purpose by realtime_lab."""


class ProtocolError(RealtimeLabError):
    """Input that breaks a wire format; the caller answers 400 or closes with 1003/1008."""


class InvalidCursor(ProtocolError):
    """A resume position (``after``, ``Last-Event-ID``) that is not well formed."""


class InvalidEnvelope(ProtocolError):
    """JSON that does not describe an event envelope."""


class SSEEncodeError(ProtocolError):
    """A value the SSE wire format cannot carry."""


class WebSocketProtocolError(ProtocolError):
    """Bytes or a value that break WebSocket framing (RFC 6455).

    Received bytes: close the connection with :attr:`code` and stop reading (the decoder that
    raised is left mid-frame and must not be fed again). A value given to an encoder: nothing was
    encoded; fix the value.

    Attributes:
        code: the close code to answer with: 1002 (protocol error), 1007 (a close reason that is
            not UTF-8) or 1009 (a frame over the size limit).
    """

    def __init__(self, message: str, code: int = 1002) -> None:
        super().__init__(message)
        self.code = code


class BusError(RealtimeLabError):
    """The event bus failed or refused an operation."""


class UnknownBusBackend(BusError):
    """No backend serves the scheme of the given bus URL."""


class SubscriberOverflow(BusError):
    """The subscriber fell more than its queue bound behind and was ended.

    Attributes:
        last_id: the id of the last event the subscriber was given; resume from it.
    """

    def __init__(self, message: str, last_id: str | None) -> None:
        super().__init__(message)
        self.last_id = last_id


class BusClosed(BusError):
    """The bus was closed while the caller was using it."""


class FeedError(RealtimeLabError):
    """The simulated LLM or the chat registry refused an operation."""


class UnknownChat(FeedError):
    """No chat with that id exists (or it has expired)."""


class ClientError(RealtimeLabError):
    """A Python client gave up: the server refused, or the reconnect budget is spent."""


class StreamEnded(ClientError):
    """The stream already delivered its ``end`` event."""


class ServerRefused(ClientError):
    """The server answered a 4xx (other than 408/429): retrying the same request cannot help.

    Attributes:
        status: the HTTP status (the WebSocket handshake's, for WebSocket).
        code: the ``error.code`` of the JSON body (``"http-error"`` when there was none).
    """

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ReconnectsExhausted(ClientError):
    """A client failed ``max_reconnects`` reconnection attempts in a row and gave up."""


class AuthError(RealtimeLabError):
    """A request's identity or browser policy check failed.

    Attributes:
        code: a short machine-readable reason (``invalid-token``, ``ticket-used``, ...) to put in
            the ``error.code`` of the answer; the message is for humans and never holds a secret.
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class Unauthenticated(AuthError):
    """No credential, or one that is invalid, expired or spent: answer 401 with ``code``.

    Codes: ``invalid-token``, ``token-expired``, ``ticket-unknown``, ``ticket-used``,
    ``ticket-expired``, ``ticket-wrong-channel``.
    """


class Forbidden(AuthError):
    """The caller is authenticated but may not do this (a missing scope, ...): answer 403."""


class LimitReached(RealtimeLabError):
    """A bound on what clients can make the server hold was reached; nothing was stored.

    Attributes:
        code: a short machine-readable reason (``too-many-channels``, ``event-too-large``,
            ``too-many-chats``) for the ``error.code`` of the answer.
        status: the HTTP status to answer with (429, 413 or 507).
        retry_after: seconds after which trying again may succeed (``None``: it will not).
    """

    def __init__(
        self, message: str, code: str, status: int = 429, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.retry_after = retry_after


class BusUnavailable(BusError, LimitReached):
    """The bus backend (Redis) cannot be reached now; nothing was stored.

    A :class:`LimitReached` too (code ``bus-unavailable``, status 503, ``retry_after`` 1 s), so
    that every place that answers a refusal answers this one as well: 503 with ``Retry-After``
    and a JSON error. Try again later; open streams carry on by themselves once it is back.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, "bus-unavailable", 503, retry_after)


class TooManyChannels(LimitReached):
    """Publishing to (or reserving) a new channel beyond the channel cap."""


class EventTooLarge(LimitReached):
    """One event larger than a channel's history byte cap."""


class TooManyChats(LimitReached):
    """The caller (or the server) already runs as many chats as it may."""


class UpstreamError(FeedError):
    """The upstream model (``--upstream``) failed a chat's generation; the chat ends in ``error``.

    The chat registry publishes it on the chat's channel as an ``error`` event (``data``:
    ``code``, ``message``, and ``status`` / ``retry_after`` when known), then ``end``. Start a
    new chat to try again, after ``retry_after`` seconds when it is set.

    Attributes:
        code: ``upstream-unreachable``, ``upstream-status``, ``upstream-rate-limited``,
            ``upstream-error``, ``upstream-cut``, ``upstream-invalid-chunk``,
            ``upstream-ttft-timeout`` or ``upstream-idle-timeout``.
        status: the upstream's HTTP status when it answered with an error one, else ``None``.
        retry_after: seconds the upstream asked to wait (its ``Retry-After``), else ``None``.
    """

    def __init__(
        self,
        message: str,
        code: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.retry_after = retry_after
