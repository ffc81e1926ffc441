"""Panel tables: frozen dataclasses describing panels and their InfluxQL, turned into grafanalib.

A dashboard module declares its panels as a tuple of :class:`PanelDef` (title, kind, unit,
queries) and :func:`dashboard` lays them out on Grafana's 24-column grid, adds the template
variables and returns a grafanalib ``Dashboard``. Every :class:`Query` names the columns it
returns (:attr:`Query.fields`), so the data test can check that each one comes back.

Queries use Grafana's InfluxQL macros (``$timeFilter``, ``$__interval``, ``$__interval_ms``)
and the template variables in their regex form (``"device" =~ /^$device$/``), which works for a
single value, several, and "All"; :func:`dashboards.macros.interpolate` expands them the way
Grafana does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

from grafanalib import core as g
from grafanalib.influxdb import InfluxDBTarget

DATASOURCE_UID: Final = "tpo-influxdb"
"""Fixed uid of the provisioned InfluxDB datasource; every panel and variable points at it."""
DATASOURCE: Final = {"type": "influxdb", "uid": DATASOURCE_UID}
GRID_WIDTH: Final = 24

SITE: Final = '"site" =~ /^$site$/'
AREA: Final = '"area" =~ /^$area$/'
DEVICE: Final = '"device" =~ /^$device$/'
WINDOW: Final = "\"window\" = '$window'"
CAMPUS_ONLY: Final = "\"area\" = '_campus'"
"""The campus-wide merged link KPIs (``area = device = "_campus"``)."""
DEVICES: Final = f"{SITE} AND {AREA} AND {DEVICE}"
"""Per-device filter: site, area and device variables (merged points never match)."""

Kind = Literal["timeseries", "bars", "stat", "bargauge", "state", "heatmap", "table", "row"]


@dataclass(frozen=True, slots=True)
class Query:
    """One InfluxQL target of a panel."""

    influxql: str
    fields: tuple[str, ...]
    """Columns the panel shows; a trailing ``*`` matches a prefix (regex field selections)."""
    alias: str = ""
    table: bool = False
    """Result format ``table`` (tags become columns) instead of ``time_series``."""


@dataclass(frozen=True, slots=True)
class PanelDef:
    """One panel: what it shows, how, and the queries behind it."""

    title: str
    kind: Kind
    queries: tuple[Query, ...] = ()
    unit: str = ""
    description: str = ""
    width: int = 12
    height: int = 8
    min: float | None = None
    max: float | None = None
    codes: tuple[str, ...] = ()
    """Value mappings code -> name (state timelines): the code table of the channel."""
    transformations: tuple[dict[str, Any], ...] = ()
    calc: str = "lastNotNull"
    """Reduction of stat and bar gauge panels."""
    min_interval: str | None = "$window"
    """Panel min interval: a KPI window, so ``$__interval`` never splits a window."""


@dataclass(frozen=True, slots=True)
class Variable:
    """A template variable filled by an InfluxQL ``SHOW TAG VALUES`` query."""

    name: str
    label: str
    query: str
    multi: bool = True
    regex: str = ""
    """Grafana's filter on the returned values (hides ``_area`` / ``_campus``)."""


@dataclass(frozen=True, slots=True)
class DashboardDef:
    """A whole dashboard: identity, variables and the panel table."""

    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    panels: tuple[PanelDef, ...]
    tags: tuple[str, ...] = field(default=("tpo-edge",))


def tag_variables(measurement: str, *, window: bool = True) -> tuple[Variable, ...]:
    """Chained site -> area -> device variables (and the KPI window) from one measurement.

    ``measurement`` may be a regex (``/^(charger|bench)_kpi$/``). Merged link points
    (``_area``, ``_campus``) are left out of the choices: the campus panels query them directly.
    """
    source = measurement if measurement.startswith("/") else f'"{measurement}"'
    out = [
        Variable("site", "Site", f'SHOW TAG VALUES FROM {source} WITH KEY = "site"'),
        Variable(
            "area",
            "Area",
            f'SHOW TAG VALUES FROM {source} WITH KEY = "area" WHERE {SITE}',
            regex="/^[^_].*/",
        ),
        Variable(
            "device",
            "Device",
            f'SHOW TAG VALUES FROM {source} WITH KEY = "device" WHERE {SITE} AND {AREA}',
            regex="/^[^_].*/",
        ),
    ]
    if window:
        out.append(
            Variable(
                "window",
                "KPI window",
                f'SHOW TAG VALUES FROM {source} WITH KEY = "window" WHERE {SITE}',
                multi=False,
            )
        )
    return tuple(out)


def value_mappings(codes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Grafana value mappings of a code table (code i -> name i)."""
    return [
        {
            "type": "value",
            "options": {str(i): {"text": name, "index": i} for i, name in enumerate(codes)},
        }
    ]


def _targets(panel: PanelDef) -> list[InfluxDBTarget]:
    return [
        InfluxDBTarget(
            query=q.influxql,
            alias=q.alias,
            refId=chr(ord("A") + i),
            datasource=DATASOURCE,
            format="table" if q.table else "time_series",
        )
        for i, q in enumerate(panel.queries)
    ]


def _panel(panel: PanelDef, pos: g.GridPos) -> Any:
    common: dict[str, Any] = {
        "title": panel.title,
        "description": panel.description or None,
        "dataSource": DATASOURCE,
        "targets": _targets(panel),
        "gridPos": pos,
        "interval": panel.min_interval,
        "transformations": list(panel.transformations),
    }
    limits = {"min": panel.min, "max": panel.max}
    defaults = {k: v for k, v in limits.items() if v is not None}
    if panel.kind in {"timeseries", "bars"}:
        bars = panel.kind == "bars"
        return g.TimeSeries(
            **common,
            unit=panel.unit,
            drawStyle="bars" if bars else "line",
            fillOpacity=60 if bars else 10,
            showPoints="never" if bars else "auto",
            spanNulls=not bars,
            legendDisplayMode="table",
            legendCalcs=["mean", "max", "lastNotNull"],
            valueMin=panel.min,
            valueMax=panel.max,
        )
    if panel.kind == "stat":
        return g.Stat(
            **common,
            format=panel.unit,
            reduceCalc=panel.calc,
            graphMode="area",
            extraJson={"fieldConfig": {"defaults": defaults}} if defaults else None,
        )
    if panel.kind == "bargauge":
        return g.BarGauge(
            **common,
            format=panel.unit,
            calc=panel.calc,
            displayMode="gradient",
            min=panel.min if panel.min is not None else 0,
            max=panel.max if panel.max is not None else 100,
            orientation="horizontal",
        )
    if panel.kind == "state":
        return g.StateTimeline(
            **common,
            mappings=value_mappings(panel.codes),
            mergeValues=True,
            showValue="auto",
            colorMode="palette-classic",
        )
    if panel.kind == "heatmap":
        return g.Heatmap(
            **common,
            dataFormat="timeseries",
            hideZeroBuckets=True,
            extraJson={"yAxis": {"format": panel.unit, "logBase": 2}},
        )
    if panel.kind == "table":
        return g.Table(**common, unit=panel.unit)
    msg = f"panel {panel.title!r}: unknown kind {panel.kind!r}"
    raise ValueError(msg)


def layout(panels: tuple[PanelDef, ...]) -> list[Any]:
    """Grafanalib panels placed left to right on the 24-column grid; a row starts a new line."""
    out: list[Any] = []
    x = y = line_height = 0
    for panel in panels:
        if panel.kind == "row":
            y += line_height
            out.append(
                g.RowPanel(title=panel.title, gridPos=g.GridPos(h=1, w=GRID_WIDTH, x=0, y=y))
            )
            x, y, line_height = 0, y + 1, 0
            continue
        if x + panel.width > GRID_WIDTH:
            x, y, line_height = 0, y + line_height, 0
        out.append(_panel(panel, g.GridPos(h=panel.height, w=panel.width, x=x, y=y)))
        x += panel.width
        line_height = max(line_height, panel.height)
    return out


def _template(var: Variable) -> Any:
    return g.Template(
        name=var.name,
        label=var.label,
        query=var.query,
        dataSource=DATASOURCE,
        includeAll=var.multi,
        multi=var.multi,
        regex=var.regex or None,
        refresh=2,  # on time range change: new devices appear without a reload
        sort=1,
    )


def dashboard(spec: DashboardDef) -> Any:
    """The grafanalib Dashboard of a dashboard table (panel ids assigned)."""
    return g.Dashboard(
        title=spec.title,
        uid=spec.uid,
        description=spec.description,
        tags=list(spec.tags),
        timezone="browser",
        refresh="10s",
        time=g.Time("now-1h", "now"),
        graphTooltip=g.GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
        schemaVersion=36,
        templating=g.Templating(list=[_template(v) for v in spec.variables]),
        panels=layout(spec.panels),
    ).auto_panel_ids()
