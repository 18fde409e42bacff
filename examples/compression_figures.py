"""The figures behind ``--compression``: bytes and CPU per token, memory per connection.

Run: ``.venv/bin/python examples/compression_figures.py`` (a few seconds). It takes 60 real
``ticker`` events from an in-process server, frames them as each mode writes them, with the
server's own functions, and prints a table; then the memory one compression context holds,
measured as the RSS of 1000 of them in a fresh process.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import zlib
from collections.abc import Callable

from aiohttp import web

from realtime_lab.app import make_app
from realtime_lab.config import Settings
from realtime_lab.protocol.deflate import ConnectionDeflater, deflate_message
from realtime_lab.protocol.envelope import Event
from realtime_lab.protocol.websocket import deflated_text_frame
from realtime_lab.transports.compression import (
    AVAILABLE,
    BROTLI_QUALITY,
    BROTLI_WINDOW_BITS,
    ZSTD_LEVEL,
    ZSTD_WINDOW_LOG,
    make_encoder,
)
from realtime_lab.transports.keys import BUS_KEY
from realtime_lab.transports.sse import chunked, sse_chunk, sse_frame
from realtime_lab.transports.ws import ws_frame

EVENTS = 60
BR = (BROTLI_QUALITY, BROTLI_WINDOW_BITS)
ZSTD = (ZSTD_LEVEL, ZSTD_WINDOW_LOG)


async def ticker_events() -> list[Event]:
    settings = Settings(host="127.0.0.1", port=0, ticker_rate=500.0)
    app = make_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        bus = app[BUS_KEY]
        async with asyncio.timeout(10):
            while True:
                replay = await bus.replay("ticker", None, EVENTS)
                if len(replay.events) >= EVENTS:
                    return list(replay.events)[:EVENTS]
                await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()


def fresh(events: list[Event]) -> list[Event]:
    """The same events without their cached frames (each measurement frames them anew)."""
    return [Event(e.channel, e.id, e.type, e.data, e.ts, e.seq, {"json": e.json}) for e in events]


def per_token(
    frames: Callable[[list[Event]], list[bytes]], events: list[Event]
) -> tuple[float, float]:
    """(bytes per token, microseconds of CPU per token) of one framing."""
    size = sum(map(len, frames(fresh(events)))) / len(events)
    rounds = 200
    batches = [fresh(events) for _ in range(rounds)]
    started = time.process_time()
    for batch in batches:
        frames(batch)
    cpu = (time.process_time() - started) / (rounds * len(events)) * 1e6
    return size, cpu


def ws_plain(events: list[Event]) -> list[bytes]:
    return [ws_frame(e) for e in events]


def ws_message(events: list[Event]) -> list[bytes]:
    out = []
    for e in events:
        payload = deflate_message(e.json)
        out.append(ws_frame(e) if payload is None else deflated_text_frame(payload))
    return out


def ws_connection(bits: int, mem: int) -> Callable[[list[Event]], list[bytes]]:
    def frames(events: list[Event]) -> list[bytes]:
        deflater = ConnectionDeflater(bits, mem)
        return [deflated_text_frame(deflater.message(e.json)) for e in events]

    return frames


def sse_plain(events: list[Event]) -> list[bytes]:
    return [sse_chunk(e) for e in events]


def sse_coded(name: str) -> Callable[[list[Event]], list[bytes]]:
    def frames(events: list[Event]) -> list[bytes]:
        encoder = make_encoder(name)
        return [chunked(encoder.encode(sse_frame(e))) for e in events]

    return frames


def sse_gzip(bits: int, mem: int) -> Callable[[list[Event]], list[bytes]]:
    def frames(events: list[Event]) -> list[bytes]:
        z = zlib.compressobj(6, zlib.DEFLATED, 16 + bits, mem)
        return [chunked(z.compress(sse_frame(e)) + z.flush(zlib.Z_SYNC_FLUSH)) for e in events]

    return frames


_MEMORY_PROBE = """
import sys, zlib
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
kind, a, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# 600 envelopes, 70 KB: more than any window here, so every page of the context is touched
# (one message alone touches a fraction, and RSS would show less than a long stream holds).
data = [b'{"channel":"ticker","id":"x-%d","type":"token","data":{"text":" w%d"},"ts":%d.5}'
        % (i, i * 7919 % 1000, 1764622000000 + i) for i in range(600)]
def make():
    if kind == "zlib":
        c = zlib.compressobj(6, zlib.DEFLATED, -a, b)
        for d in data:
            c.compress(d); c.flush(zlib.Z_SYNC_FLUSH)
    elif kind == "br":
        import brotli
        c = brotli.Compressor(mode=brotli.MODE_TEXT, quality=a, lgwin=b)
        for d in data:
            c.process(d); c.flush()
    else:
        from backports import zstd
        P = zstd.CompressionParameter
        c = zstd.ZstdCompressor(options={P.compression_level: a, P.window_log: b})
        for d in data:
            c.compress(d, mode=zstd.ZstdCompressor.FLUSH_BLOCK)
    return c
make()
before = rss()
keep = [make() for _ in range(1000)]
print((rss() - before) / 1000)
"""


def memory(kind: str, a: int, b: int) -> float:
    """Bytes of RSS one context adds, averaged over 1000 in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, kind, str(a), str(b)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout)


def main() -> None:
    events = asyncio.run(ticker_events())
    rows: list[tuple[str, Callable[[list[Event]], list[bytes]], str, tuple[int, int]]] = [
        ("ws as served (off)", ws_plain, "", (0, 0)),
        ("ws message (no context takeover)", ws_message, "", (0, 0)),
        ("ws connection, window 2^15 memLevel 8", ws_connection(15, 8), "zlib", (15, 8)),
        ("ws connection, window 2^12 memLevel 5 (default)", ws_connection(12, 5), "zlib", (12, 5)),
        ("ws connection, window 2^10 memLevel 4", ws_connection(10, 4), "zlib", (10, 4)),
        ("ws connection, window 2^9 memLevel 1", ws_connection(9, 1), "zlib", (9, 1)),
        ("sse as served (off, message)", sse_plain, "", (0, 0)),
        ("sse gzip, window 2^15 memLevel 8", sse_gzip(15, 8), "zlib", (15, 8)),
        ("sse gzip, window 2^12 memLevel 5 (default)", sse_gzip(12, 5), "zlib", (12, 5)),
    ]
    if "br" in AVAILABLE:
        rows.append(("sse br (server's settings)", sse_coded("br"), "br", BR))
    if "zstd" in AVAILABLE:
        rows.append(("sse zstd (server's settings)", sse_coded("zstd"), "zstd", ZSTD))
    print(
        f"{EVENTS} ticker events, mean envelope {sum(len(e.json) for e in events) / EVENTS:.1f} B"
    )
    print(f"{'framing':50} {'B/token':>8} {'us CPU/token':>13} {'KiB/connection':>15}")
    for name, frames, kind, params in rows:
        size, cpu = per_token(frames, events)
        mem = f"{memory(kind, *params) / 1024:.1f}" if kind else "-"
        print(f"{name:50} {size:8.1f} {cpu:13.2f} {mem:>15}")


if __name__ == "__main__":
    main()
