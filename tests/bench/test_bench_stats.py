"""The percentile definition the report states (numpy's default, linear interpolation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime_lab.bench.stats import latency_summary, median, percentile, spread


def test_percentile_by_hand() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 25) == 1.75
    assert percentile([7.0], 99) == 7.0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200),
    st.floats(0, 100),
)
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    ordered = sorted(values)
    assert percentile(ordered, q) == pytest.approx(
        float(np.percentile(ordered, q)), rel=1e-9, abs=1e-6
    )


def test_percentile_refuses_no_values_and_bad_q() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)


def test_median_odd_and_even() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError, match="no values"):
        median([])


def test_spread_skips_unmeasured_values() -> None:
    assert spread([3.0, None, 1.0, math.nan, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert spread([None, None]) == {"median": None, "min": None, "max": None}


def test_latency_summary() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100 ms
    summary = latency_summary(reversed(values))
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p95"] == pytest.approx(95.05)
    assert summary["p99"] == pytest.approx(99.01)
    assert summary["max"] == 100.0
    assert summary["count"] == 100
    assert latency_summary([math.nan])["p50"] is None
