"""ExpHistogram against its exact twin: bucket layout, counters, merges, quantiles, JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import _reference as ref
from pipelines.histogram import (
    ExpHistogram,
    _largest_float_below_root,
    bucket_indices,
    relative_error,
)

SETTINGS = settings(max_examples=60, deadline=None)

positive = st.floats(min_value=5e-324, max_value=1.7e308, allow_nan=False, allow_infinity=False)
anything = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=1e-3, max_value=1e4),
    st.sampled_from([0.0, -0.0, -1.0, 1.0, 2.0, 0.5, 1024.0, math.nan, math.inf, 5e-324]),
)


def _same(hist: ExpHistogram, twin: ref.RefHistogram) -> None:
    assert hist.scale == twin.scale
    assert hist.bucket_counts() == twin.buckets
    assert hist.zero_count == twin.zero_count
    assert hist.nan_count == twin.nan_count
    assert hist.n == twin.n
    assert hist.deadline_counts.tolist() == twin.deadline_counts
    if twin.values:
        assert hist.min == min(twin.values)
        assert hist.max == max(twin.values)
        if max(abs(v) for v in twin.values) < 1e300:  # float sums of huge values overflow
            scale_of_sum = math.fsum(abs(v) for v in twin.values)
            assert abs(hist.sum - math.fsum(twin.values)) <= 1e-12 * scale_of_sum


@SETTINGS
@given(st.lists(positive, max_size=40), st.integers(min_value=-4, max_value=6))
def test_bucket_index_is_exact(values: list[float], scale: int) -> None:
    got = bucket_indices(np.array(values, dtype=np.float64), scale).tolist()
    assert got == [ref.bucket_index(x, scale) for x in values]


@pytest.mark.parametrize("scale", [-2, 0, 1, 3, 5, 8])
def test_boundaries_are_upper_inclusive(scale: int) -> None:
    power = 1 << max(scale, 0)
    for j in range(-2 * power, 2 * power + 1):
        if scale > 0:
            at = _largest_float_below_root(j, scale)  # the largest float <= b**j
            want_at = j - 1
        else:
            at = 2.0 ** (j << -scale)  # b**j is a power of two
            want_at = j - 1
        above = math.nextafter(at, math.inf)
        got = bucket_indices(np.array([at, above]), scale).tolist()
        assert got == [want_at, want_at + 1], (scale, j, at)
        assert got == [ref.bucket_index(at, scale), ref.bucket_index(above, scale)]


def test_powers_of_two_at_default_scale() -> None:
    k = np.arange(-20, 21)
    assert bucket_indices(np.ldexp(1.0, k), 5).tolist() == ((k << 5) - 1).tolist()


@SETTINGS
@given(
    st.lists(anything, max_size=120),
    st.integers(min_value=-2, max_value=6),
    st.integers(min_value=4, max_value=64),
    st.integers(min_value=1, max_value=5),
)
def test_record_matches_reference(
    values: list[float], scale: int, max_size: int, parts: int
) -> None:
    deadlines = (0.0, 1.0, 100.0)
    hist = ExpHistogram(scale, deadlines, max_size)
    for part in np.array_split(np.array(values, dtype=np.float64), parts):
        hist.record(part)
    twin = ref.RefHistogram(scale, deadlines, max_size)
    twin.record(values)
    _same(hist, twin)
    qs = [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 1.0]
    got = hist.quantiles(qs).tolist()
    want = [twin.quantile(q) for q in qs]
    assert got == pytest.approx(want, rel=1e-12, nan_ok=True)


@SETTINGS
@given(
    st.lists(st.lists(anything, max_size=40), min_size=1, max_size=5),
    st.lists(st.integers(min_value=0, max_value=6), min_size=5, max_size=5),
    st.randoms(use_true_random=False),
)
def test_merge_is_exact_in_any_order(
    batches: list[list[float]], scales: list[int], rnd: object
) -> None:
    hists = []
    for k, batch in enumerate(batches):
        hist = ExpHistogram(scales[k], (1.0,), max_size=32)
        hist.record(np.array(batch, dtype=np.float64))
        hists.append(hist)
    forward = hists[0].copy()
    for h in hists[1:]:
        forward.merge(h)
    order = list(range(len(hists)))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    shuffled = hists[order[0]].copy()
    for k in order[1:]:
        other = hists[k].copy()
        other.merge(shuffled)  # other grouping: merge the running total into a fresh part
        shuffled = other
    twin = ref.RefHistogram(min(scales[: len(batches)]), (1.0,), max_size=32)
    twin.record(v for batch in batches for v in batch)
    for merged in (forward, shuffled):
        _same(merged, twin)
    a, b = forward.to_dict(), shuffled.to_dict()
    for key in ("sum", "sumsq"):
        x, y = float(a.pop(key)), float(b.pop(key))
        assert math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-300) or (math.isnan(x) and math.isnan(y))
    assert a == b


@SETTINGS
@given(
    st.lists(st.floats(min_value=1e-6, max_value=1e9), min_size=1, max_size=300),
    st.integers(min_value=0, max_value=8),
)
def test_quantiles_within_relative_error(values: list[float], scale: int) -> None:
    hist = ExpHistogram(scale, max_size=4096)
    hist.record(np.array(values))
    bound = relative_error(hist.scale) * (1 + 1e-9)
    qs = np.array([0.0, 0.001, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0])
    for q, estimate in zip(qs, hist.quantiles(qs), strict=True):
        exact = ref.exact_quantile(values, float(q))
        assert abs(estimate - exact) <= bound * exact, (q, estimate, exact)


def test_quantile_lognormal_at_default_scale() -> None:
    values = np.random.default_rng(7).lognormal(1.0, 0.8, 200_000)
    hist = ExpHistogram()
    hist.record(values)
    assert hist.scale == 5
    ordered = np.sort(values)
    for q in (0.5, 0.99, 0.999, 0.9999):
        exact = ordered[math.ceil(q * values.size) - 1]
        assert abs(hist.quantile(q) - exact) <= relative_error(5) * exact


def test_empty_and_invalid() -> None:
    hist = ExpHistogram()
    assert math.isnan(hist.quantile(0.5))
    hist.record(np.array([math.nan, math.inf, -math.inf]))
    assert hist.n == 0
    assert hist.nan_count == 3
    assert math.isnan(hist.quantile(0.99))
    with pytest.raises(ValueError, match="quantiles"):
        hist.quantile(1.5)
    with pytest.raises(ValueError, match="scale"):
        ExpHistogram(scale=11)


def test_zero_bucket_and_deadlines() -> None:
    hist = ExpHistogram(deadlines=(0.0, 2.0))
    hist.record(np.array([-1.0, 0.0, 1.0, 2.0, 3.0]))
    assert hist.zero_count == 2
    assert hist.deadline_counts.tolist() == [2, 4]
    assert hist.quantile(0.4) == 0.0
    assert hist.min == -1.0


@SETTINGS
@given(st.lists(anything, max_size=60), st.integers(min_value=0, max_value=4))
def test_downscale_matches_reference(values: list[float], by: int) -> None:
    hist = ExpHistogram(5, max_size=4096)
    hist.record(np.array(values, dtype=np.float64))
    hist.downscale(by)
    twin = ref.RefHistogram(5, (), max_size=4096)
    twin.record(values)
    twin.downscale(by)
    _same(hist, twin)


@SETTINGS
@given(st.lists(anything, max_size=60))
def test_json_round_trip(values: list[float]) -> None:
    hist = ExpHistogram(4, (1.0, 10.0))
    hist.record(np.array(values, dtype=np.float64))
    data = json.loads(json.dumps(hist.to_dict(), allow_nan=False))
    assert ExpHistogram.from_dict(data) == hist


def test_auto_downscale_keeps_max_size() -> None:
    hist = ExpHistogram(5, max_size=160)
    hist.record(np.geomspace(1e-3, 1e6, 1000))
    assert hist.counts.size <= 160
    assert hist.scale < 5
    assert hist.n == 1000
