"""Write coalescing in the broadcast: one write per event while the server keeps up, a bounded
window only while it is behind.

The broadcast times its flushes with ``time.perf_counter``; here a fake clock stands in, and
each fake socket write advances it, so "a fan-out that takes 18 ms" is a number, not a load.
"""

from __future__ import annotations

import asyncio

import pytest

from realtime_lab.protocol.envelope import Event
from realtime_lab.transports import broadcast
from realtime_lab.transports.broadcast import Broadcast, Broadcasts
from realtime_lab.transports.chaos import Chaos


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTransport:
    """Records writes; each one costs ``cost`` seconds of the fake clock."""

    def __init__(self, clock: Clock, cost: float) -> None:
        self.clock = clock
        self.cost = cost
        self.writes: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.clock.now += self.cost

    def get_write_buffer_size(self) -> int:
        return 0


class FakeConn:
    """The part of a StreamConnection a steady broadcast member uses."""

    def __init__(self, ident: int, transport: FakeTransport) -> None:
        self.id = ident
        self.socket = transport
        self.steady = True
        self.send_buffer = 1 << 20
        self.last_id: str | None = None

    def join(self, group: Broadcast) -> None:
        pass

    def leave(self, group: Broadcast) -> None:
        pass


def event(seq: int) -> Event:
    return Event("t", f"e1-{seq}", "token", {"text": str(seq)}, 0.0, seq)


def frame(e: Event) -> bytes:
    return f"[{e.seq}]".encode()


async def fan_out(
    monkeypatch: pytest.MonkeyPatch, window_ms: float, members: int, write_cost: float
) -> tuple[Broadcast, Clock, FakeTransport]:
    clock = Clock()
    monkeypatch.setattr(broadcast.time, "perf_counter", clock)
    owner = Broadcasts(bus=None, chaos=Chaos(), coalesce_ms=window_ms)  # type: ignore[arg-type]
    group = Broadcast(owner, "t", "sse", frame)
    shared = FakeTransport(clock, write_cost)
    for i in range(members):
        group.add(FakeConn(i, shared), "e1", 0)  # type: ignore[arg-type]
    return group, clock, shared


class Run:
    """What a simulated run did: how each flush was scheduled, and how many events it wrote."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.batches: list[int] = []
        self.worst_wait = 0.0  # longest time from an event being due to its flush finishing


async def simulate(group: Broadcast, clock: Clock, seqs: range, gap: float) -> Run:
    """Events due every ``gap`` s of the fake clock, delivered as a producer on the loop would.

    Every event already due when the loop is free arrives before the pending flush runs (a
    fan-out longer than ``gap`` makes the producer catch up in a burst); a window's timer fires
    ``window`` later, after the events due by then.
    """
    run = Run()
    t0 = clock.now

    def due(seq: int) -> float:
        return t0 + (seq - seqs.start + 1) * gap

    seq = seqs.start
    while seq < seqs.stop:
        clock.now = max(clock.now, due(seq))
        first = seq
        while seq < seqs.stop and due(seq) <= clock.now:
            group.deliver(event(seq))
            seq += 1
        handle = group._handle
        # A window's flush is the group's own timer; a next-turn flush is batched by the owner.
        assert group._scheduled
        run.kinds.append(type(handle).__name__ if handle is not None else "Handle")
        written = group.stream_events
        if isinstance(handle, asyncio.TimerHandle):
            clock.now += group._owner.window
            while seq < seqs.stop and due(seq) <= clock.now:
                group.deliver(event(seq))
                seq += 1
            group.flush()
        else:
            await asyncio.sleep(0)  # the call_soon flush runs here
        while group._rest is not None:  # a large fan-out is written a slice per loop turn
            await asyncio.sleep(0)
        run.batches.append(group.stream_events - written)
        run.worst_wait = max(run.worst_wait, clock.now - due(first))
    return run


async def test_keeping_up_writes_each_event_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1,000 members at 6.5 us per write: a 6.5 ms fan-out, longer than the 5 ms window but
    # shorter than the 10 ms between events. Nothing queues behind it, so nothing waits.
    group, clock, shared = await fan_out(monkeypatch, 5.0, 1000, 6.5e-6)
    run = await simulate(group, clock, range(1, 101), gap=0.010)
    assert set(run.kinds) == {"Handle"}  # call_soon every time, never the window's timer
    assert set(run.batches) == {1}
    assert len(shared.writes) == 100 * 1000
    assert run.worst_wait == pytest.approx(0.0065)


async def test_behind_uses_the_window_and_joins_pending_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 3,000 members: an 18 ms fan-out against events 10 ms apart. The server is behind.
    group, clock, shared = await fan_out(monkeypatch, 5.0, 3000, 6e-6)
    run = await simulate(group, clock, range(1, 201), gap=0.010)
    assert "TimerHandle" in run.kinds[-20:]  # once the average gap is known, the window opens
    assert max(run.batches) >= 2  # events within it share one write per member
    assert len(shared.writes) < 200 * 3000 * 0.7
    assert run.worst_wait < 0.050  # bounded: the backlog does not grow


async def test_without_a_window_a_backlog_still_shares_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    group, clock, _ = await fan_out(monkeypatch, 0.0, 3000, 6e-6)
    run = await simulate(group, clock, range(1, 201), gap=0.010)
    assert set(run.kinds) == {"Handle"}  # no timer, ever
    assert max(run.batches) >= 2  # what piled up during a fan-out goes out in one write
    assert run.worst_wait < 0.050


async def test_back_to_one_write_per_event_when_load_drops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    group, clock, shared = await fan_out(monkeypatch, 5.0, 3000, 6e-6)
    run = await simulate(group, clock, range(1, 201), gap=0.010)
    assert "TimerHandle" in run.kinds[-20:]
    shared.cost = 1e-6  # the fan-out now takes 3 ms
    run = await simulate(group, clock, range(201, 221), gap=0.010)
    assert run.kinds[-10:] == ["Handle"] * 10
    assert run.batches[-10:] == [1] * 10


class OwnTransport(FakeTransport):
    """One member's socket (the shared one cannot tell members apart)."""


async def test_a_large_fan_out_is_written_a_slice_per_loop_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1,200 members: 500 written by the flush, the rest on the next two loop turns, so a request
    # waiting on the loop (a publisher's next event) is served in between.
    group, clock, _ = await fan_out(monkeypatch, 0.0, 0, 0.0)
    sockets = [OwnTransport(clock, 0.0) for _ in range(1200)]
    for i, sock in enumerate(sockets):
        group.add(FakeConn(i, sock), "e1", 0)  # type: ignore[arg-type]
    group.deliver(event(1))
    group.flush()
    assert sum(len(s.writes) for s in sockets) == broadcast.SLICE
    # Events arriving during the fan-out wait for it, then go out together in one write each.
    group.deliver(event(2))
    group.deliver(event(3))
    # A member that leaves before its slice is written what it was counted for first.
    leaving = group.members[1100]
    group.remove(leaving)
    assert sockets[1100].writes == [b"[1]"]
    for _ in range(20):
        await asyncio.sleep(0)
        if group._rest is None and not group.pending and all(len(s.writes) == 2 for s in sockets):
            break
    assert sockets[1100].writes == [b"[1]"]  # gone: not written again
    others = [s for i, s in enumerate(sockets) if i != 1100]
    assert all(s.writes == [b"[1]", b"[2][3]"] for s in others)
    assert group.stream_events == 3


async def test_closing_mid_fan_out_writes_the_rest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    group, clock, _ = await fan_out(monkeypatch, 0.0, 0, 0.0)
    sockets = [OwnTransport(clock, 0.0) for _ in range(1100)]
    conns = [FakeConn(i, sock) for i, sock in enumerate(sockets)]
    closed: list[str] = []
    for conn in conns:
        conn.close = closed.append  # type: ignore[attr-defined]
        group.add(conn, "e1", 0)  # type: ignore[arg-type]
    group.deliver(event(1))
    group.flush()
    group.close("expired")
    assert all(s.writes == [b"[1]"] for s in sockets)
    assert closed == ["expired"] * 1100
