"""De-duplication, gap counting and statistics, without a server.

The rule itself is protocol/sequence.py's, tested against tests/protocol/sequence_cases.json;
here the same table checks what the client makes of its verdicts (yield or drop, which counter).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from realtime_lab.clients import ClientStats, Sequencer
from realtime_lab.clients.stats import MAX_LATENCIES, percentile
from realtime_lab.protocol.envelope import Event

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parents[1] / "protocol" / "sequence_cases.json").read_text(encoding="utf-8")
)


def ev(event_id: str, type_: str = "token") -> Event:
    seq = event_id.rpartition("-")[2]
    return Event("c", event_id, type_, {}, 0.0, int(seq) if seq.isdigit() else 0)


def feed(sequencer: Sequencer, *ids: str) -> list[str]:
    """The ids the sequencer lets through (an id starting with '!' is a reset)."""
    passed = []
    for raw in ids:
        event = ev(raw[1:], "reset") if raw.startswith("!") else ev(raw)
        if sequencer.accept(event):
            passed.append(raw)
    return passed


def test_in_order_events_pass_and_count_nothing() -> None:
    stats = ClientStats()
    assert feed(Sequencer(stats), "a-1", "a-2", "a-3") == ["a-1", "a-2", "a-3"]
    assert (stats.gaps, stats.duplicates, stats.resets, stats.out_of_order) == (0, 0, 0, 0)


def test_duplicates_are_dropped_and_counted() -> None:
    stats = ClientStats()
    passed = feed(Sequencer(stats), "a-1", "a-2", "a-2", "a-1", "a-3", "a-3")
    assert passed == ["a-1", "a-2", "a-3"]
    assert stats.duplicates == 3
    assert stats.gaps == 0


def test_a_jump_counts_one_gap_per_skipped_id_and_the_event_is_yielded() -> None:
    stats = ClientStats()
    assert feed(Sequencer(stats), "a-1", "a-4", "a-5", "a-9") == ["a-1", "a-4", "a-5", "a-9"]
    assert stats.gaps == 2 + 3  # 2-3, then 6-8


def test_a_late_event_is_out_of_order_once_then_a_duplicate() -> None:
    stats = ClientStats()
    passed = feed(Sequencer(stats), "a-1", "a-4", "a-3", "a-3", "a-2", "a-1")
    assert passed == ["a-1", "a-4"]  # never yielded after a later one: order is kept
    assert stats.gaps == 2  # a-2 and a-3 were skipped; filling them later does not undo that
    assert stats.out_of_order == 2  # a-3, a-2 filled the reported gap
    assert stats.duplicates == 2  # the second a-3, and a-1


def test_the_resume_position_is_the_starting_point() -> None:
    stats = ClientStats()
    assert feed(Sequencer(stats, after="a-5"), "a-5", "a-6", "a-8") == ["a-6", "a-8"]
    assert stats.duplicates == 1
    assert stats.gaps == 1


@pytest.mark.parametrize("after", [None, "", "now"])
def test_without_a_resume_position_the_first_event_sets_the_base(after: str | None) -> None:
    stats = ClientStats()
    assert feed(Sequencer(stats, after=after), "a-40", "a-41") == ["a-40", "a-41"]
    assert stats.gaps == 0


def test_a_reset_rebases_on_its_own_id() -> None:
    stats = ClientStats()
    # History was trimmed (same epoch, later position), then the client went back to a new life.
    passed = feed(Sequencer(stats), "a-1", "a-2", "!a-10", "a-11", "!b-0", "b-1", "b-2")
    assert passed == ["a-1", "a-2", "!a-10", "a-11", "!b-0", "b-1", "b-2"]
    assert stats.resets == 2
    assert stats.gaps == 0
    assert stats.duplicates == 0


def test_a_reset_can_move_the_position_back() -> None:
    stats = ClientStats()
    # Resumed from a future id: the reset points before the oldest retained event.
    assert feed(Sequencer(stats, after="a-50"), "!a-0", "a-1", "a-2") == ["!a-0", "a-1", "a-2"]
    assert stats.duplicates == 0


def test_an_epoch_change_without_a_reset_is_a_gap() -> None:
    stats = ClientStats()
    assert feed(Sequencer(stats), "a-1", "a-2", "b-1", "b-2", "a-3") == [
        "a-1",
        "a-2",
        "b-1",
        "b-2",
        "a-3",
    ]
    assert stats.gaps == 2
    assert stats.resets == 0


def test_a_foreign_id_is_yielded_and_counted_nowhere() -> None:
    stats = ClientStats()
    assert feed(Sequencer(stats), "a-1", "not-an-id!", "a-2") == ["a-1", "not-an-id!", "a-2"]
    assert (stats.gaps, stats.duplicates, stats.resets, stats.out_of_order) == (0, 0, 0, 0)


def test_forget_starts_over() -> None:
    stats = ClientStats()
    sequencer = Sequencer(stats, after="a-5")
    sequencer.forget()
    assert feed(sequencer, "b-1", "b-2") == ["b-1", "b-2"]
    assert stats.gaps == 0


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_shared_table(case: dict[str, Any]) -> None:
    stats = ClientStats()
    sequencer = Sequencer(stats, after=case["after"])
    for event, verdict in zip(case["events"], case["verdicts"], strict=True):
        if event.get("forget"):
            sequencer.forget()
            continue
        passed = sequencer.accept(ev(event["id"], "reset" if event["reset"] else "token"))
        assert passed == (verdict in ("new", "reset", "foreign")), (event, verdict)
    expected = case["counts"]
    assert (stats.gaps, stats.duplicates, stats.out_of_order, stats.resets) == (
        expected["gaps"],
        expected["duplicates"],
        expected["reordered"],
        expected["resets"],
    )


def test_summary_has_percentiles_and_every_counter() -> None:
    stats = ClientStats(transport="sse", events=100, requests=1)
    for ms in range(1, 101):
        stats.add_latency(float(ms))
    summary = stats.summary()
    assert summary["latency_p50_ms"] == 50.0
    assert summary["latency_p95_ms"] == 95.0
    assert summary["latency_p99_ms"] == 99.0
    assert summary["latency_max_ms"] == 100.0
    assert summary["events"] == 100
    assert summary["transport"] == "sse"
    assert "latencies_ms" not in summary
    assert "sse: 100 events" in stats.format()


def test_summary_without_events() -> None:
    summary = ClientStats().summary()
    assert summary["latency_p50_ms"] is None
    assert summary["first_event_s"] is None
    assert percentile([], 50) is None


def test_latencies_stay_bounded() -> None:
    stats = ClientStats()
    for ms in range(3 * MAX_LATENCIES):
        stats.add_latency(float(ms))
    assert len(stats.latencies_ms) <= MAX_LATENCIES * 1.1
    assert stats.latencies_ms[-1] == 3 * MAX_LATENCIES - 1
    assert stats.summary()["latency_max_ms"] == 3 * MAX_LATENCIES - 1
