"""The open-stream bound, on its own: per client, in total, released exactly once."""

from __future__ import annotations

import pytest

from realtime_lab.transports.problems import HTTPProblem
from realtime_lab.transports.slots import StreamSlots


def test_per_client_and_total_bounds_are_separate_and_counted() -> None:
    slots = StreamSlots(max_total=3, max_per_client=2)
    a1, a2 = slots.claim("a"), slots.claim("a")
    with pytest.raises(HTTPProblem) as refused:
        slots.claim("a")
    assert refused.value.status == 429
    assert refused.value.headers["Retry-After"] == "5"
    b1 = slots.claim("b")
    with pytest.raises(HTTPProblem):
        slots.claim("c")  # the total is reached, whoever asks
    assert slots.refused == {"per-client": 1, "total": 1}
    a1.release()
    a1.release()  # idempotent: one slot back, not two
    assert slots.total == 2
    slots.claim("c")
    with pytest.raises(HTTPProblem):
        slots.claim("a")
    for slot in (a2, b1):
        slot.release()
    assert slots.total == 1


def test_zero_means_unbounded() -> None:
    slots = StreamSlots(max_total=0, max_per_client=0)
    held = [slots.claim("a") for _ in range(1000)]
    assert slots.total == 1000
    for slot in held:
        slot.release()
    assert slots.total == 0
