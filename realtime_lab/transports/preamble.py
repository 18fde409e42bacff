"""What every transport handler does first: the one request preamble.

:func:`open_request` reads and checks what a transport request carries (the channel, the resume
position, the client tag), applies an injected chaos failure, checks who is asking and whether
they may read the channel (:mod:`realtime_lab.transports.access`), claims a stream slot, and
counts the request. A handler calls it first and gets an :class:`Opening` (and
:meth:`Opening.release` s it when it ends), or the request has been answered with a JSON error and
counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from realtime_lab.auth import Identity
from realtime_lab.bus import After
from realtime_lab.errors import BusError, InvalidCursor, LimitReached
from realtime_lab.feed.ticker import TICKER_CHANNEL
from realtime_lab.protocol.channels import CHAT_PREFIX
from realtime_lab.protocol.cursor import Cursor, parse_after
from realtime_lab.transports.accounting import Counters
from realtime_lab.transports.keys import (
    ACCESS_KEY,
    BUS_KEY,
    CHAOS_KEY,
    CHATS_KEY,
    HUB_KEY,
    SLOTS_KEY,
)
from realtime_lab.transports.problems import HTTPProblem, bus_problem
from realtime_lab.transports.slots import Slot

CHANNEL_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
CLIENT_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


@dataclass(slots=True)
class Opening:
    """A transport request that passed the preamble: what it asks for, and its counters."""

    transport: str
    channel: str
    after: After
    client: str | None
    counters: Counters
    identity: Identity | None = None  # None: auth is off (or a public channel, anonymously)
    slot: Slot | None = None  # claimed for a stream; released when the handler ends

    def release(self) -> None:
        """Give the stream slot back (the handler is ending). Idempotent."""
        if self.slot is not None:
            self.slot.release()

    def refuse(self, request: web.Request, problem: web.HTTPException) -> web.HTTPException:
        """Count ``problem`` as this request's answer; the caller raises what this returns."""
        self.counters.errors += 1
        request.app[HUB_KEY].record(self.transport, self.client, self.counters)
        return problem


async def open_request(
    request: web.Request,
    transport: str,
    *,
    resume_header: bool = False,
    stream: bool = False,
    browser_origin: bool = False,
    channel: str | None = None,
    inject_faults: bool = True,
) -> Opening:
    """Check a transport request; answer (and count) it with a JSON error when it is refused.

    ``resume_header``: the ``Last-Event-ID`` header wins over ``?after`` (an EventSource sends
    it when it reconnects, while the URL still holds the position the stream first opened at).
    ``stream``: the request may hold a stream open; it claims a slot (release it at the end).
    ``browser_origin``: refuse an ``Origin`` that is not allowed (a WebSocket handshake, which
    browsers send cross-site with cookies and which CORS does not guard).
    ``channel``: the channel, when the request names it otherwise than in its path.
    ``inject_faults``: ``False`` when the handler applied chaos failures itself, earlier.

    Raises:
        HTTPProblem: 400 for a malformed channel, position or tag, 401/403 for a missing or
            refused credential, 404 for an unknown chat, 421 for a Host not served, 429 over
            the stream bound, 503 for an injected failure.
    """
    app = request.app
    client = client_tag(request)
    counters = Counters(requests=1)
    try:
        if inject_faults:
            app[CHAOS_KEY].maybe_fail(transport)
        access = app[ACCESS_KEY]
        access.check_host(request)
        if browser_origin:
            access.check_origin(request)
        if channel is None:
            channel = await existing_channel(request)
        header = request.headers.get("Last-Event-ID") if resume_header else None
        if header is not None:
            after = after_param(header, "Last-Event-ID")
        else:
            after = after_param(request.query.get("after"))
        public = channel == TICKER_CHANNEL
        identity = await access.for_channel(request, channel, app[CHATS_KEY], public)
        slot = None
        if stream:
            key = identity.user if identity is not None else f"addr:{request.remote}"
            slot = app[SLOTS_KEY].claim(key)
    except web.HTTPException:
        counters.errors += 1
        app[HUB_KEY].record(transport, client, counters)
        raise
    if isinstance(after, Cursor):
        counters.reconnects += 1
    return Opening(transport, channel, after, client, counters, identity, slot)


def channel_name(request: web.Request) -> str:
    """The ``{channel}`` path segment, validated.

    Raises:
        HTTPProblem: 400 when it is not a short ``[A-Za-z0-9_.:-]`` name.
    """
    name = request.match_info.get("channel", "")
    if not CHANNEL_RE.fullmatch(name):
        raise HTTPProblem(
            400, "invalid-channel", "channel names are 1-64 characters of A-Z a-z 0-9 _ . : -"
        )
    return name


async def existing_channel(request: web.Request) -> str:
    """A channel a client may subscribe to: any valid name, but ``chat.*`` only for real chats.

    Raises:
        HTTPProblem: 400 for a malformed name, 404 for a chat that does not exist (anymore),
            503 when the bus does not answer.
    """
    name = channel_name(request)
    if name.startswith(CHAT_PREFIX):
        chat_id = name[len(CHAT_PREFIX) :]
        if chat_id not in request.app[CHATS_KEY]:
            try:
                info = await request.app[BUS_KEY].info(name)
            except (BusError, LimitReached) as exc:
                raise bus_problem(exc) from None
            if info is None:
                raise HTTPProblem(404, "unknown-channel", f"no chat channel {name!r}")
    return name


def after_param(value: str | None, source: str = "after") -> After:
    """Parse a resume position.

    Raises:
        HTTPProblem: 400 ``invalid-cursor`` when malformed.
    """
    try:
        return parse_after(value)
    except InvalidCursor as exc:
        raise HTTPProblem(400, "invalid-cursor", f"{source}: {exc}") from exc


def client_tag(request: web.Request) -> str | None:
    """The optional ``client`` query tag that groups a dashboard pane's requests."""
    tag = request.query.get("client")
    if tag is None:
        return None
    if not CLIENT_RE.fullmatch(tag):
        raise HTTPProblem(400, "invalid-parameter", "client must be 1-64 of A-Z a-z 0-9 _ . : -")
    return tag
