"""Who is asking and what they may do: the one place every access check is made.

Credentials, each the way its client can send it: ``Authorization: Bearer <jwt>`` (fetch, the
Python clients, the OpenAI endpoint), the ``rtl_session`` cookie (EventSource and browser
WebSockets, which cannot set headers), and single-use ``?ticket=`` values bound to one channel.
With no ``--auth-secret`` the lab is open, as a local tool should be: nobody is asked who they
are, and only the admin side (settings, chaos) is kept to clients on loopback.

The transports' preamble calls :meth:`Access.for_channel`; the JSON API's handlers are wrapped
with :func:`guarded`. Neither adds a middleware: a middleware would stay on the stack of every
open stream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Final

from aiohttp import hdrs, web

from realtime_lab.auth import (
    ADMIN,
    SESSION_COOKIE,
    HostPolicy,
    Identity,
    OriginPolicy,
    Tickets,
    TicketStore,
    TokenAuthority,
    TrustedProxies,
    is_loopback,
    origin_of,
    request_is_https,
)
from realtime_lab.config import Settings
from realtime_lab.errors import AuthError, BusError, LimitReached, Unauthenticated
from realtime_lab.feed.chats import ChatRegistry
from realtime_lab.protocol.channels import CHAT_PREFIX
from realtime_lab.transports.problems import HTTPProblem, bus_problem

USER_PREFIX: Final = "user."
IDENTITY_KEY: Final = web.RequestKey("identity", Identity)
SIGN_IN: Final = "send Authorization: Bearer <token>, the rtl_session cookie, or a ?ticket="


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def problem(exc: AuthError) -> HTTPProblem:
    """The HTTP answer to a refused credential or permission."""
    status = 401 if isinstance(exc, Unauthenticated) else 403
    return HTTPProblem(status, exc.code, str(exc))


class Need(Enum):
    """What an endpoint asks of its caller."""

    NOBODY = "nobody"  # public (health, the ticker)
    USER = "user"  # any signed-in user (anyone, with auth off)
    PUBLISH = "publish"  # the publish scope (anyone, with auth off)
    ADMIN = "admin"  # the admin scope (a client on loopback, with auth off)


class Access:
    """The server's identity and browser policy (see the module docstring).

    Raises:
        ValueError: a setting is malformed (an origin, host or proxy entry, a short secret).
    """

    def __init__(self, settings: Settings, store: TicketStore) -> None:
        self.authority = TokenAuthority(settings.auth_secret) if settings.auth_secret else None
        self.tickets = Tickets(store, ttl_s=settings.ticket_ttl)
        self.origins = OriginPolicy(_split(settings.allowed_origins))
        self.hosts = HostPolicy(_split(settings.allowed_hosts), settings.host)
        self.proxies = TrustedProxies(_split(settings.trusted_proxies))

    @property
    def on(self) -> bool:
        """``True`` when users must say who they are."""
        return self.authority is not None

    # Browser policy ----------------------------------------------------------------------------
    def check_host(self, request: web.BaseRequest) -> None:
        """Refuse a ``Host`` this server does not answer to (DNS rebinding) with 421."""
        if not self.hosts.allows(request.headers.get(hdrs.HOST)):
            raise HTTPProblem(
                421, "misdirected-request", "this server does not answer to that Host header"
            )

    def is_https(self, request: web.BaseRequest) -> bool:
        """Whether the client reached us over HTTPS (a trusted proxy's word counts)."""
        forwarded = request.headers.get("X-Forwarded-Proto")
        peer = request.remote
        return request_is_https(request.scheme, peer, forwarded, self.proxies)

    def server_origin(self, request: web.BaseRequest) -> str | None:
        """This server's own origin as the client addressed it."""
        host = request.headers.get(hdrs.HOST)
        if host is None:
            return None
        return origin_of("https" if self.is_https(request) else "http", host)

    def check_origin(self, request: web.BaseRequest) -> None:
        """Refuse a browser request from an origin not allowed (cross-site WebSocket hijacking).

        A request without ``Origin`` is not from a browser page and passes.
        """
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and not self.origins.allows(origin, self.server_origin(request)):
            raise HTTPProblem(403, "origin-not-allowed", "requests from this origin are refused")

    # Identity ----------------------------------------------------------------------------------
    def identify(self, request: web.BaseRequest) -> Identity | None:
        """The user a bearer token or the session cookie names; ``None`` when there is none.

        Raises:
            HTTPProblem: 401 for a credential that is present but invalid or expired.
        """
        if self.authority is None:
            return None
        header = request.headers.get(hdrs.AUTHORIZATION)
        token: str | None = None
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise HTTPProblem(401, "invalid-token", "use Authorization: Bearer <token>")
            token = value.strip()
        else:
            token = request.cookies.get(SESSION_COOKIE)
        if token is None:
            return None
        try:
            return self.authority.verify(token)
        except AuthError as exc:
            raise problem(exc) from None

    def require(self, request: web.BaseRequest, need: Need) -> Identity | None:
        """Check ``need`` for ``request``; its identity (``None`` with auth off) when met.

        Raises:
            HTTPProblem: 401 without a (valid) credential, 403 without the scope (with auth
                off: 403 for the admin side from anywhere but loopback).
        """
        self.check_host(request)
        if need is Need.NOBODY:
            return None
        if self.authority is None:
            if need is Need.ADMIN and not is_loopback(request.remote or ""):
                raise HTTPProblem(
                    403, "forbidden", "the admin API answers clients on loopback only (no auth)"
                )
            return None
        identity = self.identify(request)
        if identity is None:
            raise HTTPProblem(401, "unauthenticated", f"sign in: {SIGN_IN}")
        if need in (Need.PUBLISH, Need.ADMIN) and not identity.has(need.value):
            raise HTTPProblem(403, "forbidden", f"this needs the {need.value!r} scope")
        return identity

    async def for_channel(
        self, request: web.Request, channel: str, chats: ChatRegistry, public: bool
    ) -> Identity | None:
        """Who may read ``channel`` on this request: a ticket's user, or the credential's.

        Raises:
            HTTPProblem: 401 without a valid credential or ticket, 403 for another user's chat
                or ``user.<id>`` channel.
        """
        self.check_host(request)
        if self.authority is None:
            return None
        ticket = request.query.get("ticket")
        if ticket is not None:
            try:
                identity: Identity | None = await self.tickets.redeem(ticket, channel)
            except AuthError as exc:
                raise problem(exc) from None
        else:
            identity = self.identify(request)
        if identity is None:
            if public:
                return None
            raise HTTPProblem(401, "unauthenticated", f"sign in: {SIGN_IN}")
        await self.check_read(identity, channel, chats)
        return identity

    async def check_read(
        self, identity: Identity | None, channel: str, chats: ChatRegistry
    ) -> None:
        """Refuse (403) reading another user's chat or ``user.<id>`` channel."""
        if self.authority is None or (identity is not None and identity.has(ADMIN)):
            return
        user = identity.user if identity is not None else None
        if channel.startswith(USER_PREFIX) and channel[len(USER_PREFIX) :] != user:
            raise HTTPProblem(403, "forbidden", "user channels are read by their user only")
        if channel.startswith(CHAT_PREFIX):
            await self.check_chat(identity, channel[len(CHAT_PREFIX) :], chats)

    async def check_chat(
        self, identity: Identity | None, chat_id: str, chats: ChatRegistry
    ) -> None:
        """Refuse (403) a chat that belongs to someone else (or to no known user).

        The owner of a chat another process generates is in the shared bus (one lookup, then
        remembered); the backend not answering is a 503.
        """
        if self.authority is None or (identity is not None and identity.has(ADMIN)):
            return
        try:
            owner = await chats.owner_of(chat_id)
        except BusError as exc:
            raise HTTPProblem(503, "bus-unavailable", str(exc)) from None
        if identity is None or owner != identity.user:
            raise HTTPProblem(403, "forbidden", "this chat belongs to another user")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guarded(need: Need, access: Callable[[web.Request], Access]) -> Callable[[Handler], Handler]:
    """Wrap a JSON API handler so it runs only when ``need`` is met.

    The identity (``None`` with auth off) is at ``request[IDENTITY_KEY]`` when it is not. A
    bus failure or refusal the handler lets through is answered as :func:`bus_problem` says.
    """

    def wrap(handler: Handler) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            identity = access(request).require(request, need)
            if identity is not None:
                request[IDENTITY_KEY] = identity
            try:
                return await handler(request)
            except (BusError, LimitReached) as exc:  # one the handler did not answer itself
                raise bus_problem(exc) from None

        checked.__name__ = handler.__name__
        checked.__doc__ = handler.__doc__
        return checked

    return wrap


def identity_of(request: web.Request) -> Identity | None:
    """The identity :func:`guarded` found for ``request`` (``None`` with auth off)."""
    return request.get(IDENTITY_KEY)
