"""User identities carried by HS256 JSON Web Tokens.

A token's ``sub`` is the user id, ``exp`` its end of life (both required) and ``scope`` an
optional space-separated list of grants: :data:`PUBLISH` (publish to any channel from the server
side) and :data:`ADMIN` (settings and chaos). Signing and claim checks are PyJWT's; this module
adds what PyJWT leaves to the application: one pinned algorithm, a length bound, claim types
and the user id syntax (user ids become channel names ``user.<id>``).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import jwt

from realtime_lab.errors import Unauthenticated

#: Grants carried in the ``scope`` claim.
PUBLISH: Final = "publish"
ADMIN: Final = "admin"

#: The only algorithm ever accepted or produced: pinned, never read from the token's header.
ALGORITHM: Final = "HS256"
#: RFC 7518 §3.2: an HS256 key must be at least as long as the hash (256 bits).
MIN_SECRET_BYTES: Final = 32
#: Clock skew tolerated on ``exp``, ``nbf`` and ``iat``, in seconds.
LEEWAY_S: Final = 5.0
#: Longer strings are refused before any parsing (a real token is a few hundred bytes).
MAX_TOKEN_LENGTH: Final = 4096
#: Prefix of a user's private channel: ``user.<id>``.
USER_CHANNEL_PREFIX: Final = "user."

_USER_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_SCOPE_RE: Final = re.compile(r"[\x21-\x7e]{1,64}")  # printable ASCII, no space
_TIME_CLAIMS: Final = ("exp", "nbf", "iat")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who made a request, and what they were granted.

    Attributes:
        user: the user id (1 to 64 of ``A-Z a-z 0-9 _ . : -``).
        scopes: the grants (:data:`PUBLISH`, :data:`ADMIN`, or others the server ignores).
    """

    user: str
    scopes: frozenset[str] = frozenset()
    # The token's ``exp`` (seconds since the epoch), when known; not part of who it is.
    expires: float | None = field(default=None, compare=False)

    def has(self, scope: str) -> bool:
        """Whether this identity was granted ``scope``; answer 403 ``Forbidden`` when not."""
        return scope in self.scopes

    @property
    def channel(self) -> str:
        """The user's private channel, ``user.<id>``."""
        return USER_CHANNEL_PREFIX + self.user


def is_valid_user(user: object) -> bool:
    """Whether ``user`` is a well-formed user id (safe to embed in a channel name)."""
    return isinstance(user, str) and _USER_RE.fullmatch(user) is not None


class TokenAuthority:
    """Mints and verifies the user tokens of one secret.

    Raises:
        ValueError: the secret is shorter than :data:`MIN_SECRET_BYTES` bytes (UTF-8); tell
            the operator to generate one, e.g. ``python -c "import secrets;
            print(secrets.token_urlsafe(32))"``.
    """

    __slots__ = ("_key", "leeway_s")

    def __init__(self, secret: str | bytes, *, leeway_s: float = LEEWAY_S) -> None:
        key = secret.encode() if isinstance(secret, str) else bytes(secret)
        if len(key) < MIN_SECRET_BYTES:
            raise ValueError(
                f"the auth secret must be at least {MIN_SECRET_BYTES} bytes long "
                f"(HS256, RFC 7518 section 3.2); got {len(key)}"
            )
        self._key = key
        self.leeway_s = leeway_s

    def __repr__(self) -> str:
        return "TokenAuthority(<secret>)"  # never the key, not even in a traceback

    def mint(self, user: str, scopes: Iterable[str] = (), ttl: float = 3600) -> str:
        """A signed token for ``user`` with ``scopes``, valid for ``ttl`` seconds from now.

        Hand it to the user; they send it as ``Authorization: Bearer <token>``.

        Raises:
            ValueError: a malformed user id or scope, or a ``ttl`` that is not a positive
                finite number.
        """
        if not is_valid_user(user):
            raise ValueError(f"invalid user id {user!r}: use 1 to 64 of A-Z a-z 0-9 _ . : -")
        grants = sorted(set(scopes))
        for scope in grants:
            if _SCOPE_RE.fullmatch(scope) is None:
                raise ValueError(f"invalid scope {scope!r}: use 1 to 64 printable ASCII, no space")
        if not (isinstance(ttl, int | float) and math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        now = int(time.time())
        claims: dict[str, Any] = {"sub": user, "iat": now, "exp": now + max(1, math.ceil(ttl))}
        if grants:
            claims["scope"] = " ".join(grants)
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def verify(self, token: str) -> Identity:
        """The identity a token proves.

        Raises:
            Unauthenticated: ``token-expired`` when ``exp`` has passed (the client should get
                a new token), ``invalid-token`` for anything else (bad signature, another
                algorithm, missing or mistyped claims, a malformed user id, oversize). The
                message never contains the token.
        """
        if not isinstance(token, str) or not token:
            raise Unauthenticated("no token", "invalid-token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated(
                f"token longer than {MAX_TOKEN_LENGTH} characters", "invalid-token"
            )
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                leeway=self.leeway_s,
                options={"require": ["sub", "exp"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired", "token-expired") from exc
        except jwt.PyJWTError as exc:
            # The class names the failed check; PyJWT's message may quote attacker-chosen header
            # values (``crit``), which have no place in a log line.
            raise Unauthenticated(f"invalid token ({type(exc).__name__})", "invalid-token") from exc
        return _identity(claims)


def _identity(claims: dict[str, Any]) -> Identity:
    for name in _TIME_CLAIMS:
        # PyJWT coerces with int(), which would take "123" or true; RFC 7519 wants a number.
        value = claims.get(name)
        if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise Unauthenticated(f"invalid token: {name} is not a number", "invalid-token")
    user = claims["sub"]
    if not is_valid_user(user):
        raise Unauthenticated("invalid token: malformed user id", "invalid-token")
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        raise Unauthenticated("invalid token: scope is not a string", "invalid-token")
    return Identity(user=user, scopes=frozenset(scope.split()), expires=float(claims["exp"]))
