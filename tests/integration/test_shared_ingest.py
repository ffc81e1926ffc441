"""Scale-out ingest: two worker processes share the data through an MQTT 5 shared subscription.

One worker is SIGKILLed mid-run and restarted by its "supervisor" with the same client id
(mosquitto keeps the messages in flight to a dead shared subscriber in that subscriber's
session). Nothing may be lost, nothing stored twice, and the merged link KPIs (``_area`` and
``_campus``) must equal the sum of the per-device ones: each worker merges every window from
its own, unshared KPI subscription and acknowledges a link KPI message only after the merge it
went into is written, so a crash never leaves a worker with half a window.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edge.agent import Agent
from edge.services import Influxd, Mosquitto
from sim.clock import SimClock
from sim.field import FieldDeviceSpec, FieldSim
from sim.link import LinkProfile
from sim.modbus import ModbusDeviceSpec, ModbusServerSim
from sim.truth import GroundTruth

from .helpers import make_site, stored_values, truth_values
from .ingest_procs import IngestProc, link_merge_problems, query_ns, signal_count, write_site

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

BENCHES = {"street": ("bench-s1", "bench-s2"), "north": ("bench-n1",)}


def field_source(broker: Mosquitto, area: str, devices: tuple[str, ...]) -> dict[str, Any]:
    return {
        "type": "mqtt",
        "area": area,
        "device": f"field-{area}",
        "broker": {"host": broker.host, "port": broker.port},
        "topics": [f"field/bench/{d}/telemetry" for d in devices],
        "devices": [{"id": d, "kind": "bench"} for d in devices],
    }


async def test_two_workers_one_killed_lose_nothing_and_merge_exactly(
    tmp_path: Path, mosquitto: Mosquitto, influxd: Influxd
) -> None:
    truth = GroundTruth()
    meter = ModbusServerSim(
        "127.0.0.1", 0, [ModbusDeviceSpec(kind="sdm630", name="meter-s", unit_id=1, seed=5)], truth
    )
    await meter.start()
    link = LinkProfile(delay_ms=5, jitter_ms=1)
    specs = [
        FieldDeviceSpec(kind="bench", id=d, interval_s=60, seed=40 + i, count=70, link=link)
        for i, d in enumerate(d for ds in BENCHES.values() for d in ds)
    ]
    field = FieldSim(mosquitto.host, mosquitto.port, specs, truth, SimClock(speed=600))
    sources = [
        meter.devices[0].source_config("hall-s", meter.host, meter.port, poll_interval_s=0.05),
        *(field_source(mosquitto, area, devs) for area, devs in BENCHES.items()),
    ]
    site = make_site(
        sources,
        mosquitto.port,
        database={"url": influxd.url, "flush_interval_s": 0.3},
        ingest={"share_group": "it-share"},
        kpi={"windows_s": [1.0], "allowed_lateness_s": 0.5},
    )
    site_file = write_site(site, tmp_path / "site.yaml")
    workers = [IngestProc(site_file, f"it-w{i}-{tmp_path.name}", tmp_path) for i in (1, 2)]
    agent = Agent(site)
    try:
        for w in workers:
            await w.start()
        agent_task = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.started.wait(), 10)
        await asyncio.wait_for(agent.sources_ready.wait(), 20)  # subscribed before the benches talk
        await field.start()
        await asyncio.sleep(3.0)
        workers[0].kill()  # mid-run, with messages received and not yet written
        await workers[0].wait_killed()
        await asyncio.sleep(1.5)
        await workers[0].start()  # the supervisor restarts it with the same client id
        await field.wait_done(timeout_s=30)
        await asyncio.sleep(0.5)
        agent.stop()
        await asyncio.wait_for(agent_task, 30)
        published = agent.counters["samples_published"]
        async with asyncio.timeout(30):
            while signal_count(influxd) < published:
                await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # the agent's last KPI windows reach both workers
        codes = [await w.stop() for w in workers]
    finally:
        await field.stop()
        await meter.stop()
        for w in workers:
            await w.stop()
    logs = "\n".join(w.log_text() for w in workers)
    assert codes == [0, 0], logs[-3000:]

    # Nothing lost, nothing twice: every delivered value of every device, exactly.
    devices = ["meter-s", *(d for ds in BENCHES.values() for d in ds)]
    total = 0
    for device in devices:
        expected, stored = truth_values(truth, device), stored_values(influxd, device)
        assert set(stored) == set(expected), device
        for channel, values in expected.items():
            assert [v for v, _ in stored[channel]] == values, f"{device}/{channel}"
            total += len(values)
    assert total == truth.delivered_count() == published == signal_count(influxd)

    # Both workers carried data (their own self-metrics say how much).
    own = query_ns(influxd, 'SELECT max("samples") FROM "agent" GROUP BY "agent"')
    carried = {r["agent"]: r["max"] for r in own if r["agent"].startswith("_ingest-")}
    assert set(carried) == {f"_ingest-{w.client_id}" for w in workers}
    assert all(n > 0 for n in carried.values()), carried

    # Merged link KPIs equal the sum of the per-device ones, window by window.
    windows, problems = link_merge_problems(influxd)
    assert windows >= 10
    assert problems == []
    received = query_ns(influxd, "SELECT sum(n_received) FROM link_kpi WHERE device = '_campus'")
    assert received[0]["sum"] == sum(len(truth_values(truth, d)["pv_w"]) for d in devices[1:])
