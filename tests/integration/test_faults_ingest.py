"""Ingest under faults, against real processes: the stored samples equal the simulator's ground
truth exactly (count and values), and no point is stored twice.

* ingest SIGKILLed with messages received and not written, then restarted: the broker held
  them (manual acknowledgement + persistent session) and redelivers them;
* influxd stopped for 60 s: ingest spools to its own disk queue and keeps acknowledging, then
  drains the queue at several times the live rate while live data keeps flowing (the one long
  test, marked ``slow``);
* the OPC UA server restarted: everything the agent read is stored once, and everything the
  server served outside the restart gap was read.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from drivers.opcua.config import OpcUaSource
from edge.agent import Agent
from edge.influx import InfluxV1Writer
from edge.ingest import Ingest
from edge.services import Influxd, Mosquitto, free_port
from sim.clock import SimClock
from sim.modbus import ModbusDeviceSpec, ModbusServerSim
from sim.opcua import MACHINE_TOOL_CHANNELS, SIM_NAMESPACES, OpcUaMachineSpec, OpcUaServerSim
from sim.truth import GroundTruth

from .helpers import make_site, running_platform, stored_values, truth_values
from .ingest_procs import IngestProc, query_ns, signal_count, write_site

pytestmark = pytest.mark.integration


def assert_exact(truth: GroundTruth, influxd: Influxd, devices: list[str]) -> int:
    """Stored == delivered ground truth, channel by channel, in order; returns the count."""
    total = 0
    for device in devices:
        expected, stored = truth_values(truth, device), stored_values(influxd, device)
        assert set(stored) == set(expected), device
        for channel, values in expected.items():
            assert [v for v, _ in stored[channel]] == values, f"{device}/{channel}"
            total += len(values)
    assert total == truth.delivered_count()
    return total


async def wait_stored(influxd: Influxd, n: int, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while signal_count(influxd) < n:
            await asyncio.sleep(0.2)


@pytest.mark.timeout(60)
async def test_ingest_sigkill_redelivers_and_stores_exactly_once(
    tmp_path: Path, mosquitto: Mosquitto, influxd: Influxd
) -> None:
    truth = GroundTruth()
    sim = ModbusServerSim(
        "127.0.0.1", 0, [ModbusDeviceSpec(kind="sdm630", name="meter-k", unit_id=1, seed=3)], truth
    )
    await sim.start()
    site = make_site(
        [sim.devices[0].source_config("hall-k", sim.host, sim.port, poll_interval_s=0.05)],
        mosquitto.port,
        # A long flush interval: the worker holds received messages unwritten for 4 s.
        database={"url": influxd.url, "flush_interval_s": 4.0, "batch_points": 100_000},
    )
    worker = IngestProc(write_site(site, tmp_path / "site.yaml"), f"it-k-{tmp_path.name}", tmp_path)
    agent = Agent(site)
    try:
        await worker.start()
        agent_task = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.started.wait(), 10)
        await asyncio.sleep(1.5)
        published_before_kill = agent.counters["samples_published"]
        assert published_before_kill > 100
        assert signal_count(influxd) == 0  # received (QoS 1, in flight), not written
        worker.kill()
        await worker.wait_killed()
        await asyncio.sleep(1.0)  # the agent keeps publishing; the broker queues for the session
        await worker.start()
        await asyncio.sleep(2.0)
        agent.stop()
        await asyncio.wait_for(agent_task, 30)
        published = agent.counters["samples_published"]
        await wait_stored(influxd, published)
        assert await worker.stop() == 0, worker.log_text()[-3000:]
    finally:
        await sim.stop()
        await worker.stop()
    total = assert_exact(truth, influxd, ["meter-k"])
    assert total == published == signal_count(influxd)
    assert published > published_before_kill


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_influxd_down_60s_spools_then_drains_fast(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    server = Influxd(tmp_path / "influxd").start()  # its own: this test stops it
    truth = GroundTruth()
    specs = [ModbusDeviceSpec(kind="sdm630", name=f"meter-o{i}", unit_id=1, seed=i) for i in (1, 2)]
    sims = [ModbusServerSim("127.0.0.1", 0, [spec], truth) for spec in specs]
    for sim in sims:
        await sim.start()
    site = make_site(
        [s.devices[0].source_config("hall-o", s.host, s.port, poll_interval_s=0.05) for s in sims],
        mosquitto.port,
        database={"url": server.url, "flush_interval_s": 0.5},
        ingest={"spool_dir": str(tmp_path / "spool"), "spool_after_s": 1.0},
    )
    writer = InfluxV1Writer(server.url, server.database, backoff_min_s=0.2, max_retries=2)
    ingest = Ingest(site, writer, client_id=f"it-o-{tmp_path.name}")
    assert ingest.spool is not None
    ingest_task = asyncio.create_task(ingest.run())
    agent = Agent(site)
    try:
        await asyncio.wait_for(ingest.ready.wait(), 10)
        agent_task = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.started.wait(), 10)
        await asyncio.sleep(3.0)
        server.stop()
        down_at, samples_at_down = time.monotonic(), ingest.stats.samples
        await asyncio.sleep(60.0)
        live_rate = (ingest.stats.samples - samples_at_down) / (time.monotonic() - down_at)
        spooled = ingest.spool.points
        assert spooled > 0.5 * 60 * live_rate  # acknowledged into the spool, not held
        assert ingest.stats.spooled_points >= spooled
        server.start()  # same port and data directory
        async with asyncio.timeout(60):
            while ingest.spool.batches:
                await asyncio.sleep(0.1)
        drain_rate = ingest.stats.drained_points / max(ingest.stats.drain_s, 1e-9)
        print(
            f"\nlive {live_rate:,.0f} points/s, spooled {spooled:,} points in 60 s,"
            f" drained at {drain_rate:,.0f} points/s ({drain_rate / live_rate:.0f}x live)"
        )
        assert drain_rate >= 3 * live_rate
        await asyncio.sleep(2.0)  # live data flows straight to the database again
        agent.stop()
        await asyncio.wait_for(agent_task, 30)
        published = agent.counters["samples_published"]
        await wait_stored(server, published)
        ingest.stop()
        await asyncio.wait_for(ingest_task, 30)
    finally:
        if not ingest_task.done():
            ingest.stop()
            await asyncio.wait_for(ingest_task, 30)
        await writer.close()
        for sim in sims:
            await sim.stop()
        try:
            total = assert_exact(truth, server, [s.name for s in specs])
            assert total == published == signal_count(server)
            assert ingest.spool.dropped_points == 0
            lag = query_ns(
                server,
                f"SELECT max(ingest_lag_ms_max) FROM agent WHERE agent = '{ingest.agent_name}'",
            )
            assert lag
            assert lag[0]["max"] > 0
        finally:
            server.stop()


@pytest.mark.timeout(60)
async def test_opcua_server_restart_full_path(mosquitto: Mosquitto, influxd: Influxd) -> None:
    truth = GroundTruth()
    machine = OpcUaMachineSpec(
        name="Mill-R", seed=7, update_interval_s=0.1, cycle_s=(3.0, 6.0), idle_s=(1.0, 3.0)
    )
    sim = OpcUaServerSim("127.0.0.1", free_port(), [machine], truth, clock=SimClock(speed=20.0))
    await sim.start()
    source = OpcUaSource(
        area="hall-r",
        device="Mill-R",
        endpoint=sim.endpoint,
        namespaces=SIM_NAMESPACES,
        nodes=[
            {
                "channel": c.channel,
                "browse_path": c.browse_path("Mill-R"),
                "unit": c.unit,
                "codes": c.codes,
            }
            for c in MACHINE_TOOL_CHANNELS
        ],
        reconnect_min_s=0.2,
        reconnect_max_s=1.0,
    )
    site = make_site([source], mosquitto.port, database={"flush_interval_s": 0.2})
    sim_s = 10**9  # one second of source time (the sim stamps with the wall clock)

    def newest() -> int:
        return max((r.ts_ns for r in truth.records("Mill-R")), default=0)

    try:
        async with running_platform(site, influxd) as (agent, _ingest):
            await asyncio.sleep(0.5)
            started = newest()  # values primed before the agent subscribed are not expected
            await asyncio.sleep(2.0)
            before = newest()
            await sim.restart(downtime_s=0.5)
            read_at_restart = agent.counters["samples_read"]
            async with asyncio.timeout(15):
                while agent.counters["samples_read"] < read_at_restart + 50:
                    await asyncio.sleep(0.05)
            reconnected = newest()
            await asyncio.sleep(3.0)
            end = newest()
    finally:
        await sim.stop()
    published = agent.counters["samples_published"]
    rows = query_ns(
        influxd, "SELECT value, quality FROM signal WHERE device = 'Mill-R' GROUP BY channel"
    )
    stored = {(r["channel"], int(r["time"])): r["value"] for r in rows}
    assert len(stored) == len(rows) == published == agent.counters["samples_read"]  # once each
    served = {(r.channel, r.ts_ns): r.value for r in truth.records("Mill-R")}
    wrong = [(k, v, served.get(k)) for k, v in stored.items() if k not in served or served[k] != v]
    assert wrong == []  # every stored sample is one the server served, with its value
    # Everything served outside the restart gap (and the last second, still in flight) arrived.
    settled = {
        k
        for k in served
        if started < k[1] < before - sim_s or reconnected + sim_s < k[1] < end - sim_s
    }
    assert len(settled) > 100
    assert sorted(settled - stored.keys()) == []
    assert any(k[1] > reconnected for k in stored)  # the path works again after the restart
