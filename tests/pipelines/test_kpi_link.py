"""Link KPI functions against their loop twins, and the windower against plain grouping."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import _reference as ref
from pipelines.link import (
    AUTO,
    AUTO_TI_MIN_CYCLES,
    NO_SEQ,
    NO_TIME,
    NS_PER_S,
    LinkConfig,
    LinkWindower,
    SeriesState,
    availability_in_window,
    estimate_transfer_interval,
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


def _rows(rng: np.random.Generator, n: int, series: int) -> tuple[np.ndarray, ...]:
    ids = rng.integers(0, series, n)
    seq = rng.integers(0, 256, n)
    seq[rng.random(n) < 0.05] = NO_SEQ
    t_send = np.sort(rng.integers(0, 5_000 * MS, n))
    t_recv = t_send + rng.integers(1 * MS, 40 * MS, n)
    t_send[rng.random(n) < 0.05] = NO_TIME
    size = rng.integers(10, 1500, n)
    return ids, seq, t_send, t_recv, size


# Transfer interval settings: fixed, estimated, or per series (series 1 fixed, others auto).
TI_MODES: dict[str, tuple[float | str, dict[object, Any] | None]] = {
    "fixed": (10.0, None),
    "auto": (AUTO, None),
    "per_series": (AUTO, {1: 25.0, 3: 0.0}),
}


@SETTINGS
@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 300),
    st.integers(1, 4),
    st.integers(1, 5),
    st.sampled_from(sorted(TI_MODES)),
    st.sampled_from([15.0, AUTO]),
)
def test_windower_matches_plain_grouping(
    seed: int, n: int, series: int, parts: int, mode: str, survival: float | str
) -> None:
    rng = np.random.default_rng(seed)
    ids, seq, t_send, t_recv, size = _rows(rng, n, series)
    ti, per_series = TI_MODES[mode]
    config = LinkConfig(
        window_s=0.5,
        lateness_s=0.0,
        seq_modulus=256,
        deadline_ms=20.0,
        survival_time_ms=survival,  # type: ignore[arg-type]  # a number or "auto"
        transfer_interval_ms=ti,  # type: ignore[arg-type]
    )
    windower = LinkWindower(config, per_series)
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
        own = config
        if per_series and key in per_series:
            own = LinkConfig(**{**_fields(config), "transfer_interval_ms": per_series[key]})
        for w in range(min(indices), max(t_recv.tolist()) // window_ns + 1):
            rows = np.array(groups.get((key, w), []), dtype=np.int64)
            cols = (seq[rows], t_send[rows], t_recv[rows], size[rows])
            kpis, state = link_window(cols, (w * window_ns, (w + 1) * window_ns), own, state)
            want[(key, w * window_ns)] = kpis
    assert got == want
    assert sum(k.n_received for k in got.values()) == n


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 300), st.integers(1, 4), st.integers(1, 8))
def test_advancing_as_rows_arrive_equals_one_flush(
    seed: int, n: int, series: int, parts: int
) -> None:
    # Rows arrive in receive order, shuffled within each part; the windower advances to the
    # newest receive time after every part, so pending chunks end up due, pending, or split
    # across the boundary. Nothing is late, so the windows must equal those of one flush.
    rng = np.random.default_rng(seed)
    ids, seq, t_send, t_recv, size = _rows(rng, n, series)
    config = LinkConfig(window_s=0.5, lateness_s=0.0, seq_modulus=256, deadline_ms=20.0)
    by_recv = np.argsort(t_recv, kind="stable")
    streamed, whole = LinkWindower(config), LinkWindower(config)
    got = []
    for in_order in np.array_split(by_recv, parts):
        if in_order.size == 0:
            continue
        part = rng.permutation(in_order)
        streamed.add(ids[part], seq[part], t_send[part], t_recv[part], size[part])
        got += streamed.advance(int(t_recv[part].max()))
    got += streamed.flush()
    whole.add(ids, seq, t_send, t_recv, size)
    want = whole.flush()
    assert streamed.late_samples == 0
    assert {(w.series, w.window_start_ns): w.kpis for w in got} == {
        (w.series, w.window_start_ns): w.kpis for w in want
    }
    assert len(got) == len(want)


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


def _fields(config: LinkConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in LinkConfig.__dataclass_fields__}


# -- transfer interval estimate ("auto") -----------------------------------------------------


def _cyclic(
    rng: np.random.Generator,
    *,
    interval: int,
    cycles: int,
    burst: int,
    jitter: int,
    gaps: int,
    start: int = 0,
    delay_spread: int = 7 * MS,
) -> tuple[np.ndarray, np.ndarray]:
    """(send, receive) times of a cyclic source: ``burst`` messages per cycle, lost runs."""
    send = start + np.arange(cycles, dtype=np.int64) * interval
    send = send + rng.integers(-jitter, jitter + 1, cycles)
    lost = np.zeros(cycles, dtype=np.bool_)
    for first in rng.integers(1, max(cycles - 1, 2), gaps):
        lost[first : first + int(rng.integers(1, 4))] = True
    send = np.repeat(send[~lost], burst)
    spread = max(interval // (16 * burst), 1)  # a burst lasts well under 1/16 of the cycle
    send = send + np.tile(np.arange(burst, dtype=np.int64) * spread, send.size // burst)
    recv = send + MS + rng.integers(0, delay_spread + 1, send.size)
    order = np.argsort(recv, kind="stable")
    return send[order], recv[order]


@SETTINGS
@given(
    st.one_of(
        st.lists(st.integers(0, 10_000), max_size=60),
        st.lists(st.integers(0, 2**40), max_size=200),
    )
)
def test_estimate_matches_reference_on_any_times(times: list[int]) -> None:
    got = estimate_transfer_interval(np.array(times, dtype=np.int64))
    assert got == ref.estimate_transfer_interval(times)


@SETTINGS
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1 * MS, 2_000 * MS),
    st.integers(AUTO_TI_MIN_CYCLES + 12, 300),
    st.integers(1, 12),
    st.integers(0, 20),
)
def test_estimate_finds_the_cycle_despite_bursts_jitter_and_gaps(
    seed: int, interval: int, cycles: int, burst: int, jitter_permille: int
) -> None:
    rng = np.random.default_rng(seed)
    jitter = interval * jitter_permille // 1000  # up to 2 % of the cycle
    gaps = cycles // 12  # lost runs of 1-3 cycles: well under half of the cycles
    spread = interval // 50  # link delay varies by up to 2 % of the cycle
    _, recv = _cyclic(
        rng,
        interval=interval,
        cycles=cycles,
        burst=burst,
        jitter=jitter,
        gaps=gaps,
        delay_spread=spread,
    )
    got = estimate_transfer_interval(recv)
    assert got == ref.estimate_transfer_interval(recv.tolist())
    assert got is not None
    # Receive-time jitter: send jitter and delay spread on both ends, plus the burst spread.
    assert abs(got - interval) <= 2 * (jitter + spread) + interval // 16


def test_estimate_needs_enough_cycles() -> None:
    recv = np.arange(AUTO_TI_MIN_CYCLES, dtype=np.int64) * 100 * MS
    assert estimate_transfer_interval(recv) is None  # 4 intervals
    assert estimate_transfer_interval(np.append(recv, recv[-1] + 100 * MS)) == 100 * MS
    # Many receptions, but all of them one burst after another too few times: no cycle.
    burst = np.arange(50, dtype=np.int64) * 1000
    assert estimate_transfer_interval(np.concatenate([burst, burst + 100 * MS])) is None


def test_estimate_burst_gap_is_an_eighth_of_the_typical_interval() -> None:
    # Updates alternate 100 and 800 ns: typical 800 (the 100s cover only 1/9 of the time), so
    # 100 = 800 / 8 is not "more than 1/8": each pair is one burst and the cycle is 900.
    recv = np.cumsum(np.tile([100, 800], 20)).astype(np.int64)
    assert estimate_transfer_interval(recv) == 900
    assert ref.estimate_transfer_interval(recv.tolist()) == 900
    # 101 is more than 1/8: every reception starts a cycle, half of them 101 ns long.
    assert estimate_transfer_interval(np.cumsum(np.tile([101, 800], 20))) in {101, 800}


def test_estimate_ignores_an_outage_and_bursts() -> None:
    # 1 s cycle, 4 messages per burst (a charger), 40 cycles with a 12 s outage in the middle.
    cycle = np.concatenate([np.arange(0, 20), np.arange(32, 52)]).astype(np.int64) * NS_PER_S
    recv = (cycle[:, None] + np.array([0, 1, 2, 5]) * MS).ravel()
    assert estimate_transfer_interval(recv) == NS_PER_S
    # The mean interval would be 1.3 s and hide most of the outage.
    assert np.diff(cycle).mean() > 1.25 * NS_PER_S


@SETTINGS
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([AUTO, 40.0]),
    st.sampled_from([AUTO, 0.0, 30.0]),
    st.integers(5, 150),
)
def test_windower_availability_matches_reference_walk(
    seed: int, ti: float | str, survival: float | str, interval_ms: int
) -> None:
    rng = np.random.default_rng(seed)
    config = LinkConfig(
        window_s=1.0,
        lateness_s=0.0,
        deadline_ms=6.0,
        survival_time_ms=survival,  # type: ignore[arg-type]
        transfer_interval_ms=ti,  # type: ignore[arg-type]
    )
    columns: list[tuple[np.ndarray, ...]] = []
    for key in range(3):
        # Series 2 starts late and sparse: its first windows have no estimate.
        cycles = int(rng.integers(3, 8_000 // interval_ms))
        send, recv = _cyclic(
            rng,
            interval=interval_ms * MS,
            cycles=cycles,
            burst=int(rng.integers(1, 4)),
            jitter=int(rng.integers(0, interval_ms * MS // 20 + 1)),
            gaps=int(rng.integers(0, 4)),
            start=int(rng.integers(0, 3 * NS_PER_S)) * (key == 2),
        )
        send[rng.random(send.size) < 0.1] = NO_TIME
        columns.append((np.full(send.size, key), send, recv))
    ids, send, recv = (np.concatenate(c) for c in zip(*columns, strict=True))
    windower = LinkWindower(config)
    windower.add(ids, np.full(ids.size, NO_SEQ), send, recv, np.ones(ids.size, dtype=np.int64))
    closed = windower.flush()

    window_ns = config.window_ns
    last = int(recv.max()) // window_ns
    for key in range(3):
        rows = np.flatnonzero(ids == key)
        rows = rows[np.argsort(recv[rows], kind="stable")]
        first = int(recv[rows].min()) // window_ns
        windows = [(w * window_ns, (w + 1) * window_ns) for w in range(first, last + 1)]
        want = ref.series_availability(
            list(zip(send[rows].tolist(), recv[rows].tolist(), strict=True)),
            windows,
            deadline=6 * MS,
            transfer_interval=None if ti == AUTO else round(float(ti) * MS),
            survival=None if survival == AUTO else round(float(survival) * MS),
        )
        got = [w.kpis for w in closed if w.series == key]
        assert [w.window_start_ns for w in closed if w.series == key] == [s for s, _ in windows]
        for kpis, (interval, avail) in zip(got, want, strict=True):
            assert kpis.transfer_interval_ms == (None if interval is None else interval / MS)
            if avail is None:
                assert kpis.availability is None
                continue
            up, down, failures = avail
            assert (kpis.up_s, kpis.down_s, kpis.failures) == (
                up / NS_PER_S,
                down / NS_PER_S,
                failures,
            )


def test_auto_transfer_interval_on_a_known_stream() -> None:
    # The known stream below, with TI estimated: 10 ms exactly, so the same DOWN time.
    n = 1000
    seq = np.arange(n, dtype=np.int64)
    t_send = seq * 10 * MS
    t_recv = t_send + 4 * MS
    keep = (seq < 200) | (seq >= 300)
    rows = (seq[keep], t_send[keep], t_recv[keep], np.full(keep.sum(), 100, dtype=np.int64))
    config = LinkConfig(
        window_s=10.0, deadline_ms=5.0, survival_time_ms=20.0, transfer_interval_ms=AUTO
    )
    kpis, state = link_window(rows, (0, 10_000 * MS), config, SeriesState())
    assert kpis.transfer_interval_ms == 10.0
    assert kpis.survival_time_ms == 20.0
    assert kpis.down_s == pytest.approx(0.979)
    # survival "auto" = one TI: down from 1990 + 10 + 5 + 10 = 2015 ms to 3004 ms.
    one_miss = LinkConfig(
        window_s=10.0, deadline_ms=5.0, survival_time_ms=AUTO, transfer_interval_ms=AUTO
    )
    kpis, _ = link_window(rows, (0, 10_000 * MS), one_miss, SeriesState())
    assert (kpis.survival_time_ms, kpis.failures) == (10.0, 1)
    assert kpis.down_s == pytest.approx(0.989)
    # A silent window keeps the estimate: the last message (sent 9990 ms) covers the service
    # until 9990 + 10 + 5 + 20 = 10025 ms, DOWN after that.
    empty = tuple(np.zeros(0, dtype=np.int64) for _ in range(4))
    silent, state = link_window(empty, (10_000 * MS, 20_000 * MS), config, state)  # type: ignore[arg-type]
    assert silent.transfer_interval_ms == 10.0
    assert silent.up_s == pytest.approx(0.025)
    assert silent.failures == 1


def test_without_enough_history_availability_is_absent() -> None:
    config = LinkConfig(window_s=10.0, deadline_ms=50.0, transfer_interval_ms=AUTO)
    t = np.array([0, 1_000, 2_000, 3_000], dtype=np.int64) * MS  # 3 intervals: no estimate
    rows = (np.arange(4, dtype=np.int64), t, t + MS, np.ones(4, dtype=np.int64))
    kpis, state = link_window(rows, (0, 10_000 * MS), config, SeriesState())
    assert kpis.transfer_interval_ms is None
    assert kpis.availability is None
    assert (kpis.up_s, kpis.down_s, kpis.failures) == (0.0, 0.0, 0)
    assert kpis.deadline_reliability == 1.0  # the other KPIs do not wait for the estimate
    # Three more cycles in the next window: 6 intervals over both windows, estimate 1 s.
    t2 = t[:3] + 10_000 * MS
    rows = (np.arange(4, 7, dtype=np.int64), t2, t2 + MS, np.ones(3, dtype=np.int64))
    kpis, _ = link_window(rows, (10_000 * MS, 20_000 * MS), config, state)
    assert kpis.transfer_interval_ms == 1_000.0
    # Counted from the first message of this window: UP until 12 s + 1 s + 50 ms, then DOWN.
    assert kpis.up_s == pytest.approx(3.05)
    assert kpis.availability == pytest.approx(3.05 / 10.0)


def test_config_rejects_other_words() -> None:
    with pytest.raises(ValueError, match="transfer_interval_ms"):
        LinkConfig(transfer_interval_ms="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="survival_time_ms"):
        LinkConfig(survival_time_ms=-1.0)


def test_flush_counts_availability_only_until_the_input_ended() -> None:
    # 100 ms cycle for 3.45 s; input stops at 3.5 s, in the middle of the last window.
    config = LinkConfig(window_s=1.0, deadline_ms=10.0, transfer_interval_ms=100.0)
    send = np.arange(35, dtype=np.int64) * 100 * MS
    rows = (np.arange(35), send, send + 2 * MS, np.ones(35, dtype=np.int64))

    def last_window(until: int | None) -> Any:
        windower = LinkWindower(config)
        windower.add(np.zeros(35, dtype=np.int64), *rows)
        return windower.flush(until)[-1].kpis

    whole = last_window(None)  # DOWN from 3.4 + 0.1 + 0.01 s to the window end
    assert whole.down_s == pytest.approx(0.49)
    cut = last_window(3_500 * MS)
    assert (cut.up_s, cut.down_s, cut.availability) == (pytest.approx(0.5), 0.0, 1.0)
    assert cut.n_received == whole.n_received == 5
    # A stop time before the last arrival cannot hide that arrival.
    early = last_window(3_000 * MS)
    assert early.up_s == pytest.approx(0.402)
