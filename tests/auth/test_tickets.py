"""Tickets: single use, bound to user and channel, expiring, and kept only as hashes."""

from __future__ import annotations

import asyncio

import pytest

from realtime_lab.auth.tickets import (
    DEFAULT_GRACE_S,
    MemoryTicketStore,
    Tickets,
    TicketStore,
    ticket_key,
)
from realtime_lab.auth.tokens import PUBLISH, Identity
from realtime_lab.errors import Unauthenticated

ALICE = Identity("alice", frozenset({PUBLISH}))


class Clock:
    """A hand-driven clock shared by the tickets and their store."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SpyStore:
    """A :class:`TicketStore` that records every call."""

    def __init__(self, clock: Clock) -> None:
        self.inner = MemoryTicketStore(clock)
        self.puts: list[tuple[str, bytes, float]] = []
        self.takes: list[str] = []

    async def put_ticket(self, key: str, value: bytes, ttl_s: float) -> None:
        self.puts.append((key, value, ttl_s))
        await self.inner.put_ticket(key, value, ttl_s)

    async def take_ticket(self, key: str) -> bytes | None:
        self.takes.append(key)
        return await self.inner.take_ticket(key)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> SpyStore:
    return SpyStore(clock)


@pytest.fixture
def tickets(store: SpyStore, clock: Clock) -> Tickets:
    return Tickets(store, clock=clock)


async def refused(tickets: Tickets, ticket: str, channel: str, code: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        await tickets.redeem(ticket, channel)
    assert info.value.code == code
    assert ticket not in str(info.value)
    return info.value


def test_stores_satisfy_the_protocol(store: SpyStore) -> None:
    checked: list[TicketStore] = [store, store.inner]  # mypy checks the protocol here
    assert len(checked) == 2


async def test_issue_then_redeem_gives_back_the_identity(tickets: Tickets) -> None:
    ticket, expires_in = await tickets.issue(ALICE, "chat.1")
    assert expires_in == 30
    assert await tickets.redeem(ticket, "chat.1") == ALICE


async def test_tickets_are_long_random_and_url_safe(tickets: Tickets) -> None:
    issued = {(await tickets.issue(ALICE, "c"))[0] for _ in range(50)}
    assert len(issued) == 50
    for ticket in issued:
        assert len(ticket) >= 32
        assert ticket.replace("-", "").replace("_", "").isalnum()


async def test_store_holds_only_a_hash_of_the_ticket(tickets: Tickets, store: SpyStore) -> None:
    ticket, _ = await tickets.issue(ALICE, "c")
    [(key, value, _ttl)] = store.puts
    assert key == ticket_key(ticket)
    assert len(key) == 64
    assert ticket not in key
    assert ticket.encode() not in value
    await tickets.redeem(ticket, "c")
    for key, value, _ttl in store.puts:
        assert ticket not in key
        assert ticket.encode() not in value


async def test_second_redemption_is_refused_as_used(tickets: Tickets) -> None:
    ticket, _ = await tickets.issue(ALICE, "c")
    await tickets.redeem(ticket, "c")
    for _ in range(3):  # and it stays "used", not "unknown"
        await refused(tickets, ticket, "c", "ticket-used")


async def test_concurrent_redemptions_let_exactly_one_through(tickets: Tickets) -> None:
    ticket, _ = await tickets.issue(ALICE, "c")
    results = await asyncio.gather(
        *(tickets.redeem(ticket, "c") for _ in range(20)), return_exceptions=True
    )
    assert sum(isinstance(r, Identity) for r in results) == 1
    assert all(isinstance(r, Identity | Unauthenticated) for r in results)


async def test_wrong_channel_is_refused_and_spends_the_ticket(tickets: Tickets) -> None:
    ticket, _ = await tickets.issue(ALICE, "user.alice")
    await refused(tickets, ticket, "user.bob", "ticket-wrong-channel")
    await refused(tickets, ticket, "user.alice", "ticket-used")


async def test_ticket_is_valid_until_its_ttl(tickets: Tickets, clock: Clock) -> None:
    ticket, _ = await tickets.issue(ALICE, "c")
    clock.advance(29.9)
    assert await tickets.redeem(ticket, "c") == ALICE


async def test_expired_ticket_is_refused_as_expired(tickets: Tickets, clock: Clock) -> None:
    ticket, _ = await tickets.issue(ALICE, "c")
    clock.advance(30.0)
    await refused(tickets, ticket, "c", "ticket-expired")
    await refused(tickets, ticket, "c", "ticket-expired")  # still the precise reason


async def test_expired_ticket_for_another_channel_says_expired(
    tickets: Tickets, clock: Clock
) -> None:
    ticket, _ = await tickets.issue(ALICE, "c")
    clock.advance(31)
    await refused(tickets, ticket, "other", "ticket-expired")


async def test_records_are_forgotten_after_the_grace_period(
    tickets: Tickets, clock: Clock, store: SpyStore
) -> None:
    expired, _ = await tickets.issue(ALICE, "c")
    used, _ = await tickets.issue(ALICE, "c")
    await tickets.redeem(used, "c")
    clock.advance(30 + DEFAULT_GRACE_S)
    await refused(tickets, expired, "c", "ticket-unknown")
    await refused(tickets, used, "c", "ticket-unknown")
    assert len(store.inner) == 0


async def test_every_key_lives_at_most_ttl_plus_grace(
    tickets: Tickets, clock: Clock, store: SpyStore
) -> None:
    deadline = clock.now + 30 + DEFAULT_GRACE_S
    expired, _ = await tickets.issue(ALICE, "c")
    used, _ = await tickets.issue(ALICE, "c")
    clock.advance(10)
    await tickets.redeem(used, "c")
    await refused(tickets, used, "c", "ticket-used")
    clock.advance(25)
    await refused(tickets, expired, "c", "ticket-expired")
    start = 1_700_000_000.0
    assert store.puts
    assert all(ttl > 0 for _, _, ttl in store.puts)
    # Each put's end of life, from the time it was made, never passes the first deadline.
    times = [start, start, start + 10, start + 10, start + 35]
    for (_, _, ttl), at in zip(store.puts, times, strict=True):
        assert at + ttl <= deadline + 1e-6


async def test_never_issued_ticket_is_unknown(tickets: Tickets) -> None:
    await refused(tickets, "A" * 43, "c", "ticket-unknown")


@pytest.mark.parametrize(
    "ticket", ["", "short", "a" * 31, "a" * 129, "a" * 100_000, "ab+/=" * 10, "é" * 40, " " * 40]
)
async def test_malformed_ticket_is_unknown_without_touching_the_store(
    tickets: Tickets, store: SpyStore, ticket: str
) -> None:
    with pytest.raises(Unauthenticated) as info:
        await tickets.redeem(ticket, "c")
    assert info.value.code == "ticket-unknown"
    assert store.takes == []


async def test_corrupt_record_is_unknown(tickets: Tickets, store: SpyStore) -> None:
    ticket = "B" * 43
    for raw in [
        b"",
        b"not json",
        b"[]",
        b'{"state": "live"}',
        b'{"state":"odd","exp":1,"until":2}',
        b"\xff\xfe",
        # Well formed but for its state: must not pass as a live ticket.
        b'{"state":"odd","exp":1e10,"until":1e10,"user":"alice","scopes":[],"channel":"c"}',
        b'{"state":"live","exp":1e10,"until":1e10,"user":"a b","scopes":[],"channel":"c"}',
        b'{"state":"live","exp":1e10,"until":1e10,"user":"alice","scopes":[1],"channel":"c"}',
        b'{"state":"live","exp":1e10,"until":1e10,"user":"alice","scopes":[],"channel":7}',
        b'{"state":"live","exp":"soon","until":1e10,"user":"alice","scopes":[],"channel":"c"}',
    ]:
        await store.inner.put_ticket(ticket_key(ticket), raw, 60)
        await refused(tickets, ticket, "c", "ticket-unknown")


async def test_record_written_by_hand_redeems(tickets: Tickets, store: SpyStore) -> None:
    # The same shape as the corrupt cases above, but valid: the refusals are for the flaws.
    ticket = "C" * 43
    raw = b'{"state":"live","exp":1e10,"until":1e10,"user":"alice","scopes":[],"channel":"c"}'
    await store.inner.put_ticket(ticket_key(ticket), raw, 60)
    assert await tickets.redeem(ticket, "c") == Identity("alice")


async def test_ticket_carries_the_scopes_it_was_issued_with(tickets: Tickets) -> None:
    bare = Identity("bob")
    t1, _ = await tickets.issue(bare, "c")
    t2, _ = await tickets.issue(ALICE, "c")
    assert await tickets.redeem(t1, "c") == bare
    assert (await tickets.redeem(t2, "c")).has(PUBLISH)


async def test_custom_ttl(store: SpyStore, clock: Clock) -> None:
    tickets = Tickets(store, ttl_s=5.5, clock=clock)
    ticket, expires_in = await tickets.issue(ALICE, "c")
    assert expires_in == 5  # rounded down: never promise more than there is
    clock.advance(5.6)
    await refused(tickets, ticket, "c", "ticket-expired")


@pytest.mark.parametrize("ttl", [0, 0.5, -1, float("inf"), float("nan")])
def test_bad_ttl_is_refused(store: SpyStore, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        Tickets(store, ttl_s=ttl)


async def test_empty_channel_is_refused(tickets: Tickets) -> None:
    with pytest.raises(ValueError, match="channel"):
        await tickets.issue(ALICE, "")


# --- the in-memory store ---------------------------------------------------------------------


async def test_memory_store_take_is_get_and_delete(clock: Clock) -> None:
    store = MemoryTicketStore(clock)
    await store.put_ticket("k", b"v", 10)
    assert await store.take_ticket("k") == b"v"
    assert await store.take_ticket("k") is None
    assert await store.take_ticket("never") is None


async def test_memory_store_forgets_after_ttl(clock: Clock) -> None:
    store = MemoryTicketStore(clock)
    await store.put_ticket("k", b"v", 10)
    await store.put_ticket("j", b"w", 10)
    clock.advance(9.9)
    assert await store.take_ticket("k") == b"v"
    clock.advance(0.1)
    assert await store.take_ticket("j") is None


async def test_memory_store_put_replaces(clock: Clock) -> None:
    store = MemoryTicketStore(clock)
    await store.put_ticket("k", b"old", 1)
    await store.put_ticket("k", b"new", 10)
    clock.advance(5)
    assert await store.take_ticket("k") == b"new"


async def test_memory_store_memory_stays_bounded(clock: Clock) -> None:
    store = MemoryTicketStore(clock)
    for round_ in range(20):
        for i in range(500):
            await store.put_ticket(f"{round_}-{i}", b"v", 1)
        clock.advance(2)
    assert len(store) <= 1000  # only about the last round is alive
