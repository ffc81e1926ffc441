"""Golden cases: tests/cases/<name>/{config,device,expected}.yaml, walked by one table test.

Each case starts a pymodbus server holding exactly the raw words of device.yaml
and runs the real driver against it over TCP.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from drivers.base import BAD, GOOD
from drivers.modbus.config import ModbusSource
from sim.modbus import ModbusServerSim, SimulatedDevice

CASES = Path(__file__).resolve().parents[2] / "cases"
CASE_NAMES = sorted(p.name for p in CASES.iterdir() if (p / "config.yaml").exists())


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _device(spec: dict[str, Any]) -> SimulatedDevice:
    device = SimulatedDevice("case", spec["unit_id"], max_block=spec.get("max_block"))
    for block in spec.get("registers", ()):
        device.set_raw(block["table"], block["address"], block["words"])
    for hole in spec.get("illegal", ()):
        device.mark_illegal(hole["table"], hole["start"], hole["end"])
    return device


def test_there_are_cases() -> None:
    assert len(CASE_NAMES) >= 15


@pytest.mark.parametrize("name", CASE_NAMES)
async def test_case(name: str, make_driver: Any) -> None:
    case = CASES / name
    config = _load(case / "config.yaml")
    expected = _load(case / "expected.yaml")
    async with ModbusServerSim("127.0.0.1", 0, [_device(_load(case / "device.yaml"))]) as sim:
        source = ModbusSource.model_validate({**config, "host": "127.0.0.1", "port": sim.port})
        driver = make_driver(source)
        async with driver:
            batch = await driver.read_batch()
    got = {driver.series[int(s)].channel: i for i, s in enumerate(batch.series)}
    assert sorted(got) == sorted(expected["channels"]), "every channel yields exactly one sample"
    for channel, want in expected["channels"].items():
        i = got[channel]
        if isinstance(want, dict):
            assert batch.quality[i] == BAD, channel
            assert math.isnan(batch.value[i]), channel
            assert driver.ctx.counters[f"modbus_{want['error']}"] >= 1, channel
        else:
            assert batch.quality[i] == GOOD, channel
            assert batch.value[i] == want, f"{channel}: {batch.value[i]!r} != {want!r}"
    for counter, count in (expected.get("counters") or {}).items():
        assert driver.ctx.counters[counter] == count, counter
