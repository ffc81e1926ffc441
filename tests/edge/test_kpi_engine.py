"""KpiEngine on synthetic batches, the tpo.kpi/1 payload, line protocol and the merger."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from drivers.base import BAD, NO_SEQ, SampleBatch, SeriesKey, SeriesTable
from edge.config import SiteConfig
from edge.errors import ConfigError, DecodeError
from edge.kpi import (
    AREA_DEVICE,
    CAMPUS,
    DEFAULT_IDEAL_CYCLE_S,
    HistogramMerger,
    KpiEngine,
    KpiIngest,
    decode_kpi,
)
from pipelines.histogram import relative_error
from pipelines.link import order_statistic
from pipelines.process import PACKML, StepSeries, machine_oee, oee, run_time_ns

W_NS = 10_000_000_000
T0 = 1_700_000_000 * 1_000_000_000 // W_NS * W_NS  # a window boundary
MS = 1_000_000
REL = relative_error(5)

MACHINE = (
    "MachineryBuildingBlocks.MachineryItemState",
    "MachineryBuildingBlocks.MachineryOperationMode",
    "Production.Job.PartsCompleted",
    "Production.Job.PartsGood",
    "Monitoring.Spindle.ActSpeed",
)
PACKML_CH = (
    "Status.StateCurrent",
    "Status.UnitMode",
    "Admin.ProdProcessedCount.AccCount",
    "Admin.ProdDefectiveCount.AccCount",
)
BENCH = ("pv_w", "pv_wh_total", "batt_soc_pct", "protect_mode", "sessions_today", "occupancy")
CHARGER: tuple[str, ...] = (
    "status",
    "energy_wh",
    "transaction_active",
    "status_c2",
    "energy_wh_c2",
)
CHARGER += ("transaction_active_c2",)


def site(**kpi: Any) -> SiteConfig:
    return SiteConfig.model_validate(
        {
            "site": "tpo",
            "agent": {"id": "edge-1"},
            "kpi": {"windows_s": [10.0], "allowed_lateness_s": 1.0, **kpi},
            "sources": [
                {
                    "type": "mqtt",
                    "area": "street",
                    "device": "street",
                    "devices": [{"id": "bench-x", "kind": "bench"}],
                }
            ],
        }
    )


def table() -> SeriesTable:
    keys = [SeriesKey("tpo", "street", "bench-1", c, "", "mqtt") for c in BENCH]
    keys += [SeriesKey("tpo", "street", "bench-2", c, "", "mqtt") for c in BENCH]
    keys += [SeriesKey("tpo", "street", "cp-1", c, "", "mqtt") for c in CHARGER]
    keys += [SeriesKey("tpo", "hall1", "mill-1", c, "", "opcua") for c in MACHINE]
    keys += [SeriesKey("tpo", "hall1", "line-1", c, "", "opcua") for c in PACKML_CH]
    keys += [SeriesKey("tpo", "hall1", "meter-1", "power", "W", "modbus")]
    return SeriesTable(keys)


TABLE = table()


def messages(
    device: str, seq: np.ndarray, send: np.ndarray, recv: np.ndarray, channels: int = 3
) -> SampleBatch:
    """One row per channel per message, like the MQTT driver."""
    series = TABLE.of_device("street", device)[:channels]
    n = len(seq)
    return SampleBatch.build(
        np.tile(series, n),
        np.arange(n * channels, dtype=np.float64),
        ts_receive=np.repeat(recv, channels),
        ts_source=np.repeat(send, channels),
        seq=np.repeat(seq, channels),
    )


def decoded(out: list[tuple[str, bytes]], device: str, kind: str = "link") -> list[dict[str, Any]]:
    docs = [orjson.loads(p) for _, p in out]
    return [d for d in docs if d["device"] == device and d["kind"] == kind]


def steps(series: int, values: Any, t: Any, **kw: Any) -> SampleBatch:
    """Rows of one series at source times t (received at the same time)."""
    t = np.asarray(t, np.int64)
    return SampleBatch.build(np.full(t.size, series), values, ts_source=t, ts_receive=t, **kw)


def latencies(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.lognormal(np.log(5.0), 0.5, n) * MS).astype(np.int64)


# -- link ------------------------------------------------------------------------------------


def test_loss_duplicates_and_exact_percentiles_per_device() -> None:
    engine = KpiEngine(site(), TABLE)
    n = 400
    seq = np.arange(n)
    keep = ~np.isin(seq, [10, 11, 50, 300])
    send = T0 + seq * 20 * MS
    delay = latencies(n)
    recv = send + delay
    engine.add(messages("bench-1", seq[keep], send[keep], recv[keep]))
    # A redelivery of seq 7 (same message, later reception) is a duplicate, not a new message.
    engine.add(messages("bench-1", seq[7:8], send[7:8], recv[7:8] + 100 * MS))
    assert engine.advance(T0 + W_NS) == []  # lateness not yet over
    out = engine.advance(T0 + W_NS + 1_000_000_000)
    (doc,) = decoded(out, "bench-1")
    k = doc["kpis"]
    assert doc["schema"] == "tpo.kpi/1"
    assert (doc["site"], doc["area"], doc["agent"]) == ("tpo", "street", "edge-1")
    assert (doc["window_start_ns"], doc["window_s"]) == (T0, 10.0)
    assert k["n_received"] == 397  # 396 messages + 1 duplicate, 3 rows each counted once
    assert (k["n_expected"], k["n_lost"], k["duplicates"]) == (400, 4, 1)
    assert k["loss_ratio"] == pytest.approx(4 / 400)
    assert k["bytes_received"] == 397 * 3 * 8
    exact = np.sort(np.concatenate([delay[keep], [delay[7] + 100 * MS]]) / MS)
    assert k["latency_p50_ms"] == order_statistic(exact, 0.5)
    assert k["latency_p90_ms"] == order_statistic(exact, 0.9)
    assert k["latency_p99_ms"] is None  # needs 1000 samples
    assert k["latency_p99_9_ms"] is None
    assert k["latency_min_ms"] == exact[0]
    assert k["latency_max_ms"] == exact[-1]
    # The published histogram estimates the same percentiles within its relative error.
    hist = decode_kpi(out[0][1]).histogram
    assert hist is not None
    assert hist.n == exact.size
    for q in (0.5, 0.9, 0.99):
        truth = order_statistic(exact, q)
        assert abs(hist.quantile(q) - truth) <= REL * truth * (1 + 1e-9)


def test_every_deadline_has_exact_counts() -> None:
    engine = KpiEngine(site(deadlines_ms=[4.0, 10.0]), TABLE)
    n = 200
    seq = np.arange(n)
    send = T0 + seq * 40 * MS
    delay = latencies(n, seed=3)
    engine.add(messages("bench-1", seq, send, send + delay))
    (doc,) = decoded(engine.flush(), "bench-1")
    k = doc["kpis"]
    for d, label in ((4.0, "4ms"), (10.0, "10ms")):
        timely = int(np.count_nonzero(delay <= d * MS))
        assert k[f"n_timely_{label}"] == timely
        assert k[f"deadline_reliability_{label}"] == pytest.approx(timely / n)
    assert k["deadline_reliability"] == k["deadline_reliability_4ms"]  # first deadline rules
    assert doc["histogram"]["deadlines"] == [4.0, 10.0]
    assert doc["histogram"]["deadline_counts"] == [k["n_timely_4ms"], k["n_timely_10ms"]]


def test_few_samples_give_absent_percentiles_not_numbers() -> None:
    engine = KpiEngine(site(), TABLE)
    seq = np.arange(5)
    send = T0 + seq * MS
    engine.add(messages("bench-1", seq, send, send + 3 * MS))
    (doc,) = decoded(engine.flush(), "bench-1")
    for label in ("p50", "p90", "p99", "p99_9", "p99_99"):
        assert doc["kpis"][f"latency_{label}_ms"] is None
    assert doc["kpis"]["latency_mean_ms"] == pytest.approx(3.0)


def test_windows_split_by_receive_time_and_silent_windows_are_reported() -> None:
    engine = KpiEngine(site(windows_s=[10.0, 60.0]), TABLE)
    seq = np.arange(4)
    recv = np.array([T0 + 1, T0 + 2, T0 + 2 * W_NS + 5, T0 + 2 * W_NS + 6])
    engine.add(messages("bench-1", seq, recv - MS, recv))
    out = decoded(engine.advance(T0 + 3 * W_NS + 2_000_000_000), "bench-1")
    tens = [(d["window_start_ns"], d["kpis"]["n_received"]) for d in out if d["window_s"] == 10]
    assert tens == [(T0, 2), (T0 + W_NS, 0), (T0 + 2 * W_NS, 2)]


def test_sources_without_seq_group_rows_by_source_and_receive_time() -> None:
    engine = KpiEngine(site(), TABLE)
    mill = TABLE.of_device("hall1", "mill-1")
    t = T0 + np.array([0, 0, 0, 100, 100]) * MS
    batch = SampleBatch.build(
        [mill[4], mill[0], mill[2], mill[4], mill[0]],
        [1.0, 3.0, 0.0, 2.0, 3.0],
        ts_source=t,
        ts_receive=t + 2 * MS,
    )
    meter = TABLE.index("hall1", "meter-1", "power")
    engine.add(batch)
    engine.add(SampleBatch.build([meter], [5.0], ts_receive=[T0]))  # no seq, no ts: no link
    out = engine.flush()
    (doc,) = decoded(out, "mill-1")
    assert doc["kpis"]["n_received"] == 2
    assert doc["kpis"]["n_expected"] == 0
    assert doc["kpis"]["loss_ratio"] is None
    assert not decoded(out, "meter-1")


def cyclic(
    device: str, period_ms: int, seconds: float, skip: tuple[float, float] = (0, 0)
) -> SampleBatch:
    """Messages every ``period_ms`` for ``seconds`` from T0, 5 ms latency, none sent in skip."""
    t_ms = np.arange(0, round(seconds * 1000), period_ms)
    sent = ~((t_ms >= skip[0] * 1000) & (t_ms < skip[1] * 1000))
    seq = np.flatnonzero(sent)
    send = T0 + t_ms[sent] * MS
    return messages(device, seq, send, send + 5 * MS)


def test_availability_is_computed_against_each_devices_transfer_interval() -> None:
    kpi = {"deadlines_ms": [50.0], "survival_time_ms": "auto"}
    engine = KpiEngine(site(transfer_interval_ms={"bench-2": 500.0}, **kpi), TABLE)
    engine.add(cyclic("bench-1", 1000, 20.0, skip=(12.0, 16.0)))  # auto: estimated 1 s
    engine.add(cyclic("bench-2", 500, 20.0))  # fixed 500 ms
    engine.add(cyclic("cp-1", 1000, 3.0))  # too few cycles for an estimate
    out = engine.flush()
    bench1 = [d["kpis"] for d in decoded(out, "bench-1")]
    assert [k["transfer_interval_ms"] for k in bench1] == [1000.0, 1000.0]
    assert [k["survival_time_ms"] for k in bench1] == [1000.0, 1000.0]
    assert bench1[0]["availability"] == 1.0
    # The last message before the gap (sent 11 s) covers until 11 + 1 + 0.05 + 1 = 13.05 s;
    # the next one arrives at 16.005 s: DOWN for 2.955 s of the window, one failure.
    assert bench1[1]["down_s"] == pytest.approx(2.955)
    assert bench1[1]["availability"] == pytest.approx(1 - 0.2955)
    assert bench1[1]["availability_50ms"] == bench1[1]["availability"]
    assert bench1[1]["failures"] == 1
    bench2 = [d["kpis"] for d in decoded(out, "bench-2")]
    assert [(k["transfer_interval_ms"], k["availability"]) for k in bench2] == [(500.0, 1.0)] * 2
    cp1 = [d["kpis"] for d in decoded(out, "cp-1")]  # the second window is silent
    assert [(k["transfer_interval_ms"], k["availability"]) for k in cp1] == [(None, None)] * 2
    assert cp1[0]["deadline_reliability"] == 1.0


def test_without_a_transfer_interval_a_cyclic_device_looks_down() -> None:
    # What the site got before the TI was known: DOWN 50 ms after every message of a 1 s cycle.
    engine = KpiEngine(site(deadlines_ms=[50.0], transfer_interval_ms=0.0), TABLE)
    engine.add(cyclic("bench-1", 1000, 10.0))
    (doc,) = decoded(engine.flush(), "bench-1")
    assert doc["kpis"]["transfer_interval_ms"] == 0.0
    # UP from the first send time until 50 ms after it, then 45 ms after each later arrival.
    assert doc["kpis"]["availability"] == pytest.approx((0.050 + 9 * 0.045) / 10.0)


def test_flush_at_shutdown_does_not_count_the_unobserved_rest_of_the_window() -> None:
    kpi = {"deadlines_ms": [50.0], "survival_time_ms": "auto"}
    last = []
    for now in (None, T0 + 15_500 * MS):  # messages 0..14 s; the agent stops at 15.5 s
        engine = KpiEngine(site(**kpi), TABLE)
        engine.add(cyclic("bench-1", 1000, 15.0))
        last.append(decoded(engine.flush(now), "bench-1")[-1]["kpis"])
    # Without a stop time the window runs on to 20 s: DOWN from 14 + 2.05 s.
    assert last[0]["down_s"] == pytest.approx(3.95)
    assert (last[1]["up_s"], last[1]["down_s"], last[1]["availability"]) == (5.5, 0.0, 1.0)


def test_transfer_interval_of_an_unknown_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"kpi\.transfer_interval_ms\.bench-9"):
        KpiEngine(site(transfer_interval_ms={"bench-1": 1000.0, "bench-9": 5.0}), TABLE)


# -- process ---------------------------------------------------------------------------------


def test_machine_oee_equals_pipelines_process() -> None:
    engine = KpiEngine(site(), TABLE)
    state_t = T0 + np.array([0, 2, 5, 7]) * 1_000_000_000
    state_v = np.array([3, 2, 3, 1], np.float64)
    count_t = T0 + np.array([0, 1, 3, 6, 8, 9]) * 1_000_000_000
    total_v = np.array([10, 11, 12, 13, 14, 14], np.float64)
    good_v = np.array([9, 10, 10, 11, 12, 12], np.float64)
    s, mode, total, good, _ = (TABLE.index("hall1", "mill-1", c) for c in MACHINE)
    batch = SampleBatch.concat(
        [
            steps(s, state_v, state_t),
            steps(mode, [3.0], [T0]),
            steps(total, total_v, count_t),
            steps(good, good_v, count_t),
            # A Bad sample never counts as a reading.
            steps(total, [999.0], [T0 + 5], quality=BAD),
        ]
    )
    engine.add(batch)
    (doc,) = decoded(engine.flush(), "mill-1", "machine")
    window = (T0, T0 + W_NS)
    expected = machine_oee(
        window,
        state=StepSeries(state_t, state_v),
        mode=StepSeries(np.array([T0]), np.array([3.0])),
        total_counter=StepSeries(count_t, total_v),
        good_counter=StepSeries(count_t, good_v),
        ideal_cycle_s=DEFAULT_IDEAL_CYCLE_S,
    )
    k = doc["kpis"]
    assert k["run_s"] == expected.run_s == 4.0  # 0-2 s and 5-7 s Executing
    assert (k["total_count"], k["good_count"]) == (expected.total_count, expected.good_count)
    assert k["oee"] == pytest.approx(expected.oee)
    assert k["availability"] == pytest.approx(expected.availability)
    assert k["quality"] == pytest.approx(3 / 4)


def test_packml_good_is_processed_minus_defective_and_carries_over_windows() -> None:
    engine = KpiEngine(site(), TABLE)
    state, mode, processed, defective = (TABLE.index("hall1", "line-1", c) for c in PACKML_CH)
    t = T0 + np.array([0, 4, 12, 15]) * 1_000_000_000
    batch = SampleBatch.concat(
        [
            steps(state, [6, 4, 6, 6], t),
            steps(mode, [1.0], [T0]),
            steps(processed, [100, 104, 110, 112], t),
            steps(defective, [5, 5, 6, 7], t),
        ]
    )
    engine.add(batch)
    first, second = decoded(engine.flush(), "line-1", "machine")
    assert first["kpis"]["run_s"] == 4.0
    assert (first["kpis"]["total_count"], first["kpis"]["good_count"]) == (4.0, 4.0)
    # The second window starts from the values held at its start (state 4, counters 104/5).
    window = (T0 + W_NS, T0 + 2 * W_NS)
    planned, run = run_time_ns(
        StepSeries(t[2:], np.array([6.0, 6.0]), 4.0),
        StepSeries(np.zeros(0, np.int64), np.zeros(0), 1.0),
        PACKML,
        window,
    )
    expected = oee(planned / 1e9, run / 1e9, 8.0, 6.0, DEFAULT_IDEAL_CYCLE_S)
    assert second["kpis"]["run_s"] == expected.run_s == 8.0
    assert second["kpis"]["good_count"] == 6.0
    assert second["kpis"]["oee"] == pytest.approx(expected.oee)


def test_charger_and_bench_kpis() -> None:
    engine = KpiEngine(site(), TABLE)
    cp = TABLE.of_device("street", "cp-1")
    st, en, tx, st2, en2, _tx2 = cp
    sec = 1_000_000_000
    rows = [
        (st, 0.0, 0), (st, 2.0, 2 * sec), (st, 5.0, 6 * sec), (st, 0.0, 8 * sec),
        (en, 1000.0, 0), (en, 1500.0, 9 * sec), (tx, 1.0, 2 * sec), (tx, 0.0, 6 * sec),
        (st2, 8.0, 0), (en2, 50.0, 0), (en2, 50.0, 9 * sec),
    ]  # fmt: skip
    bench = TABLE.of_device("street", "bench-2")
    _pv, wh, soc, protect, sessions, occupancy = bench
    rows += [
        (wh, 100.0, 0), (wh, 130.0, 5 * sec), (soc, 50.0, 0), (soc, 40.0, 5 * sec),
        (protect, 0.0, 0), (protect, 1.0, 8 * sec), (sessions, 3.0, 0), (sessions, 5.0, 5 * sec),
        (occupancy, 2.0, 0), (occupancy, 0.0, 5 * sec),
    ]  # fmt: skip
    series, value, t = zip(*rows, strict=True)
    ts = T0 + np.array(t)
    engine.add(SampleBatch.build(series, value, ts_source=ts, ts_receive=ts, seq=NO_SEQ))
    out = engine.flush()
    (charger,) = decoded(out, "cp-1", "charger")
    k = charger["kpis"]
    assert k["connectors"] == 2
    assert k["utilisation"] == pytest.approx((0.4 + 0.0) / 2)  # Charging 2-6 s on connector 1
    assert k["energy_wh"] == 500.0
    assert k["sessions"] == 1
    assert k["availability"] == pytest.approx((1.0 + 0.0) / 2)  # connector 2 Faulted throughout
    (doc,) = decoded(out, "bench-2", "bench")
    b = doc["kpis"]
    assert b["solar_yield_wh"] == 30.0
    assert b["soc_min_pct"] == 40.0
    assert b["soc_mean_pct"] == pytest.approx(45.0)
    assert b["protection_s"] == 2.0
    assert b["charging_sessions"] == 2.0
    assert b["occupancy_mean"] == pytest.approx(1.0)
    assert "histogram" not in doc


def test_late_samples_are_counted_not_used() -> None:
    engine = KpiEngine(site(), TABLE)
    seq = np.arange(3)
    send = T0 + seq * MS
    engine.add(messages("bench-1", seq, send, send + MS))
    engine.advance(T0 + 2 * W_NS)
    engine.add(messages("bench-1", np.array([3]), send[:1], send[:1] + 2 * MS))
    # One late message for the link KPIs, and its two process rows (pv_wh_total, batt_soc_pct).
    assert engine.late_samples() == 3


# -- ingest: line protocol and merging ---------------------------------------------------------


def link_payload(
    device: str, delays_ms: np.ndarray, *, area: str = "street", lost: int = 0, seed: int = 0
) -> bytes:
    engine = KpiEngine(site(), TABLE)
    n = delays_ms.size
    # `lost` messages go missing right after the first one.
    seq = np.concatenate([[0], np.arange(lost + 1, n + lost)]) if lost else np.arange(n)
    send = T0 + np.arange(n) * 10 * MS + seed
    recv = send + (delays_ms * MS).astype(np.int64)
    engine.add(messages(device, seq, send, recv))
    (doc,) = decoded(engine.flush(), device)
    doc["area"] = area
    return orjson.dumps(doc)


def topic(doc: bytes) -> str:
    d = orjson.loads(doc)
    return f"tpo/v1/{d['site']}/{d['area']}/{d['device']}/kpi"


def test_ingest_writes_one_point_per_message_with_window_start_timestamp() -> None:
    ingest = KpiIngest(site())
    payload = link_payload("bench-1", np.full(30, 4.0))
    encoded = ingest.encode(topic(payload), payload)
    assert encoded.lines == 1
    line = encoded.data.decode()
    head, fields, ts = line.rstrip("\n").split(" ")
    assert head == "link_kpi,area=street,device=bench-1,site=tpo,window=10s"
    assert int(ts) == T0
    values = dict(f.split("=") for f in fields.split(","))
    assert values["n_received"] == "30"
    assert values["latency_p50_ms"] == "4"
    assert values["transfer_interval_ms"] == "10"  # estimated: one message every 10 ms
    assert "latency_p90_ms" not in values  # absent (30 < 100): no field, not a number
    with pytest.raises(DecodeError, match="topic does not match"):
        ingest.encode("tpo/v1/tpo/street/other/kpi", payload)
    with pytest.raises(DecodeError, match="schema"):
        ingest.encode(topic(payload), payload.replace(b"tpo.kpi/1", b"tpo.kpi/9"))


def test_merge_is_exact_in_counts_and_within_histogram_error_in_percentiles() -> None:
    rng = np.random.default_rng(5)
    a = np.round(rng.lognormal(np.log(5), 0.4, 300), 3)
    b = np.round(rng.lognormal(np.log(9), 0.3, 200), 3)
    c = np.round(rng.lognormal(np.log(7), 0.3, 100), 3)
    ingest = KpiIngest(site(), grace_s=0.0)
    for p in (
        link_payload("bench-1", a, lost=3),
        link_payload("bench-2", b),
        link_payload("bench-1", c, area="north"),
    ):
        ingest.encode(topic(p), p)
    merger = ingest.merger
    assert merger.due(T0 + W_NS) == []  # lateness not over yet
    points = {(p.area, p.device): p.kpis for p in merger.due(T0 + W_NS + 1_000_000_000)}
    assert set(points) == {("street", AREA_DEVICE), ("north", AREA_DEVICE), (CAMPUS, CAMPUS)}
    street = points[("street", AREA_DEVICE)]
    assert street["n_received"] == 500
    assert street["n_lost"] == 3
    assert street["n_expected"] == 503
    assert street["loss_ratio"] == pytest.approx(3 / 503)
    assert street["devices"] == 2
    exact = np.sort(np.concatenate([a, b]))
    for q, label in ((0.5, "p50"), (0.9, "p90")):
        truth = order_statistic(exact, q)
        got = street[f"latency_{label}_ms"]
        assert got is not None
        assert abs(got - truth) <= REL * truth * (1 + 1e-9)
    assert street["latency_p99_ms"] is None  # 500 < 1000
    assert street["latency_min_ms"] == pytest.approx(exact[0])
    assert street["latency_max_ms"] == pytest.approx(exact[-1])
    timely = np.count_nonzero(exact <= 10.0)
    assert street["n_timely_10ms"] == timely
    assert street["deadline_reliability_10ms"] == pytest.approx(timely / 503)
    campus = points[(CAMPUS, CAMPUS)]
    assert campus["n_received"] == 600
    assert campus["devices"] == 3
    assert merger.due(T0 + W_NS + 2_000_000_000) == []  # written once, until something changes


def test_replayed_kpi_message_is_not_merged_twice() -> None:
    payload = link_payload("bench-1", np.full(40, 5.0))
    other = link_payload("bench-2", np.full(60, 7.0))
    once = HistogramMerger(lateness_s=1.0, grace_s=0.0)
    twice = HistogramMerger(lateness_s=1.0, grace_s=0.0)
    for m in (payload, other):
        once.add(decode_kpi(m))
    for m in (payload, other, payload, payload):
        twice.add(decode_kpi(m))
    late = T0 + 2 * W_NS
    assert [p.kpis for p in once.due(late)] == [p.kpis for p in twice.due(late)]
    assert twice.counters["kpi_merge_replaced"] == 2
    # A replay after the point was written rewrites the same (unchanged) point, not a sum.
    twice.add(decode_kpi(payload))
    (area, campus) = twice.due(late + 1)
    assert area.kpis["n_received"] == campus.kpis["n_received"] == 100


def test_contributions_to_forgotten_windows_are_refused() -> None:
    merger = HistogramMerger(lateness_s=1.0, grace_s=0.0, retain_s=60.0)
    payload = link_payload("bench-1", np.full(10, 5.0))
    merger.add(decode_kpi(payload))
    assert merger.due(T0 + 100 * W_NS)  # written, then forgotten
    merger.add(decode_kpi(payload))
    assert merger.counters["kpi_merge_too_late"] == 1
    assert merger.flush() == []


def test_decode_rejects_non_numbers() -> None:
    payload = orjson.loads(link_payload("bench-1", np.full(10, 5.0)))
    payload["kpis"]["n_received"] = "ten"
    with pytest.raises(DecodeError, match=r"kpis\.n_received"):
        decode_kpi(orjson.dumps(payload))
    payload["kpis"]["n_received"] = 10
    payload["kind"] = "toaster"
    with pytest.raises(DecodeError, match="kind"):
        decode_kpi(orjson.dumps(payload))


def test_empty_and_unknown_input_is_harmless() -> None:
    engine = KpiEngine(site(), TABLE)
    engine.add(SampleBatch.empty())
    assert engine.flush() == []
    assert engine.advance(T0) == []
    kinds = {d.device: d.model.name for d in engine.process_devices}
    assert kinds == {
        "bench-1": "bench",
        "bench-2": "bench",
        "cp-1": "charger",
        "mill-1": "opc40001",
        "line-1": "packml",
    }
