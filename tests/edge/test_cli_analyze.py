"""`tpo-edge analyze` on a trace whose KPIs are known by construction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from edge.cli import app

runner = CliRunner()


def write_trace(path: Path) -> None:
    """1000 messages every 10 ms; message 100..104 lost; latency 2 ms + 0..7 ms ramp; 5 over 8 ms."""
    rng = np.random.default_rng(7)
    lines = ["seq,t_send_ns,t_recv_ns,size"]
    t0 = 1_700_000_000_000_000_000
    latencies_ms = 2.0 + rng.permutation(np.linspace(0, 7, 1000))
    for i in range(1000):
        send = t0 + i * 10_000_000
        recv = "" if 100 <= i < 105 else str(send + int(latencies_ms[i] * 1e6))
        lines.append(f"{i},{send},{recv},64")
    path.write_text("\n".join(lines) + "\n")
    return latencies_ms


def test_json_output_matches_the_constructed_trace(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    latencies = write_trace(trace)
    result = runner.invoke(
        app, ["analyze", str(trace), "--deadline", "8", "--window", "5", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["n_sent"] == 1000
    assert out["n_received"] == 995
    assert out["loss_ratio"] == 5 / 1000
    received = np.delete(latencies, np.arange(100, 105))
    timely = int((received <= 8.0).sum())
    assert out["deadline_reliability"] == timely / 1000
    exact_p50 = np.sort(received)[int(np.ceil(0.5 * len(received))) - 1]
    assert abs(out["one_way_latency_p50_ms"] - exact_p50) <= 0.011 * exact_p50 + 1e-6
    assert out["one_way_latency_p99_99_ms"] is None  # 995 samples cannot support p99.99
    assert len(out["windows"]) == 2
    # No --transfer-interval: estimated from the 10 ms cycle of the trace.
    assert out["transfer_interval_estimated"] is True
    assert abs(out["transfer_interval_ms"] - 10.0) <= 0.5
    assert out["survival_time_ms"] == 0.0


def test_given_transfer_interval_and_survival_time(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    write_trace(trace)
    args = ["analyze", str(trace), "--deadline", "10", "--json"]
    auto = json.loads(runner.invoke(app, [*args, "--survival-time", "10"]).output)
    given = json.loads(
        runner.invoke(app, [*args, "--survival-time", "10", "--transfer-interval", "10"]).output
    )
    assert given["transfer_interval_ms"] == 10.0
    assert given["transfer_interval_estimated"] is False
    assert abs(auto["transfer_interval_ms"] - 10.0) <= 0.5  # receive times carry the jitter
    assert auto["survival_time_ms"] == given["survival_time_ms"] == 10.0
    # 5 messages in a row lost: down for a while against a 10 ms TI with one miss tolerated.
    for out in (auto, given):
        assert out["failures"] >= 1
        assert 0.9 < out["availability"] < 1.0
    table = runner.invoke(app, ["analyze", str(trace)]).output
    assert "transfer_interval_ms" in table


def test_table_output_and_bad_file(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    write_trace(trace)
    result = runner.invoke(app, ["analyze", str(trace)])
    assert result.exit_code == 0, result.output
    assert "loss" in result.output.lower()
    broken = tmp_path / "broken.csv"
    broken.write_text("seq,when\n1,2\n")
    result = runner.invoke(app, ["analyze", str(broken)])
    assert result.exit_code == 2
    assert "broken.csv" in result.output
