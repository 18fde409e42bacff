"""Sans-I/O parsers for the load clients: HTTP/1.1 heads, chunked bodies, SSE, WebSocket frames.

Why not the project's own clients or aiohttp here: a benchmark client that spends more CPU per
event than the server does measures itself. On a 2-core machine 1,000 clients at 100 tokens/s
are 100,000 deliveries per second to parse; the WHATWG decoder in
:mod:`realtime_lab.protocol.sse` decodes UTF-8, splits lines with a regular expression and builds
a dataclass per event, and ``json.loads`` builds a dict per envelope. The load client only needs
three things per event - its ``seq`` (loss and duplicate checks), its ``ts`` (latency) and
whether it is a token - and the server's output format is fixed by the wire contract, so these
parsers take them with ``bytes.find`` and slicing:

- an SSE token block is exactly ``id: <epoch>-<seq>\\n`` + ``data: <envelope>``; the envelope's
  keys come in the order ``channel, id, type, data, ts`` and nothing follows ``ts`` but ``}``;
- ``channel`` and ``id`` cannot contain a quote, so the first ``"type":"`` is the envelope's.

Whatever does not match that shape (CR line endings from a proxy, several data lines, another
key order) falls back to the full decoders (:class:`~realtime_lab.protocol.sse.SSEDecoder`,
``json.loads``), so the fast path is an optimisation and never a different answer.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from functools import partial
from typing import Any, Final, NamedTuple

from realtime_lab.errors import RealtimeLabError
from realtime_lab.protocol import websocket
from realtime_lab.protocol.sse import SSEDecoder

NAN: Final = math.nan

# WebSocket opcodes, under the names the load clients use.
OP_CONT: Final = websocket.OP_CONTINUATION
OP_TEXT: Final = websocket.OP_TEXT
OP_BINARY: Final = websocket.OP_BINARY
OP_CLOSE: Final = websocket.OP_CLOSE
OP_PING: Final = websocket.OP_PING
OP_PONG: Final = websocket.OP_PONG


class BenchProtocolError(RealtimeLabError):
    """The server sent bytes the load client cannot parse; the connection is counted as failed."""


class Item(NamedTuple):
    """One event as the load client sees it.

    Attributes:
        kind: ``None`` for a token, else the event type (``end``, ``reset``, ``error``, ...).
        seq: the sequence number in the event id (``-1`` when the event has no id).
        ts: the envelope's server timestamp in ms (NaN when it has none).
        payload: the raw JSON (only read for non-token events).
    """

    kind: str | None
    seq: int
    ts: float
    payload: bytes


#: Build an :class:`Item` from a 4-tuple without NamedTuple's Python-level ``__new__``.
_item: Callable[[tuple[str | None, int, float, bytes]], Item] = partial(tuple.__new__, Item)


# HTTP/1.1 -------------------------------------------------------------------------------------


class Head(NamedTuple):
    """A parsed response head: status code and lower-cased header names."""

    status: int
    headers: dict[str, str]


def parse_head(buf: bytes) -> tuple[Head, int] | None:
    """Parse a response head from the start of ``buf``.

    Returns:
        ``(head, body_offset)``, or ``None`` when the blank line has not arrived yet (read more).

    Raises:
        BenchProtocolError: not an HTTP/1.x status line.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 64 * 1024:
            raise BenchProtocolError("response head larger than 64 KiB")
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise BenchProtocolError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Head(int(parts[1]), headers), end + 4


def get_request(path: str, host: str, headers: dict[str, str] | None = None) -> bytes:
    """A keep-alive ``GET`` request."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post_request(path: str, host: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A keep-alive ``POST`` request with a JSON ``body``."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ChunkedDecoder:
    """Incremental ``Transfer-Encoding: chunked`` body decoder.

    :meth:`feed` returns the payload bytes completed so far; :attr:`finished` turns true at the
    zero-size last chunk (trailers are ignored).
    """

    __slots__ = ("_buf", "finished")

    def __init__(self) -> None:
        self._buf = b""
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        """Take the next bytes of the body; return the payload they complete.

        Raises:
            BenchProtocolError: a chunk-size line that is not hexadecimal, or a missing CRLF.
        """
        buf = self._buf + data if self._buf else data
        if self.finished:
            return b""
        out: list[bytes] = []
        pos, size_of_buf = 0, len(buf)
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            try:
                size = int(buf[pos:eol], 16)
            except ValueError:
                size = _chunk_size_with_extension(buf[pos:eol])
            if size == 0:
                self.finished = True
                pos = size_of_buf
                break
            start = eol + 2
            end = start + size
            if end + 2 > size_of_buf:
                break
            if buf[end : end + 2] != b"\r\n":
                raise BenchProtocolError("chunk not followed by CRLF")
            out.append(buf[start:end])
            pos = end + 2
        self._buf = buf[pos:]
        if len(out) == 1:
            return out[0]
        return b"".join(out)


def _chunk_size_with_extension(line: bytes) -> int:
    try:
        return int(line.split(b";", 1)[0], 16)
    except ValueError as exc:
        raise BenchProtocolError(f"bad chunk size {line[:20]!r}") from exc


# Envelope fields ------------------------------------------------------------------------------


def seq_of(event_id: bytes | str) -> int:
    """The ``seq`` of an ``<epoch>-<seq>`` id, or ``-1`` when it is not one."""
    raw = event_id.encode() if isinstance(event_id, str) else event_id
    cut = raw.rfind(b"-")
    try:
        return int(raw[cut + 1 :]) if cut > 0 else -1
    except ValueError:
        return -1


def ts_of(payload: bytes) -> float:
    """The ``ts`` of an envelope (the last key the server writes), NaN when it has none."""
    at = payload.rfind(b'"ts":')
    if at >= 0 and payload[-1:] == b"}":
        try:
            # Only a number lies between the last "ts": and the closing brace when ts is the
            # envelope's last key; anything else fails float() and takes the slow path.
            return float(payload[at + 5 : -1])
        except ValueError:
            pass
    return _slow_fields(payload)[2]


def _slow_fields(payload: bytes) -> tuple[str | None, int, float]:
    """``(kind, seq, ts)`` of an envelope by full JSON decoding (the fallback path)."""
    try:
        value: Any = json.loads(payload)
    except ValueError:
        return "error", -1, NAN
    if not isinstance(value, dict):
        return "error", -1, NAN
    kind = value.get("type")
    ident = value.get("id")
    ts = value.get("ts")
    return (
        None if kind == "token" else str(kind),
        seq_of(ident) if isinstance(ident, str) else -1,
        float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else NAN,
    )


_ENVELOPE_START: Final = b'{"channel":"'


def envelope_item(payload: bytes) -> Item:
    """Read ``kind``, ``seq`` and ``ts`` from one JSON envelope (fast path, see module doc)."""
    if payload.startswith(_ENVELOPE_START):
        at = payload.find(b'"id":"')
        typ = payload.find(b'"type":"')
        if 0 < at < typ:
            seq = seq_of(payload[at + 6 : payload.find(b'"', at + 6)])
            if payload.startswith(b'token"', typ + 8):
                return Item(None, seq, ts_of(payload), payload)
            name = payload[typ + 8 : payload.find(b'"', typ + 8)].decode()
            return Item(name, seq, ts_of(payload), payload)
    kind, seq, ts = _slow_fields(payload)
    return Item(kind, seq, ts, payload)


# SSE ---------------------------------------------------------------------------------------------


class SSEParser:
    """Incremental parser of a (de-chunked) ``text/event-stream`` body into :class:`Item` s.

    Fast path for the server's own framing (see the module docstring); comments and ``retry:``
    blocks are skipped; anything else goes through the WHATWG decoder. A stream that contains a
    CR anywhere is handed to the WHATWG decoder for good, since the fast path splits on LF only.
    """

    __slots__ = ("_buf", "_slow")

    def __init__(self) -> None:
        self._buf = b""
        self._slow: SSEDecoder | None = None

    def feed(self, data: bytes) -> list[Item]:
        """Take the next bytes of the body; return the events they complete, in order."""
        if self._slow is not None or b"\r" in data:
            return self._feed_slow(data)
        buf = self._buf + data if self._buf else data
        blocks = buf.split(b"\n\n")
        self._buf = blocks.pop()
        out: list[Item] = []
        for block in blocks:
            # The hot path, inlined: "id: <epoch>-<seq>\ndata: <envelope ending in ts>}".
            if block[:4] == b"id: ":
                nl = block.find(b"\n")
                if nl > 0 and block[nl + 1 : nl + 7] == b"data: " and block.find(b"\n", nl + 1) < 0:
                    payload = block[nl + 7 :]
                    at = payload.rfind(b'"ts":')
                    try:
                        seq = int(block[block.rfind(b"-", 0, nl) + 1 : nl])
                        ts = (
                            float(payload[at + 5 : -1])
                            if at > 0 and payload[-1] == 125
                            else ts_of(payload)
                        )
                    except ValueError:
                        seq, ts = seq_of(block[4:nl]), ts_of(payload)
                    out.append(_item((None, seq, ts, payload)))
                    continue
            elif (block[:1] == b":" or block[:7] == b"retry: ") and b"\n" not in block:
                continue
            if block:
                out.extend(self._decode_block(block))
        return out

    def _decode_block(self, block: bytes) -> list[Item]:
        decoder = SSEDecoder()
        return [_from_sse(e.event, e.id, e.data) for e in decoder.feed(block + b"\n\n")]

    def _feed_slow(self, data: bytes) -> list[Item]:
        if self._slow is None:
            self._slow = SSEDecoder()
            data, self._buf = self._buf + data, b""
        return [_from_sse(e.event, e.id, e.data) for e in self._slow.feed(data)]


def _from_sse(event: str, event_id: str, data: str) -> Item:
    payload = data.encode()
    if event == "message":
        return Item(None, seq_of(event_id) if event_id else -1, ts_of(payload), payload)
    _, seq, ts = _slow_fields(payload)
    return Item(event, seq if seq >= 0 else seq_of(event_id), ts, payload)


# WebSocket ---------------------------------------------------------------------------------------
# The framing is :mod:`realtime_lab.protocol.websocket`'s; what is left here is the handshake
# request (HTTP/1.1, built like the other load clients' requests) and the load client's defaults.

#: A fresh ``Sec-WebSocket-Key``.
ws_key = websocket.new_key
#: The ``Sec-WebSocket-Accept`` a server must answer to a key.
ws_accept = websocket.accept_key


def ws_handshake(path: str, host: str, key: str, extensions: str | None = None) -> bytes:
    """The opening handshake request; ``extensions`` is offered in ``Sec-WebSocket-Extensions``
    (``None``: no extensions, the server sends plain text frames)."""
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
    }
    if extensions is not None:
        headers["Sec-WebSocket-Extensions"] = extensions
    return get_request(path, host, headers)


def client_frame(opcode: int, payload: bytes = b"", mask: bytes | None = None) -> bytes:
    """A final, masked client frame (clients must mask, RFC 6455 section 5.3).

    ``mask`` defaults to a fresh random key; pass one only to get reproducible bytes in tests.
    """
    return websocket.encode_frame(opcode, payload, mask=os.urandom(4) if mask is None else mask)


class WSFrameParser(websocket.FrameDecoder):
    """Incremental parser of server-to-client frames, fragmented messages joined.

    The protocol's :class:`~realtime_lab.protocol.websocket.FrameDecoder`, set up for the load
    client: :meth:`feed` returns ``(opcode, payload, fin, rsv1)`` tuples, one per message or
    control frame (control frames may arrive between a message's fragments and come out first),
    and raises :class:`~realtime_lab.errors.WebSocketProtocolError` on bytes that break RFC 6455:
    count the connection as failed. (It is not wrapped to raise :class:`BenchProtocolError`: the
    extra call cost about 0.15 us per read, a third of the decoding itself.)
    """

    __slots__ = ()

    def __init__(self, *, rsv1: bool = False) -> None:
        # rsv1: permessage-deflate was agreed (compressed messages have RSV1 set).
        super().__init__(masked=False, rsv1=rsv1, reassemble=True)


# Poll answers ------------------------------------------------------------------------------------


def poll_answer(body: bytes) -> tuple[list[Item], str | None, bool]:
    """``(events, cursor, more)`` of a ``/poll`` or ``/longpoll`` answer.

    Raises:
        BenchProtocolError: the body is not the documented JSON object.
    """
    try:
        value = json.loads(body)
        raw_events = value["events"]
        cursor = value["cursor"]
        more = bool(value.get("more", False))
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchProtocolError(f"not a poll answer: {body[:80]!r}") from exc
    items: list[Item] = []
    for event in raw_events:
        kind = event.get("type")
        ident = event.get("id")
        ts = event.get("ts")
        items.append(
            Item(
                None if kind == "token" else str(kind),
                seq_of(ident) if isinstance(ident, str) else -1,
                float(ts) if isinstance(ts, int | float) else NAN,
                b"" if kind == "token" else json.dumps(event).encode(),
            )
        )
    return items, cursor if isinstance(cursor, str) else None, more
