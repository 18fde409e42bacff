"""The exception tree. Every error the package raises on purpose derives from RealtimeLabError.

RealtimeLabError
├── ProtocolError           bytes or values that break a wire format (sans-I/O layer)
│   ├── InvalidCursor       a malformed ``after`` / ``Last-Event-ID``
│   ├── InvalidEnvelope     JSON that is not an event envelope
│   └── SSEEncodeError      a field the SSE format cannot carry (CR, LF or NUL in ``id``/``event``)
├── BusError                the event bus failed or refused
│   ├── UnknownBusBackend   a bus URL whose scheme no backend serves
│   ├── SubscriberOverflow  a subscriber fell more than its bound behind and was ended
│   └── BusClosed           the bus was closed under a subscriber
├── FeedError               the simulated LLM / chat registry
│   └── UnknownChat
└── ClientError             the Python clients (reconnect budget spent, server refused, ...)
    ├── StreamEnded         raised by helpers that expected more events after ``end``
    ├── ServerRefused       a 4xx answer (other than 408/429): retrying cannot help
    └── ReconnectsExhausted ``max_reconnects`` attempts in a row failed
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
