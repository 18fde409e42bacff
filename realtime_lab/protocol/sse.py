"""The Server-Sent Events wire format: an encoder for the server and an incremental decoder.

Encoding follows the ``text/event-stream`` grammar; decoding follows the WHATWG "event stream
interpretation" algorithm
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation)
so the Python client sees exactly what a browser's ``EventSource`` would, whatever way TCP cut the
stream into chunks.

Both halves are sans-I/O: the server writes the bytes :func:`encode_event` returns, and a client
passes every chunk it reads to :meth:`SSEDecoder.feed` and handles the events it gets back.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Final

from realtime_lab.errors import SSEEncodeError

__all__ = [
    "MAX_RETRY",
    "SSEDecoder",
    "ServerSentEvent",
    "encode_comment",
    "encode_event",
    "encode_retry",
]

#: The largest reconnection time (ms) either side accepts. Chromium ignores a ``retry`` field that
#: overflows an unsigned 64-bit integer; the decoder does the same, and the encoder refuses to
#: write a value a browser would ignore.
MAX_RETRY: Final = 2**64 - 1

_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")
_FORBIDDEN_IN_EVENT_OR_ID: Final = re.compile(r"[\r\n\x00]")
_DEFAULT_TYPE: Final = "message"


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event, as an ``EventSource`` would deliver it.

    Attributes:
        data: the data lines joined with ``"\\n"`` (line endings are normalised to LF).
        event: the event type; ``"message"`` when the event had no (or an empty) ``event:`` field.
        id: the last event id in effect at dispatch. It carries over: an event without an ``id:``
            field gets the id of the latest one that had it. Send it back as ``Last-Event-ID``.
        retry: the reconnection time (ms) set by a valid ``retry:`` field inside this event's own
            block, else ``None``. ``retry`` is a property of the stream, not of events, so the
            value that stays in force (also when set by a block with no data) is
            :attr:`SSEDecoder.retry`; this field only lets ``encode_event`` round-trip.
    """

    data: str = ""
    event: str = _DEFAULT_TYPE
    id: str = ""
    retry: int | None = None


def _split_lines(text: str) -> list[str]:
    # str.splitlines() would also break on VT, FF, U+2028 and friends, which SSE treats as text.
    if "\r" not in text:
        return text.split("\n")
    return _LINE_BREAK.split(text)


def _check_field(name: str, value: str) -> None:
    if _FORBIDDEN_IN_EVENT_OR_ID.search(value) is not None:
        raise SSEEncodeError(f"SSE {name} field cannot contain CR, LF or NUL: {value!r}")


def _check_retry(ms: object) -> None:
    # bool is an int subclass; ``retry=True`` is always a caller's mistake.
    if isinstance(ms, bool) or not isinstance(ms, int) or not 0 <= ms <= MAX_RETRY:
        raise SSEEncodeError(f"SSE retry must be an int in 0..{MAX_RETRY}, got {ms!r}")


def _to_bytes(lines: list[str]) -> bytes:
    try:
        return ("\n".join(lines) + "\n\n").encode()
    except UnicodeEncodeError as exc:
        # Lone surrogates: the stream is UTF-8 and they have no UTF-8 form.
        raise SSEEncodeError(f"SSE fields must be encodable as UTF-8: {exc.reason}") from exc


def encode_event(
    data: str | None = None,
    *,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
    comment: str | None = None,
) -> bytes:
    """Encode one event block, ready to write to a ``text/event-stream`` response.

    Lines come in the order comments, ``event:``, ``id:``, ``retry:``, ``data:``, then the blank
    line that makes the client dispatch. ``data`` (and ``comment``) are split on CRLF, CR and LF
    into one line each, so the client gets ``data`` back with LF line endings; ``""`` is one empty
    data line (an event with empty data), while ``None`` writes no data line at all, and then the
    client dispatches nothing: use that to only set an id or the reconnection time.

    Args:
        data: the event payload, or ``None`` for no ``data:`` line.
        event: the event type; ``None`` (or ``""``) means the client sees ``"message"``.
        id: the event id the client stores and sends back as ``Last-Event-ID``; ``""`` clears it.
        retry: the reconnection time in milliseconds, ``0..MAX_RETRY``.
        comment: text for ``:`` comment lines, which clients ignore (padding, debugging).

    Returns:
        The UTF-8 block, ending in a blank line; ``b""`` when every argument is ``None``. Write it
        as is: it is self-delimiting, so blocks can be concatenated or cached and reused.

    Raises:
        SSEEncodeError: ``event`` or ``id`` contains CR, LF or NUL, ``retry`` is not an int in
            range, or a value holds lone surrogates. Nothing was encoded; fix the value.
    """
    lines: list[str] = []
    if comment is not None:
        lines.extend(": " + line for line in _split_lines(comment))
    if event is not None:
        _check_field("event", event)
        lines.append("event: " + event)
    if id is not None:
        _check_field("id", id)
        lines.append("id: " + id)
    if retry is not None:
        _check_retry(retry)
        lines.append(f"retry: {retry}")
    if data is not None:
        # Always one space after the colon: the decoder strips exactly one, so data starting with
        # a space survives.
        lines.extend("data: " + line for line in _split_lines(data))
    if not lines:
        return b""
    return _to_bytes(lines)


def encode_comment(text: str = "") -> bytes:
    """Encode a comment block (``": text\\n\\n"``), one ``:`` line per line of ``text``.

    Clients ignore comments, which makes them the heartbeat that keeps proxies from closing an
    idle stream; write the result as is.

    Raises:
        SSEEncodeError: ``text`` holds lone surrogates.
    """
    return _to_bytes([": " + line for line in _split_lines(text)])


def encode_retry(ms: int) -> bytes:
    """Encode a block that only sets the client's reconnection time (``"retry: N\\n\\n"``).

    Write it once at the start of a stream; the client waits ``ms`` milliseconds before
    reconnecting after the connection drops.

    Raises:
        SSEEncodeError: ``ms`` is not an int in ``0..MAX_RETRY``.
    """
    _check_retry(ms)
    return f"retry: {ms}\n\n".encode()


def _parse_retry(value: str) -> int | None:
    # isascii() first: isdigit() also accepts "²" and other non-ASCII digits.
    if not (value.isascii() and value.isdigit()):
        return None
    # Strip zeros before int() so a long zero-padded value cannot hit Python's int-from-str digit
    # limit; 20 digits is the most an unsigned 64-bit value has.
    significant = value.lstrip("0")
    if len(significant) > 20:
        return None
    ms = int(significant or "0")
    return ms if ms <= MAX_RETRY else None


class SSEDecoder:
    """Incremental WHATWG ``EventSource`` parser.

    See https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation.

    Feed it the response body chunk by chunk, cut anywhere (inside a CRLF, a UTF-8 sequence or the
    leading BOM); it returns each event once its terminating blank line has arrived. When the
    connection ends, call :meth:`close`; the same decoder can then be fed the next connection's
    body, keeping :attr:`last_event_id`, :attr:`retry` and :attr:`comments`, as an
    ``EventSource`` keeps them across reconnections.
    """

    __slots__ = (
        "_block_retry",
        "_comments",
        "_data",
        "_event",
        "_id_buffer",
        "_last_event_id",
        "_parts",
        "_pending_cr",
        "_retry",
        "_text",
    )

    def __init__(self) -> None:
        self._last_event_id = ""
        self._retry: int | None = None
        self._comments = 0
        self._start_stream()

    def _start_stream(self) -> None:
        # utf-8-sig strips one BOM at the very start only, buffering while the first bytes could
        # still be a BOM, which is exactly the spec's "UTF-8 decode" even for a BOM split across
        # chunks.
        self._text = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        # The unterminated line so far, as pieces, so a long line in many chunks is joined once.
        self._parts: list[str] = []
        # The previous chunk ended in CR: an LF starting the next one belongs to that line end.
        self._pending_cr = False
        self._data: list[str] = []
        self._event = ""
        # Chromium seeds a new connection's buffer with the id in force, so ids carry over a
        # reconnect; the spec's literal "initialise to empty" would forget it.
        self._id_buffer = self._last_event_id
        self._block_retry: int | None = None

    @property
    def last_event_id(self) -> str:
        """The id to send as ``Last-Event-ID`` when reconnecting (``""`` if none).

        This is the spec's "last event ID string": an ``id:`` field takes effect at the blank line
        that ends its block, so an id whose event was cut off by a disconnect is not reported, and
        a resume after it would not skip that event.
        """
        return self._last_event_id

    @property
    def retry(self) -> int | None:
        """The reconnection time (ms) set by the latest valid ``retry:`` field, ``None`` if none.

        Wait this long before reconnecting; a ``retry:`` field takes effect as soon as its line
        is complete.
        """
        return self._retry

    @property
    def comments(self) -> int:
        """How many comment lines have been seen; it grows with every server heartbeat."""
        return self._comments

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        """Parse the next chunk of the stream.

        Returns:
            The events this chunk completed, in stream order (often none); handle them, then feed
            the next chunk.
        """
        text = self._text.decode(data)
        if not text:
            # Keep the pending CR: the decoder may be holding bytes back mid-character.
            return []
        if self._pending_cr:
            self._pending_cr = False
            if text[0] == "\n":
                text = text[1:]
        if "\r" in text:
            self._pending_cr = text[-1] == "\r"
        lines = _split_lines(text)
        if len(lines) == 1:
            if text:
                self._parts.append(text)
            return []
        events: list[ServerSentEvent] = []
        if self._parts:
            self._parts.append(lines[0])
            lines[0] = "".join(self._parts)
        tail = lines.pop()
        self._parts = [tail] if tail else []
        for line in lines:
            if line:
                self._process_field(line)
            else:
                event = self._dispatch()
                if event is not None:
                    events.append(event)
        return events

    def close(self) -> list[ServerSentEvent]:
        """End the current stream (the connection closed).

        An event whose blank line never arrived is discarded, as is a partial line, as the spec
        requires; so is an ``id:`` field of that event (see :attr:`last_event_id`). Reconnect after
        :attr:`retry` ms with :attr:`last_event_id`, and feed the new body to this decoder.

        Returns:
            Always ``[]`` (kept as a list so callers can treat it like :meth:`feed`).
        """
        self._start_stream()
        return []

    def _process_field(self, line: str) -> None:
        if line[0] == ":":
            self._comments += 1
            return
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id_buffer = value
        elif name == "retry":
            ms = _parse_retry(value)
            if ms is not None:
                self._retry = self._block_retry = ms

    def _dispatch(self) -> ServerSentEvent | None:
        # Per spec the id is committed even when the block has no data, which is how a server
        # moves the client's Last-Event-ID without sending an event.
        self._last_event_id = self._id_buffer
        retry, self._block_retry = self._block_retry, None
        event_type, self._event = self._event, ""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return ServerSentEvent(data, event_type or _DEFAULT_TYPE, self._last_event_id, retry)
