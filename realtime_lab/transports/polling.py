"""Short polling (``GET /poll/{channel}``) and long polling (``GET /longpoll/{channel}``).

Both answer ``{"events": [...], "cursor": "ID", "more": false}``; the client sends ``cursor`` back
as ``after``. The body is assembled from each event's cached JSON, so an event is JSON-encoded
once however many pollers fetch it. With ``--compression`` on, an answer is compressed as the
request's ``Accept-Encoding`` asks (see :mod:`realtime_lab.transports.compression`).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from realtime_lab.bus import After, Replay
from realtime_lab.errors import BusError, InvalidCursor, LimitReached
from realtime_lab.protocol.cursor import Cursor, parse_id
from realtime_lab.protocol.envelope import Event, dumps
from realtime_lab.transports.accounting import Counters, Hub, LiveConnection, MeteredResponse
from realtime_lab.transports.compression import encode_body, mark_compressed
from realtime_lab.transports.keys import BUS_KEY, CHAOS_KEY, HUB_KEY, SETTINGS_KEY
from realtime_lab.transports.params import field
from realtime_lab.transports.preamble import Opening, open_request
from realtime_lab.transports.problems import HTTPProblem, bus_problem


def render(replay: Replay) -> bytes:
    """The poll answer body, from the events' cached JSON."""
    events = b",".join(event.json for event in replay.events)
    return b'{"events":[%s],"cursor":%s,"more":%s}' % (
        events,
        dumps(replay.cursor),
        b"true" if replay.more else b"false",
    )


async def _begin(request: web.Request, transport: str) -> tuple[Opening, int]:
    """The preamble, and the ``limit`` every poll takes (a long poll claims a stream slot)."""
    opening = await open_request(request, transport, stream=transport == "longpoll")
    settings = request.app[SETTINGS_KEY]
    try:
        query, high = request.query, settings.poll_max_limit
        limit = field(query, "limit", settings.poll_limit, 1, high, integer=True, text=True)
    except HTTPProblem as exc:
        opening.release()
        raise opening.refuse(request, exc) from None
    return opening, int(limit)


async def poll(request: web.Request) -> web.StreamResponse:
    """``GET /poll/{channel}?after=ID&limit=N``: whatever is new, at once."""
    opening, limit = await _begin(request, "poll")
    after, counters = opening.after, opening.counters
    try:
        replay = await request.app[BUS_KEY].replay(opening.channel, after, limit)
    except (BusError, LimitReached) as exc:
        raise opening.refuse(request, bus_problem(exc)) from None
    if request.app[CHAOS_KEY].paused and replay.events:
        replay = _held(after)
    counters.events += len(replay.events)
    hub = request.app[HUB_KEY]
    return _answer(request, render(replay), "poll", opening.client, counters, hub)


def _answer(
    request: web.Request,
    body: bytes,
    transport: str,
    client: str | None,
    counters: Counters,
    hub: Hub,
) -> MeteredResponse:
    """The poll answer, compressed when the client asks and ``--compression`` is on (the
    accounting counts the compressed body)."""
    settings = request.app[SETTINGS_KEY]
    body, coding = encode_body(request, settings, body)
    response = MeteredResponse(body, transport, client, counters, hub)
    mark_compressed(response, settings, coding)
    return response


def _held(after: After) -> Replay:
    """The answer while a chaos pause holds events back: none, and a cursor that skips none."""
    return Replay([], str(after) if isinstance(after, Cursor) else None)


#: How a long-poll wait ended, as the stream outcomes count it.
_WAIT_OUTCOMES = {
    "event": "done",
    "timeout": "timeout",
    "drop": "client-gone",
    "closed": "shutdown",
}


class _Waiter(LiveConnection):
    """A waiting long-poll: the first event (or shutdown, or a chaos drop) wakes it."""

    transport = "longpoll"

    def __init__(self, channel: str, client: str | None, counters: Counters) -> None:
        super().__init__(channel, client)
        self.counters = counters
        loop = asyncio.get_running_loop()
        self.woken: asyncio.Future[str] = loop.create_future()
        # Also set after an event woke it: a waiter held by a chaos pause still ends at once.
        self.interrupted: asyncio.Future[str] = loop.create_future()

    def deliver(self, event: Event) -> None:
        if not self.woken.done():
            self.woken.set_result("event")

    def _interrupt(self, why: str) -> None:
        for future in (self.woken, self.interrupted):
            if not future.done():
                future.set_result(why)

    def close(self, reason: str) -> None:
        self._interrupt("closed")

    def shutdown(self) -> None:
        self.close("shutdown")

    def drop(self) -> None:
        self._interrupt("drop")


async def longpoll(request: web.Request) -> web.StreamResponse:
    """``GET /longpoll/{channel}?after=ID&timeout=S&limit=N``: wait for news, then answer.

    Answers as soon as at least one event is available, with every available event up to
    ``limit``; with an empty list when ``timeout`` passes first. Waiters are woken by the
    publish itself (they are bus sinks), never by a timer that re-checks.
    """
    opening, limit = await _begin(request, "longpoll")
    try:
        channel, after = opening.channel, opening.after
        client, counters = opening.client, opening.counters
        settings = request.app[SETTINGS_KEY]
        try:
            timeout = field(
                request.query,
                "timeout",
                settings.longpoll_timeout,
                0,
                settings.longpoll_max_timeout,
                text=True,
            )
        except HTTPProblem as exc:
            raise opening.refuse(request, exc) from None
        bus, hub, chaos = request.app[BUS_KEY], request.app[HUB_KEY], request.app[CHAOS_KEY]
        replay = await bus.replay(channel, after, limit)
        if chaos.paused and replay.events:
            # Wait from ``after`` itself, so neither the answer nor a timeout skips held events.
            replay = _held(after)
        if not replay.events and timeout > 0 and not hub.shutting_down:
            waiter = _Waiter(channel, client, counters)
            hub.register(waiter)
            woke = "gone"  # until the wait says otherwise: cancelled when the client hung up
            try:
                position: After = after
                if replay.cursor is not None:
                    try:
                        position = parse_id(replay.cursor)
                    except InvalidCursor:
                        position = after
                attachment = await bus.attach(channel, position, waiter)
                try:
                    async with asyncio.timeout(timeout):
                        woke = await asyncio.shield(waiter.woken)
                        if woke == "event" and chaos.paused:
                            await asyncio.wait(
                                (chaos.unpaused(), waiter.interrupted),
                                return_when=asyncio.FIRST_COMPLETED,
                            )
                            if waiter.interrupted.done():
                                woke = waiter.interrupted.result()
                except TimeoutError:
                    woke = "timeout"
                finally:
                    attachment.detach()
            finally:
                # The answer's bytes are not known yet: the response records the counters once sent.
                hub.stats["longpoll"].live.pop(waiter.id, None)
                hub.ended(waiter, _WAIT_OUTCOMES.get(woke, "client-gone"))
            if woke == "drop" and request.transport is not None:
                # A network cut: no answer at all. aiohttp's write then fails with the
                # ConnectionError it expects, and the bytes it could not send count as zero.
                request.transport.abort()
            replay = (
                await bus.replay(channel, position, limit)
                if woke == "event"
                else Replay([], replay.cursor)
            )
        counters.events += len(replay.events)
        return _answer(request, render(replay), "longpoll", client, counters, hub)
    except (BusError, LimitReached) as exc:  # nothing answered yet: a 503 (or the cap's 507)
        raise opening.refuse(request, bus_problem(exc)) from None
    finally:
        opening.release()
