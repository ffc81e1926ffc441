"""Every target of every panel, run against data from a simulated campus.

One run (module fixture): the example campus (Modbus meters, OPC UA machine tools and a PackML
line) plus its MQTT benches and chargers, reporting fast, the example site with 4 s KPI
windows, agent -> mosquitto -> ingest -> influxd, for about eight seconds. Then each
dashboard's variables are resolved by running their ``SHOW TAG VALUES`` queries in order
(chained, "All" selected), and every panel target, with Grafana's macros and those values
substituted by :func:`dashboards.macros.interpolate`, must return a series carrying every field
the panel shows, with at least one value.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.build import SPECS, dashboard_json
from dashboards.macros import interpolate
from dashboards.panels import DashboardDef
from edge.agent import Agent
from edge.config import SiteConfig
from edge.demo import example_scenario_path, example_site_path
from edge.influx import InfluxV1Writer
from edge.ingest import Ingest
from edge.services import Influxd, Mosquitto
from sim.campus import Campus, load_scenario
from sim.field import FieldDeviceSpec
from sim.truth import GroundTruth

pytestmark = pytest.mark.integration

WINDOW_S = 4.0
RUN_S = 8.0
FIELD = (
    # The example scenario's street furniture, reporting far faster than on the street, so
    # that percentiles have their sample sizes: a per-device p99 needs 1000 messages in one
    # window. At speed 60, cp-02 (two connectors, OCPP 2.0.1) sends several hundred
    # messages per second, so even a loaded CI machine fills a 4 s window.
    FieldDeviceSpec(kind="bench", id="bench-01", interval_s=0.4, seed=31, link="sa_uplink_loaded"),
    FieldDeviceSpec(kind="bench", id="bench-02", interval_s=0.4, seed=32, link="sa_nominal"),
    FieldDeviceSpec(kind="bench", id="bench-03", interval_s=0.4, seed=33, link="handover"),
    FieldDeviceSpec(kind="charger", id="cp-01", interval_s=0.4, seed=41, link="cell_edge"),
    FieldDeviceSpec(
        kind="charger", id="cp-02", interval_s=0.25, seed=42, ocpp="2.0.1", connectors=2
    ),
)

EXPECTED_EMPTY: dict[tuple[str, str, str], str] = {
    # (dashboard uid, panel title, refId): why the simulated run cannot fill it.
}
"""Targets that must come back empty from the simulated run, each with its reason."""

SPARSE_FIELDS: dict[tuple[str, str], str] = {
    (
        "tpo-link",
        "p99.9",
    ): "p99.9 needs 10 000 messages in one window; the run sends a few thousand",
    ("tpo-link", "p99.99"): "p99.99 needs 100 000 messages in one window",
}
"""Fields allowed to be all-null in the short run: (dashboard uid, column) -> reason."""


@dataclass(frozen=True)
class CampusRun:
    influxd: Influxd
    start_ms: int
    end_ms: int


def _site(broker: Mosquitto) -> SiteConfig:
    doc = yaml.safe_load(example_site_path().read_text())
    doc["agent"] = {**doc["agent"], "batch_max_age_s": 0.2, "metrics_interval_s": 1.0}
    doc["database"] = {**doc["database"], "flush_interval_s": 0.2}
    doc["kpi"] = {**doc["kpi"], "windows_s": [WINDOW_S], "allowed_lateness_s": 1.0}
    del broker  # the campus patches the broker in
    return SiteConfig.model_validate(doc)


async def _run_campus(broker: Mosquitto, influxd: Influxd, workdir: Path) -> None:
    scenario = load_scenario(example_scenario_path()).model_copy(update={"field": FIELD})
    truth = GroundTruth(workdir / "truth.jsonl")
    campus = Campus(scenario, truth, broker=(broker.host, broker.port))
    writer = InfluxV1Writer(url=influxd.url, database=influxd.database)
    await writer.ensure_database()
    await campus.start(paused=True)
    try:
        site = campus.patch_site(
            _site(broker), broker=(broker.host, broker.port), database=_site(broker).database
        )
        ingest = Ingest(site, writer, client_id=f"dash-ingest-{time.time_ns()}")
        ingest_task = asyncio.create_task(ingest.run())
        await asyncio.wait_for(ingest.ready.wait(), 10)
        agent = Agent(site)
        agent_task = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.started.wait(), 10)
        await asyncio.wait_for(agent.sources_ready.wait(), 30)  # connected and subscribed
        campus.resume()
        await asyncio.sleep(RUN_S)
        campus.pause()
        await asyncio.sleep(1.0)  # link-delayed messages land
        agent.stop()
        await asyncio.wait_for(agent_task, 30)
        published = agent.counters["samples_published"]
        async with asyncio.timeout(20):
            while ingest.stats.samples < published:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the last KPI messages
        ingest.stop()
        await asyncio.wait_for(ingest_task, 30)
    finally:
        await writer.close()
        await campus.stop()
        truth.close()


@pytest.fixture(scope="module")
def campus_run(
    mosquitto: Mosquitto, influxd_server: Influxd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CampusRun]:
    influxd_server.query(f'DROP DATABASE "{influxd_server.database}"')
    influxd_server.query(f'CREATE DATABASE "{influxd_server.database}"')
    start_ms = time.time_ns() // 1_000_000 - 60_000
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TPO_SITE_SECRET", "test-secret-not-for-production")  # charger idTags
        asyncio.run(_run_campus(mosquitto, influxd_server, tmp_path_factory.mktemp("campus")))
    yield CampusRun(influxd_server, start_ms, time.time_ns() // 1_000_000 + 60_000)


def _grafana_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern.strip("/"))


def resolve_variables(run: CampusRun, doc: dict[str, Any]) -> dict[str, str | list[str]]:
    """Run the variables' queries in order, as Grafana does, selecting "All" (or the first)."""
    values: dict[str, str | list[str]] = {}
    for var in doc["templating"]["list"]:
        q = interpolate(
            var["query"], values, start_ms=run.start_ms, end_ms=run.end_ms, interval_s=1
        )
        found = sorted({row[1] for s in run.influxd.query(q) for row in s["values"]})  # type: ignore[attr-defined]
        if var["regex"]:
            found = [v for v in found if _grafana_regex(var["regex"]).search(v)]
        assert found, f"{doc['uid']}: variable ${var['name']} has no values ({q})"
        values[var["name"]] = found if var["multi"] else found[0]
    return values


def _interval_s(panel: dict[str, Any], values: dict[str, str | list[str]]) -> float:
    raw = panel.get("interval") or "1s"
    if raw.startswith("$"):
        raw = str(values[raw[1:]])
    assert raw.endswith("s"), raw
    return float(raw.removesuffix("s"))


def _cases() -> list[Any]:
    cases = []
    for spec in SPECS:
        for panel in spec.panels:
            for i, query in enumerate(panel.queries):
                ref = chr(ord("A") + i)
                cases.append(
                    pytest.param(
                        spec, panel.title, ref, query.fields, id=f"{spec.uid}:{panel.title}:{ref}"
                    )
                )
    return cases


@pytest.mark.parametrize(("spec", "title", "ref", "fields"), _cases())
def test_panel_target_returns_data(
    campus_run: CampusRun, spec: DashboardDef, title: str, ref: str, fields: tuple[str, ...]
) -> None:
    doc = dashboard_json(spec)
    values = resolve_variables(campus_run, doc)
    panel = next(p for p in doc["panels"] if p["title"] == title)
    target = next(t for t in panel["targets"] if t["refId"] == ref)
    q = interpolate(
        target["query"],
        values,
        start_ms=campus_run.start_ms,
        end_ms=campus_run.end_ms,
        interval_s=_interval_s(panel, values),
    )
    series = campus_run.influxd.query(q)
    expected_empty = EXPECTED_EMPTY.get((spec.uid, title, ref))
    if expected_empty is not None:
        assert not series, f"returns data now; remove it from EXPECTED_EMPTY ({expected_empty})"
        pytest.skip(f"expected empty: {expected_empty}")
    assert series, f"no series for {q}"
    for pattern in fields:
        columns = {c for s in series for c in s["columns"] if fnmatch.fnmatchcase(c, pattern)}  # type: ignore[attr-defined]
        assert columns, f"no column {pattern!r} in {[s['columns'] for s in series]} for {q}"
        if (spec.uid, pattern) in SPARSE_FIELDS:
            continue
        for column in columns:
            filled = [
                row[s["columns"].index(column)]  # type: ignore[attr-defined]
                for s in series
                if column in s["columns"]  # type: ignore[operator]
                for row in s["values"]  # type: ignore[attr-defined]
                if row[s["columns"].index(column)] is not None  # type: ignore[attr-defined]
            ]
            assert filled, f"column {column!r} is all null for {q}"
