"""Dashboards as code: snapshots of the JSON, provisioning files, the CLI, macro expansion."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dashboards.build import SPECS, build, dashboard_json, render
from dashboards.macros import format_interval, interpolate, regex_value
from dashboards.panels import DATASOURCE_UID
from edge.cli import app

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("UPDATE_SNAPSHOTS", "") == "1"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.uid)
def test_dashboard_json_matches_snapshot(spec) -> None:
    """The generated JSON is the product: any change must be reviewed (UPDATE_SNAPSHOTS=1)."""
    path = SNAPSHOTS / f"{spec.uid}.json"
    text = render(spec)
    if UPDATE:
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"no snapshot {path.name}: run with UPDATE_SNAPSHOTS=1 and review it"
    assert text == path.read_text(encoding="utf-8"), (
        f"{spec.uid} changed; review the diff and regenerate with UPDATE_SNAPSHOTS=1"
    )


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.uid)
def test_every_panel_targets_the_provisioned_datasource(spec) -> None:
    doc = dashboard_json(spec)
    assert doc["uid"] == spec.uid
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    assert panels
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "influxdb", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID
            assert target["rawQuery"] is True
            assert "$timeFilter" in target["query"], (panel["title"], target["query"])
        pos = panel["gridPos"]
        assert pos["x"] >= 0
        assert pos["x"] + pos["w"] <= 24
    names = [v["name"] for v in doc["templating"]["list"]]
    assert names[0] == "site"
    for var in doc["templating"]["list"]:
        assert var["query"].startswith("SHOW TAG VALUES")
        assert var["datasource"]["uid"] == DATASOURCE_UID
        used = any(f"${var['name']}" in t["query"] for p in panels for t in p["targets"])
        used |= any(f"${var['name']}" in v["query"] for v in doc["templating"]["list"])
        assert used, f"variable {var['name']} is never used"


def test_state_timelines_name_the_code_tables() -> None:
    machines = dashboard_json(next(s for s in SPECS if s.uid == "tpo-machines"))
    timelines = {p["title"]: p for p in machines["panels"] if p["type"] == "state-timeline"}
    item = next(p for t, p in timelines.items() if "MachineryItemState" in t)
    options = item["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert options["3"]["text"] == "Executing"
    packml = next(p for t, p in timelines.items() if "PackML" in t)
    assert packml["fieldConfig"]["defaults"]["mappings"][0]["options"]["6"]["text"] == "Execute"


def test_cli_build_writes_dashboards_and_provisioning(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["dashboards", "build", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted(
        [
            *(f"dashboards/{s.uid}.json" for s in SPECS),
            "provisioning/datasources/tpo-influxdb.yaml",
            "provisioning/dashboards/tpo.yaml",
        ]
    )
    for spec in SPECS:
        assert json.loads((tmp_path / "dashboards" / f"{spec.uid}.json").read_text())["title"]
    ds = yaml.safe_load((tmp_path / "provisioning/datasources/tpo-influxdb.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "influxdb"
    # Hosts, names and secrets come from Grafana's environment, never from the repo.
    assert source["url"].startswith("$")
    assert source["user"].startswith("$")
    assert source["jsonData"]["dbName"].startswith("$")
    assert source["secureJsonData"]["password"].startswith("$")
    provider = yaml.safe_load((tmp_path / "provisioning/dashboards/tpo.yaml").read_text())
    (entry,) = provider["providers"]
    assert entry["type"] == "file"
    assert entry["options"]["path"]


def test_build_is_deterministic(tmp_path: Path) -> None:
    first = {p.name: p.read_bytes() for p in build(tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in build(tmp_path / "b")}
    assert first == second


def test_interpolate_expands_macros_and_variables() -> None:
    q = (
        'SELECT max("x") FROM "m" WHERE "site" =~ /^$site$/ AND "device" =~ /^${device}$/ '
        "AND \"window\" = '[[window]]' AND $timeFilter "
        "GROUP BY time($__interval) fill(null) -- $__interval_ms $interval"
    )
    out = interpolate(
        q,
        {"site": ["tpo"], "device": ["mill-1", "a.b"], "window": "10s"},
        start_ms=1000,
        end_ms=2000,
        interval_s=10,
    )
    assert out == (
        'SELECT max("x") FROM "m" WHERE "site" =~ /^tpo$/ AND "device" =~ /^(mill-1|a\\.b)$/ '
        "AND \"window\" = '10s' AND time >= 1000ms and time <= 2000ms "
        "GROUP BY time(10s) fill(null) -- 10000 10s"
    )
    assert "$" not in re.sub(r"\$/", "", out)


def test_interpolate_rejects_unknown_variables() -> None:
    with pytest.raises(KeyError, match="nope"):
        interpolate("SELECT 1 FROM m WHERE $nope", {}, start_ms=0, end_ms=1, interval_s=1)


@pytest.mark.parametrize(
    ("seconds", "text"), [(2, "2s"), (0.5, "500ms"), (60, "1m"), (90, "90s"), (600, "10m")]
)
def test_format_interval(seconds: float, text: str) -> None:
    assert format_interval(seconds) == text


def test_regex_value_escapes_metacharacters() -> None:
    assert regex_value(["a/b", "c|d", "e(f)"]) == r"(a\/b|c\|d|e\(f\))"
