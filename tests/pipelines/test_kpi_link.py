"""Link KPI functions against their loop twins, and the windower against plain grouping."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import _reference as ref
from pipelines.link import (
    NO_SEQ,
    NO_TIME,
    LinkConfig,
    LinkWindower,
    SeriesState,
    availability_in_window,
    link_window,
    loss_duplicates_reordering,
    rfc3550_jitter,
    unwrap_seq,
)

SETTINGS = settings(max_examples=60, deadline=None)
MS = 1_000_000


@SETTINGS
@given(
    st.sampled_from([4, 256, 65536]),
    st.lists(st.integers(min_value=-3, max_value=6), max_size=80),
    st.integers(min_value=0, max_value=70000),
    st.booleans(),
)
def test_unwrap_matches_reference(modulus: int, steps: list[int], start: int, carry: bool) -> None:
    truth = start + np.cumsum(steps, dtype=np.int64)
    seq = (truth % modulus).tolist()
    previous = start if carry else None
    got = unwrap_seq(np.array(seq, dtype=np.int64), modulus, previous).tolist()
    assert got == ref.unwrap_seq(seq, modulus, previous)
    if carry and modulus > 2 * 6:  # steps are small against the modulus: the truth comes back
        assert got == truth.tolist()


def test_unwrap_out_of_order_across_the_wrap() -> None:
    assert unwrap_seq(np.array([254, 255, 1, 0, 2, 3]), 256).tolist() == [
        254,
        255,
        257,
        256,
        258,
        259,
    ]
    assert unwrap_seq(np.array([1, 255, 2]), 256, previous=511).tolist() == [513, 511, 514]
    with pytest.raises(ValueError, match="outside"):
        unwrap_seq(np.array([256]), 256)


@SETTINGS
@given(
    st.lists(st.integers(min_value=0, max_value=40), max_size=80),
    st.one_of(st.none(), st.integers(min_value=-1, max_value=30)),
)
def test_loss_duplicates_reordering_matches_reference(seq: list[int], before: int | None) -> None:
    got = loss_duplicates_reordering(np.array(seq, dtype=np.int64), before)
    assert tuple(got) == ref.loss_duplicates_reordering(seq, before)
    assert got.lost >= 0


def test_rfc4737_example() -> None:
    # Arrivals 1 2 4 3 5 5 7 6: 3 and 6 arrive after a higher number (reordered), one duplicate.
    stats = loss_duplicates_reordering(np.array([1, 2, 4, 3, 5, 5, 7, 6]))
    assert (stats.expected, stats.received, stats.lost) == (7, 7, 0)
    assert (stats.duplicates, stats.reordered, stats.distinct) == (1, 2, 7)


@SETTINGS
@given(
    st.lists(st.integers(min_value=0, max_value=50 * MS), max_size=1300),
    st.floats(min_value=0, max_value=1e7),
    st.one_of(st.none(), st.integers(min_value=0, max_value=50 * MS)),
)
def test_jitter_matches_reference(delays: list[int], j0: float, transit0: int | None) -> None:
    send = np.arange(len(delays), dtype=np.int64) * 10 * MS
    recv = send + np.array(delays, dtype=np.int64)
    got = rfc3550_jitter(send, recv, j0, transit0)
    want = ref.rfc3550_jitter(send.tolist(), recv.tolist(), j0, transit0)
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-6)


def test_jitter_long_series_stays_exact() -> None:
    rng = np.random.default_rng(3)
    send = np.arange(20_000, dtype=np.int64) * MS
    recv = send + rng.integers(1 * MS, 30 * MS, send.size)
    got = rfc3550_jitter(send, recv)
    want = ref.rfc3550_jitter(send.tolist(), recv.tolist())
    assert np.allclose(got, want, rtol=1e-10, atol=0)


@SETTINGS
@given(
    st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 300)), max_size=30),
    st.integers(min_value=-200, max_value=600),
    st.integers(min_value=-100, max_value=500),
)
def test_availability_matches_reference(
    events: list[tuple[int, int]], expire0: int, observed: int
) -> None:
    events.sort()
    observed = min([observed, *(t for t, _ in events)])  # precondition: observed before arrivals
    good = [t for t, _ in events]
    expire = [t + extra for t, extra in events]
    window = (0, 1001)
    got = availability_in_window(
        np.array(good, dtype=np.int64), np.array(expire, dtype=np.int64), window, expire0, observed
    )
    assert tuple(got) == ref.availability_in_window(good, expire, window, expire0, observed)
    assert got.up_ns + got.down_ns == max(0, window[1] - max(window[0], observed))


def _rows(rng: np.random.Generator, n: int, series: int):
    ids = rng.integers(0, series, n)
    seq = rng.integers(0, 256, n)
    seq[rng.random(n) < 0.05] = NO_SEQ
    t_send = np.sort(rng.integers(0, 5_000 * MS, n))
    t_recv = t_send + rng.integers(1 * MS, 40 * MS, n)
    t_send[rng.random(n) < 0.05] = NO_TIME
    size = rng.integers(10, 1500, n)
    return ids, seq, t_send, t_recv, size


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 300), st.integers(1, 4), st.integers(1, 5))
def test_windower_matches_plain_grouping(seed: int, n: int, series: int, parts: int) -> None:
    rng = np.random.default_rng(seed)
    ids, seq, t_send, t_recv, size = _rows(rng, n, series)
    config = LinkConfig(
        window_s=0.5,
        lateness_s=0.0,
        seq_modulus=256,
        deadline_ms=20.0,
        survival_time_ms=15.0,
        transfer_interval_ms=10.0,
    )
    windower = LinkWindower(config)
    shuffled = rng.permutation(n)
    for chunk in np.array_split(shuffled, parts):
        windower.add(ids[chunk], seq[chunk], t_send[chunk], t_recv[chunk], size[chunk])
    got = {(w.series, w.window_start_ns): w.kpis for w in windower.flush()}

    window_ns = config.window_ns
    groups = ref.group_windows(ids.tolist(), t_recv.tolist(), window_ns)
    want = {}
    for key in sorted(set(ids.tolist())):
        indices = [w for (k, w) in groups if k == key]
        state = SeriesState()
        for w in range(min(indices), max(t_recv.tolist()) // window_ns + 1):
            rows = np.array(groups.get((key, w), []), dtype=np.int64)
            cols = (seq[rows], t_send[rows], t_recv[rows], size[rows])
            kpis, state = link_window(cols, (w * window_ns, (w + 1) * window_ns), config, state)
            want[(key, w * window_ns)] = kpis
    assert got == want
    assert sum(k.n_received for k in got.values()) == n


def test_late_samples_are_counted() -> None:
    windower = LinkWindower(LinkConfig(window_s=1.0, lateness_s=0.5))
    one = np.array([1])
    windower.add(np.array(["a"]), one, one * 0, np.array([100 * MS]), one)
    assert windower.advance(1_400 * MS) == []
    closed = windower.advance(1_500 * MS)
    assert [(w.series, w.window_start_ns) for w in closed] == [("a", 0)]
    windower.add(
        np.array(["a", "a"]),
        one.repeat(2),
        one.repeat(2),
        np.array([900 * MS, 1_100 * MS]),
        one.repeat(2),
    )
    assert windower.late_samples == 1
    assert windower.late_by_series == {"a": 1}
    closed = windower.flush()
    assert [w.kpis.n_received for w in closed] == [1]


def test_window_kpis_on_a_known_stream() -> None:
    # 1000 messages every 10 ms, 4 ms latency, seq 200-299 lost (1 s gap): one failure.
    n = 1000
    seq = np.arange(n, dtype=np.int64)
    t_send = seq * 10 * MS
    t_recv = t_send + 4 * MS
    keep = (seq < 200) | (seq >= 300)
    config = LinkConfig(
        window_s=10.0, deadline_ms=5.0, survival_time_ms=20.0, transfer_interval_ms=10.0
    )
    rows = (seq[keep], t_send[keep], t_recv[keep], np.full(keep.sum(), 100, dtype=np.int64))
    kpis, _ = link_window(rows, (0, 10_000 * MS), config, SeriesState())
    assert kpis.n_received == 900
    assert kpis.n_lost == 100
    assert kpis.loss_ratio == pytest.approx(0.1)
    assert kpis.deadline_reliability == pytest.approx(0.9)
    assert kpis.latency_p90_ms == pytest.approx(4.0)
    assert kpis.latency_p99_ms is None  # 900 < 10 / (1 - 0.99): absent, not a number
    assert kpis.pdv_p99_ms is None
    assert kpis.interarrival_jitter_ms == 0.0
    assert kpis.failures == 1
    # Last good before the gap: sent 1990 ms; down from 1990 + 10 + 5 + 20 = 2025 ms to 3004 ms.
    assert kpis.down_s == pytest.approx(0.979)
    assert kpis.update_time_max_ms == pytest.approx(1010.0)
    assert kpis.throughput_bps == pytest.approx(900 * 100 * 8 / 10.0)
    assert math.isclose(kpis.availability or 0, 1 - 0.979 / 10.0)
