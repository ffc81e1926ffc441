"""Machines dashboard: OEE and its factors, machine state, part counters, energy per part.

OEE comes from ``machine_kpi`` (one point per machine and KPI window; OPC 40001 machine tools
and PackML lines, see :mod:`edge.kpi`). The state timelines read the raw state channel from
``signal`` and name its codes with the companion specifications' tables (the same tables the
OPC UA simulator and site files use). Energy per part divides the drive energy (the integral
of ``Monitoring.Drive.ActPower``, kW) by the parts made, per machine, over the time range; the
division is a Grafana transformation because InfluxQL cannot join two measurements.
"""

# ruff: noqa: S608 -- InfluxQL assembled from constants for dashboards; no user input.

from __future__ import annotations

from typing import Any, Final

from dashboards.panels import DEVICES, WINDOW, DashboardDef, PanelDef, Query, dashboard
from dashboards.panels import tag_variables as _tag_variables
from sim.opcua import ITEM_STATES, PACKML_STATES

M: Final = '"machine_kpi"'
KPI: Final = f"{DEVICES} AND {WINDOW} AND $timeFilter"
RAW: Final = f"{DEVICES} AND $timeFilter"
BY_DEVICE: Final = 'GROUP BY time($__interval), "device" fill(null)'
ITEM_STATE: Final = "MachineryBuildingBlocks.MachineryItemState"
PACKML_STATE: Final = "Status.StateCurrent"
POWER: Final = "Monitoring.Drive.ActPower"


def _kpi(select: str, fields: tuple[str, ...], alias: str = "$tag_device $col") -> Query:
    return Query(f"SELECT {select} FROM {M} WHERE {KPI} {BY_DEVICE}", fields, alias)


def _state(channel: str) -> Query:
    return Query(
        f'SELECT last("value") AS "state" FROM "signal" WHERE {RAW} AND "channel" = '
        f"'{channel}' GROUP BY time($__interval), \"device\" fill(previous)",
        ("state",),
        "$tag_device",
    )


PANELS: Final = (
    PanelDef(
        "OEE per machine (time range)",
        "bargauge",
        (
            Query(
                f'SELECT mean("oee") AS "OEE" FROM {M} WHERE {KPI} GROUP BY "device"',
                ("OEE",),
                "$tag_device",
            ),
        ),
        unit="percentunit",
        description="Mean of the windows' OEE = availability x performance x quality.",
        calc="mean",
        width=8,
        max=1,
    ),
    PanelDef(
        "OEE",
        "timeseries",
        (_kpi('mean("oee") AS "OEE"', ("OEE",), "$tag_device"),),
        unit="percentunit",
        width=16,
        min=0,
    ),
    PanelDef(
        "Availability, performance, quality",
        "timeseries",
        (
            _kpi(
                'mean("availability") AS "availability", mean("performance") AS "performance", '
                'mean("quality") AS "quality"',
                ("availability", "performance", "quality"),
            ),
        ),
        unit="percentunit",
        description=(
            "Availability = run time / planned time; performance = ideal cycle x parts / run "
            "time; quality = good / total parts."
        ),
        width=24,
        min=0,
    ),
    PanelDef(
        "Machine tool state (OPC 40001 MachineryItemState)",
        "state",
        (_state(ITEM_STATE),),
        codes=ITEM_STATES,
        width=12,
        height=6,
    ),
    PanelDef(
        "Packaging line state (PackML StateCurrent)",
        "state",
        (_state(PACKML_STATE),),
        codes=PACKML_STATES,
        width=12,
        height=6,
    ),
    PanelDef(
        "Parts made and good",
        "bars",
        (_kpi('sum("total_count") AS "parts", sum("good_count") AS "good"', ("parts", "good")),),
        unit="short",
        width=12,
    ),
    PanelDef(
        "Planned and run time",
        "bars",
        (_kpi('sum("planned_s") AS "planned", sum("run_s") AS "run"', ("planned", "run")),),
        unit="s",
        width=12,
    ),
    PanelDef(
        "Energy per part",
        "table",
        (
            Query(
                f'SELECT integral("value", 1h) AS "energy_kwh" FROM "signal" WHERE {RAW} '
                f'AND "channel" = \'{POWER}\' GROUP BY "device"',
                ("energy_kwh",),
                table=True,
            ),
            Query(
                f'SELECT sum("total_count") AS "parts" FROM {M} WHERE {KPI} GROUP BY "device"',
                ("parts",),
                table=True,
            ),
        ),
        unit="kwatth",
        description=(
            "Drive energy (integral of ActPower) / parts completed, per machine over the range. "
            "Machines without a power channel (PackML lines) show parts only."
        ),
        transformations=(
            {"id": "merge", "options": {}},
            {
                "id": "calculateField",
                "options": {
                    "mode": "binary",
                    "binary": {"left": "energy_kwh", "operator": "/", "right": "parts"},
                    "alias": "kWh per part",
                    "replaceFields": False,
                },
            },
        ),
        width=24,
        height=6,
    ),
)
"""The panel table of the machines dashboard."""

SPEC: Final = DashboardDef(
    uid="tpo-machines",
    title="TPO machines",
    description="OEE, state, counters and energy per part of the campus machines (machine_kpi).",
    variables=_tag_variables("machine_kpi"),
    panels=PANELS,
)


def machines_dashboard() -> Any:
    """The machines dashboard."""
    return dashboard(SPEC)
