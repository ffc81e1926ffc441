"""Platform dashboard: is the pipeline keeping up, and is anything lost?

Reads the self-metrics in ``agent`` (tags site, agent; one field per metric: counters such as
``samples_read``, gauges such as ``outbox_depth``, ``drops.<reason>``, ``backbone_reconnects``;
ingest workers report as ``agent = "_ingest-<id>"`` with their write latency and lag) and counts
what was stored in ``signal``. Counters are cumulative, so rates are
``non_negative_derivative``; drops and reconnects show their increase per interval.

Per-stage latency: source -> agent is the campus link latency (``link_kpi``, merged); agent ->
ingest is ingest's lag behind the agent's receive time; ingest -> database its write latency.
"""

# ruff: noqa: S608 -- InfluxQL assembled from constants for dashboards; no user input.

from __future__ import annotations

from dataclasses import replace
from typing import Any, Final

from dashboards.panels import CAMPUS_ONLY, SITE, DashboardDef, PanelDef, Query, Variable, dashboard

M: Final = '"agent"'
AGENT: Final = '"agent" =~ /^$agent$/'
WHERE: Final = f"{SITE} AND {AGENT} AND $timeFilter"
INGEST: Final = f'{SITE} AND "agent" =~ /^_ingest/ AND $timeFilter'
BY_AGENT: Final = 'GROUP BY time($__interval), "agent" fill(null)'
DROPS: Final = (
    r"/^(drops\.|rejected\.|outbox_dropped_samples$|dead_letters$|publish_failures$"
    r"|kpi_late_samples$|write_failures$)/"
)
AGENT_STAGES: Final = r"/^latency_ms\.[a-z]+\.p99$/"


def _agent(select: str, fields: tuple[str, ...], alias: str = "$tag_agent $col") -> Query:
    return Query(f"SELECT {select} FROM {M} WHERE {WHERE} {BY_AGENT}", fields, alias)


VARIABLES: Final = (
    Variable("site", "Site", f'SHOW TAG VALUES FROM {M} WITH KEY = "site"'),
    Variable("agent", "Agent", f'SHOW TAG VALUES FROM {M} WITH KEY = "agent" WHERE {SITE}'),
)

PANELS: Final = (
    PanelDef(
        "Samples stored per second",
        "timeseries",
        (
            Query(
                'SELECT count("value") * 1000 / $__interval_ms AS "stored" FROM "signal" '
                f'WHERE {SITE} AND $timeFilter GROUP BY time($__interval), "area" fill(0)',
                ("stored",),
                "$tag_area",
            ),
        ),
        unit="short",
        description="Points written to the signal measurement, per area.",
        width=12,
    ),
    PanelDef(
        "Ingest rate",
        "timeseries",
        (
            Query(
                'SELECT non_negative_derivative(max("messages"), 1s) AS "messages", '
                'non_negative_derivative(max("points"), 1s) AS "points" '
                f"FROM {M} WHERE {INGEST} {BY_AGENT}",
                ("messages", "points"),
                "$tag_agent $col",
            ),
        ),
        unit="short",
        description="Per ingest worker: backbone messages decoded and points written per second.",
        width=12,
    ),
    PanelDef(
        "Agent read and publish rate",
        "timeseries",
        (
            _agent(
                'non_negative_derivative(max("samples_read"), 1s) AS "read", '
                'non_negative_derivative(max("samples_published"), 1s) AS "published"',
                ("read", "published"),
            ),
        ),
        unit="short",
        description="Samples per second read from the sources and acknowledged by the broker.",
        width=12,
    ),
    PanelDef(
        "Drops by reason",
        "bars",
        (_agent(f"non_negative_difference(max({DROPS}))", ("non_negative_difference_*",)),),
        unit="short",
        description=(
            "Increase per interval of every drop counter: outbox overflow by policy, dead "
            "letters, failed publishes, KPI samples that arrived after their window closed; "
            "ingest's rejected messages by reason and failed writes."
        ),
        width=12,
    ),
    PanelDef(
        "Outbox depth",
        "timeseries",
        (_agent('max("outbox_depth") AS "messages"', ("messages",)),),
        unit="short",
        description="Messages waiting for the broker's acknowledgement (bounded).",
        width=8,
    ),
    PanelDef(
        "Outbox bytes",
        "timeseries",
        (_agent('max("outbox_bytes") AS "bytes"', ("bytes",)),),
        unit="bytes",
        width=8,
    ),
    PanelDef(
        "Backbone reconnects",
        "bars",
        (
            _agent(
                'non_negative_difference(max("backbone_reconnects")) AS "reconnects"',
                ("reconnects",),
            ),
        ),
        unit="short",
        width=8,
    ),
    PanelDef(
        "Awaiting ingest's confirmation",
        "timeseries",
        (_agent('max("outbox_unconfirmed") AS "messages"', ("messages",)),),
        unit="short",
        description=(
            "Messages the broker acknowledged that ingest has not yet confirmed stored "
            "(delivery: stored). They stay in the outbox and are published again after a "
            "broker restart; a level that keeps rising means ingest is not keeping up."
        ),
        width=12,
    ),
    PanelDef(
        "Resident memory",
        "timeseries",
        (
            Query(
                f'SELECT max("rss_bytes") AS "rss" FROM {M} WHERE {SITE} AND '
                f'("agent" =~ /^$agent$/ OR "agent" =~ /^_ingest/) AND $timeFilter {BY_AGENT}',
                ("rss",),
                "$tag_agent $col",
            ),
        ),
        unit="bytes",
        description=(
            "Resident set size of every agent and ingest worker. Flat after start-up in the "
            "soak benchmarks; a climb that lasts for days is worth a report."
        ),
        width=12,
    ),
    PanelDef(
        "Per-stage latency",
        "timeseries",
        (
            Query(
                'SELECT mean("latency_p50_ms") AS "source -> agent p50" FROM "link_kpi" '
                f"WHERE {SITE} AND {CAMPUS_ONLY} AND $timeFilter "
                "GROUP BY time($__interval) fill(null)",
                ("source -> agent p50",),
            ),
            _agent(f"max({AGENT_STAGES})", ("max_latency_ms.*",)),
            Query(
                'SELECT max("ingest_lag_ms_max") AS "agent -> ingest lag", '
                'max("write_ms_max") AS "ingest -> database write" '
                f"FROM {M} WHERE {INGEST} {BY_AGENT}",
                ("agent -> ingest lag", "ingest -> database write"),
                "$tag_agent $col",
            ),
        ),
        unit="ms",
        description=(
            "Source -> agent: campus link latency (median). In the agent, p99 per metrics "
            "interval: receipt -> outbox (batch), outbox -> client (outbox), client -> PUBACK "
            "(ack), receipt -> PUBACK (total). Ingest: worst lag behind the agent's receipt "
            "and slowest database write per interval."
        ),
        width=24,
    ),
)
"""The panel table of the platform dashboard."""

SPEC: Final = DashboardDef(
    uid="tpo-platform",
    title="TPO platform",
    description="Agent and ingest self-metrics: rates, outbox, drops, reconnects, latency.",
    variables=VARIABLES,
    # No KPI window here: Grafana picks the interval (self-metrics come every few seconds).
    panels=tuple(replace(p, min_interval=None) for p in PANELS),
)


def platform_dashboard() -> Any:
    """The platform dashboard."""
    return dashboard(SPEC)
