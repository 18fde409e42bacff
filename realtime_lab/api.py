"""The JSON API: chats, publishing application events, stats and health.

The admin side (settings, fault injection) is :mod:`realtime_lab.admin`; the OpenAI-compatible
endpoint is :mod:`realtime_lab.openai_api`.
"""

from __future__ import annotations

import re
import time
from typing import Any, Final

from aiohttp import web

from realtime_lab.auth import expired_session_cookie, is_valid_user
from realtime_lab.auth import session_cookie as session_cookie_attributes
from realtime_lab.errors import AuthError, BusError, LimitReached, UnknownChat
from realtime_lab.feed.chats import Chat
from realtime_lab.feed.ticker import TICKER_CHANNEL
from realtime_lab.protocol.channels import CHAT_PREFIX
from realtime_lab.protocol.envelope import CONTROL_TYPES, TOKEN
from realtime_lab.transports.access import USER_PREFIX, identity_of, problem
from realtime_lab.transports.chatstart import start_chat
from realtime_lab.transports.keys import ACCESS_KEY, BUS_KEY, CHATS_KEY, HUB_KEY
from realtime_lab.transports.params import json_body
from realtime_lab.transports.preamble import CHANNEL_RE, channel_name, client_tag
from realtime_lab.transports.problems import HTTPProblem, error_body, json_response, limit_problem

EVENT_TYPE_RE: Final = re.compile(r"[a-z][a-z0-9_.-]{0,31}")


def transport_urls(request: web.Request, channel: str) -> dict[str, str]:
    """Where each transport serves ``channel``, as absolute URLs.

    Built from the request's ``Host`` (which the access checks allowed) and its scheme as the
    client saw it (``X-Forwarded-Proto`` counts from a trusted proxy).
    """
    https = request.app[ACCESS_KEY].is_https(request)
    http = ("https" if https else "http") + f"://{request.host}"
    ws = ("wss" if https else "ws") + f"://{request.host}"
    return {
        "poll": f"{http}/poll/{channel}",
        "longpoll": f"{http}/longpoll/{channel}",
        "sse": f"{http}/sse/{channel}",
        "ws": f"{ws}/ws/{channel}",
    }


def _chat_json(request: web.Request, chat: Chat) -> dict[str, Any]:
    return {**chat.to_dict(), "urls": transport_urls(request, chat.channel)}


async def create_chat(request: web.Request) -> web.Response:
    """``POST /api/chats``: start a simulated generation; answer 201 with where to stream it."""
    chat = await start_chat(request, await json_body(request))
    return json_response(_chat_json(request, chat), 201, Location=f"/api/chats/{chat.id}")


async def _chat(request: web.Request) -> Chat:
    """The chat the path names, on whichever process of the bus generates it."""
    chats, chat_id = request.app[CHATS_KEY], request.match_info["chat_id"]
    try:
        chat = await chats.find(chat_id)
    except UnknownChat as exc:
        raise HTTPProblem(404, "unknown-chat", str(exc)) from exc
    except BusError as exc:
        raise HTTPProblem(503, "bus-unavailable", str(exc)) from None
    await request.app[ACCESS_KEY].check_chat(identity_of(request), chat_id, chats)
    return chat


async def get_chat(request: web.Request) -> web.Response:
    """``GET /api/chats/{id}``: the chat's state and its text so far (from any process)."""
    return json_response(_chat_json(request, await _chat(request)))


async def cancel_chat(request: web.Request) -> web.Response:
    """``DELETE /api/chats/{id}``: cancel the generation (on whichever process runs it); the
    stream ends with ``cancelled``."""
    chat = await _chat(request)
    try:
        # Wait (briefly) so the answer shows the final state.
        chat = await request.app[CHATS_KEY].cancel_anywhere(chat.id, wait=2.0)
    except UnknownChat as exc:
        raise HTTPProblem(404, "unknown-chat", str(exc)) from exc
    except BusError as exc:
        raise HTTPProblem(503, "bus-unavailable", str(exc)) from None
    return json_response(_chat_json(request, chat))


async def publish_event(request: web.Request) -> web.Response:
    """``POST /api/channels/{channel}/events``: publish an application event; 201 with it."""
    channel = channel_name(request)
    if channel.startswith(CHAT_PREFIX) or channel == TICKER_CHANNEL:
        raise HTTPProblem(
            403, "reserved-channel", f"{channel!r} is fed by the server; publish to another channel"
        )
    kind, data = _event_body(await json_body(request))
    return await _publish(request, channel, kind, data)


async def _publish(
    request: web.Request, channel: str, kind: str, data: dict[str, Any]
) -> web.Response:
    try:
        event = await request.app[BUS_KEY].publish(channel, kind, data)
    except LimitReached as exc:
        raise limit_problem(exc) from None
    return json_response(event.to_dict(), 201)


def _event_body(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kind = body.get("type")
    if not isinstance(kind, str) or not EVENT_TYPE_RE.fullmatch(kind):
        raise HTTPProblem(400, "invalid-type", "type must match [a-z][a-z0-9_.-]{0,31}")
    if kind in CONTROL_TYPES or kind == TOKEN:
        raise HTTPProblem(
            400, "reserved-type", f"{kind!r} is reserved for the server; use an application type"
        )
    data = body.get("data", {})
    if not isinstance(data, dict):
        raise HTTPProblem(400, "invalid-data", "data must be a JSON object")
    return kind, data


async def push_to_user(request: web.Request) -> web.Response:
    """``POST /api/users/{user}/events``: push an event to every open stream of one user.

    It is a publish to the user's channel ``user.<id>``, which only that user may read: every
    connection the user has open, on every transport and (on Redis) every process, gets it.
    """
    user = request.match_info["user"]
    if not is_valid_user(user):
        raise HTTPProblem(400, "invalid-user", "user ids are 1-64 of A-Z a-z 0-9 _ . : -")
    kind, data = _event_body(await json_body(request))
    return await _publish(request, USER_PREFIX + user, kind, data)


async def channel_info(request: web.Request) -> web.Response:
    """``GET /api/channels/{channel}``: history bounds and subscriber count."""
    channel = channel_name(request)
    info = await request.app[BUS_KEY].info(channel)
    if info is None:
        raise HTTPProblem(404, "unknown-channel", f"no events on {channel!r} yet")
    return json_response(
        {
            "channel": channel,
            "epoch": info.epoch,
            "last_id": info.last_id,
            "oldest_id": f"{info.epoch}-{info.first_seq}"
            if info.first_seq <= info.last_seq
            else None,
            "retained": max(info.last_seq - info.first_seq + 1, 0),
            "finished": info.finished,
            "subscribers": info.subscribers,
        }
    )


async def stats(request: web.Request) -> web.Response:
    """``GET /api/stats[?client=TAG]``: per-transport accounting (and one client's)."""
    hub = request.app[HUB_KEY]
    body = hub.snapshot(client_tag(request))
    body["server_time_ms"] = time.time() * 1000.0
    body["chats_running"] = request.app[CHATS_KEY].running
    # CPU seconds this server process has used (all threads); the dashboard divides the change
    # over a run by the tokens its panes received: server CPU per token, in the run's mode.
    body["process_cpu_s"] = time.process_time()
    return json_response(body)


async def health(request: web.Request) -> web.Response:
    """``GET /api/health``: 200 while the server accepts work; 503 with why while the bus
    backend (Redis) does not answer (a load balancer then sends new work elsewhere)."""
    if request.app[HUB_KEY].shutting_down:
        return json_response({"ok": False})
    try:
        reason = await request.app[BUS_KEY].broker.health()
    except BusError as exc:
        reason = str(exc)
    if reason is not None:
        return json_response({"ok": False, **error_body("bus-unavailable", reason)}, 503)
    return json_response({"ok": True})


# Sessions and tickets ----------------------------------------------------------------------------


async def get_session(request: web.Request) -> web.Response:
    """``GET /api/session``: whether auth is on, and who the credential names (if anyone)."""
    access = request.app[ACCESS_KEY]
    identity = access.identify(request)
    return json_response(
        {
            "auth": access.on,
            "user": None if identity is None else identity.user,
            "scopes": [] if identity is None else sorted(identity.scopes),
            "expires": None if identity is None else identity.expires,
        }
    )


async def open_session(request: web.Request) -> web.Response:
    """``POST /api/session`` with a bearer token: set it as the ``rtl_session`` cookie.

    EventSource and browser WebSockets cannot send an ``Authorization`` header; the cookie is
    how they are authenticated. It is HttpOnly (no script reads it), SameSite=Lax, and Secure
    when the request came over HTTPS.
    """
    access = request.app[ACCESS_KEY]
    if not access.on:
        raise HTTPProblem(404, "auth-off", "auth is off: start the server with --auth-secret")
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPProblem(401, "unauthenticated", "POST /api/session with Authorization: Bearer")
    assert access.authority is not None
    try:
        identity = access.authority.verify(token.strip())
    except AuthError as exc:
        raise problem(exc) from None
    expires = identity.expires or time.time()
    response = json_response({"user": identity.user, "scopes": sorted(identity.scopes)})
    attributes = session_cookie_attributes(
        token.strip(), secure=access.is_https(request), max_age=max(int(expires - time.time()), 1)
    )
    response.set_cookie(**attributes)
    return response


async def close_session(request: web.Request) -> web.Response:
    """``DELETE /api/session``: clear the session cookie."""
    access = request.app[ACCESS_KEY]
    response = json_response({"user": None})
    response.set_cookie(**expired_session_cookie(secure=access.is_https(request)))
    return response


async def create_ticket(request: web.Request) -> web.Response:
    """``POST /api/tickets {"channel"}``: a single-use ticket to open that channel's stream.

    For a stream opened where no credential can be sent (a URL handed to another component,
    an EventSource on another origin): ``?ticket=`` on any transport. It is bound to the user and
    the channel, and expires after ``--ticket-ttl`` seconds; a reconnect takes a new one.
    """
    access = request.app[ACCESS_KEY]
    identity = identity_of(request)
    if identity is None:
        raise HTTPProblem(404, "auth-off", "auth is off: no ticket is needed")
    body = await json_body(request)
    channel = body.get("channel")
    if not isinstance(channel, str) or not CHANNEL_RE.fullmatch(channel):
        raise HTTPProblem(400, "invalid-channel", "channel must be a valid channel name")
    await access.check_read(identity, channel, request.app[CHATS_KEY])
    ticket, expires_in = await access.tickets.issue(identity, channel)
    return json_response({"ticket": ticket, "expires_in": expires_in, "channel": channel}, 201)
