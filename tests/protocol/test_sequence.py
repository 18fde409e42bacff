"""The sequence-continuity rule (protocol/sequence.py) against the shared table.

``sequence_cases.json`` is the one table every implementation of the rule is tested against (this
module, ``tests/js/sequence.test.mjs`` for the dashboard's copy, ``tests/bench`` for the load
clients). Each case: ``after`` (the start position, or null), ``events`` (``{"id", "reset"}``, or
``{"forget": true}`` for a call of ``forget()``), the ``verdicts`` of the events in order (null for
a forget) and the ``counts`` after the last one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from realtime_lab.errors import InvalidCursor
from realtime_lab.protocol.cursor import parse_id
from realtime_lab.protocol.sequence import MAX_SKIPPED_RANGES, Sequence, Verdict

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).with_name("sequence_cases.json")).read_text(encoding="utf-8")
)


def counts(sequence: Sequence) -> dict[str, int]:
    return {
        "gaps": sequence.gaps,
        "duplicates": sequence.duplicates,
        "reordered": sequence.reordered,
        "resets": sequence.resets,
    }


def run_case(case: dict[str, Any]) -> tuple[list[str | None], Sequence]:
    sequence = Sequence(case["after"])
    verdicts: list[str | None] = []
    for event in case["events"]:
        if event.get("forget"):
            sequence.forget()
            verdicts.append(None)
        else:
            verdicts.append(sequence.observe(event["id"], reset=event["reset"]))
    return verdicts, sequence


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_table(case: dict[str, Any]) -> None:
    verdicts, sequence = run_case(case)
    assert verdicts == case["verdicts"]
    assert counts(sequence) == case["counts"]


def _seq_or_foreign(event_id: str) -> tuple[str | None, int]:
    try:
        cursor = parse_id(event_id)
    except InvalidCursor:
        return None, -1
    return cursor.epoch, cursor.seq


def _one_epoch(case: dict[str, Any]) -> bool:
    """Whether the epoch changes only where a reset (or a forget) says so."""
    epoch = _seq_or_foreign(case["after"])[0] if case["after"] is not None else None
    for event in case["events"]:
        if event.get("forget"):
            epoch = None
            continue
        this = _seq_or_foreign(event["id"])[0]
        if this is not None and not event["reset"] and epoch not in (None, this):
            return False
        if this is not None and (event["reset"] or epoch is None):
            epoch = this
    return True


SEQ_CASES = [c for c in CASES if _one_epoch(c)]


@pytest.mark.parametrize("case", SEQ_CASES, ids=[c["name"] for c in SEQ_CASES])
def test_the_seq_fast_path_follows_the_same_table(case: dict[str, Any]) -> None:
    """``observe_seq`` is ``observe`` for one epoch: same verdicts, same counts."""
    sequence = Sequence()
    if case["after"] is not None:
        start = _seq_or_foreign(case["after"])[1]
        if start >= 0:
            sequence.start_at(start)
    verdicts: list[str | None] = []
    for event in case["events"]:
        if event.get("forget"):
            sequence.forget()
            verdicts.append(None)
        else:
            seq = _seq_or_foreign(event["id"])[1]
            verdicts.append(sequence.observe_seq(seq, reset=event["reset"]))
    assert verdicts == case["verdicts"]
    assert counts(sequence) == case["counts"]


def test_the_table_covers_every_verdict_and_the_bound() -> None:
    seen = {v for case in CASES for v in case["verdicts"]}
    assert seen == {*Verdict, None}
    assert len({c["name"] for c in CASES}) == len(CASES)
    assert max(c["counts"]["gaps"] for c in CASES) > MAX_SKIPPED_RANGES
    for case in CASES:
        assert len(case["verdicts"]) == len(case["events"]), case["name"]


def test_verdicts_are_strings() -> None:
    assert Sequence().observe("a-1") == "new"
    assert Sequence().observe("a-1", reset=True) == "reset"
    assert Verdict("reordered") is Verdict.REORDERED


def test_the_position_is_readable() -> None:
    sequence = Sequence("k3x9-41")
    assert (sequence.epoch, sequence.last) == ("k3x9", 41)
    sequence.observe("k3x9-45")
    assert (sequence.epoch, sequence.last) == ("k3x9", 45)
    assert sequence.skipped == ((42, 44),)
    sequence.observe("k3x9-43")
    assert sequence.skipped == ((42, 42), (44, 44))
    sequence.forget()
    assert (sequence.epoch, sequence.last, sequence.skipped) == (None, None, ())


def test_the_record_drops_its_oldest_range() -> None:
    sequence = Sequence("a-0")
    for k in range(1, MAX_SKIPPED_RANGES + 4):  # 2, 4, 6, ...: skips 1, 3, 5, ...
        sequence.observe(f"a-{2 * k}")
    assert len(sequence.skipped) == MAX_SKIPPED_RANGES
    assert sequence.skipped[0] == (7, 7)  # 1, 3 and 5 were dropped


def test_the_largest_seq_is_exact() -> None:
    top = 10**18 - 1
    sequence = Sequence(f"a-{top - 3}")
    assert sequence.observe(f"a-{top}") is Verdict.NEW
    assert sequence.gaps == 2
    assert sequence.observe(f"a-{top - 1}") is Verdict.REORDERED


def test_the_seq_fast_path_calls_a_negative_seq_foreign() -> None:
    sequence = Sequence()
    assert sequence.observe_seq(-1) is Verdict.FOREIGN
    assert sequence.observe_seq(-1, reset=True) is Verdict.FOREIGN
    assert sequence.last is None
    assert sequence.resets == 0


@given(st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=200))
def test_what_is_delivered_is_increasing_and_the_counts_add_up(seqs: list[int]) -> None:
    sequence = Sequence()
    delivered: list[int] = []
    for seq in seqs:
        verdict = sequence.observe(f"e-{seq}")
        if verdict is Verdict.NEW:
            delivered.append(seq)
    assert delivered == sorted(set(delivered))
    assert delivered[0] == seqs[0]
    assert sequence.duplicates + sequence.reordered + len(delivered) == len(seqs)
    # One gap per id between the first and the highest that was never delivered in place.
    assert sequence.gaps == delivered[-1] - delivered[0] + 1 - len(delivered)
    assert sequence.reordered <= sequence.gaps
