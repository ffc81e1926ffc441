"""The engineer's commands, run as processes: `tpo-edge demo` and `tpo-edge read --once`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from edge.config import load_site
from edge.demo import example_scenario_path, example_site_path
from edge.services import Mosquitto
from sim.campus import Campus, load_scenario
from sim.truth import GroundTruth

pytestmark = pytest.mark.integration

TPO_EDGE = [sys.executable, "-m", "edge"]


async def run(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *TPO_EDGE,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


def _demo_env() -> dict[str, str]:
    return {"TPO_SITE_SECRET": "test-secret-not-for-production"}


async def test_demo_stores_everything_it_simulated(tmp_path: Path, mosquitto: Mosquitto) -> None:
    summary_path = tmp_path / "summary.json"
    code, out, err = await run(
        "demo",
        "--duration",
        "6",
        "--summary-json",
        str(summary_path),
        "--report",
        str(tmp_path / "report.html"),
        "--no-live",
        env=_demo_env(),
    )
    assert code == 0, err[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["simulated"] > 500
    assert summary["lost"] == 0
    assert summary["stored"] == summary["simulated"]
    assert summary["published"] == summary["read"]
    assert summary["broker"] == "mosquitto"
    assert summary["database"] == "influxd"
    assert json.loads(out)["stored"] == summary["stored"]
    assert Path(summary["report"]) == tmp_path / "report.html"
    assert "<svg" in (tmp_path / "report.html").read_text()


async def test_demo_without_servers_uses_python_broker_and_sqlite(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    code, _, err = await run(
        "demo",
        "--duration",
        "4",
        "--summary-json",
        str(summary_path),
        "--report",
        str(tmp_path / "report.html"),
        "--no-live",
        "--broker",
        "python",
        "--database",
        "sqlite",
        env=_demo_env(),
    )
    assert code == 0, err[-3000:]
    summary = json.loads(summary_path.read_text())
    assert (summary["broker"], summary["database"]) == ("python", "sqlite")
    assert summary["simulated"] > 300
    assert summary["lost"] == 0


async def test_demo_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    proc = await asyncio.create_subprocess_exec(
        *TPO_EDGE,
        "demo",
        "--duration",
        "0",
        "--summary-json",
        str(summary_path),
        "--report",
        str(tmp_path / "report.html"),
        "--no-live",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **_demo_env()},
    )
    await asyncio.sleep(8)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["lost"] == 0
    assert summary["simulated"] > 0


async def test_read_once_prints_every_channel_of_every_source(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    truth = GroundTruth()
    campus = Campus(
        load_scenario(example_scenario_path()), truth, broker=(mosquitto.host, mosquitto.port)
    )
    await campus.start()
    try:
        base = load_site(example_site_path())
        site = campus.patch_site(
            base, broker=(mosquitto.host, mosquitto.port), database=base.database
        )
        site_file = tmp_path / "site.yaml"
        site_file.write_text(
            yaml.safe_dump(site.model_dump(mode="json", exclude_none=True), sort_keys=False)
        )
        code, out, err = await run(
            "read", "-c", str(site_file), "--once", "--timeout", "3", env=_demo_env()
        )
    finally:
        await campus.stop()
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in out.splitlines()]
    polled_or_subscribed = {
        (k.device, k.channel) for k in site.series_table() if k.kind in {"modbus", "opcua"}
    }
    seen = {(r["device"], r["channel"]) for r in rows}
    assert polled_or_subscribed <= seen
    sample = next(r for r in rows if r["device"] == "meter-hall-a" and r["channel"] == "voltage_l1")
    assert sample["unit"] == "V"
    assert sample["quality"] == "good"
    assert 200 < sample["value"] < 260
    assert sample["ts_source"] is None
    assert sample["ts_receive"] > 0
    state = next(
        r for r in rows if r["device"] == "mill-1" and r["channel"].endswith("MachineryItemState")
    )
    assert state["code"] in {"NotAvailable", "OutOfService", "NotExecuting", "Executing"}
    # Field devices push: every bench and charger of the scenario reported within the timeout.
    field_devices = {k.device for k in site.series_table() if k.kind == "mqtt"}
    assert field_devices <= {r["device"] for r in rows}
    bench = next(r for r in rows if r["device"] == "bench-01" and r["channel"] == "batt_soc_pct")
    assert bench["ts_source"] is not None
    assert bench["seq"] is not None
