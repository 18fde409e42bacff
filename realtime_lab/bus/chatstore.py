"""Chats shared between processes: what a bus backend keeps of them besides their events.

A chat runs on one process, but its client may reach any process behind the load balancer. A
backend that several processes share (Redis) offers a :class:`ChatStore`
(:meth:`~realtime_lab.bus.broker.Broker.chat_store`): the chat's record (id, owner, prompt,
status, the generating process, ...), the generating processes' leases, and the one atomic step
that ends an orphaned chat. The embedded broker offers none: one process knows all its chats.

Leases are per process, not per chat: each process renews one lease every
:data:`LEASE_RENEW_S` (it lasts :data:`LEASE_TTL_S`) and lists the chats it generates; a process
whose lease passed is dead, and any other process ends each of its running chats once, with
``end`` and reason ``error`` (:meth:`ChatStore.end_orphan`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

#: How often a process renews its lease (and looks for dead ones).
LEASE_RENEW_S: Final = 1.0
#: How long a lease lasts unrenewed: a generator dead this long has its chats ended.
LEASE_TTL_S: Final = 3.0
#: Dead processes handled per renewal (the rest wait for the next one).
DEAD_BATCH: Final = 16


@dataclass(slots=True)
class Renewal:
    """What renewing a lease found.

    ``lapsed``: this process's own lease had passed before the renewal (a stall, an outage):
    others may have ended its chats, so check them. ``dead``: processes whose lease passed (up to
    :data:`DEAD_BATCH`; whoever forgets one first drops it, so not every process sees each).
    ``gone``: those of the processes the renewal was asked to ``watch`` that have no live lease.
    """

    lapsed: bool = False
    dead: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)


class ChatStore(Protocol):
    """Chat records and generator leases in a shared backend (see the module docstring)."""

    async def put(
        self,
        chat_id: str,
        fields: Mapping[str, str],
        ttl_s: float,
        *,
        process: str,
        running: bool,
    ) -> None:
        """Store (merge) the chat's record, kept ``ttl_s`` more; list it as ``process``'s
        running chat while ``running``, unlist it otherwise."""
        ...

    async def get(self, chat_id: str) -> dict[str, str] | None:
        """The chat's record, or ``None`` when no process has it (never, or expired)."""
        ...

    async def renew(self, process: str, ttl_s: float, watch: Collection[str] = ()) -> Renewal:
        """Extend ``process``'s lease to ``ttl_s`` from now; say what the renewal found, and
        which of the processes in ``watch`` are gone (in the same round trip)."""
        ...

    async def orphans(self, process: str) -> list[str]:
        """The chats a (dead) process listed as running."""
        ...

    async def end_orphan(self, chat_id: str, process: str) -> bool:
        """If the chat still runs on ``process`` and its channel has no ``end``: publish its
        ``end`` (reason ``error``) and mark it ``error``, atomically, so that of all the
        processes that try, one does. ``True`` when this call ended it."""
        ...

    async def forget(self, process: str, chat_ids: list[str]) -> None:
        """Unlist ``chat_ids`` of a dead process, and drop the process once its lease is still
        passed (a process that came back renewed it and is kept)."""
        ...

    async def leave(self, process: str) -> None:
        """Drop this process's lease at a clean shutdown (its chats have ended)."""
        ...
