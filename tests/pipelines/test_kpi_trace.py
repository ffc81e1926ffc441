"""Trace files: CSV and JSON-lines round trip, overall KPIs and the table rows."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pytest

from pipelines.link import NO_SEQ, NO_TIME
from pipelines.trace import Trace, analyze_trace, load_trace, render_table, save_trace

if TYPE_CHECKING:
    from pathlib import Path

MS = 1_000_000


def _trace(n: int = 2000) -> Trace:
    rng = np.random.default_rng(11)
    seq = np.arange(n, dtype=np.int64)
    t_send = 1_700_000_000_000_000_000 + seq * 10 * MS
    t_recv = t_send + (rng.lognormal(1.3, 0.3, n) * MS).astype(np.int64)
    t_recv[rng.random(n) < 0.01] = NO_TIME
    size = np.full(n, 64, dtype=np.int64)
    return Trace(seq, t_send, t_recv, size)


def test_csv_round_trip(tmp_path: Path) -> None:
    trace = _trace(50)
    trace.seq[3] = NO_SEQ
    path = tmp_path / "trace.csv"
    save_trace(path, trace)
    assert path.read_text().splitlines()[0] == "seq,t_send_ns,t_recv_ns,size"
    loaded = load_trace(path)
    for got, want in zip(loaded, trace, strict=True):
        assert got.tolist() == want.tolist()


def test_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    lines = [
        {"seq": 1, "t_send_ns": 0, "t_recv_ns": 5 * MS, "size": 10},
        {"seq": 2, "t_send_ns": 10 * MS, "t_recv_ns": None, "size": 10},
        {"seq": 3, "t_send_ns": 20 * MS, "size": 10},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    trace = load_trace(path)
    assert trace.t_recv_ns.tolist() == [5 * MS, NO_TIME, NO_TIME]


def test_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("seq,sent\n1,2\n")
    with pytest.raises(ValueError, match="header lacks"):
        load_trace(path)


def test_analyze_trace(tmp_path: Path) -> None:
    trace = _trace()
    path = tmp_path / "t.csv"
    save_trace(path, trace)
    result = analyze_trace(
        load_trace(path),
        deadline_ms=8.0,
        survival_time_ms=10.0,
        transfer_interval_ms=10.0,
        window_s=5.0,
    )
    received = int(np.count_nonzero(trace.t_recv_ns != NO_TIME))
    assert result["n_sent"] == 2000
    assert result["n_received"] == received
    assert result["loss_ratio"] == pytest.approx(1 - received / 2000)
    delays = np.sort((trace.t_recv_ns - trace.t_send_ns)[trace.t_recv_ns != NO_TIME]) / MS
    assert result["one_way_latency_p50_ms"] == delays[int(np.ceil(0.5 * delays.size)) - 1]
    assert result["one_way_latency_p99_99_ms"] is None
    timely = np.count_nonzero(delays <= 8.0)
    assert result["deadline_reliability"] == pytest.approx(timely / 2000)
    assert 0.9 < result["availability"] <= 1.0
    assert sum(w["n_received"] for w in result["windows"]) == received
    assert len(result["windows"]) >= 4
    json.dumps(result, allow_nan=False)  # ready for MQTT / the CLI
    rows = render_table(result)
    assert ("n_sent", "2000") in rows
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in rows)


def test_auto_transfer_interval_is_estimated_from_the_trace() -> None:
    trace = _trace()  # one message every 10 ms, lognormal delays, ~1 % lost
    result = analyze_trace(trace, deadline_ms=8.0, survival_time_ms="auto", window_s=5.0)
    assert result["transfer_interval_estimated"] is True
    assert result["transfer_interval_ms"] == pytest.approx(10.0, rel=0.05)
    assert result["survival_time_ms"] == result["transfer_interval_ms"]  # auto: one TI
    # The windows are judged against the same TI as the whole trace.
    assert {w["transfer_interval_ms"] for w in result["windows"]} == {
        result["transfer_interval_ms"]
    }
    # The same TI given by hand gives the same availability; a given TI is reported as such.
    given = analyze_trace(
        trace,
        deadline_ms=8.0,
        survival_time_ms="auto",
        transfer_interval_ms=result["transfer_interval_ms"],
        window_s=5.0,
    )
    assert given["transfer_interval_estimated"] is False
    assert given["availability"] == result["availability"]
    # A much shorter assumed TI makes every normal cycle a miss: availability must drop.
    strict = analyze_trace(trace, deadline_ms=8.0, transfer_interval_ms=1.0, window_s=5.0)
    assert strict["transfer_interval_ms"] == 1.0
    assert strict["availability"] < result["availability"]


def test_auto_transfer_interval_follows_the_cycle() -> None:
    rng = np.random.default_rng(3)
    n = 400
    seq = np.arange(n, dtype=np.int64)
    t_send = 1_700_000_000_000_000_000 + seq * 25 * MS + rng.integers(0, MS, n)
    t_recv = t_send + 2 * MS
    trace = Trace(seq, t_send, t_recv, np.full(n, 64, dtype=np.int64))
    result = analyze_trace(trace, deadline_ms=10.0)
    assert result["transfer_interval_ms"] == pytest.approx(25.0, abs=1.0)
    assert result["survival_time_ms"] == 0.0
    assert result["availability"] == 1.0


def test_auto_transfer_interval_without_enough_messages() -> None:
    trace = Trace(*(np.array(c, dtype=np.int64) for c in ([0, 1], [0, MS], [MS, 2 * MS], [8, 8])))
    result = analyze_trace(trace, deadline_ms=5.0)
    assert result["transfer_interval_ms"] is None
    assert result["availability"] is None  # no TI, no basis
    json.dumps(result, allow_nan=False)
