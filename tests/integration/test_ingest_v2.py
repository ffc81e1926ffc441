"""``database.kind: influxdb_v2`` end to end: sim -> agent -> mosquitto -> ingest -> v2 API.

The v2 front is :mod:`tests.integration.v2shim` over the real influxd; it answers 429 (with
Retry-After) and 503 once each, which ingest must ride out without losing or doubling data.
"""

from __future__ import annotations

import asyncio

import pytest

from edge.agent import Agent
from edge.ingest import Ingest
from edge.services import Influxd, Mosquitto
from edge.sinks import open_sink
from sim.modbus import ModbusDeviceSpec, ModbusServerSim
from sim.truth import GroundTruth

from .helpers import make_site, stored_values, truth_values
from .ingest_procs import signal_count
from .v2shim import ORG, TOKEN, v2_shim

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_v2_database_end_to_end_with_retries(
    mosquitto: Mosquitto, influxd: Influxd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IT_INFLUX_TOKEN", TOKEN)
    truth = GroundTruth()
    sim = ModbusServerSim(
        "127.0.0.1", 0, [ModbusDeviceSpec(kind="umg604", name="meter-v2", unit_id=3, seed=9)], truth
    )
    await sim.start()
    async with v2_shim(influxd) as shim:
        shim.answers = [(429, {"Retry-After": "1"}), (503, {})]
        site = make_site(
            [sim.devices[0].source_config("hall-v", sim.host, sim.port, poll_interval_s=0.05)],
            mosquitto.port,
            database={
                "kind": "influxdb_v2",
                "url": shim.url,
                "org": ORG,
                "bucket": "tpo",
                "token_env": "IT_INFLUX_TOKEN",
                "flush_interval_s": 0.2,
            },
        )
        sink = await open_sink(site.database)
        ingest = Ingest(site, sink, client_id="it-ingest-v2")
        ingest_task = asyncio.create_task(ingest.run())
        agent = Agent(site)
        try:
            await asyncio.wait_for(ingest.ready.wait(), 10)
            agent_task = asyncio.create_task(agent.run())
            await asyncio.wait_for(agent.started.wait(), 10)
            await asyncio.sleep(2.5)
            agent.stop()
            await asyncio.wait_for(agent_task, 30)
            published = agent.counters["samples_published"]
            async with asyncio.timeout(20):
                while signal_count(influxd) < published:
                    await asyncio.sleep(0.1)
        finally:
            ingest.stop()
            await asyncio.wait_for(ingest_task, 30)
            await sink.close()
            await sim.stop()
    assert shim.seen[:3] == ["429", "503", "forward"]
    assert all(wire < plain for wire, plain in shim.sizes if plain > 1000)  # gzip on the wire
    expected, stored = truth_values(truth, "meter-v2"), stored_values(influxd, "meter-v2")
    assert set(stored) == set(expected)
    for channel, values in expected.items():
        assert [v for v, _ in stored[channel]] == values, channel
    assert sum(map(len, expected.values())) == truth.delivered_count() == published
    assert published == signal_count(influxd) > 300
