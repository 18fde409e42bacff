"""The baseline of ``realtime-lab bench --baseline naive``: a chat stream the tutorial way.

One ``GET /chat?tokens=N&rate=R&ttft_ms=T&seed=S`` per chat; the handler generates its own
tokens (the lab's simulated answer for ``seed``, so both servers stream the same chats) with
``asyncio.sleep`` and ``resp.write`` and ends with an ``end`` event. No bus, no history, no
resume, no accounting, no limits: what every aiohttp SSE tutorial shows, and what the lab's
server is measured against. Each event's data is the envelope the bench reads (``id`` as
``<epoch>-<seq>``, ``ts`` in ms), so the same load client counts it the same way.

Run as its own process by the bench (``python -m realtime_lab.bench.naive --port P``), so its
CPU time and RSS are read as the lab server's are. It keeps ``web.run_app``'s defaults, as a
tutorial would: the access logger is on, but with logging unconfigured it is below its level
and formats nothing; the startup banner goes to the bench's server log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time

from aiohttp import web

from realtime_lab.feed.llm import answer_tokens

PROMPT = "bench chat"


async def chat(request: web.Request) -> web.StreamResponse:
    """Stream one chat as SSE, paced at ``rate`` tokens/s after ``ttft_ms``."""
    tokens = int(request.query.get("tokens", "200"))
    rate = float(request.query.get("rate", "50"))
    ttft = float(request.query.get("ttft_ms", "0")) / 1000
    seed = int(request.query.get("seed", "0"))
    epoch = secrets.token_hex(6)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    seq = 0
    for seq, text in enumerate(answer_tokens(PROMPT, seed, max_tokens=tokens), 1):
        await asyncio.sleep(ttft if seq == 1 else 1 / rate)
        ts = time.time() * 1000
        event = {"id": f"{epoch}-{seq}", "type": "token", "data": {"text": text}, "ts": ts}
        await resp.write(f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode())
    end = {"id": f"{epoch}-{seq + 1}", "type": "end", "ts": time.time() * 1000}
    await resp.write(f"event: end\ndata: {json.dumps(end, separators=(',', ':'))}\n\n".encode())
    return resp


async def health(request: web.Request) -> web.Response:
    """What the bench waits for before it starts the load."""
    return web.json_response({"ok": True})


def make_app() -> web.Application:
    """The two routes."""
    app = web.Application()
    app.router.add_get("/chat", chat)
    app.router.add_get("/api/health", health)
    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m realtime_lab.bench.naive --host H --port P``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)
    web.run_app(make_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
