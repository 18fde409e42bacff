"""The load generator: light clients of each transport, run in worker processes.

Each worker is a process with one asyncio loop that opens its share of a point's clients, counts
what they receive and answers the coordinator (:mod:`.runner`) over a pipe. Several workers keep
thousands of clients from queueing behind one Python loop.

Why hand-written clients instead of aiohttp or the project's own clients: they are
:class:`asyncio.Protocol` s that parse in ``data_received`` (no task, no ``await`` and no
``StreamReader`` copy per read) with the fast parsers of :mod:`.wire`, and they count the bytes
each transport costs exactly as received. The same cost model for all five transports keeps the
load client's overhead from tilting the comparison; the worker's own CPU use is reported beside
the server's so a client-bound point shows up as one. The control plane (creating chats) uses
aiohttp, where a library's convenience costs nothing.

Even so, these clients spend 10-14 us of CPU per event, which at 1,000 SSE subscribers is more
than a core of a 2-core machine taken from the server under test. So when the runner hands the
worker a native binary (``loadclient.c``, see :mod:`.native`), the ticker's SSE and WebSocket
clients are opened and counted by it instead (:class:`NativeClients`), and so are the chats
workload's users (sse, ws, fetch, openai and the naive baseline, one reader per chat: the
binary runs their rounds itself); polls, chats of several readers and the late-joiner probes
stay here.

The chats workload is users chatting continuously: each starts a chat, reads it to its end and
starts the next. Fetch streaming (``POST /api/chats/stream``) and the OpenAI endpoint read no
channel: the request starts the chat it streams, so each has one reader, its own; the other
transports' chats are started by ``POST /api/chats`` and read by ``chat_readers`` subscribers
each; that POST is counted in ``requests`` and the bytes too, so that every way of streaming a
chat pays for starting it.

Commands (dicts, one reply each): ``open`` (connect a point's clients, or start its chat
rounds), ``window`` (count deliveries between two wall-clock times and reply the tally),
``close``, ``stall`` / ``unstall`` (the slow-subscriber scenario), ``quit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import socket
import struct
import time
import zlib
from array import array
from multiprocessing.connection import Connection
from typing import Any, Final
from urllib.parse import quote

import aiohttp

from realtime_lab.bench import wire
from realtime_lab.bench.native import (
    NATIVE_CHAT_MODES,
    NATIVE_CHATS,
    NATIVE_TRANSPORTS,
    source_env,
)
from realtime_lab.bench.server import raise_fd_limit
from realtime_lab.errors import WebSocketProtocolError
from realtime_lab.protocol.deflate import Inflater
from realtime_lab.protocol.sequence import DUPLICATE, FOREIGN, NEW, REORDERED, Sequence

#: Every transport the load clients speak (``openai``: ``POST /v1/chat/completions`` with
#: ``"stream": true``; ``naive``: the baseline server of :mod:`.naive`).
TRANSPORTS: Final = ("sse", "ws", "longpoll", "poll", "fetch", "openai", "naive")
#: Those that read a channel by name, the ticker's included (fetch and openai stream only the
#: chat their request starts: the chats workload).
CHANNEL_TRANSPORTS: Final = ("sse", "ws", "longpoll", "poll")
#: The chats workload's transports on the lab's server.
CHAT_TRANSPORTS: Final = ("sse", "ws", "longpoll", "poll", "fetch", "openai")
#: Only the native load client speaks these.
NATIVE_ONLY: Final = frozenset({"openai", "naive"})
FETCH_PATH: Final = "/api/chats/stream"
OPENAI_PATH: Final = "/v1/chat/completions"
NAIVE_PATH: Final = "/chat"
#: Every chat asks this prompt; round ``r`` of user ``u`` asks seed ``u * SEED_STRIDE + r`` (as
#: loadclient.c does), so users' answers differ in length and their rounds fall out of step.
CHAT_PROMPT: Final = "bench chat"
SEED_STRIDE: Final = 100_000
#: The fetch stream's opening event, which names the chat: not a delivery.
CHAT_EVENT: Final = "chat"
#: What the clients ask for when a point compresses (``--compression``): what Chromium offers.
GZIP: Final = {"Accept-Encoding": "gzip"}
DEFLATE_OFFER: Final = "permessage-deflate; client_max_window_bits"
CONNECT_CONCURRENCY: Final = 32  # per worker: well under the server's listen backlog (128)
LONGPOLL_TIMEOUT: Final = 25.0
POLL_LIMIT: Final = 1000
OVERFLOW_CLOSE: Final = 1013
PROBE_WAIT: Final = 20.0  # longest a probe waits for its first token, from its connect


def _now_ms() -> float:
    return time.time() * 1000.0


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Tally:
    """What one worker's clients received during one point.

    ``events``, ``bytes`` (received), ``bytes_up`` (sent), ``requests``, ``latency`` and ``chats``
    count only inside the latest
    measurement window (``in_window``); losses, duplicates and failures count over the clients'
    whole lives. Continuity is the protocol's rule (:mod:`realtime_lab.protocol.sequence`):
    ``lost`` is its ``gaps`` (one per id skipped), ``dup`` its ``duplicates``, ``reordered`` the
    late arrivals that filled a gap (also dropped), ``resets`` the reset events.
    """

    def __init__(self) -> None:
        self.in_window = False
        self.events = 0
        self.bytes = 0
        self.bytes_up = 0
        self.requests = 0
        self.latency = array("d")
        self.ttft = array("d")
        self.gaps = array("d")  # between a stream's consecutive tokens, ms
        self.lost = 0
        self.dup = 0
        self.reordered = 0
        self.resets = 0
        self.overflows = 0
        self.disconnects = 0
        self.failures = 0
        self.incomplete = 0
        self.chats = 0
        self.errors: list[str] = []

    def error(self, message: str) -> None:
        """Keep the first few failure messages for the report."""
        if len(self.errors) < 5:
            self.errors.append(message)

    def result(self, cpu: float) -> dict[str, Any]:
        """The reply to the coordinator (the arrays travel as raw bytes)."""
        return {
            "events": self.events,
            "bytes": self.bytes,
            "bytes_up": self.bytes_up,
            "requests": self.requests,
            "latency": self.latency.tobytes(),
            "ttft": self.ttft.tobytes(),
            "gaps": self.gaps.tobytes(),
            "lost": self.lost,
            "dup": self.dup,
            "reordered": self.reordered,
            "resets": self.resets,
            "overflows": self.overflows,
            "disconnects": self.disconnects,
            "failures": self.failures,
            "incomplete": self.incomplete,
            "chats": self.chats,
            "errors": list(self.errors),
            "cpu": cpu,
        }


class Client(asyncio.Protocol):
    """One subscriber: one TCP connection speaking one transport, counting into a :class:`Tally`.

    Subclasses send their request in :meth:`start` and parse the body in :meth:`body`; this class
    reads the response head, checks sequence continuity and records latencies.
    """

    expected_status = 200

    def __init__(
        self,
        tally: Tally,
        host: str,
        channel: str,
        after: str,
        tag: str,
        started_ms: float,
        *,
        from_start: bool = False,
    ) -> None:
        self.tally = tally
        self.host = host
        self.channel = channel
        self.after = after
        self.tag = tag
        self.started_ms = started_ms
        # Continuity by seq alone: one client reads one channel life (a reset announces any
        # other), and wire.Item carries no epoch.
        self.run = Sequence()
        if from_start:
            # A chat is read from its first event: anything before the first seen seq is a loss.
            self.run.start_at(0)
        self.first_token = False
        self.last_token_ms = 0.0
        self.transport: asyncio.Transport | None = None
        self.head: wire.Head | None = None
        self._buf = b""
        self.closing = False
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.got_first: asyncio.Future[None] = loop.create_future()  # first token, or the end
        self.saw_end = False
        # Ask for compression as a browser does (--compression sweeps): Accept-Encoding gzip,
        # a permessage-deflate offer; what comes back compressed is inflated before parsing.
        self.compress = False

    # asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.start()

    def data_received(self, data: bytes) -> None:
        tally = self.tally
        if tally.in_window:
            tally.bytes += len(data)
        self.consume(data)

    def consume(self, data: bytes) -> None:
        """Parse received bytes (already counted)."""
        if self.head is None:
            data = self._read_head(data)
            if not data:
                return
        try:
            self.body(data, _now_ms())
        except (wire.BenchProtocolError, WebSocketProtocolError) as exc:
            self.fail(str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            if self.ready.done():
                self.tally.disconnects += 1
            else:
                self.tally.failures += 1
            self.tally.error(f"{type(self).__name__}: connection lost: {exc!r}")
        self._settle()

    # Helpers for subclasses ---------------------------------------------------------------------
    def start(self) -> None:
        """Send the request (called once connected)."""
        raise NotImplementedError

    def body(self, data: bytes, now: float) -> None:
        """Parse body bytes received at ``now`` (ms)."""
        raise NotImplementedError

    def send(self, data: bytes, request: bool = True) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            if self.tally.in_window:
                self.tally.bytes_up += len(data)
                if request:
                    self.tally.requests += 1

    def _read_head(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        try:
            parsed = wire.parse_head(buf)
        except wire.BenchProtocolError as exc:
            self.fail(str(exc))
            return b""
        if parsed is None:
            self._buf = buf
            return b""
        self._buf = b""
        self.head, offset = parsed
        if self.head.status != self.expected_status:
            self.fail(f"{type(self).__name__}: HTTP {self.head.status} for {self.channel}")
            return b""
        self.on_head(self.head)
        if not self.ready.done():
            self.ready.set_result(None)
        return buf[offset:]

    def on_head(self, head: wire.Head) -> None:
        """Look at the response head (before its body)."""

    def items(self, items: list[wire.Item], now: float) -> None:
        """Account for received events: continuity, latency, ends, errors.

        Tokens (and application events) are delivered unless the rule calls them duplicate or
        reordered; a token without an id (seq -1, "foreign") is still delivered.
        """
        tally = self.tally
        run = self.run
        observe = run.observe_seq
        gaps, duplicates, reordered, resets = run.gaps, run.duplicates, run.reordered, run.resets
        for kind, seq, ts, payload in items:
            if kind is None or kind not in _CONTROL:
                verdict = observe(seq)
                if verdict is not NEW and verdict is not FOREIGN:
                    continue  # a duplicate, or a late arrival whose place has passed
                if not self.first_token:
                    self.first_token = True
                    tally.ttft.append(now - self.started_ms)
                    self.got_first.set_result(None)
                if tally.in_window:
                    tally.events += 1
                    tally.latency.append(now - ts)
                    if self.last_token_ms:
                        tally.gaps.append(now - self.last_token_ms)
                self.last_token_ms = now
            elif kind == "reset":
                observe(seq, reset=True)
            elif kind == "end":
                verdict = observe(seq)
                if verdict is not DUPLICATE and verdict is not REORDERED:
                    self.saw_end = True
            elif kind == "error":
                if b"overflow" in payload:
                    tally.overflows += 1
                else:
                    tally.error(f"{type(self).__name__}: error event {payload[:120]!r}")
        # The tally sums every client's counters: add what this batch changed.
        tally.lost += run.gaps - gaps
        tally.dup += run.duplicates - duplicates
        tally.reordered += run.reordered - reordered
        tally.resets += run.resets - resets
        if self.saw_end:
            self.close()

    def fail(self, message: str) -> None:
        """Give up on this connection, counting it as failed."""
        self.tally.error(message)
        if not self.ready.done():
            self.tally.failures += 1
            self.ready.set_result(None)
        else:
            self.tally.disconnects += 1
        self.close()

    def close(self) -> None:
        """Close the connection on purpose (not counted as a disconnect)."""
        self.closing = True
        if self.transport is not None:
            self.transport.close()
        self._settle()

    def _settle(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)
        if not self.done.done():
            self.done.set_result(None)
        if not self.got_first.done():
            self.got_first.set_result(None)

    def _query(self, **extra: str) -> str:
        params = {"after": self.after, "client": self.tag, **extra}
        return "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


_CONTROL: Final = frozenset({"end", "reset", "error"})


class SSEClient(Client):
    """``GET /sse/{channel}``: HTTP/1.1, chunked body, fast SSE parsing."""

    def start(self) -> None:
        self._chunks: wire.ChunkedDecoder | None = None
        self._inflate: Any = None
        self._parser = wire.SSEParser()
        path = f"/sse/{self.channel}?{self._query()}"
        headers = {"Accept": "text/event-stream", **(GZIP if self.compress else {})}
        self.send(wire.get_request(path, self.host, headers))

    def on_head(self, head: wire.Head) -> None:
        if head.headers.get("transfer-encoding", "").lower() == "chunked":
            self._chunks = wire.ChunkedDecoder()
        if head.headers.get("content-encoding", "").lower() == "gzip":
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def body(self, data: bytes, now: float) -> None:
        if self._chunks is not None:
            data = self._chunks.feed(data)
        if self._inflate is not None:
            data = self._inflate.decompress(data)
        items = self._parser.feed(data)
        if items:
            self.items(items, now)


class FetchClient(SSEClient):
    """``POST /api/chats/stream``: the request starts a chat, the answer is its SSE stream.

    The stream opens with a ``chat`` event (no id: which chat this is), which is not counted;
    then the chat's events, read and counted as :class:`SSEClient` reads them.
    """

    def __init__(self, *args: Any, request: bytes, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request = request

    def start(self) -> None:
        self._chunks = None
        self._inflate = None
        self._parser = wire.SSEParser()
        path = f"{FETCH_PATH}?client={quote(self.tag, safe='')}"
        headers = {"Accept": "text/event-stream"}
        self.send(wire.post_request(path, self.host, self.request, headers))

    def items(self, items: list[wire.Item], now: float) -> None:
        super().items([item for item in items if item.kind != CHAT_EVENT], now)


class WSClient(Client):
    """``GET /ws/{channel}``: hand-made handshake, unmasked server frames, masked pongs."""

    expected_status = 101

    def start(self) -> None:
        self._key = wire.ws_key()
        self._frames = wire.WSFrameParser()
        self._inflater: Inflater | None = None
        path = f"/ws/{self.channel}?{self._query()}"
        offer = DEFLATE_OFFER if self.compress else None
        self.send(wire.ws_handshake(path, self.host, self._key, offer))

    def on_head(self, head: wire.Head) -> None:
        if head.headers.get("sec-websocket-accept") != wire.ws_accept(self._key):
            self.fail("ws: bad Sec-WebSocket-Accept")
        agreed = head.headers.get("sec-websocket-extensions")
        if agreed is not None and agreed.startswith("permessage-deflate"):
            self._frames = wire.WSFrameParser(rsv1=True)
            reset = "server_no_context_takeover" in agreed
            self._inflater = Inflater(no_context_takeover=reset)

    def body(self, data: bytes, now: float) -> None:
        items: list[wire.Item] = []
        for opcode, payload, _, rsv1 in self._frames.feed(data):
            if opcode == wire.OP_TEXT:
                if rsv1 and self._inflater is not None:
                    payload = self._inflater.message(payload)
                items.append(wire.envelope_item(payload))
            elif opcode == wire.OP_PING:
                self.send(wire.client_frame(wire.OP_PONG, payload), request=False)
            elif opcode == wire.OP_CLOSE:
                if items:  # the end event may sit in the same read as the close frame
                    self.items(items, now)
                    items = []
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                if code == OVERFLOW_CLOSE:
                    self.tally.overflows += 1
                elif code != 1000 or not self.saw_end:
                    self.tally.error(f"ws: closed {code} {payload[2:80]!r}")
                    self.tally.disconnects += 1
                self.close()
        if items:
            self.items(items, now)


class Polling(Client):
    """What every poll client does, whatever carries its requests: one request at a time, the
    next one at once (``more``, or a long poll) or after ``interval`` (the first wait spread
    over one interval, since real pollers are not in step)."""

    def __init__(self, *args: Any, kind: str, interval: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind
        self.interval = interval
        self._timer: asyncio.TimerHandle | None = None
        self._polls = 0

    def start(self) -> None:
        self._request()

    def _request(self) -> None:
        self._timer = None
        if not self.closing:
            self.request(self.poll_path())

    def request(self, path: str) -> None:
        """Send ``GET path`` (the subclass's transport)."""
        raise NotImplementedError

    def poll_path(self) -> str:
        """The next poll's path and query: from the cursor the last answer gave."""
        extra = {"limit": str(POLL_LIMIT)}
        if self.kind == "longpoll":
            extra["timeout"] = f"{LONGPOLL_TIMEOUT:g}"
        return f"/{self.kind}/{self.channel}?{self._query(**extra)}"

    def answered(self, answer: bytes, now: float) -> None:
        """Take one whole answer's events, then ask again when it is time.

        Raises:
            wire.BenchProtocolError: the answer is not a poll answer.
        """
        items, cursor, more = wire.poll_answer(answer)
        if cursor is not None:
            self.after = cursor
        if items:
            self.items(items, now)
        if self.closing:
            return
        self._polls += 1
        if more or self.kind == "longpoll":
            self._request()
            return
        delay = self.interval
        if self._polls == 1:
            delay = random.uniform(0.0, self.interval)
        self._timer = asyncio.get_running_loop().call_later(delay, self._request)

    def stop_timer(self) -> None:
        """No next poll (the client is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self.stop_timer()
        super().close()


class PollClient(Polling):
    """``GET /poll`` or ``/longpoll``, one request at a time on a keep-alive connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chunks: wire.ChunkedDecoder | None = None
        self._pieces: list[bytes] = []
        self._size = 0
        self._length = -1
        self._gzipped = False

    def request(self, path: str) -> None:
        self.head = None
        self._chunks, self._pieces, self._size, self._length = None, [], 0, -1
        self.send(wire.get_request(path, self.host, GZIP if self.compress else None))

    def on_head(self, head: wire.Head) -> None:
        self._gzipped = head.headers.get("content-encoding", "").lower() == "gzip"
        if head.headers.get("transfer-encoding", "").lower() == "chunked":
            self._chunks = wire.ChunkedDecoder()
        else:
            self._length = int(head.headers.get("content-length", "-1"))

    def body(self, data: bytes, now: float) -> None:
        rest = b""
        if self._chunks is not None:
            self._pieces.append(self._chunks.feed(data))
            complete = self._chunks.finished
        else:
            need = self._length - self._size
            if len(data) > need >= 0:
                data, rest = data[:need], data[need:]
            self._pieces.append(data)
            self._size += len(data)
            complete = self._size >= self._length >= 0
        if not complete:
            return
        answer = b"".join(self._pieces)
        if self._gzipped:
            answer = zlib.decompress(answer, 16 + zlib.MAX_WBITS)
        self.answered(answer, now)
        if rest and not self.closing:
            self.consume(rest)


def make_client(
    transport: str,
    tally: Tally,
    host: str,
    channel: str,
    after: str,
    tag: str,
    *,
    from_start: bool = False,
    poll_interval: float = 1.0,
    request: bytes = b"",
    compress: bool = False,
) -> Client:
    """A not yet connected client of ``transport`` (``sse``, ``ws``, ``longpoll``, ``poll``, or
    ``fetch`` with the chat's JSON ``request``: ``channel`` and ``after`` are not used then);
    ``compress``: it asks for compression as a browser does."""
    client = _make_client(
        transport,
        tally,
        host,
        channel,
        after,
        tag,
        from_start=from_start,
        poll_interval=poll_interval,
        request=request,
    )
    client.compress = compress
    return client


def _make_client(
    transport: str,
    tally: Tally,
    host: str,
    channel: str,
    after: str,
    tag: str,
    *,
    from_start: bool,
    poll_interval: float,
    request: bytes,
) -> Client:
    started = _now_ms()
    if transport == "sse":
        return SSEClient(tally, host, channel, after, tag, started, from_start=from_start)
    if transport == "fetch":
        return FetchClient(
            tally, host, channel, after, tag, started, from_start=from_start, request=request
        )
    if transport == "ws":
        return WSClient(tally, host, channel, after, tag, started, from_start=from_start)
    if transport in ("poll", "longpoll"):
        return PollClient(
            tally,
            host,
            channel,
            after,
            tag,
            started,
            from_start=from_start,
            kind=transport,
            interval=poll_interval,
        )
    raise ValueError(f"unknown transport {transport!r}")


class NativeClients:
    """A worker's share of a point's SSE or WebSocket clients, read by the native load client.

    The binary (``loadclient.c``, built by :mod:`.native`) holds the connections and counts what
    they receive exactly as :meth:`Client.items` does; this class drives it over its stdin and
    reads its replies from its stdout (one JSON line, then the window's latencies as raw
    doubles).
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def open(
        cls, binary: str, spec: dict[str, Any], count: int
    ) -> tuple[NativeClients, dict[str, Any]]:
        """Start the binary with ``count`` clients; return it and its ``opened`` reply.

        The ticker workload: ``count`` readers of ``spec["channel"]``. The chats workload:
        ``count`` users chatting continuously (the binary runs their rounds itself, one reader
        per chat; see :func:`chat_template` for what each round asks).

        Raises:
            BenchProtocolError: it exited or answered something else.
        """
        tag = quote(spec["tag"], safe="")
        transport = spec["transport"]
        mode, extra = transport, []
        if spec["workload"] == "chats":
            mode = NATIVE_CHAT_MODES[transport]
            path, body = chat_template(spec)
            extra = [] if body is None else [body]
        else:
            channel = quote(spec["channel"], safe="")
            path = f"/{transport}/{channel}?after=now&client={tag}"
        proc = await asyncio.create_subprocess_exec(
            binary,
            spec["host"],
            str(spec["port"]),
            mode,
            str(count),
            spec["host_header"],
            path,
            *extra,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # Several server processes on one bus: the binary spreads its connections.
            env=source_env([], ports=spec.get("ports")),
        )
        native = cls(proc)
        try:
            return native, await native._reply("opened")
        except BaseException:
            await native.close()
            raise

    async def _reply(self, op: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        try:
            reply: dict[str, Any] = json.loads(line)
        except ValueError as exc:
            code = await self.proc.wait() if not line else None
            raise wire.BenchProtocolError(
                f"native load client: expected {op!r}, got {line[:200]!r} (exit {code})"
            ) from exc
        if reply.get("op") != op:
            raise wire.BenchProtocolError(f"native load client: expected {op!r}, got {reply}")
        return reply

    async def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    async def start(self) -> None:
        """Begin a measurement window (its counts start once this returns)."""
        await self.send("start")
        await self._reply("started")

    async def stop(self) -> dict[str, Any]:
        """End the measurement window; return its tally (``latency`` and ``ttft`` as raw
        doubles)."""
        await self.send("stop")
        reply = await self._reply("window")
        assert self.proc.stdout is not None
        reply["latency"] = await self.proc.stdout.readexactly(8 * int(reply["latency_count"]))
        reply["ttft"] = await self.proc.stdout.readexactly(8 * int(reply["ttft_count"]))
        reply["gaps"] = await self.proc.stdout.readexactly(8 * int(reply["gap_count"]))
        return reply

    async def close(self) -> None:
        """Close its connections and wait for it to exit."""
        if self.proc.returncode is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send("quit")
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Worker:
    """One load worker: a loop, its clients, and the command pipe to the coordinator."""

    def __init__(self, conn: Connection, index: int) -> None:
        self.conn = conn
        self.index = index
        self.tally = Tally()
        self.clients: set[Client] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.stalled: list[socket.socket] = []
        self.session: aiohttp.ClientSession | None = None
        self.spec: dict[str, Any] = {}
        self.stopping = False
        self.native: NativeClients | None = None
        self._connect_gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def serve(self) -> None:
        """Answer commands until ``quit`` (or the coordinator goes away)."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def readable() -> None:
            try:
                while self.conn.poll():
                    inbox.put_nowait(self.conn.recv())
            except (EOFError, OSError):
                loop.remove_reader(self.conn.fileno())
                inbox.put_nowait(None)

        loop.add_reader(self.conn.fileno(), readable)
        try:
            while True:
                command = await inbox.get()
                if command is None or command["op"] == "quit":
                    break
                try:
                    reply = await self.handle(command)
                except Exception as exc:  # the coordinator reports it; the worker carries on
                    reply = {"op": "error", "error": f"{type(exc).__name__}: {exc}"}
                self.conn.send(reply)
        finally:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(self.conn.fileno())
            await self.close_all()
            if self.session is not None:
                await self.session.close()

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "open":
            return await self.open(command)
        if op == "window":
            return await self.window(command["start"], command["end"], int(command["probes"]))
        if op == "close":
            await self.close_all()
            return {"op": "closed"}
        if op == "stall":
            return await self.stall(command)
        if op == "unstall":
            return self.unstall()
        raise ValueError(f"unknown command {op!r}")

    # Opening ------------------------------------------------------------------------------------
    def client(
        self,
        tally: Tally,
        channel: str,
        after: str,
        *,
        from_start: bool = False,
        request: bytes = b"",
    ) -> Client:
        spec = self.spec
        return make_client(
            spec["transport"],
            tally,
            spec["host_header"],
            channel,
            after,
            spec["tag"],
            from_start=from_start,
            poll_interval=float(spec["poll_interval"]),
            request=request,
            compress=spec.get("compression", "off") != "off",
        )

    async def connect(self, client: Client, *, restart_clock: bool = True) -> bool:
        """Connect ``client`` and wait for its response head (a long-poll: for the request).

        Returns:
            Whether it is open; a failure is counted in the client's tally.
        """
        loop = asyncio.get_running_loop()
        spec = self.spec
        async with self._connect_gate:
            if restart_clock:  # time to first token starts now, not while queued at the gate
                client.started_ms = _now_ms()
            try:
                async with asyncio.timeout(30):
                    await loop.create_connection(lambda: client, spec["host"], spec["port"])
                    if not isinstance(client, PollClient) or client.kind != "longpoll":
                        await asyncio.shield(client.ready)
            except (OSError, TimeoutError) as exc:
                client.tally.failures += 1
                client.tally.error(f"connect: {exc!r}")
                client.closing = True
                client._settle()
                return False
        return not client.done.done()

    async def open(self, spec: dict[str, Any]) -> dict[str, Any]:
        await self.close_all()
        self.tally = Tally()
        self.spec = spec
        self.stopping = False
        count = int(spec["clients"])
        chats = spec["workload"] == "chats"
        one_reader = all(int(r) == 1 for r in spec.get("chat_readers", []))
        if chats and spec.get("native") and spec["transport"] in NATIVE_CHATS and one_reader:
            self.native, opened = await NativeClients.open(spec["native"], spec, count)
            self.tally.failures = int(opened["failures"])
            self.tally.errors = list(opened["errors"])
            return {**opened, "op": "opened"}
        if spec["transport"] in NATIVE_ONLY:
            raise ValueError(f"{spec['transport']} is read by the native load client only")
        if chats and spec["transport"] == "fetch":
            for i in range(count):
                self.tasks.append(asyncio.create_task(self.fetch_rounds(i)))
            return {"op": "opened", "clients": count, "failures": 0, "errors": []}
        if chats:
            if self.session is None:
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0), raise_for_status=True
                )
            for i, readers in enumerate(spec["chat_readers"]):
                self.tasks.append(asyncio.create_task(self.chat_rounds(i, int(readers))))
            return {"op": "opened", "clients": count, "failures": 0, "errors": []}
        if spec.get("native") and spec["transport"] in NATIVE_TRANSPORTS:
            self.native, opened = await NativeClients.open(spec["native"], spec, count)
            self.tally.failures = int(opened["failures"])
            self.tally.errors = list(opened["errors"])
            return {**opened, "op": "opened"}
        clients = [self.client(self.tally, spec["channel"], "now") for _ in range(count)]
        self.clients.update(clients)
        await asyncio.gather(*(self.connect(c) for c in clients))
        return {
            "op": "opened",
            "clients": count - self.tally.failures,
            "failures": self.tally.failures,
            "errors": list(self.tally.errors),
        }

    def chat_request(self, index: int, round_no: int) -> dict[str, Any]:
        """The body of ``POST /api/chats`` (or of a fetch stream) for round ``round_no`` of
        user ``index``: what the native client sends (see :func:`chat_template`)."""
        return {**chat_fields(self.spec), "seed": index * SEED_STRIDE + round_no}

    #: What a failed :meth:`post_chat` raises (counted as a failure, then tried again).
    POST_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError, ValueError)

    async def post_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/chats`` with ``body``; the chat it made (counted in the window).

        Several server processes on one bus (``ports``, this worker's first): the chat is
        started on the next process and read on this one, so its tokens cross the bus.

        Raises:
            aiohttp.ClientError, TimeoutError, ValueError: it failed (:data:`POST_ERRORS`).
        """
        assert self.session is not None
        spec = self.spec
        ports = spec.get("ports") or [spec["port"]]
        base = f"http://{spec['host']}:{ports[1 % len(ports)]}"
        async with self.session.post(base + "/api/chats", json=body) as response:
            raw = await response.read()
            chat: dict[str, Any] = json.loads(raw)
            self.count_request(response, raw)
        return chat

    async def chat_rounds(self, index: int, share: int) -> None:
        """Start a chat, read it with ``share`` clients to its end, repeat until closed."""
        round_no = 0
        while not self.stopping:
            round_no += 1
            posted = _now_ms()
            try:
                chat = await self.post_chat(self.chat_request(index, round_no))
            except self.POST_ERRORS as exc:
                self.tally.failures += 1
                self.tally.error(f"POST /api/chats{self.route}: {exc!r}")
                await asyncio.sleep(0.5)  # the next try in a moment
                continue
            clients = [
                self.client(self.tally, chat["channel"], "", from_start=True) for _ in range(share)
            ]
            for c in clients:
                c.started_ms = posted  # a chat's first token is timed from its creation
            self.clients.update(clients)
            await asyncio.gather(*(self.connect(c, restart_clock=False) for c in clients))
            await asyncio.wait([c.done for c in clients])
            for c in clients:
                if not c.saw_end and not self.stopping:
                    self.tally.incomplete += 1
                self.clients.discard(c)
            if self.tally.in_window:
                self.tally.chats += 1

    @property
    def route(self) -> str:
        """How this worker's requests reach the server, for its error lines ("" direct)."""
        return ""

    def count_request(self, response: aiohttp.ClientResponse, body: bytes) -> None:
        """Count the request that started a chat, and its bytes both ways, in the window.

        A fetch stream's POST is its stream request, counted as any request is: the POST that
        starts a chat for the other transports costs the same, and is counted the same.
        """
        tally = self.tally
        if not tally.in_window:
            return
        info = response.request_info
        sent = info.headers
        tally.requests += 1
        request_line = len(f"{info.method} {info.url.raw_path_qs} HTTP/1.1\r\n")
        content = int(sent.get("Content-Length", "0") or 0)
        tally.bytes_up += request_line + sum(len(k) + len(v) + 4 for k, v in sent.items()) + 2
        tally.bytes_up += content
        status_line = len(f"HTTP/1.1 {response.status} {response.reason or ''}\r\n")
        head = sum(len(k) + len(v) + 4 for k, v in response.raw_headers) + 2
        tally.bytes += status_line + head + len(body)

    async def fetch_rounds(self, index: int) -> None:
        """Start a chat with its fetch stream, read it to its end, repeat until closed.

        One client per chat: its POST starts the chat, so its time to first token runs from
        that request.
        """
        # The requests the native client sends, byte for byte, so that the two load clients'
        # figures compare.
        round_no = 0
        while not self.stopping:
            round_no += 1
            request = json.dumps(self.chat_request(index, round_no), separators=(",", ":"))
            client = self.client(self.tally, "", "", from_start=True, request=request.encode())
            self.clients.add(client)
            opened = await self.connect(client)
            await asyncio.wait([client.done])
            self.clients.discard(client)
            if not client.saw_end and not self.stopping:
                self.tally.incomplete += 1
            if not opened and not self.stopping:
                await asyncio.sleep(0.5)  # refused or unreachable, as a failed POST /api/chats
            elif self.tally.in_window:
                self.tally.chats += 1

    # Measuring ----------------------------------------------------------------------------------
    async def window(self, start: float, end: float, probes: int) -> dict[str, Any]:
        """Count deliveries from ``start`` to ``end`` (wall clock) and reply the tally.

        With ``probes``, that many extra clients join between a fifth and half into the window,
        each at a random moment, and time their first token (the ticker never starts over, so
        its time to first token is a late joiner's); they are counted apart from the point's
        clients, and may wait past the window's end (up to :data:`PROBE_WAIT`) on a saturated
        server.
        """
        await asyncio.sleep(max(start - time.time(), 0.0))
        cpu = _cpu_self()
        tally = self.tally
        tally.events = tally.bytes = tally.bytes_up = tally.requests = tally.chats = 0
        tally.latency = array("d")
        tally.gaps = array("d")
        if self.spec.get("workload") == "chats":
            tally.ttft = array("d")  # the window's chats only, not the opening burst
        tally.in_window = True
        native = self.native
        if native is not None:
            await native.start()
        probe_tally = Tally()
        probe = None
        if probes and self.spec.get("workload") != "chats":
            span = end - start
            probe = asyncio.create_task(
                self.probe(probe_tally, probes, start + span / 5, start + span / 2)
            )
        await asyncio.sleep(max(end - time.time(), 0.0))
        tally.in_window = False
        cpu = _cpu_self() - cpu
        result = tally.result(cpu)
        tally.latency = array("d")
        tally.gaps = array("d")
        if native is not None:
            counted = await native.stop()
            # The native client's tally replaces this worker's (it opened no clients of its own);
            # its failures and errors count over its whole life, the opening included.
            for key in (
                "events",
                "bytes",
                "bytes_up",
                "lost",
                "dup",
                "reordered",
                "resets",
                "overflows",
                "chats",
                "incomplete",
                "requests",
            ):
                result[key] = int(counted[key])
            result["disconnects"] = int(counted["disconnects"])
            result["failures"] = int(counted["failures"])
            result["latency"] = counted["latency"]
            result["gaps"] = counted["gaps"]
            if self.spec.get("workload") == "chats":
                result["ttft"] = counted["ttft"]  # each chat's, timed from its POST
            result["cpu"] = cpu + float(counted["cpu"])
            result["errors"] = list(counted["errors"])
        if probe is not None:
            late = await probe
            result["ttft"] = probe_tally.ttft.tobytes()
            result["ttft_late"] = late
            result["errors"] += probe_tally.errors
        return {"op": "result", **result}

    async def probe(self, tally: Tally, count: int, earliest: float, latest: float) -> int:
        """Time ``count`` late joiners' first tokens; return how many had none in time.

        Each joins at its own random moment between ``earliest`` and ``latest`` (wall clock):
        the ticker publishes on a fixed schedule, so probes joining at one fixed moment would
        all meet it at the same phase of its period (at 1 token/s, that made a 50 ms "time to
        first token" out of what averages 500 ms). A probe still waiting after
        :data:`PROBE_WAIT` counts with that wait, a lower bound.
        """

        async def one() -> int:
            await asyncio.sleep(max(random.uniform(earliest, latest) - time.time(), 0.0))
            client = self.client(tally, self.spec["channel"], "now")
            try:
                async with asyncio.timeout(PROBE_WAIT):
                    await self.connect(client)
                    await asyncio.wait([client.got_first])
            except TimeoutError:
                pass
            finally:
                client.close()
            if client.first_token:
                return 0
            tally.ttft.append(_now_ms() - client.started_ms)
            return 1

        return sum(await asyncio.gather(*(one() for _ in range(count))))

    async def close_all(self) -> None:
        """Close every client (and stop chat rounds)."""
        self.stopping = True
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        clients, self.clients = self.clients, set()
        for client in clients:
            client.close()
        native, self.native = self.native, None
        if native is not None:
            await native.close()
        self.unstall()
        await asyncio.sleep(0)

    # Stalled subscribers ------------------------------------------------------------------------
    async def stall(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Open ``count`` SSE connections that never read a byte.

        Each socket gets a small receive buffer and a 1460-byte MSS. The MSS is the one of an
        Ethernet path: over loopback (MSS ~64 KiB) Linux autotunes the server's send buffer to
        about 4 MiB per socket, so a stalled client would take minutes to fill it, which no real
        network path allows.
        """
        loop = asyncio.get_running_loop()
        request = wire.get_request(
            f"/sse/{spec['channel']}?after=now&client={spec['tag']}", spec["host_header"]
        )
        failures = 0
        for _ in range(int(spec["count"])):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(spec["rcvbuf"]))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(10):
                    await loop.sock_connect(sock, (spec["host"], int(spec["port"])))
                    await loop.sock_sendall(sock, request)
            except (OSError, TimeoutError):
                failures += 1
                sock.close()
                continue
            self.stalled.append(sock)
        return {"op": "stalled", "count": len(self.stalled), "failures": failures}

    def unstall(self) -> dict[str, Any]:
        """Close the stalled sockets, counting those the server had already ended."""
        ended = alive = 0
        for sock in self.stalled:
            if _ended_by_server(sock):
                ended += 1
            else:
                alive += 1
            sock.close()
        self.stalled = []
        return {"op": "unstalled", "ended": ended, "alive": alive}


def _ended_by_server(sock: socket.socket) -> bool:
    """Whether the server closed or reset this never-read socket (reads what is queued)."""
    seen = b""
    for _ in range(256):
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return b'"overflow"' in seen
        except OSError:
            return True  # reset: the server aborted it after the overflow grace
        if not data:
            return True
        seen = seen[-64:] + data
    return False


def worker_main(conn: Connection, index: int) -> None:
    """Entry point of a worker process."""
    raise_fd_limit()
    try:
        asyncio.run(Worker(conn, index).serve())
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()


def chat_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """A chat request's fields but its seed (key order as :func:`chat_template` sends them)."""
    return {
        "prompt": CHAT_PROMPT,
        "max_tokens": int(spec["chat_tokens"]),
        "token_ms": float(spec["token_ms"]),
        "ttft_ms": float(spec["ttft_ms"]),
    }


def chat_template(spec: dict[str, Any]) -> tuple[str, str | None]:
    """What the native client asks each round for ``spec``'s transport: ``(path, body)``.

    ``$SEED`` in either is the round's seed (``user * SEED_STRIDE + round``). The body is
    ``None`` for the naive baseline, whose chat is all in its ``GET``'s query. ``openai`` asks
    ``max_tokens`` and the seed; its pace and time to first token are the server's
    ``token_ms`` and ``ttft_ms`` settings (the runner sets them to the point's).
    """
    tag = quote(spec["tag"], safe="")
    transport = spec["transport"]
    fields = chat_fields(spec)
    if transport == "naive":
        rate = 1000.0 / fields["token_ms"] if fields["token_ms"] > 0 else 1e6
        query = (
            f"tokens={fields['max_tokens']}&rate={rate:g}&ttft_ms={fields['ttft_ms']:g}"
            f"&seed=$SEED&client={tag}"
        )
        return f"{NAIVE_PATH}?{query}", None
    if transport == "openai":
        body = {
            "model": "realtime-lab-sim",
            "messages": [{"role": "user", "content": CHAT_PROMPT}],
            "stream": True,
            "max_tokens": fields["max_tokens"],
        }
        path = f"{OPENAI_PATH}?client={tag}"
    else:
        body = fields
        path = f"{FETCH_PATH if transport == 'fetch' else '/api/chats'}?client={tag}"
    return path, json.dumps(body, separators=(",", ":"))[:-1] + ',"seed":$SEED}'


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as possible (first parts get the remainder)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
