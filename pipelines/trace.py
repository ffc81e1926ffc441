# Copyright 2026 tpo-edge contributors
# SPDX-License-Identifier: Apache-2.0
"""Load a captured measurement trace and compute its link KPIs (``tpo-edge analyze``).

A trace has one row per message sent: ``seq,t_send_ns,t_recv_ns,size`` as CSV with that header,
or JSON lines with the same keys. An empty ``t_recv_ns`` (CSV) or null / missing (JSON) means
the message was never received. This is the one module of ``pipelines`` that reads files.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from pipelines.link import (
    AUTO,
    NO_SEQ,
    NO_TIME,
    NS_PER_MS,
    NS_PER_S,
    Auto,
    LinkConfig,
    LinkWindow,
    LinkWindower,
    SeriesState,
    estimate_transfer_interval,
    link_window,
    sort_arrivals,
    unwrap_seq,
)

IntArray = npt.NDArray[np.int64]
COLUMNS = ("seq", "t_send_ns", "t_recv_ns", "size")


class Trace(NamedTuple):
    """Columnar trace: one int64 array per column, NO_SEQ / NO_TIME where a value is missing."""

    seq: IntArray
    t_send_ns: IntArray
    t_recv_ns: IntArray
    size: IntArray


def _int_or(text: object, missing: int) -> int:
    if text is None or text == "":
        return missing
    return int(str(text))


def load_trace(path: str | Path) -> Trace:
    """Read a CSV (by header) or JSON-lines trace file into int64 columns."""
    path = Path(path)
    rows: list[tuple[int, int, int, int]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        first = handle.readline()
        handle.seek(0)
        if first.lstrip().startswith("{"):
            records: list[dict[str, Any]] = [json.loads(line) for line in handle if line.strip()]
        else:
            reader = csv.DictReader(handle)
            missing = set(COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: trace header lacks {sorted(missing)}")
            records = list(reader)
    for number, record in enumerate(records, start=1):
        try:
            rows.append(
                (
                    _int_or(record.get("seq"), NO_SEQ),
                    _int_or(record.get("t_send_ns"), NO_TIME),
                    _int_or(record.get("t_recv_ns"), NO_TIME),
                    _int_or(record.get("size"), 0),
                )
            )
        except ValueError as exc:
            raise ValueError(f"{path}: record {number}: {exc}") from exc
    table = np.array(rows, dtype=np.int64).reshape(-1, 4)
    return Trace(*(np.ascontiguousarray(table[:, k]) for k in range(4)))


def save_trace(path: str | Path, trace: Trace) -> None:
    """Write a trace as CSV (the inverse of ``load_trace``)."""
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for seq, sent, received, size in zip(*(c.tolist() for c in trace), strict=True):
            writer.writerow(
                [
                    "" if seq == NO_SEQ else seq,
                    "" if sent == NO_TIME else sent,
                    "" if received == NO_TIME else received,
                    size,
                ]
            )


_OVERALL_KEYS = {
    "latency_min_ms": "one_way_latency_min_ms",
    "latency_mean_ms": "one_way_latency_mean_ms",
    "latency_max_ms": "one_way_latency_max_ms",
    "latency_p50_ms": "one_way_latency_p50_ms",
    "latency_p90_ms": "one_way_latency_p90_ms",
    "latency_p99_ms": "one_way_latency_p99_ms",
    "latency_p99_9_ms": "one_way_latency_p99_9_ms",
    "latency_p99_99_ms": "one_way_latency_p99_99_ms",
    "update_time_mean_ms": "update_time_mean_ms",
    "update_time_max_ms": "update_time_max_ms",
    "update_time_p99_ms": "update_time_p99_ms",
    "interarrival_jitter_ms": "interarrival_jitter_ms",
    "ipdv_abs_mean_ms": "ipdv_abs_mean_ms",
    "ipdv_abs_p99_ms": "ipdv_abs_p99_ms",
    "pdv_p99_ms": "pdv_p99_ms",
    "pdv_max_ms": "pdv_max_ms",
    "duplicates": "duplicates",
    "reordering_ratio": "reordering_ratio",
    "transfer_interval_ms": "transfer_interval_ms",
    "survival_time_ms": "survival_time_ms",
    "availability": "availability",
    "up_s": "up_s",
    "down_s": "down_s",
    "failures": "failures",
    "mtbf_s": "mtbf_s",
    "throughput_bps": "throughput_bps",
    "message_rate": "message_rate",
}
"""LinkWindow field -> trace result key (KPIS.md names, snake_case)."""


def trace_transfer_interval_ms(trace: Trace) -> float | None:
    """The transfer interval TI (ms) estimated from the trace's receive times, or None.

    One estimate over the whole trace (:func:`pipelines.link.estimate_transfer_interval`:
    median cycle, bursts folded, gaps ignored while they are a minority), so the overall
    result and every window are judged against the same TI.
    """
    estimate = estimate_transfer_interval(trace.t_recv_ns[trace.t_recv_ns != NO_TIME])
    return None if estimate is None else estimate / NS_PER_MS


def analyze_trace(
    trace: Trace,
    deadline_ms: float,
    survival_time_ms: float | Auto = 0.0,
    transfer_interval_ms: float | Auto | None = AUTO,
    window_s: float = 10.0,
    *,
    seq_modulus: int | None = None,
) -> dict[str, Any]:
    """Return overall link KPIs of the trace and a ``windows`` list of per-window KPIs.

    Unlike the live windower the trace knows every message sent, so ``n_sent``, loss and
    deadline reliability count the messages never received, also at the end of the trace.
    ``transfer_interval_ms`` None or ``"auto"``: estimated from the trace
    (:func:`trace_transfer_interval_ms`); ``survival_time_ms`` ``"auto"``: one TI. The TI and
    survival time used are reported (``transfer_interval_ms``, ``survival_time_ms``; None when
    no TI could be estimated, and then availability is None too).
    """
    interval: float | Auto | None = transfer_interval_ms
    estimated = interval is None or interval == AUTO
    if interval is None or interval == AUTO:
        # No estimate: keep "auto", which leaves availability without a basis (None).
        interval = trace_transfer_interval_ms(trace)
        interval = AUTO if interval is None else interval
    config = LinkConfig(
        window_s=window_s,
        lateness_s=0.0,
        seq_modulus=seq_modulus,
        deadline_ms=deadline_ms,
        survival_time_ms=survival_time_ms,
        transfer_interval_ms=interval,
    )
    arrivals = sort_arrivals(tuple(trace))  # type: ignore[arg-type]  # Trace is 4 int arrays
    known = np.concatenate(
        (trace.t_recv_ns[trace.t_recv_ns != NO_TIME], trace.t_send_ns[trace.t_send_ns != NO_TIME])
    )
    n_sent, n_delivered = _sent_and_received(trace, seq_modulus)
    result: dict[str, Any] = {
        "n_sent": n_sent,
        "n_received": int(arrivals[0].size),
        "transfer_interval_estimated": estimated,
    }
    if known.size == 0:
        return result | {"windows": []}
    span = (int(known.min()), int(known.max()) + 1)
    overall, _ = link_window(arrivals, span, config, SeriesState())
    result |= {
        "duration_s": (span[1] - span[0]) / NS_PER_S,
        "loss_ratio": (n_sent - n_delivered) / n_sent if n_sent else None,
        "deadline_reliability": overall.n_timely / n_sent if n_sent else None,
    }
    result |= {key: getattr(overall, name) for name, key in _OVERALL_KEYS.items()}
    windower = LinkWindower(config)
    windower.add(np.zeros(arrivals[0].size, dtype=np.int64), *arrivals)
    result["windows"] = [
        {"window_start_ns": w.window_start_ns, "window_s": w.window_len_s} | _window_dict(w.kpis)
        for w in windower.flush()
    ]
    return result


def _window_dict(kpis: LinkWindow) -> dict[str, Any]:
    row = asdict(kpis)
    row.pop("latency_histogram")
    row["latency_histogram"] = kpis.latency_histogram.to_dict()
    return row


def _sent_and_received(trace: Trace, seq_modulus: int | None) -> tuple[int, int]:
    """Return (messages sent, messages received), each counted once per sequence number.

    Trace rows are in send order, so sequence numbers are unwrapped in row order. Rows without
    a sequence number count as one message each.
    """
    has_seq = trace.seq != NO_SEQ
    numbers = trace.seq[has_seq]
    if seq_modulus is not None:
        numbers = unwrap_seq(numbers, seq_modulus)
    received = (trace.t_recv_ns != NO_TIME)[has_seq]
    plain = ~has_seq
    n_sent = int(np.unique(numbers).size) + int(np.count_nonzero(plain))
    n_received = int(np.unique(numbers[received]).size) + int(
        np.count_nonzero(plain & (trace.t_recv_ns != NO_TIME))
    )
    return n_sent, n_received


def _format(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def render_table(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (KPI, value) rows of the overall result for a readable table."""
    return [(key, _format(value)) for key, value in result.items() if key != "windows"]
