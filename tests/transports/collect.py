"""Collect a channel's events over each transport with raw requests.

These helpers deliberately do not use :mod:`realtime_lab.clients`: they are the independent
reference the server is checked against, so they speak each wire format directly (HTTP + JSON,
``text/event-stream`` through :class:`~realtime_lab.protocol.sse.SSEDecoder`, WebSocket frames
through ``aiohttp``'s client) and add no retry or resume logic of their own.

The fetch stream (``POST /api/chats/stream``) creates the chat it streams, so it has a collector
of its own (:func:`fetch`), which takes the chat's request instead of a channel.

Every collector takes a ``stop`` predicate over the envelopes received so far (default: the last
one is ``end``) and an overall ``timeout``, so a server that never delivers fails the test instead
of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from realtime_lab.protocol.sse import ServerSentEvent, SSEDecoder

TRANSPORTS = ("poll", "longpoll", "sse", "ws", "fetch")
#: The transports that read a channel by name (fetch streams the chat it creates).
CHANNEL_TRANSPORTS = ("poll", "longpoll", "sse", "ws")

T = TypeVar("T")
Envelope = dict[str, Any]
Stop = Callable[[list[Envelope]], bool]


def until_end(events: list[Envelope]) -> bool:
    """Stop once an ``end`` event arrived."""
    return bool(events) and events[-1]["type"] == "end"


def until_count(count: int) -> Stop:
    """Stop once ``count`` events arrived."""
    return lambda events: len(events) >= count


def _query(after: str | None, **extra: Any) -> dict[str, str]:
    params = {k: str(v) for k, v in extra.items() if v is not None}
    if after is not None:
        params["after"] = after
    return params


def text_of(events: list[Envelope]) -> str:
    """The concatenated text of the ``token`` events."""
    return "".join(e["data"]["text"] for e in events if e["type"] == "token")


def comparable(events: list[Envelope]) -> list[tuple[str, str, Any, str]]:
    """What must be identical across transports: (id, type, data, channel); ``ts`` is too."""
    return [(e["id"], e["type"], e["data"], e["channel"]) for e in events]


# Short and long polling -----------------------------------------------------------------------


async def poll(
    session: aiohttp.ClientSession,
    base: str,
    channel: str,
    *,
    after: str | None = None,
    stop: Stop = until_end,
    limit: int | None = None,
    interval: float = 0.01,
    timeout: float = 20.0,
) -> list[Envelope]:
    """Short-poll ``/poll/{channel}`` from ``after`` until ``stop`` says so."""
    events: list[Envelope] = []
    cursor = after
    async with asyncio.timeout(timeout):
        while True:
            async with session.get(
                f"{base}/poll/{channel}", params=_query(cursor, limit=limit)
            ) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            events.extend(body["events"])
            cursor = body["cursor"]
            if stop(events):
                return events
            if not body["more"]:
                # A short-poll client's polling interval, not a synchronisation.
                await asyncio.sleep(interval)


async def longpoll(
    session: aiohttp.ClientSession,
    base: str,
    channel: str,
    *,
    after: str | None = None,
    stop: Stop = until_end,
    limit: int | None = None,
    wait: float = 5.0,
    timeout: float = 20.0,
) -> list[Envelope]:
    """Long-poll ``/longpoll/{channel}`` from ``after`` until ``stop`` says so."""
    events: list[Envelope] = []
    cursor = after
    async with asyncio.timeout(timeout):
        while True:
            params = _query(cursor, limit=limit, timeout=wait)
            async with session.get(f"{base}/longpoll/{channel}", params=params) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            events.extend(body["events"])
            cursor = body["cursor"]
            if stop(events):
                return events


# Server-Sent Events ------------------------------------------------------------------------------


@dataclass
class SSEResult:
    """What one SSE response carried."""

    status: int
    headers: dict[str, str]
    messages: list[ServerSentEvent] = field(default_factory=list)
    events: list[Envelope] = field(default_factory=list)
    closed_by_server: bool = False
    decoder: SSEDecoder = field(default_factory=SSEDecoder)
    first_field: bytes = b""


async def sse(
    session: aiohttp.ClientSession,
    base: str,
    channel: str,
    *,
    after: str | None = None,
    last_event_id: str | None = None,
    stop: Stop = until_end,
    read_to_eof: bool = True,
    timeout: float = 20.0,
    on_open: Callable[[], Any] | None = None,
) -> SSEResult:
    """Read ``/sse/{channel}`` until ``stop`` is satisfied.

    With ``read_to_eof`` (the default) reading goes on until the server closes the stream, which
    the server must do after ``end``; ``closed_by_server`` tells whether it did.
    """
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    async with (
        asyncio.timeout(timeout),
        session.get(f"{base}/sse/{channel}", params=_query(after), headers=headers) as resp,
    ):
        result = SSEResult(resp.status, dict(resp.headers))
        if resp.status != 200:
            return result
        if on_open is not None:
            await on_open()
        satisfied = False
        async for chunk in resp.content.iter_any():
            if not result.first_field:
                result.first_field = chunk.split(b"\n", 1)[0]
            for message in result.decoder.feed(chunk):
                result.messages.append(message)
                result.events.append(json.loads(message.data))
            if stop(result.events):
                satisfied = True
                if not read_to_eof:
                    return result
        result.decoder.close()
        result.closed_by_server = True
        assert satisfied or not read_to_eof or stop(result.events), "stream ended early"
        return result


# Fetch streaming ----------------------------------------------------------------------------------


@dataclass
class FetchResult(SSEResult):
    """What one ``POST /api/chats/stream`` answer carried; ``chat`` is its ``chat`` event's chat
    (which is not in ``events``: it has no id and is no envelope)."""

    chat: Envelope | None = None
    error: Envelope | None = None  # the JSON error of a refused request


async def fetch(
    session: aiohttp.ClientSession,
    base: str,
    body: Envelope,
    *,
    last_event_id: str | None = None,
    headers: dict[str, str] | None = None,
    stop: Stop = until_end,
    read_to_eof: bool = True,
    timeout: float = 20.0,
    on_chat: Callable[[Envelope], Any] | None = None,
) -> FetchResult:
    """``POST /api/chats/stream`` with ``body`` and read the answer until ``stop``.

    ``on_chat`` is awaited with the chat as soon as the ``chat`` event arrived. With
    ``read_to_eof`` reading goes on until the server closes the stream (``closed_by_server``).
    """
    sent = dict(headers or {})
    if last_event_id is not None:
        sent["Last-Event-ID"] = last_event_id
    async with (
        asyncio.timeout(timeout),
        session.post(f"{base}/api/chats/stream", json=body, headers=sent) as resp,
    ):
        result = FetchResult(resp.status, dict(resp.headers))
        if resp.status == 204:
            result.closed_by_server = True  # the stream is over: nothing more will come
            return result
        if resp.status != 200:
            result.error = (await resp.json())["error"]
            return result
        satisfied = False
        async for chunk in resp.content.iter_any():
            if not result.first_field:
                result.first_field = chunk.split(b"\n", 1)[0]
            for message in result.decoder.feed(chunk):
                result.messages.append(message)
                if message.event == "chat":
                    assert result.chat is None, "a second chat event"
                    assert not result.events, "the chat event comes first"
                    result.chat = json.loads(message.data)["chat"]
                    if on_chat is not None:
                        await on_chat(result.chat)
                else:
                    result.events.append(json.loads(message.data))
            if stop(result.events):
                satisfied = True
                if not read_to_eof:
                    resp.close()  # the client goes away: a cut, as far as the server can tell
                    return result
        result.decoder.close()
        result.closed_by_server = True
        assert satisfied or not read_to_eof or stop(result.events), "stream ended early"
        return result


# WebSocket --------------------------------------------------------------------------------------


@dataclass
class WSResult:
    """What one WebSocket carried: bus events, control messages (``id: null``), the close."""

    events: list[Envelope] = field(default_factory=list)
    controls: list[Envelope] = field(default_factory=list)
    close_code: int | None = None


async def ws(
    session: aiohttp.ClientSession,
    base: str,
    channel: str,
    *,
    after: str | None = None,
    send: list[Any] | None = None,
    stop: Stop = until_end,
    read_to_close: bool = True,
    timeout: float = 20.0,
) -> WSResult:
    """Read ``/ws/{channel}`` (sending ``send`` messages first) until ``stop`` is satisfied.

    With ``read_to_close`` reading goes on until the server closes; ``close_code`` is its code.
    """
    url = base.replace("http", "ws", 1) + f"/ws/{channel}"
    result = WSResult()
    async with asyncio.timeout(timeout), session.ws_connect(url, params=_query(after)) as sock:
        for message in send or ():
            await sock.send_json(message)
        async for msg in sock:
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            value = json.loads(msg.data)
            (result.controls if value["id"] is None else result.events).append(value)
            if stop(result.events) and not read_to_close:
                return result
        result.close_code = sock.close_code
    return result


async def collect(
    transport: str,
    session: aiohttp.ClientSession,
    base: str,
    channel: str,
    *,
    after: str | None = None,
    stop: Stop = until_end,
    timeout: float = 20.0,
) -> list[Envelope]:
    """The events of ``channel`` after ``after`` over ``transport``, until ``stop``.

    Not for ``fetch``, which reads no channel: see :func:`fetch`.
    """
    if transport == "poll":
        return await poll(session, base, channel, after=after, stop=stop, timeout=timeout)
    if transport == "longpoll":
        return await longpoll(session, base, channel, after=after, stop=stop, timeout=timeout)
    if transport == "sse":
        done = await sse(
            session, base, channel, after=after, stop=stop, read_to_eof=False, timeout=timeout
        )
        assert done.status == 200, done.status
        return done.events
    if transport == "ws":
        return (
            await ws(session, base, channel, after=after, stop=stop, read_to_close=False)
        ).events
    raise ValueError(transport)


# Raw sockets -------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    """One HTTP/1.1 response as read off the socket."""

    raw: bytes  # everything the server sent, status line to the last byte
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes  # de-chunked


def parse_response(raw: bytes) -> RawResponse:
    """Split a complete HTTP/1.1 response (read to EOF) into status, headers and body."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += rest[:size]
            assert rest[size : size + 2] == b"\r\n", "bad chunk framing"
            rest = rest[size + 2 :]
        return RawResponse(raw, status, headers, bytes(body))
    return RawResponse(raw, status, headers, rest)


async def raw_get(
    port: int, path: str, *, headers: dict[str, str] | None = None, timeout: float = 20.0
) -> RawResponse:
    """``GET path`` over a fresh socket with ``Connection: close``; read every byte until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}Connection: close\r\n"
        writer.write(head.encode() + b"\r\n")
        async with asyncio.timeout(timeout):
            raw = await reader.read(-1)
    finally:
        writer.close()
        await writer.wait_closed()
    return parse_response(raw)


async def stalled_get(
    port: int, path: str, *, rcvbuf: int = 4096, headers: dict[str, str] | None = None
) -> socket.socket:
    """Send ``GET path`` on a non-blocking socket with a tiny receive buffer; return it unread.

    Nothing reads the socket until the caller does (no asyncio reader pulls data off it behind
    the scenes), so the server sees a client that stopped reading. The caller closes it.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Before connect, so the window the kernel advertises is small from the start.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        fields = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
        head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        await loop.sock_sendall(sock, head.encode() + b"\r\n")
    except BaseException:
        sock.close()
        raise
    return sock


async def read_to_eof(sock: socket.socket, *, timeout: float = 20.0) -> bytes:
    """Everything left to read on ``sock`` until the peer closes it."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(timeout):
        while chunk := await loop.sock_recv(sock, 1 << 16):
            data += chunk
    return bytes(data)


WS_UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def ws_frames(data: bytes) -> list[tuple[int, bytes]]:
    """``(opcode, payload)`` of the unmasked frames in ``data`` (a server's side of a socket)."""
    frames = []
    pos = 0
    while pos + 2 <= len(data):
        opcode, size = data[pos] & 0x0F, data[pos + 1] & 0x7F
        assert not data[pos + 1] & 0x80, "server frames are never masked"
        pos += 2
        if size == 126:
            size, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif size == 127:
            size, pos = int.from_bytes(data[pos : pos + 8], "big"), pos + 8
        frames.append((opcode, data[pos : pos + size]))
        pos += size
    assert pos == len(data), "truncated frame"
    return frames


# The JSON API -------------------------------------------------------------------------------------


async def start_chat(
    session: aiohttp.ClientSession, base: str, prompt: str = "Tell me about streaming", **body: Any
) -> Envelope:
    """``POST /api/chats``; the 201 answer."""
    async with session.post(f"{base}/api/chats", json={"prompt": prompt, **body}) as resp:
        assert resp.status == 201, await resp.text()
        value: Envelope = await resp.json()
        return value


async def publish(
    session: aiohttp.ClientSession, base: str, channel: str, kind: str, data: Envelope
) -> Envelope:
    """``POST /api/channels/{channel}/events``; the stored event."""
    async with session.post(
        f"{base}/api/channels/{channel}/events", json={"type": kind, "data": data}
    ) as resp:
        assert resp.status == 201, await resp.text()
        value: Envelope = await resp.json()
        return value


async def stats(session: aiohttp.ClientSession, base: str, client: str | None = None) -> Envelope:
    """``GET /api/stats[?client=]``."""
    params = {} if client is None else {"client": client}
    async with session.get(f"{base}/api/stats", params=params) as resp:
        assert resp.status == 200, await resp.text()
        value: Envelope = await resp.json()
        return value


async def wait_for(
    predicate: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.01
) -> Any:
    """Await ``predicate()`` (sync or async) until it returns something truthy; return it."""
    async with asyncio.timeout(timeout):
        while True:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running(coro: Coroutine[Any, Any, T]) -> AsyncIterator[asyncio.Task[T]]:
    """Run ``coro`` as a task for the block; cancel and reap it on the way out."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        # Reaped so a failing test does not also log "Task exception was never retrieved".
        await asyncio.gather(task, return_exceptions=True)
