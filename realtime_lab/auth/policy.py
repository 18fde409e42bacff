"""Browser policy, sans-I/O: which Origins and Host headers to serve, cookies, log redaction.

Hand-written rather than taken from a library: the checks are a few exact comparisons after
normalisation (and the redaction a few regular expressions), and the libraries that do Host and
Origin checks (Django's, Starlette's middlewares) come with a framework. CORS responses
themselves are ``aiohttp-cors``'s job; this module only answers "is this origin one of ours".

- :class:`OriginPolicy`: an ``Origin`` must equal the server's own origin or a configured one.
- :class:`HostPolicy`: a ``Host`` must name this server (defeats DNS rebinding).
- :func:`request_is_https`: ``X-Forwarded-Proto`` is believed only from :class:`TrustedProxies`.
- :func:`session_cookie`: the ``rtl_session`` cookie's attributes for ``response.set_cookie``.
- :func:`redact` and :class:`RedactingFilter`: no token or ticket ever reaches a log.
- :func:`exposure_error`: ``serve`` refuses to listen beyond loopback without a secret.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from typing import Final, TypedDict

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SESSION_COOKIE: Final = "rtl_session"
#: The Host names every server bound to loopback answers to (with any port).
LOOPBACK_HOSTS: Final = ("localhost", "127.0.0.1", "[::1]")

_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
#: Host header values whose answer HostPolicy remembers at most.
_MAX_SEEN_HOSTS: Final = 256
_SCHEME_RE: Final = re.compile(r"[a-z][a-z0-9+.-]*")
_NAME_RE: Final = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")  # a DNS name or an IPv4 literal
_PORT_RE: Final = re.compile(r"[0-9]{1,5}")
_WILDCARD_BINDS: Final = frozenset({"", "0.0.0.0", "::", "[::]"})
_MAX_HOST_LENGTH: Final = 300


def _ip(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address


def _split_host(text: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of ``name[:port]`` / ``[v6][:port]``, normalised; ``None`` if malformed.

    The host is lowercased, without a trailing dot; an IP literal is in its canonical form
    (IPv6 in brackets), so ``[0::1]`` and ``[::1]`` compare equal.
    """
    if not text or len(text) > _MAX_HOST_LENGTH:
        return None
    text = text.lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        address = _ip(text[1:end])
        if not isinstance(address, ipaddress.IPv6Address) or address.scope_id:
            return None
        host, rest = f"[{address.compressed}]", text[end + 1 :]
    else:
        host, sep, port_text = text.partition(":")
        rest = sep + port_text
        host = host[:-1] if host.endswith(".") else host
        if _NAME_RE.fullmatch(host) is None:
            return None
        address = _ip(host)
        if address is not None:
            host = str(address)
    if not rest:
        return host, None
    if not rest.startswith(":") or _PORT_RE.fullmatch(rest[1:]) is None:
        return None
    port = int(rest[1:])
    return (host, port) if 0 < port < 65536 else None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or IP literal, IPv6 with or without brackets, no port) is this
    machine only: ``localhost``, 127.0.0.0/8, ``::1``. A wildcard such as ``0.0.0.0`` is not."""
    text = host.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text.rstrip(".") == "localhost":
        return True
    address = _ip(text)
    return address is not None and address.is_loopback


def exposure_error(host: str, *, has_secret: bool, insecure: bool) -> str | None:
    """Why ``serve --host host`` must not start, or ``None`` when it may.

    Listening beyond loopback without an auth secret lets anyone who can reach the port act
    as anyone; only ``--insecure`` overrides that. Print the message and exit 2.
    """
    if has_secret or insecure or is_loopback(host):
        return None
    return (
        f"refusing to listen on {host or 'all interfaces'} without an auth secret: set "
        "--auth-secret (or REALTIME_LAB_AUTH_SECRET), listen on 127.0.0.1, or pass --insecure"
    )


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` lowercased, without a default port; ``None`` if not an origin.

    ``null``, paths (a trailing ``/`` included), queries, user info and bad ports give ``None``:
    a browser never sends them in ``Origin``.
    """
    scheme, sep, authority = origin.partition("://")
    scheme = scheme.lower()
    if not sep or _SCHEME_RE.fullmatch(scheme) is None:
        return None
    parts = _split_host(authority)
    if parts is None:
        return None
    host, port = parts
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def origin_of(scheme: str, host_header: str) -> str | None:
    """The origin a browser gives pages served from this request, e.g. ``https://lab:8443``.

    Pass the request's effective scheme (see :func:`request_is_https`) and ``Host`` header.
    """
    return normalize_origin(f"{scheme}://{host_header}")


class OriginPolicy:
    """The ``Origin`` values a browser request may come from.

    Args:
        allowed: extra origins (``--allowed-origins``), e.g. ``https://app.example``. One
            trailing ``/`` is tolerated here; case and default ports are normalised.

    Raises:
        ValueError: an entry is not ``scheme://host[:port]`` (``null`` and ``*`` are refused:
            this is an exact allow-list).
    """

    __slots__ = ("allowed",)

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        origins: set[str] = set()
        for entry in allowed:
            text = entry.strip()
            if not text:
                continue
            normal = normalize_origin(text[:-1] if text.endswith("/") else text)
            if normal is None:
                raise ValueError(f"not an origin (scheme://host[:port]): {entry!r}")
            origins.add(normal)
        self.allowed: frozenset[str] = frozenset(origins)

    def allows(self, origin: str, server_origin: str | None) -> bool:
        """Whether a request whose ``Origin`` header is ``origin`` may be served.

        ``server_origin`` is this server's own origin for the request (:func:`origin_of`),
        always allowed. Call this only when the request has an ``Origin`` header; answer
        403 when it returns ``False``. ``null`` (sandboxed frames, ``file:``) never passes.
        """
        normal = normalize_origin(origin)
        if normal is None:
            return False
        if normal in self.allowed:
            return True
        return server_origin is not None and normalize_origin(server_origin) == normal


class HostPolicy:
    """The ``Host`` header values this server answers to; refuse others with 400 or 421.

    Args:
        allowed_hosts: ``--allowed-hosts`` entries: ``name`` (any port), ``name:port`` (that
            port only), IP literals (IPv6 in brackets or bare), or ``*`` (any Host: turns the
            check off). Empty: the default below.
        bound_host: the ``--host`` the server listens on. The default allows
            :data:`LOOPBACK_HOSTS` (any port) and, when bound to one specific address, that
            address: a DNS-rebinding page can only ever send a name, never our IP literal.

    Raises:
        ValueError: an entry is not a host name or IP literal.
    """

    __slots__ = ("_seen", "any_host", "hosts")

    def __init__(self, allowed_hosts: Iterable[str] = (), bound_host: str = "127.0.0.1") -> None:
        entries = [e.strip() for e in allowed_hosts if e.strip()]
        self.any_host = "*" in entries
        if not entries:
            entries = list(LOOPBACK_HOSTS)
            if not is_loopback(bound_host) and bound_host.strip() not in _WILDCARD_BINDS:
                entries.append(bound_host.strip())
        hosts: set[tuple[str, int | None]] = set()
        for entry in entries:
            if entry == "*":
                continue
            parts = _split_host(f"[{entry}]" if _bare_ipv6(entry) else entry)
            if parts is None:
                raise ValueError(f"not a host name or IP address: {entry!r}")
            hosts.add(parts)
        self.hosts: frozenset[tuple[str, int | None]] = frozenset(hosts)
        self._seen: dict[str, bool] = {}

    def allows(self, host_header: str | None) -> bool:
        """Whether to serve a request with this ``Host`` header (``None``: it had none)."""
        if self.any_host:
            return True
        if host_header is None:
            return False
        known = self._seen.get(host_header)
        if known is not None:
            return known
        parts = _split_host(host_header.strip(" \t"))
        if parts is None:
            allowed = False
        else:
            host, port = parts
            allowed = (host, None) in self.hosts or (port is not None and parts in self.hosts)
        # Every request asks with one of a few Host values: remember the answers (bounded, as
        # the header is the client's to choose).
        if len(self._seen) >= _MAX_SEEN_HOSTS:
            self._seen.clear()
        self._seen[host_header] = allowed
        return allowed


def _bare_ipv6(text: str) -> bool:
    return ":" in text and not text.startswith("[") and isinstance(_ip(text), ipaddress.IPv6Address)


class TrustedProxies:
    """The reverse proxies (addresses or networks) whose ``X-Forwarded-*`` headers are believed.

    Raises:
        ValueError: an entry is not an IP address or network (``10.0.0.0/8``).
    """

    __slots__ = ("networks",)

    def __init__(self, entries: Iterable[str] = ()) -> None:
        networks: list[IPNetwork] = []
        for entry in entries:
            text = entry.strip()
            if not text:
                continue
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError as exc:
                raise ValueError(f"not an IP address or network: {entry!r}") from exc
        self.networks: tuple[IPNetwork, ...] = tuple(networks)

    def __contains__(self, peer: object) -> bool:
        if not isinstance(peer, str):
            return False
        address = _ip(peer.strip())
        return address is not None and any(address in net for net in self.networks)


def request_is_https(
    scheme: str, peer: str | None, forwarded_proto: str | None, trusted_proxies: TrustedProxies
) -> bool:
    """Whether the browser's request came over HTTPS (so cookies get ``Secure``).

    Args:
        scheme: the scheme of the connection the server accepted (``request.scheme`` without
            aiohttp's own forwarded handling).
        peer: the connection's remote address (``request.remote``).
        forwarded_proto: the ``X-Forwarded-Proto`` header, believed only when ``peer`` is in
            ``trusted_proxies``; of a comma list, the last value (the one our proxy set).
    """
    if scheme.lower() == "https":
        return True
    if not forwarded_proto or peer not in trusted_proxies:
        return False
    return forwarded_proto.rsplit(",", 1)[-1].strip().lower() == "https"


class CookieAttributes(TypedDict):
    """Keyword arguments of aiohttp's ``StreamResponse.set_cookie``."""

    name: str
    value: str
    max_age: int
    path: str
    secure: bool
    httponly: bool
    samesite: str


def session_cookie(token: str, *, secure: bool, max_age: int) -> CookieAttributes:
    """The session cookie carrying ``token``: ``response.set_cookie(**session_cookie(...))``.

    HttpOnly (no script reads it), SameSite=Lax (not sent on cross-site subrequests), Path=/,
    and Secure when ``secure`` (:func:`request_is_https`). Make ``max_age`` the token's
    remaining lifetime in seconds.
    """
    if max_age < 0:
        raise ValueError(f"max_age must not be negative, got {max_age}")
    return CookieAttributes(
        name=SESSION_COOKIE,
        value=token,
        max_age=max_age,
        path="/",
        secure=secure,
        httponly=True,
        samesite="Lax",
    )


def expired_session_cookie(*, secure: bool) -> CookieAttributes:
    """The attributes that make a browser drop the session cookie (log out)."""
    return session_cookie("", secure=secure, max_age=0)


_REDACTED: Final = "[redacted]"
_REDACTIONS: Final = (
    # Authorization: Bearer <token> (and Basic, for good measure)
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s\"',;]+"), rf"\1\2{_REDACTED}"),
    # ?ticket=..., &access_token=..., rtl_session=... in URLs and Cookie headers
    (
        re.compile(
            r"(?i)(?<![A-Za-z0-9])([A-Za-z0-9_-]*(?:ticket|token|secret|session)=)[^&\s\"';,]*"
        ),
        rf"\1{_REDACTED}",
    ),
    # "ticket": "...", "token": "..." in JSON
    (
        re.compile(r"(?i)(\"[A-Za-z0-9_-]*(?:ticket|token|secret|session)\"\s*:\s*\")[^\"]*\""),
        rf'\1{_REDACTED}"',
    ),
    # Any JWT anywhere: its header is base64url of '{"', hence "eyJ".
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), _REDACTED),
)


def redact(text: str) -> str:
    """``text`` with bearer tokens, ticket/token/session values and JWTs replaced by
    ``[redacted]``: run every access-log line through it (:class:`RedactingFilter`)."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


_RECORD_FIELDS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class RedactingFilter(logging.Filter):
    """A logging filter that :func:`redact` s each record's message and its string extras.

    Attach it to the access logger's handlers or to the logger itself:
    ``logging.getLogger("aiohttp.access").addFilter(RedactingFilter())``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        for name, value in list(vars(record).items()):
            if name in _RECORD_FIELDS:
                continue
            if isinstance(value, str):
                setattr(record, name, redact(value))
            elif isinstance(value, dict):
                setattr(
                    record,
                    name,
                    {k: redact(v) if isinstance(v, str) else v for k, v in value.items()},
                )
        return True
