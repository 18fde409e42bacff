"""Single-use tickets: a short-lived stand-in for a token where headers cannot go.

Browsers cannot put an ``Authorization`` header on an ``EventSource`` or a ``WebSocket``, so a
client trades its token for a ticket (``POST /api/tickets {"channel"}``) and opens the stream
with ``?ticket=``. A ticket is bound to one user and one channel, valid for ``ttl_s`` seconds,
and spent the first time it is presented, whatever the outcome.

The state lives in a :class:`TicketStore` (the bus backend), so a ticket issued by one process
is redeemed by another on Redis. The store only sees a SHA-256 of the ticket: a leaked store
dump holds nothing a client could present. To say *why* a ticket is refused, each record
outlives the ticket's validity by ``grace_s`` with its expiry inside, and a redeemed record is
replaced by a ``used`` marker for the rest of that lifetime: every key dies within
``ttl_s + grace_s``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from realtime_lab.auth.tokens import Identity, is_valid_user
from realtime_lab.errors import Unauthenticated

DEFAULT_TTL_S: Final = 30.0
#: How long after expiry a ticket is still told "expired" (then "unknown").
DEFAULT_GRACE_S: Final = 60.0
_TICKET_BYTES: Final = 32  # 256 random bits, 43 URL-safe characters
_TICKET_RE: Final = re.compile(r"[A-Za-z0-9_-]{32,128}")
_LIVE: Final = "live"
_USED: Final = "used"


class TicketStore(Protocol):
    """Where tickets are kept: each bus backend implements it (Redis: ``SET PX`` / ``GETDEL``).

    Keys are 64 lowercase hex digits; namespace them as the backend needs.
    """

    async def put_ticket(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store ``value`` under ``key`` (replacing any), forgotten after ``ttl_s`` seconds."""

    async def take_ticket(self, key: str) -> bytes | None:
        """Atomically read and delete ``key``: of concurrent callers, at most one gets it.

        Returns ``None`` when the key is absent or its ``ttl_s`` has passed.
        """


class MemoryTicketStore:
    """A :class:`TicketStore` in a dict, for one process (tests, and the memory bus's model).

    Expired entries are dropped when read, and swept whenever the dict has doubled since the
    last sweep, so memory stays proportional to the tickets still alive.
    """

    __slots__ = ("_clock", "_entries", "_sweep_at")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, tuple[bytes, float]] = {}
        self._sweep_at = 64

    def __len__(self) -> int:
        return len(self._entries)

    async def put_ticket(self, key: str, value: bytes, ttl_s: float) -> None:
        now = self._clock()
        self._entries[key] = (value, now + ttl_s)
        if len(self._entries) >= self._sweep_at:
            self._entries = {k: e for k, e in self._entries.items() if e[1] > now}
            self._sweep_at = max(64, 2 * len(self._entries))

    async def take_ticket(self, key: str) -> bytes | None:
        # No await before the pop: on one event loop this is atomic.
        entry = self._entries.pop(key, None)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]


@dataclass(frozen=True, slots=True)
class _Record:
    state: str
    expires_at: float  # wall clock: the ticket is refused from then on
    until: float  # wall clock: the store forgets the key then
    user: str = ""
    scopes: tuple[str, ...] = ()
    channel: str = ""

    def encode(self) -> bytes:
        body: dict[str, Any] = {"state": self.state, "exp": self.expires_at, "until": self.until}
        if self.state == _LIVE:
            body |= {"user": self.user, "scopes": list(self.scopes), "channel": self.channel}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> _Record | None:
        try:
            body = json.loads(raw)
            record = cls(
                state=body["state"],
                expires_at=float(body["exp"]),
                until=float(body["until"]),
                user=body.get("user", ""),
                scopes=tuple(body.get("scopes", ())),
                channel=body.get("channel", ""),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        if record.state == _USED:
            return record
        if record.state != _LIVE or not is_valid_user(record.user):
            return None
        if not all(isinstance(s, str) for s in record.scopes):
            return None
        return record if isinstance(record.channel, str) else None


def ticket_key(ticket: str) -> str:
    """The store key of ``ticket``: its SHA-256, so the store never holds a usable ticket."""
    return hashlib.sha256(ticket.encode()).hexdigest()


class Tickets:
    """Issues and redeems tickets kept in ``store``.

    Args:
        store: the bus backend's :class:`TicketStore`.
        ttl_s: how long a ticket may wait before it is presented (at least 1 s).
        grace_s: how long after expiry a presented ticket is still told ``ticket-expired``
            rather than ``ticket-unknown``.
        clock: wall-clock seconds; every process sharing ``store`` must agree on it.
    """

    __slots__ = ("_clock", "_store", "grace_s", "ttl_s")

    def __init__(
        self,
        store: TicketStore,
        ttl_s: float = DEFAULT_TTL_S,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not (math.isfinite(ttl_s) and ttl_s >= 1):
            raise ValueError(f"ticket ttl must be at least 1 second, got {ttl_s!r}")
        if not (math.isfinite(grace_s) and grace_s >= 0):
            raise ValueError(f"ticket grace must be a non-negative number, got {grace_s!r}")
        self._store = store
        self._clock = clock
        self.ttl_s = ttl_s
        self.grace_s = grace_s

    async def issue(self, identity: Identity, channel: str) -> tuple[str, int]:
        """A new ticket for ``identity`` to open ``channel`` with.

        Check first that ``identity`` may read ``channel``: the ticket carries that decision.

        Returns:
            ``(ticket, expires_in)``: answer ``{"ticket": ..., "expires_in": ...}``;
            ``expires_in`` is in whole seconds, rounded down.

        Raises:
            ValueError: ``channel`` is empty (validate channel names before calling).
            Whatever the store raises (a :class:`~realtime_lab.errors.BusError`): answer 503.
        """
        if not channel:
            raise ValueError("a ticket needs a channel")
        ticket = secrets.token_urlsafe(_TICKET_BYTES)
        now = self._clock()
        record = _Record(
            state=_LIVE,
            expires_at=now + self.ttl_s,
            until=now + self.ttl_s + self.grace_s,
            user=identity.user,
            scopes=tuple(sorted(identity.scopes)),
            channel=channel,
        )
        await self._store.put_ticket(ticket_key(ticket), record.encode(), record.until - now)
        return ticket, math.floor(self.ttl_s)

    async def redeem(self, ticket: str, channel: str) -> Identity:
        """Spend ``ticket`` to open ``channel``; the identity it was issued to.

        The ticket is spent by this call even when it is refused for the wrong channel.

        Raises:
            Unauthenticated: answer 401 with its ``code``: ``ticket-unknown`` (never issued,
                malformed, or forgotten), ``ticket-used``, ``ticket-expired`` or
                ``ticket-wrong-channel``. The message never contains the ticket.
            Whatever the store raises: answer 503; a ticket taken before the failure is spent.
        """
        if not isinstance(ticket, str) or _TICKET_RE.fullmatch(ticket) is None:
            raise Unauthenticated("unknown ticket", "ticket-unknown")
        key = ticket_key(ticket)
        raw = await self._store.take_ticket(key)
        record = None if raw is None else _Record.decode(raw)
        if raw is None or record is None:
            raise Unauthenticated("unknown ticket", "ticket-unknown")
        now = self._clock()
        left = record.until - now
        if record.state == _USED:
            await self._put_back(key, raw, left)
            raise Unauthenticated("ticket already used", "ticket-used")
        if now >= record.expires_at:
            await self._put_back(key, raw, left)
            raise Unauthenticated("ticket expired", "ticket-expired")
        used = _Record(state=_USED, expires_at=record.expires_at, until=record.until)
        await self._put_back(key, used.encode(), left)
        if record.channel != channel:
            raise Unauthenticated("ticket issued for another channel", "ticket-wrong-channel")
        return Identity(user=record.user, scopes=frozenset(record.scopes))

    async def _put_back(self, key: str, value: bytes, ttl_s: float) -> None:
        # Between the take and this put, a concurrent presentation sees "unknown": it is refused
        # all the same, only the reason is less precise.
        if ttl_s > 0:
            await self._store.put_ticket(key, value, ttl_s)
