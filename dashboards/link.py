"""5G link dashboard: latency, deadline reliability, availability, jitter, loss, throughput.

Reads ``link_kpi`` (one point per device and KPI window; see :mod:`edge.kpi`). Per-device
panels follow the site / area / device variables; campus panels read the merged points
(``area = device = "_campus"``), whose percentiles come from the merged exponential histograms,
so they are true campus percentiles rather than averages of device percentiles.

A percentile is absent from a window with too few messages (p99 needs 1000, p99.9 10 000):
the panels show gaps there rather than a number without a basis. Across a display interval
longer than the window the worst window is shown (``max``) for tail latencies and losses.
"""

# ruff: noqa: S608 -- InfluxQL assembled from constants for dashboards; no user input.

from __future__ import annotations

from typing import Any, Final

from dashboards.panels import (
    CAMPUS_ONLY,
    DEVICES,
    SITE,
    WINDOW,
    DashboardDef,
    PanelDef,
    Query,
    dashboard,
    tag_variables,
)

M: Final = '"link_kpi"'
PER_DEVICE: Final = f"{DEVICES} AND {WINDOW} AND $timeFilter"
CAMPUS: Final = f"{SITE} AND {CAMPUS_ONLY} AND {WINDOW} AND $timeFilter"
BY_DEVICE: Final = 'GROUP BY time($__interval), "device" fill(null)'
BY_TIME: Final = "GROUP BY time($__interval) fill(null)"


def _per_device(select: str, fields: tuple[str, ...], alias: str = "$tag_device $col") -> Query:
    return Query(f"SELECT {select} FROM {M} WHERE {PER_DEVICE} {BY_DEVICE}", fields, alias)


def _campus(select: str, fields: tuple[str, ...], alias: str = "campus $col") -> Query:
    return Query(f"SELECT {select} FROM {M} WHERE {CAMPUS} {BY_TIME}", fields, alias)


LATENCY: Final = (
    'max("latency_p50_ms") AS "p50", max("latency_p99_ms") AS "p99", '
    'max("latency_p99_9_ms") AS "p99.9"'
)
LATENCY_FIELDS: Final = ("p50", "p99", "p99.9")

PANELS: Final = (
    PanelDef("Campus (merged histograms)", "row"),
    PanelDef(
        "Campus latency p50 / p99 / p99.9",
        "timeseries",
        (_campus(LATENCY, LATENCY_FIELDS),),
        unit="ms",
        description="One-way latency percentiles of all devices, from the merged histograms.",
        width=12,
    ),
    PanelDef(
        "Campus latency distribution",
        "bargauge",
        (
            Query(
                'SELECT max("latency_p50_ms") AS "p50", max("latency_p90_ms") AS "p90", '
                'max("latency_p99_ms") AS "p99", max("latency_p99_9_ms") AS "p99.9", '
                'max("latency_p99_99_ms") AS "p99.99", max("latency_max_ms") AS "max" '
                f"FROM {M} WHERE {CAMPUS}",
                ("p50", "p90", "p99", "p99.9", "p99.99", "max"),
            ),
        ),
        unit="ms",
        description=(
            "CDF-like view: each bar is a percentile (worst window in the range), so the bars "
            "read as the latency below which that share of messages arrived."
        ),
        width=6,
        max=100,
    ),
    PanelDef(
        "Campus deadline reliability",
        "stat",
        (
            Query(
                f"SELECT mean(/^deadline_reliability_/) FROM {M} WHERE {CAMPUS} {BY_TIME}",
                ("mean_deadline_reliability_*",),
                "$col",
            ),
        ),
        unit="percentunit",
        description=(
            "Share of sent messages delivered within each configured deadline (exact counters, "
            "no histogram error), mean over the range's windows."
        ),
        calc="mean",
        width=6,
        min=0,
        max=1,
    ),
    PanelDef(
        "Campus messages lost, duplicated, received",
        "timeseries",
        (
            _campus('sum("n_lost") AS "lost", sum("duplicates") AS "duplicates"', ("lost",)),
            _campus('mean("message_rate") AS "msg/s"', ("msg/s",)),
        ),
        unit="short",
        width=12,
    ),
    PanelDef(
        "Campus throughput",
        "timeseries",
        (_campus('mean("throughput_bps") AS "throughput"', ("throughput",)),),
        unit="bps",
        description="Value bytes (8 per sample) per second, summed over devices.",
        width=12,
    ),
    PanelDef("Per device", "row"),
    PanelDef(
        "Latency p50 / p99 / p99.9 per device",
        "timeseries",
        (_per_device(LATENCY, LATENCY_FIELDS),),
        unit="ms",
        width=12,
    ),
    PanelDef(
        "Median latency across devices",
        "heatmap",
        (_per_device('max("latency_p50_ms") AS "p50"', ("p50",), "$tag_device"),),
        unit="ms",
        description="Distribution of the per-device, per-window median latency over time.",
        width=12,
    ),
    PanelDef(
        "Deadline reliability per device",
        "timeseries",
        (_per_device("mean(/^deadline_reliability_/)", ("mean_deadline_reliability_*",)),),
        unit="percentunit",
        description="Messages within each deadline / messages sent (lost ones count as late).",
        width=12,
        max=1,
    ),
    PanelDef(
        "Availability per device (3GPP TS 22.104)",
        "timeseries",
        (_per_device("mean(/^availability_/)", ("mean_availability_*",)),),
        unit="percentunit",
        description="Up time / observed time; down after a deadline miss beyond survival time.",
        width=12,
        max=1,
    ),
    PanelDef(
        "MTBF and failures per device",
        "timeseries",
        (
            _per_device('mean("mtbf_s") AS "MTBF"', ("MTBF",)),
            _per_device('sum("failures") AS "failures"', ("failures",)),
        ),
        unit="s",
        description="Mean time between failures per window (absent without a failure).",
        width=12,
    ),
    PanelDef(
        "Jitter per device",
        "timeseries",
        (
            _per_device(
                'mean("interarrival_jitter_ms") AS "RFC 3550 jitter", '
                'max("pdv_p99_ms") AS "PDV p99", mean("ipdv_abs_mean_ms") AS "IPDV mean"',
                ("RFC 3550 jitter", "PDV p99", "IPDV mean"),
            ),
        ),
        unit="ms",
        width=12,
    ),
    PanelDef(
        "Loss per device",
        "timeseries",
        (_per_device('max("loss_ratio") AS "loss"', ("loss",)),),
        unit="percentunit",
        description="Lost / expected, from sequence numbers (worst window per interval).",
        width=8,
    ),
    PanelDef(
        "Reordering and duplicates per device",
        "timeseries",
        (
            _per_device(
                'sum("reordered") AS "reordered", sum("duplicates") AS "duplicates"',
                ("reordered", "duplicates"),
            ),
        ),
        unit="short",
        description="RFC 4737 reordered messages and duplicates (redeliveries) per interval.",
        width=8,
    ),
    PanelDef(
        "Throughput per device",
        "timeseries",
        (_per_device('mean("throughput_bps") AS "throughput"', ("throughput",)),),
        unit="bps",
        width=8,
    ),
)
"""The panel table of the 5G link dashboard."""

SPEC: Final = DashboardDef(
    uid="tpo-link",
    title="TPO 5G link",
    description="5G campus link KPIs per device and campus-wide (link_kpi).",
    variables=tag_variables("link_kpi"),
    panels=PANELS,
)


def link_dashboard() -> Any:
    """The 5G link dashboard."""
    return dashboard(SPEC)
