"""Smart city dashboard: EV chargers and smart benches.

Charger KPIs (``charger_kpi``: utilisation, energy, sessions, availability, summed or averaged
over connectors) and bench KPIs (``bench_kpi``: solar yield, battery, protection mode,
occupancy) per KPI window, plus the raw channels from ``signal`` for the status timelines and
power. Connector status codes are the MQTT driver's unified OCPP 1.6 / 2.0.1 table; connectors
after the first appear as channels ``status_c2`` ... Bench data are counts only: no personal
data leaves a bench.
"""

# ruff: noqa: S608 -- InfluxQL assembled from constants for dashboards; no user input.

from __future__ import annotations

from typing import Any, Final

from dashboards.panels import DEVICES, WINDOW, DashboardDef, PanelDef, Query, dashboard
from dashboards.panels import tag_variables as _tag_variables
from drivers.mqtt.config import CHARGER_STATUS_CODES

CHARGERS: Final = '"charger_kpi"'
BENCHES: Final = '"bench_kpi"'
KPI: Final = f"{DEVICES} AND {WINDOW} AND $timeFilter"
RAW: Final = f"{DEVICES} AND $timeFilter"
BY_DEVICE: Final = 'GROUP BY time($__interval), "device" fill(null)'
PROTECTION_CODES: Final = ("off", "protection")
CONNECTOR: Final = "$tag_device $tag_channel"


def _kpi(
    measurement: str, select: str, fields: tuple[str, ...], alias: str = "$tag_device $col"
) -> Query:
    return Query(f"SELECT {select} FROM {measurement} WHERE {KPI} {BY_DEVICE}", fields, alias)


def _raw(channel: str, select: str, fields: tuple[str, ...], alias: str) -> Query:
    return Query(
        f'SELECT {select} FROM "signal" WHERE {RAW} AND "channel" =~ /^{channel}$/ '
        'GROUP BY time($__interval), "device", "channel" fill(previous)',
        fields,
        alias,
    )


PANELS: Final = (
    PanelDef("EV chargers", "row"),
    PanelDef(
        "Connector status",
        "state",
        (
            _raw(
                r"status(_c\d+)?",
                'last("value") AS "status"',
                ("status",),
                "$tag_device $tag_channel",
            ),
        ),
        codes=CHARGER_STATUS_CODES,
        width=24,
        height=7,
    ),
    PanelDef(
        "Charging power",
        "timeseries",
        (
            _raw(
                r"power_w(_c\d+)?",
                'mean("value") AS "power"',
                ("power",),
                "$tag_device $tag_channel",
            ),
        ),
        unit="watt",
        width=12,
    ),
    PanelDef(
        "Energy delivered",
        "bars",
        (_kpi(CHARGERS, 'sum("energy_wh") AS "energy"', ("energy",), "$tag_device"),),
        unit="watth",
        description="Increase of the energy import register per interval (all connectors).",
        width=12,
    ),
    PanelDef(
        "Utilisation and availability",
        "timeseries",
        (
            _kpi(
                CHARGERS,
                'mean("utilisation") AS "utilisation", mean("availability") AS "availability"',
                ("utilisation", "availability"),
            ),
        ),
        unit="percentunit",
        description=(
            "Utilisation = time Charging or Occupied / window; availability = 1 - time Faulted "
            "or Unavailable / window (mean over connectors)."
        ),
        width=12,
        min=0,
        max=1,
    ),
    PanelDef(
        "Charging sessions",
        "bars",
        (_kpi(CHARGERS, 'sum("sessions") AS "sessions"', ("sessions",), "$tag_device"),),
        unit="short",
        description="Transactions completed per interval.",
        width=12,
    ),
    PanelDef("Smart benches", "row"),
    PanelDef(
        "Battery state of charge",
        "timeseries",
        (
            _kpi(
                BENCHES,
                'mean("soc_mean_pct") AS "mean", min("soc_min_pct") AS "min"',
                ("mean", "min"),
            ),
        ),
        unit="percent",
        width=12,
        min=0,
        max=100,
    ),
    PanelDef(
        "Solar yield",
        "bars",
        (_kpi(BENCHES, 'sum("solar_yield_wh") AS "yield"', ("yield",), "$tag_device"),),
        unit="watth",
        width=12,
    ),
    PanelDef(
        "Protection mode",
        "state",
        (_raw("protect_mode", 'last("value") AS "protection"', ("protection",), "$tag_device"),),
        codes=PROTECTION_CODES,
        description="Battery protection (USB and Qi charging off) while the battery is low.",
        width=12,
        height=6,
    ),
    PanelDef(
        "Time in protection mode",
        "bars",
        (_kpi(BENCHES, 'sum("protection_s") AS "protection"', ("protection",), "$tag_device"),),
        unit="s",
        width=12,
        height=6,
    ),
    PanelDef(
        "Occupancy",
        "timeseries",
        (
            _kpi(
                BENCHES,
                'mean("occupancy_mean") AS "mean", max("occupancy_max") AS "max"',
                ("mean", "max"),
            ),
        ),
        unit="short",
        description="People on the bench (time-weighted mean, and maximum).",
        width=12,
    ),
    PanelDef(
        "Device charging sessions",
        "bars",
        (_kpi(BENCHES, 'sum("charging_sessions") AS "sessions"', ("sessions",), "$tag_device"),),
        unit="short",
        description="USB / Qi charging sessions started per interval.",
        width=12,
    ),
)
"""The panel table of the smart city dashboard."""

SPEC: Final = DashboardDef(
    uid="tpo-city",
    title="TPO smart city",
    description="EV chargers and smart benches (charger_kpi, bench_kpi, signal).",
    variables=_tag_variables("/^(charger|bench)_kpi$/"),
    panels=PANELS,
)


def city_dashboard() -> Any:
    """The smart city dashboard."""
    return dashboard(SPEC)
