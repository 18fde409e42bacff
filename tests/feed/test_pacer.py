"""The pacer: one timer for many paced jobs, each at its own pace, no drift, cancellable."""

from __future__ import annotations

import asyncio

import pytest

from realtime_lab.feed.pacer import Pacer

TIMEOUT = 10.0


async def test_jobs_keep_their_pace_and_share_one_timer() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(loop)
    times: dict[str, list[float]] = {"a": [], "b": []}
    finished = loop.create_future()

    def job(name: str, count: int, delay: float):  # type: ignore[no-untyped-def]
        def step() -> float | None:
            times[name].append(loop.time())
            if len(times[name]) == count:
                if len(times["a"]) == 10 and len(times["b"]) == 5:
                    finished.set_result(None)
                return None
            return delay

        return step

    started = loop.time()
    pacer.add(0.0, job("a", 10, 0.01))
    pacer.add(0.0, job("b", 5, 0.02))
    await asyncio.wait_for(finished, TIMEOUT)
    assert len(times["a"]) == 10
    assert len(times["b"]) == 5
    # No drift: the n-th step is due n delays after the first, whatever the calls cost.
    for name, delay in (("a", 0.01), ("b", 0.02)):
        for n, at in enumerate(times[name]):
            assert at >= started + n * delay - 0.002
    assert len(pacer) == 0  # finished jobs leave the heap
    pacer.close()


async def test_a_cancelled_job_is_not_called_again() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(loop)
    calls = 0
    other = loop.create_future()

    def step() -> float | None:
        nonlocal calls
        calls += 1
        return 0.001

    job = pacer.add(0.0, step)
    pacer.add(0.05, lambda: other.set_result(None))  # returns None: runs once
    job.cancel()
    await asyncio.wait_for(other, TIMEOUT)
    assert calls == 0
    pacer.close()


async def test_a_failing_step_ends_only_its_job(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(loop)
    done = loop.create_future()
    count = 0

    def broken() -> float | None:
        raise RuntimeError("boom")

    def fine() -> float | None:
        nonlocal count
        count += 1
        if count == 3:
            done.set_result(None)
            return None
        return 0.001

    pacer.add(0.0, broken)
    pacer.add(0.0, fine)
    await asyncio.wait_for(done, TIMEOUT)
    assert "paced job" in caplog.text
    assert "boom" in caplog.text
    pacer.close()


async def test_a_late_loop_rebases_instead_of_bursting() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(loop, max_lag=0.05)
    times: list[float] = []
    done = loop.create_future()

    def step() -> float | None:
        times.append(loop.time())
        if len(times) == 1:
            # Hold the loop well past max_lag: the next step is re-based on now, not due at once.
            until = loop.time() + 0.2
            while loop.time() < until:
                pass
        if len(times) == 3:
            done.set_result(None)
            return None
        return 0.01

    pacer.add(0.0, step)
    await asyncio.wait_for(done, TIMEOUT)
    assert times[2] - times[1] >= 0.009  # paced again after the stall, not two at once
    pacer.close()


async def test_close_drops_every_job() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(loop)
    called = []
    pacer.add(0.01, lambda: called.append(1))
    pacer.close()
    assert len(pacer) == 0
    pacer.add(0.0, lambda: called.append(2))  # after close: never scheduled
    await asyncio.sleep(0)
    assert called == []


async def test_a_job_never_runs_before_its_due_time_and_near_ones_share_a_wake() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(loop, slack=0.02)
    ran: dict[str, float] = {}
    both = loop.create_future()

    def job(name: str):  # type: ignore[no-untyped-def]
        def step() -> float | None:
            ran[name] = loop.time()
            if len(ran) == 2:
                both.set_result(None)
            return None

        return step

    started = loop.time()
    first, second = pacer.add(0.01, job("first")), pacer.add(0.02, job("second"))
    await asyncio.wait_for(both, TIMEOUT)
    # A chat's first token never comes before its ttft: late by up to the slack, never early.
    assert ran["first"] >= first.due >= started + 0.01
    assert ran["second"] >= second.due >= started + 0.02
    assert abs(ran["first"] - ran["second"]) < 0.005  # one wake (the first's due + slack) ran both
    pacer.close()
