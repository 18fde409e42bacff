"""Identity and browser policy, sans-I/O: user tokens, tickets, Origin/Host checks, cookies.

Nothing here touches a socket: the transports and the HTTP API call these building blocks.
"""

from __future__ import annotations

from realtime_lab.auth.policy import (
    SESSION_COOKIE,
    CookieAttributes,
    HostPolicy,
    OriginPolicy,
    RedactingFilter,
    TrustedProxies,
    expired_session_cookie,
    exposure_error,
    is_loopback,
    normalize_origin,
    origin_of,
    redact,
    request_is_https,
    session_cookie,
)
from realtime_lab.auth.tickets import MemoryTicketStore, Tickets, TicketStore
from realtime_lab.auth.tokens import ADMIN, PUBLISH, Identity, TokenAuthority, is_valid_user

__all__ = [
    "ADMIN",
    "PUBLISH",
    "SESSION_COOKIE",
    "CookieAttributes",
    "HostPolicy",
    "Identity",
    "MemoryTicketStore",
    "OriginPolicy",
    "RedactingFilter",
    "TicketStore",
    "Tickets",
    "TokenAuthority",
    "TrustedProxies",
    "expired_session_cookie",
    "exposure_error",
    "is_loopback",
    "is_valid_user",
    "normalize_origin",
    "origin_of",
    "redact",
    "request_is_https",
    "session_cookie",
]
