"""Modbus end to end: simulated meters -> agent -> mosquitto -> ingest -> influxd.

The stored values must equal the simulator's ground truth exactly: same count
per channel, same values bit for bit, in the same order.
"""

from __future__ import annotations

import asyncio

import pytest

from edge.services import Influxd, Mosquitto
from sim.modbus import ModbusDeviceSpec, ModbusServerSim
from sim.truth import GroundTruth

from .helpers import make_site, running_platform, stored_values, truth_values

pytestmark = pytest.mark.integration


async def test_two_meters_reach_influxdb_exactly(mosquitto: Mosquitto, influxd: Influxd) -> None:
    truth = GroundTruth()
    specs = [
        ModbusDeviceSpec(kind="sdm630", name="meter-a", unit_id=1, seed=1),
        ModbusDeviceSpec(
            kind="umg604", name="meter-b", unit_id=7, order="CDAB", max_block=40, seed=2
        ),
    ]
    sims = [ModbusServerSim("127.0.0.1", 0, [spec], truth) for spec in specs]
    for sim in sims:
        await sim.start()
    try:
        sources = [
            sim.devices[0].source_config("hall-a", sim.host, sim.port, poll_interval_s=0.05)
            for sim in sims
        ]
        site = make_site(sources, mosquitto.port)
        async with running_platform(site, influxd) as (agent, _ingest):
            await asyncio.sleep(2.0)
        assert agent.counters["samples_read"] == agent.counters["samples_published"]
    finally:
        for sim in sims:
            await sim.stop()

    total = 0
    for spec in specs:
        expected = truth_values(truth, spec.name)
        stored = stored_values(influxd, spec.name)
        assert set(stored) == set(expected), spec.name
        for channel, values in expected.items():
            got = stored[channel]
            assert [v for v, _ in got] == values, f"{spec.name}/{channel}"
            assert {q for _, q in got} == {0}
            total += len(values)
    assert total == truth.delivered_count()
    assert total > 500  # 2 s at 20 Hz x ~30 channels: enough to mean something
