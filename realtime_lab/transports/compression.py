"""Compression over HTTP: the server's mode, and ``Content-Encoding`` for streams and polls.

One setting, ``--compression off|message|connection``, says how every transport compresses:

- ``off``: nothing is compressed; a client's ``Accept-Encoding`` and deflate offer are ignored.
- ``message``: what can be compressed once per event and shared. The WebSocket sends each
  event deflated on its own (``permessage-deflate`` without context takeover: see
  :mod:`realtime_lab.protocol.deflate`), one cached frame for every subscriber. An HTTP body's
  content coding is one stream per response, so SSE and fetch streams stay uncompressed:
  encode-once is what this mode keeps.
- ``connection``: a compressor per connection, for the best ratio: the WebSocket keeps its
  deflate context across messages; SSE and fetch streams are answered with ``Content-Encoding``
  (:func:`stream_encoder`), flushed after every write so each event reaches the client at once.

Polling answers are compressed like any JSON response when the client asks (``Accept-Encoding``)
in both modes that compress: a poll answer is written for one request anyway.

The codings: ``gzip`` (zlib, always there), ``br`` with Google's ``brotli`` bindings and
``zstd`` with ``backports.zstd`` (the standard library's ``compression.zstd`` from Python 3.14,
which is what aiohttp's client decodes with), each only when its package is installed
(``pip install realtime-lab[compression]``). When the client accepts several, the server picks
by the client's q-values, then by :data:`PREFERENCE` (gzip first: on this feed it gives the fewest
bytes and holds the least memory per connection; the figures are with the encoders' settings).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Final, Protocol

from aiohttp import web

from realtime_lab.config import Settings

try:  # optional: br needs Google's brotli bindings
    import brotli as _brotli  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the installation
    _brotli = None

try:  # optional: zstd is standard from Python 3.14 (compression.zstd), a backport before
    from compression import zstd as _zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - depends on the Python version
    try:
        from backports import zstd as _zstd  # type: ignore[no-redef,unused-ignore]
    except ImportError:
        _zstd = None

__all__ = [
    "AVAILABLE",
    "PREFERENCE",
    "StreamEncoder",
    "choose_encoding",
    "encode_body",
    "make_encoder",
    "mark_compressed",
    "stream_encoder",
    "stream_headers",
]

#: Smallest poll answer worth compressing: below it the coding's own header and trailer
#: (18 bytes for gzip) and the ``Content-Encoding`` line cost more than they save.
MIN_BODY: Final = 256

#: The stream encoders' settings. A token event refers back to the last few events only, and
#: each connection holds its encoder for as long as it is open: small windows and tables keep
#: that memory low for nearly the same bytes on the wire. Measured on 60 ticker events, one
#: flush per event (``examples/compression_figures.py``; bytes per token with chunk framing,
#: RSS per connection after a long stream):
#:
#: - gzip, window 2**12, memLevel 5: 40.4 B, ~9 us, 36 KiB (zlib's 2**15/8: 40.1 B, 201 KiB);
#: - zstd, level 1, window 2**10: ~41 B, ~2.5 us, 96 KiB (level 3: 800 KiB and more);
#: - br, quality 3, window 2**10: ~45 B, ~13 us, 313 KiB (quality 5 and up: 600 KiB).
GZIP_WINDOW_BITS: Final = 12
GZIP_MEM_LEVEL: Final = 5
BROTLI_QUALITY: Final = 3
BROTLI_WINDOW_BITS: Final = 10  # brotli's smallest
ZSTD_LEVEL: Final = 1
ZSTD_WINDOW_LOG: Final = 10  # zstd's smallest


class StreamEncoder(Protocol):
    """A compressed response body, written a piece at a time."""

    @property
    def name(self) -> str:
        """The ``Content-Encoding`` value."""
        ...

    def encode(self, data: bytes) -> bytes:
        """``data`` compressed and flushed: the client can decode everything written so far."""
        ...

    def finish(self) -> bytes:
        """The end of the compressed stream (trailer); write it last, before the body's end."""
        ...


class _Gzip:
    __slots__ = ("_zlib",)
    name = "gzip"

    def __init__(
        self, window_bits: int = GZIP_WINDOW_BITS, mem_level: int = GZIP_MEM_LEVEL
    ) -> None:
        self._zlib = zlib.compressobj(6, zlib.DEFLATED, 16 + window_bits, mem_level)

    def encode(self, data: bytes) -> bytes:
        return self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._zlib.flush(zlib.Z_FINISH)


class _Brotli:
    __slots__ = ("_brotli",)
    name = "br"

    def __init__(self) -> None:
        assert _brotli is not None
        self._brotli = _brotli.Compressor(
            mode=_brotli.MODE_TEXT, quality=BROTLI_QUALITY, lgwin=BROTLI_WINDOW_BITS
        )

    def encode(self, data: bytes) -> bytes:
        out: bytes = self._brotli.process(data) + self._brotli.flush()
        return out

    def finish(self) -> bytes:
        out: bytes = self._brotli.finish()
        return out


class _Zstd:
    __slots__ = ("_zstd",)
    name = "zstd"

    def __init__(self) -> None:
        assert _zstd is not None
        params = _zstd.CompressionParameter
        self._zstd = _zstd.ZstdCompressor(
            options={params.compression_level: ZSTD_LEVEL, params.window_log: ZSTD_WINDOW_LOG}
        )

    def encode(self, data: bytes) -> bytes:
        out: bytes = self._zstd.compress(data, mode=_zstd.ZstdCompressor.FLUSH_BLOCK)
        return out

    def finish(self) -> bytes:
        out: bytes = self._zstd.flush(_zstd.ZstdCompressor.FLUSH_FRAME)
        return out


_MAKERS: dict[str, Callable[[], StreamEncoder]] = {"gzip": _Gzip}
if _zstd is not None:
    _MAKERS["zstd"] = _Zstd
if _brotli is not None:
    _MAKERS["br"] = _Brotli

#: The server's order among codings a client accepts equally (a browser accepts all three):
#: fewest bytes per token first, then least memory per connection (see the figures above);
#: zstd spends a third of gzip's CPU, for 2.6 times its memory.
PREFERENCE: Final = ("gzip", "zstd", "br")
#: The codings this installation can write, in :data:`PREFERENCE` order.
AVAILABLE: Final = tuple(name for name in PREFERENCE if name in _MAKERS)


def make_encoder(name: str) -> StreamEncoder:
    """A fresh encoder for one of :data:`AVAILABLE`.

    Raises:
        KeyError: ``name`` is not available here.
    """
    return _MAKERS[name]()


def choose_encoding(header: str | None, available: tuple[str, ...] = AVAILABLE) -> str | None:
    """The coding to answer an ``Accept-Encoding`` with, or ``None`` for identity.

    The client's q-values decide (``q=0`` refuses a coding, ``*`` stands for the ones it does
    not name), then the server's order. A malformed element is skipped, not refused.
    """
    if not header:
        return None
    weights: dict[str, float] = {}
    for element in header.split(","):
        name, _, params = element.partition(";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = -1.0
                if not 0.0 <= q <= 1.0:
                    q = -1.0  # invalid: ignore the element
        if q >= 0.0:
            weights[name] = q
    wildcard = weights.get("*", 0.0)
    best: str | None = None
    best_q = 0.0
    for name in available:
        q = weights.get(name, wildcard)
        if q > best_q:
            best, best_q = name, q
    return best


def _accept(request: web.Request) -> str | None:
    values = request.headers.getall("Accept-Encoding", ())
    return ", ".join(values) if values else None


def stream_encoder(request: web.Request, settings: Settings) -> StreamEncoder | None:
    """The encoder of one SSE/fetch response body, or ``None`` to send it plain.

    Only in ``connection`` mode, and only a coding the request accepts. Send
    :func:`stream_headers` with the response, pass every write of the body through the
    encoder, and write ``finish()`` before the body's end.
    """
    if settings.compression != "connection":
        return None
    name = choose_encoding(_accept(request))
    return None if name is None else make_encoder(name)


def stream_headers(encoder: StreamEncoder | None) -> dict[str, str]:
    """The headers a response whose body ``encoder`` writes adds (none when it is plain)."""
    if encoder is None:
        return {}
    return {"Content-Encoding": encoder.name, "Vary": "Accept-Encoding"}


def encode_body(request: web.Request, settings: Settings, body: bytes) -> tuple[bytes, str | None]:
    """A whole response body compressed as the request accepts (polls): ``(body, coding)``.

    ``coding`` is ``None`` when the body goes plain: compression off, nothing accepted, a body
    under :data:`MIN_BODY`, or one the coding does not make smaller. Set ``Content-Encoding``
    to it otherwise; set ``Vary: Accept-Encoding`` either way when compression is on.
    """
    if settings.compression == "off" or len(body) < MIN_BODY:
        return body, None
    name = choose_encoding(_accept(request))
    if name is None:
        return body, None
    encoder = make_encoder(name)
    data = encoder.encode(body) + encoder.finish()
    if len(data) >= len(body):
        return body, None
    return data, name


def mark_compressed(response: web.StreamResponse, settings: Settings, coding: str | None) -> None:
    """Add the headers of :func:`encode_body`'s outcome to ``response`` (before it is sent)."""
    if settings.compression == "off":
        return
    response.headers["Vary"] = "Accept-Encoding"
    if coding is not None:
        response.headers["Content-Encoding"] = coding
