"""Percentiles and the median/min/max summaries the report prints.

Small and pure on purpose: the percentile definition is the one the report states (linear
interpolation between closest ranks, numpy's default ``method="linear"``), and the tests pin it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Final, TypedDict


class Spread(TypedDict):
    """A measure over repeated runs: the median, with the min and max beside it."""

    median: float | None
    min: float | None
    max: float | None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ascending ``sorted_values``, linearly interpolated.

    Raises:
        ValueError: no values, or ``q`` outside 0..100.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    frac = rank - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * frac


def median(values: Iterable[float]) -> float:
    """The median (the mean of the two middle values for an even count).

    Raises:
        ValueError: no values.
    """
    ordered = sorted(values)
    return percentile(ordered, 50.0)


def latency_summary(values: Iterable[float]) -> dict[str, float | None]:
    """``p50``, ``p95``, ``p99``, ``max`` and ``count`` of latencies in ms (``None`` when empty)."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return {"p50": None, "p95": None, "p99": None, "max": None, "count": 0}
    return {
        "p50": percentile(ordered, 50.0),
        "p95": percentile(ordered, 95.0),
        "p99": percentile(ordered, 99.0),
        "max": ordered[-1],
        "count": float(len(ordered)),
    }


def spread(values: Iterable[float | None]) -> Spread:
    """Median, min and max of the measured values; ``None`` values (not measured) are skipped."""
    present = sorted(v for v in values if v is not None and not math.isnan(v))
    if not present:
        return {"median": None, "min": None, "max": None}
    return {"median": percentile(present, 50.0), "min": present[0], "max": present[-1]}


#: The measures of one run, in report order: (key, label, unit).
MEASURES: Final = (
    ("events_per_s", "delivered events/s", "events/s"),
    ("p50_ms", "delivery latency p50", "ms"),
    ("p95_ms", "delivery latency p95", "ms"),
    ("p99_ms", "delivery latency p99", "ms"),
    ("max_ms", "delivery latency max", "ms"),
    ("ttft_ms", "time to first token (median)", "ms"),
    ("ttft_p99_ms", "time to first token p99", "ms"),
    ("gap_p99_ms", "gap between a stream's tokens p99", "ms"),
    ("chats_per_s", "chats read to their end per second", "chats/s"),
    ("cpu_us_per_token", "server CPU per delivered token", "µs"),
    ("rss_mb", "server RSS at the end of the window", "MiB"),
    ("bytes_per_token", "bytes on the wire (both ways) per delivered token", "bytes"),
    ("requests_per_token", "HTTP requests per delivered token", "requests"),
    ("cpu_s_per_1k", "server CPU seconds per 1,000 deliveries", "s"),
    ("rss_kb_per_conn", "server RSS per open connection", "KiB"),
    ("lost", "events lost", "events"),
    ("dup", "events duplicated", "events"),
    ("reordered", "events out of order", "events"),
)
