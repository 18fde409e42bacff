"""WebSocket ``permessage-deflate`` (RFC 7692) without I/O: negotiation, compressors, inflater.

The server reads the client's ``Sec-WebSocket-Extensions`` with :func:`negotiate`, which picks
the first offer it can accept and returns the :class:`Agreement` (``None``: answer without the
extension and send plain frames). ``agreement.header()`` is the response header's value. Then:

- ``message`` mode (no context takeover, ``server_no_context_takeover`` in the answer): each
  event is compressed once by :func:`deflate_message`, with no reference to anything sent before,
  so the frame (:func:`deflated_text_frame`) is the same bytes for every subscriber and is cached
  on the event like the plain frame. A message compression does not shrink goes out plain
  (RSV1 clear), which the RFC allows at any time.
- ``connection`` mode (context takeover): one :class:`ConnectionDeflater` per connection keeps
  its sliding window across messages, so a token envelope mostly repeats the previous one and
  shrinks to a quarter. Every message it compresses must be written, in the order compressed:
  the client's inflater follows the same stream. It costs one zlib context per connection
  (:func:`context_bytes`); a client that asks for ``server_no_context_takeover`` gets
  ``message`` mode instead.

A peer decodes compressed messages (RSV1 on the first frame) with :class:`Inflater`, bounded
by ``max_size`` (a few bytes can inflate to gigabytes). The server's own reading is aiohttp's
reader, told that the extension is on; the inflater serves clients and tests.

Why not ``websockets``' or ``wsproto``'s extension classes: both bind the compressor to a
per-connection protocol object, where ``message`` mode needs one stateless function whose
output is cached and shared; and the negotiation is a page of parsing. zlib does the deflating.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from realtime_lab.errors import WebSocketProtocolError
from realtime_lab.protocol.websocket import CLOSE_INVALID_DATA, CLOSE_TOO_BIG

__all__ = [
    "DEFAULT_MEM_LEVEL",
    "DEFAULT_WINDOW_BITS",
    "EXTENSION",
    "MODES",
    "Agreement",
    "ConnectionDeflater",
    "Inflater",
    "context_bytes",
    "deflate_message",
    "negotiate",
    "parse_offers",
]

#: The extension's token in ``Sec-WebSocket-Extensions``.
EXTENSION: Final = "permessage-deflate"
#: The server's compression modes: none, a fresh context per message, a context per connection.
MODES: Final = ("off", "message", "connection")

#: The server's sliding window in ``connection`` mode, announced as ``server_max_window_bits``,
#: and zlib's hash-table size (``memLevel``). 2**12 bytes hold ~35 token envelopes: on the
#: ticker this gives 27.4 bytes per token, as 2**15 and memLevel 8 do, for 36 KiB of RSS per
#: connection instead of 201 KiB (zlib allocates 38 and 262 KiB; measured with
#: ``examples/compression_figures.py``). Smaller still (2**9, memLevel 1: 9 KiB) costs 3%.
DEFAULT_WINDOW_BITS: Final = 12
DEFAULT_MEM_LEVEL: Final = 5

_TAIL: Final = b"\x00\x00\xff\xff"  # what a sync flush ends with; removed on the wire (7.2.1)
_FLAGS: Final = ("server_no_context_takeover", "client_no_context_takeover")
_PARAMS: Final = frozenset(
    {
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    }
)

#: One offer's parameters: name -> value (``None`` for a parameter without a value).
Offer = dict[str, str | None]


# Negotiation -------------------------------------------------------------------------------------


def parse_offers(headers: str | Iterable[str] | None) -> list[Offer]:
    """The ``permessage-deflate`` offers among ``Sec-WebSocket-Extensions`` values, in order.

    Other extensions are skipped; an offer whose syntax is broken or that repeats a parameter
    is dropped (declined), not raised: a bad header means no compression, not a refused
    handshake. Values are unquoted; names are lower-cased.
    """
    if headers is None:
        return []
    values = [headers] if isinstance(headers, str) else list(headers)
    offers: list[Offer] = []
    for value in values:
        for element in value.split(","):
            parts = [part.strip() for part in element.split(";")]
            if parts[0].lower() != EXTENSION:
                continue
            offer: Offer = {}
            for part in parts[1:]:
                name, sep, raw = part.partition("=")
                name = name.strip().lower()
                if not name or name in offer:
                    break
                param: str | None = None
                if sep:
                    param = raw.strip()
                    if len(param) >= 2 and param[0] == param[-1] == '"':
                        param = param[1:-1]
                    if not param:
                        break
                offer[name] = param
            else:
                offers.append(offer)
    return offers


def _window_bits(raw: str | None) -> int | None:
    if raw is None or not raw.isdigit() or len(raw) > 2 or raw.startswith("0"):
        return None
    bits = int(raw)
    return bits if 8 <= bits <= 15 else None


@dataclass(frozen=True, slots=True)
class Agreement:
    """The parameters both sides use, once the server has accepted an offer.

    Attributes:
        context_takeover: the server keeps its window across messages (``connection`` mode);
            ``False``: it compresses each message on its own (``server_no_context_takeover``).
        window_bits: the server's window when it keeps one (9-15).
        client_no_context_takeover: the client said it resets its own context per message.
    """

    context_takeover: bool
    window_bits: int = 15
    client_no_context_takeover: bool = False

    def header(self) -> str:
        """The response's ``Sec-WebSocket-Extensions`` value."""
        parts = [EXTENSION]
        if not self.context_takeover:
            parts.append("server_no_context_takeover")
        elif self.window_bits < 15:
            parts.append(f"server_max_window_bits={self.window_bits}")
        if self.client_no_context_takeover:
            parts.append("client_no_context_takeover")
        return "; ".join(parts)


def negotiate(
    headers: str | Iterable[str] | None,
    mode: str,
    *,
    window_bits: int = DEFAULT_WINDOW_BITS,
) -> Agreement | None:
    """Accept the first acceptable ``permessage-deflate`` offer for ``mode`` (see :data:`MODES`).

    Returns ``None`` when ``mode`` is ``off``, nothing was offered, or no offer can be accepted
    (an unknown parameter, a bad value, ``server_max_window_bits=8``, which zlib cannot keep);
    then answer without the extension. Otherwise send ``agreement.header()`` and compress as
    it says. An offer's ``server_max_window_bits`` lowers ``window_bits``; its
    ``server_no_context_takeover`` turns ``connection`` into ``message``. The client's own
    window is never limited (the server's inflater takes any).

    Raises:
        ValueError: an unknown ``mode`` or a ``window_bits`` outside 9-15 (a setting, not
            network input).
    """
    if mode not in MODES:
        raise ValueError(f"compression mode {mode!r} is not one of {', '.join(MODES)}")
    if not 9 <= window_bits <= 15:
        raise ValueError(f"window bits {window_bits} outside 9-15")
    if mode == "off":
        return None
    for offer in parse_offers(headers):
        if not offer.keys() <= _PARAMS:
            continue
        if any(offer.get(flag) is not None for flag in _FLAGS):
            continue  # these take no value
        bits = window_bits
        if "server_max_window_bits" in offer:
            asked = _window_bits(offer["server_max_window_bits"])
            if asked is None or asked == 8:
                continue
            bits = min(bits, asked)
        client_bits = offer.get("client_max_window_bits")
        if client_bits is not None and _window_bits(client_bits) is None:
            continue
        takeover = mode == "connection" and "server_no_context_takeover" not in offer
        return Agreement(
            context_takeover=takeover,
            window_bits=bits if takeover else 15,
            client_no_context_takeover="client_no_context_takeover" in offer,
        )
    return None


# Compressing -------------------------------------------------------------------------------------

# One compressor for every message of every connection: a full flush after each message drops
# its window and hash chains, so the next message refers to nothing before it - what a fresh
# context would give, without paying zlib's ~80 us to allocate and clear one per message.
_SHARED: Final = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)


def deflate_message(payload: bytes) -> bytes | None:
    """``payload`` compressed on its own (no context takeover), tail removed; ``None`` when that
    does not make it smaller: send it plain then.

    The result depends on ``payload`` only: compute it once per event and send it, in a frame
    with RSV1 set, to every subscriber that agreed to the extension.
    """
    data = _SHARED.compress(payload) + _SHARED.flush(zlib.Z_FULL_FLUSH)
    data = data[:-4] if data.endswith(_TAIL) else data
    return data if len(data) < len(payload) else None


class ConnectionDeflater:
    """The compressor of one connection that keeps its context (``connection`` mode).

    Call :meth:`message` for each message, in the order they are written, and write every
    result (in a frame with RSV1 set): skipping one desynchronises the client's inflater.
    Messages not passed through here may still be sent plain (RSV1 clear).
    """

    __slots__ = ("_zlib",)

    def __init__(
        self,
        window_bits: int = DEFAULT_WINDOW_BITS,
        mem_level: int = DEFAULT_MEM_LEVEL,
        level: int = zlib.Z_DEFAULT_COMPRESSION,
    ) -> None:
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, -window_bits, mem_level)

    def message(self, payload: bytes) -> bytes:
        """The next message's compressed payload (tail removed)."""
        data = self._zlib.compress(payload) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
        return data[:-4] if data.endswith(_TAIL) else data


def context_bytes(
    window_bits: int = DEFAULT_WINDOW_BITS, mem_level: int = DEFAULT_MEM_LEVEL
) -> int:
    """What zlib allocates for one compression context (zconf.h's formula, plus its ~6 KiB of
    state): the memory a ``connection``-mode connection holds beyond a plain one."""
    return (1 << (window_bits + 2)) + (1 << (mem_level + 9)) + 6 * 1024


# Decompressing -----------------------------------------------------------------------------------


class Inflater:
    """Decompresses the messages of one direction of a connection (RSV1 set on their first frame).

    Args:
        no_context_takeover: the sender resets its context per message (the agreement's
            ``server_no_context_takeover`` for a client, ``client_no_context_takeover`` for a
            server); the inflater then forgets its window after each message.
        max_size: refuse a message that inflates to more bytes (close code 1009).
    """

    __slots__ = ("_max_size", "_reset", "_zlib")

    def __init__(self, *, no_context_takeover: bool = False, max_size: int = 1 << 20) -> None:
        self._reset = no_context_takeover
        self._max_size = max_size
        self._zlib = zlib.decompressobj(-15)

    def message(self, payload: bytes) -> bytes:
        """One whole message's payload (fragments joined), inflated.

        Raises:
            WebSocketProtocolError: the payload is not valid deflate data (code 1007), or
                inflates past ``max_size`` (1009). Close the connection with the code.
        """
        try:
            data = self._zlib.decompress(payload + _TAIL, self._max_size + 1)
        except zlib.error as exc:
            raise WebSocketProtocolError(
                f"compressed message is not deflate data: {exc}", CLOSE_INVALID_DATA
            ) from exc
        if len(data) > self._max_size or self._zlib.unconsumed_tail:
            raise WebSocketProtocolError(
                f"compressed message inflates past {self._max_size} bytes", CLOSE_TOO_BIG
            )
        if self._reset:
            self._zlib = zlib.decompressobj(-15)
        return data
