"""Agent-side faults against real processes: every stored sample checked against ground truth.

Simulated Modbus meters (in this process) -> agent -> mosquitto -> ingest -> influxd.
Each test compares what InfluxDB holds with the simulator's ground truth, point
by point: every stored point is paired with the truth record it came from (the
last read served before the agent received it), the values must be equal, and
no truth record may be paired twice (nothing stored twice). Where the test
allows a loss it says exactly which truth records may be missing, and why.

The broker here keeps its sessions on disk (``persistence true``, saved every
second and at a clean stop), as production does. The broker SIGKILL test uses a
broker that saves only once an hour (:class:`VolatileMosquitto`) and kills it at an
arbitrary moment: the restarted broker has neither ingest's session nor anything it
acknowledged. Nothing is lost all the same, because the agent keeps every message
after PUBACK until ingest confirms it stored it (``agent.delivery: stored``, the
default) and publishes the unconfirmed ones again once it and ingest are back
(tests/integration/test_faults_delivery.py has the control with ``delivery: broker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import sqlite3
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge import payload as wire
from edge.agent import Agent
from edge.config import SiteConfig
from edge.influx import InfluxV1Writer
from edge.ingest import Ingest
from edge.services import Influxd
from sim.modbus import ModbusDeviceSpec, ModbusServerSim
from sim.truth import GroundTruth, TruthRecord
from tests.conftest import require_binary

from .helpers import PersistentMosquitto, VolatileMosquitto, make_site

pytestmark = pytest.mark.integration

POLL_S = 0.05
READ_TIMEOUT_S = 1.0
"""The Modbus sources' read timeout (the default ``timeout_s``)."""
BATCH_AGE_S = 0.2
MAX_TAIL_POLLS = 2 * round((BATCH_AGE_S + POLL_S + 0.05 + 0.1) / POLL_S)
"""Reads of one channel a SIGKILL may lose: twice those of the nominal window (batch age, a
poll, the batcher's tick, the commit), as the commit may wait for a loaded disk's fsync."""
SPECS = (
    ModbusDeviceSpec(kind="sdm630", name="meter-a", unit_id=1, seed=11),
    ModbusDeviceSpec(kind="umg604", name="meter-b", unit_id=3, seed=12),
)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PersistentMosquitto]:
    """A mosquitto of this test alone, with persistence (it gets killed and restarted)."""
    require_binary("mosquitto", "mosquitto")
    b = PersistentMosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()


@contextlib.asynccontextmanager
async def meters(truth: GroundTruth) -> AsyncIterator[list[ModbusServerSim]]:
    """One simulated Modbus TCP server per meter (a failing unit must not stall the other)."""
    sims = [ModbusServerSim("127.0.0.1", 0, [spec], truth) for spec in SPECS]
    for sim in sims:
        await sim.start()
    try:
        yield sims
    finally:
        for sim in sims:
            await sim.stop()


def site_for(sims: list[ModbusServerSim], broker_port: int, **agent: Any) -> SiteConfig:
    """Both meters polled every POLL_S; agent settings from ``agent``."""
    sources = [
        sim.devices[0].source_config("hall-a", sim.host, sim.port, poll_interval_s=POLL_S)
        for sim in sims
    ]
    return make_site(
        sources,
        broker_port,
        agent={"id": "fault-edge", "batch_max_age_s": BATCH_AGE_S, "metrics_interval_s": 1.0}
        | agent,
    )


@contextlib.asynccontextmanager
async def ingest_running(site: SiteConfig, influxd: Influxd) -> AsyncIterator[Ingest]:
    """An ingest worker in this process (persistent session, manual acknowledgement)."""
    writer = InfluxV1Writer(url=influxd.url, database=influxd.database)
    await writer.ensure_database()
    ingest = Ingest(site, writer, client_id="fault-ingest")
    task = asyncio.create_task(ingest.run())
    await asyncio.wait_for(ingest.ready.wait(), 10)
    try:
        yield ingest
    finally:
        ingest.stop()
        await asyncio.wait_for(task, 30)
        await writer.close()


async def settle(ingest: Ingest, *, at_least: int = 0, quiet_s: float = 0.6) -> None:
    """Wait until ingest took ``at_least`` samples, then nothing new for ``quiet_s`` and no
    write in flight (samples are counted when decoded, before their write lands)."""
    deadline = time.monotonic() + 20
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = ingest.stats.samples
        if n != last or ingest.writes_in_flight:
            last, since = n, time.monotonic()
        elif n >= at_least and time.monotonic() - since >= quiet_s:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"ingest stalled at {last} samples (expected at least {at_least})")


@dataclass(frozen=True)
class Point:
    """One stored sample."""

    value: float | None
    quality: int
    received_ns: int


def stored_points(influxd: Influxd, device: str) -> dict[str, list[Point]]:
    """Stored points per channel of one device, in time order."""
    out: dict[str, list[Point]] = defaultdict(list)
    q = (
        'SELECT "value", "quality", "received_ns" FROM "signal" '
        f'WHERE "device" = \'{device}\' GROUP BY "channel"'
    )
    for s in influxd.query(q):
        for _ts, value, quality, received in s["values"]:  # type: ignore[attr-defined]
            out[s["tags"]["channel"]].append(Point(value, quality, received))  # type: ignore[index]
    return out


def pair(
    truth: list[TruthRecord], stored: list[Point], *, what: str
) -> tuple[list[TruthRecord], list[Point]]:
    """Pair each good stored point with the last read served before it was received.

    Asserts: the values are equal, the read was served less than the Modbus read timeout
    (1 s) before it was received, and no truth record is paired twice (stored once). The
    pairing itself does not depend on that bound: the agent issues the next read only after
    the previous reply, so the last read served before a receipt is the one it answered
    (on a loaded machine a reply can take longer than a poll interval).
    Returns the truth records nobody paired (missing) and the non-good points.
    """
    served = [r.ts_ns for r in truth]
    used: set[int] = set()
    bad: list[Point] = []
    for p in stored:
        if p.quality != 0:
            bad.append(p)
            continue
        # the last record served at or before the receipt (one read per poll per channel)
        i = _last_at_or_before(served, p.received_ns)
        assert i >= 0, f"{what}: a point received before anything was served"
        assert i not in used, f"{what}: truth record {i} stored twice"
        used.add(i)
        record = truth[i]
        assert p.received_ns - record.ts_ns < READ_TIMEOUT_S * 1e9, f"{what}: no read matches {p}"
        assert p.value == record.value, f"{what}: stored {p.value}, served {record.value}"
    missing = [r for i, r in enumerate(truth) if i not in used]
    return missing, bad


def _last_at_or_before(sorted_ns: list[int], t: int) -> int:
    lo, hi = 0, len(sorted_ns)
    while lo < hi:
        mid = (lo + hi) // 2
        if sorted_ns[mid] <= t:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


def compare(
    truth: GroundTruth, influxd: Influxd
) -> tuple[dict[str, list[TruthRecord]], dict[str, list[Point]], int]:
    """Pair every device/channel; (missing truth records, bad points, good points stored)."""
    missing: dict[str, list[TruthRecord]] = {}
    bad: dict[str, list[Point]] = {}
    good = 0
    for spec in SPECS:
        records: dict[str, list[TruthRecord]] = defaultdict(list)
        for r in truth.records(spec.name):
            if not r.dropped:
                records[r.channel].append(r)
        stored = stored_points(influxd, spec.name)
        assert set(stored) <= set(records), spec.name
        for channel, recs in records.items():
            what = f"{spec.name}/{channel}"
            miss, b = pair(recs, stored.get(channel, []), what=what)
            missing[what] = miss
            bad[what] = b
            good += len(stored.get(channel, [])) - len(b)
    return missing, bad, good


# -- a. broker SIGKILL ---------------------------------------------------------------------------


async def test_broker_sigkill_and_restart_loses_nothing(
    volatile_broker: VolatileMosquitto, influxd: Influxd, tmp_path: Path
) -> None:
    """Killed at an arbitrary moment: the broker comes back without sessions or messages."""
    broker = volatile_broker
    kill_after_s = random.uniform(0.2, 1.5)
    truth = GroundTruth()
    async with meters(truth) as sims:
        site = site_for(sims, broker.port, outbox_dir=str(tmp_path / "outbox"))
        async with ingest_running(site, influxd) as ingest:
            agent = Agent(site)
            agent_task = asyncio.create_task(agent.run())
            await asyncio.wait_for(agent.started.wait(), 10)
            await asyncio.sleep(kill_after_s)
            broker.kill()
            await asyncio.sleep(1.0)
            backlog = agent.outbox.depth
            broker.start()
            await asyncio.sleep(2.5)
            agent.stop()
            await asyncio.wait_for(agent_task, 30)
            await settle(ingest, at_least=agent.counters["samples_published"])
    sys.stderr.write(
        f"broker SIGKILL {kill_after_s:.2f} s after the agent started: {backlog} messages in "
        f"the outbox during the outage, {agent.outbox.republished} republished\n"
    )
    assert backlog > 0  # the outage was real: messages waited in the outbox
    assert agent.metrics()["backbone_reconnects"] >= 1
    assert agent.counters["samples_read"] == agent.counters["samples_published"]
    missing, bad, good = compare(truth, influxd)
    assert {k: len(v) for k, v in missing.items() if v} == {}
    assert not any(bad.values())
    assert good == truth.delivered_count() > 1000


# -- b. agent SIGKILL (subprocess) -------------------------------------------------------------


async def start_agent(site_file: Path, log: Path) -> asyncio.subprocess.Process:
    """``python -m edge agent -c site.yaml`` with its output in ``log``."""
    with log.open("ab") as fh:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge", "agent", "-c", str(site_file), stdout=fh, stderr=fh
        )


def uncommitted_tails(truth: GroundTruth, *, before_ns: int) -> dict[str, list[TruthRecord]]:
    """Per device/channel (keys as in :func:`compare`), the records served before ``before_ns``.

    Before the restart every read was served to the killed agent, so what it lost must be a
    suffix of these lists.
    """
    out: dict[str, list[TruthRecord]] = defaultdict(list)
    for r in truth.records():
        if not r.dropped and r.ts_ns < before_ns:
            out[f"{r.device}/{r.channel}"].append(r)
    return out


def outbox_samples(path: Path) -> set[tuple[str, str, int]]:
    """(device, channel, ts_receive) of every sample in an outbox file (the agent is dead)."""
    out: set[tuple[str, str, int]] = set()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for (payload,) in conn.execute("SELECT payload FROM outbox ORDER BY id"):
            msg = wire.decode_samples(bytes(payload))
            for ch, ts in zip(msg.ch.tolist(), msg.ts_receive.tolist(), strict=True):
                out.add((msg.device, msg.channels[ch], ts))
    return out


async def test_agent_sigkill_replays_its_outbox(
    broker: PersistentMosquitto, influxd: Influxd, tmp_path: Path
) -> None:
    """SIGKILL the agent while the broker is away, so its durable outbox holds a backlog.

    Asserted exactly: (1) every sample in the outbox file at the kill is stored;
    (2) every stored point is a served value, stored once; (3) the only truth
    records missing are the killed agent's uncommitted tail: per channel, the
    records served after the last one that reached its outbox and before the
    restarted agent started, all of them and nothing else.

    The tail is defined by what the file holds, not by wall-clock time around the
    kill: the agent commits each device's reads in read order, so what a SIGKILL
    loses is a suffix of each channel's reads: those still in the open device batch
    (up to batch_max_age_s = 0.2 s, a poll and the batcher's tick; longer when a
    loaded machine delays the commit), plus the reply to a request the agent sent
    just before it died, which the simulator serves *after* the kill. Nothing
    served after the restart may be missing. The tail is also bounded in reads
    (:data:`MAX_TAIL_POLLS`), so a stuck batcher or outbox writer cannot hide in it.
    """
    truth = GroundTruth()
    outbox_dir = tmp_path / "outbox"
    log = tmp_path / "agent.log"
    async with meters(truth) as sims:
        site = site_for(sims, broker.port, outbox_dir=str(outbox_dir))
        site_file = tmp_path / "site.yaml"
        site_file.write_text(yaml.safe_dump(site.model_dump(mode="json")))
        async with ingest_running(site, influxd) as ingest:
            agent = await start_agent(site_file, log)
            try:
                deadline = time.monotonic() + 30
                while ingest.stats.samples == 0:  # the agent is up and delivering
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    assert agent.returncode is None, log.read_text()[-3000:]
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.2)  # > autosave_interval: ingest's session is on disk
                broker.stop()  # the broker goes away: the agent's outbox fills
                await asyncio.sleep(1.0)
                kill_ns = time.time_ns()
                agent.send_signal(signal.SIGKILL)
                await agent.wait()
            finally:
                if agent.returncode is None:
                    agent.kill()
                    await agent.wait()
            in_outbox = outbox_samples(outbox_dir / "outbox-fault-edge.sqlite")
            broker.start()
            await asyncio.sleep(0.5)
            before = ingest.stats.samples
            restart_ns = time.time_ns()  # every read served from now on is the new agent's
            restarted = await start_agent(site_file, log)
            try:
                # The replay, then ~1 s of new reads (~500 samples), delivered.
                deadline = time.monotonic() + 30
                while ingest.stats.samples < before + len(in_outbox) + 500:
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    await asyncio.sleep(0.1)
                restarted.send_signal(signal.SIGTERM)  # orderly: drains its outbox
                assert await asyncio.wait_for(restarted.wait(), 30) == 0, log.read_text()[-3000:]
            finally:
                if restarted.returncode is None:
                    restarted.kill()
                    await restarted.wait()
            await settle(ingest, quiet_s=1.0)

    assert len(in_outbox) > 200, "the outbox held no backlog at the kill: nothing was tested"
    assert "replaying" in log.read_text()
    stored_keys = {
        (spec.name, ch, p.received_ns)
        for spec in SPECS
        for ch, points in stored_points(influxd, spec.name).items()
        for p in points
    }
    assert in_outbox <= stored_keys, f"{len(in_outbox - stored_keys)} outbox samples not stored"
    missing, bad, good = compare(truth, influxd)
    assert not any(bad.values())
    lost = [r for recs in missing.values() for r in recs]
    tails = uncommitted_tails(truth, before_ns=restart_ns)
    # Exact: missing == the killed agent's uncommitted tail of every channel, record by record.
    # (By (1) and the pairing, each tail starts after the channel's newest sample in the file.)
    not_tail = {
        k: [round((r.ts_ns - kill_ns) / 1e6, 1) for r in v]
        for k, v in missing.items()
        if v and tails[k][len(tails[k]) - len(v) :] != v
    }
    assert not_tail == {}, "missing (ms from the kill), not the killed agent's last reads"
    longest = max(len(v) for v in missing.values())
    assert longest <= MAX_TAIL_POLLS, f"{longest} reads of one channel never reached the outbox"
    assert good + len(lost) == truth.delivered_count()
    after_restart = sum(1 for r in truth.records() if r.ts_ns > restart_ns)
    assert after_restart > 300  # the restarted agent really read and delivered
    span = [(r.ts_ns - kill_ns) / 1e6 for r in lost] or [0.0]
    sys.stderr.write(
        f"agent SIGKILL: {good} stored, {len(in_outbox)} replayed from the outbox, {len(lost)} "
        f"never committed and lost (<= {longest} reads per channel, served {min(span):.0f} ms "
        f"to {max(span):+.1f} ms around the kill)\n"
    )


# -- c. disk cap ---------------------------------------------------------------------------------


async def test_outbox_cap_drops_exactly_what_it_counts(
    broker: PersistentMosquitto, influxd: Influxd, tmp_path: Path
) -> None:
    truth = GroundTruth()
    cap = 2**16
    async with meters(truth) as sims:
        site = site_for(
            sims, broker.port, outbox_dir=str(tmp_path / "outbox"), outbox_max_bytes=cap
        )
        async with ingest_running(site, influxd) as ingest:
            await asyncio.sleep(0.2)
            broker.stop()  # clean stop: ingest's session is saved
            agent = Agent(site)
            agent_task = asyncio.create_task(agent.run())
            await asyncio.wait_for(agent.started.wait(), 10)
            peak = 0
            for _ in range(25):  # 2.5 s at ~50 KB/s of messages into a 64 KB outbox
                await asyncio.sleep(0.1)
                peak = max(peak, agent.outbox.nbytes)
            full_while_down = agent.outbox.full
            files = list((tmp_path / "outbox").iterdir())
            disk = sum(f.stat().st_size for f in files)
            broker.start()
            deadline = time.monotonic() + 10
            while agent.counters["samples_published"] == 0:
                assert time.monotonic() < deadline, "agent did not reconnect"
                await asyncio.sleep(0.1)
            agent.stop()
            await asyncio.wait_for(agent_task, 30)
            await settle(ingest, at_least=agent.counters["samples_published"])

    drops = agent.outbox.drops
    assert drops["outbox_full"] > 0
    assert set(drops) == {"outbox_full"}
    assert full_while_down
    assert agent.counters["outbox_full_alarms"] >= 1
    assert peak <= cap
    assert disk <= 3 * cap + 2**16, f"outbox files use {disk} bytes for a {cap} byte bound"
    missing, bad, good = compare(truth, influxd)
    assert not any(bad.values())
    lost = sum(len(v) for v in missing.values())
    # Exact: every simulated sample is either stored or in the dropped count.
    assert lost == agent.outbox.dropped_samples > 0
    assert good + agent.outbox.dropped_samples == truth.delivered_count()
    metrics = agent.metrics()
    assert metrics["drops.outbox_full"] == drops["outbox_full"]
    assert metrics["outbox_dropped_samples"] == lost


# -- d. one Modbus unit times out ------------------------------------------------------------


async def test_modbus_unit_timeout_does_not_stall_the_other(
    broker: PersistentMosquitto, influxd: Influxd
) -> None:
    truth = GroundTruth()
    fault_s = 1.0
    async with meters(truth) as sims:
        sources = [
            sim.devices[0].source_config(
                "hall-a",
                sim.host,
                sim.port,
                poll_interval_s=POLL_S,
                timeout_s=0.2,
                reconnect_min_s=0.1,
                reconnect_max_s=0.3,
            )
            for sim in sims
        ]
        site = make_site(
            sources,
            broker.port,
            agent={"id": "fault-edge", "batch_max_age_s": BATCH_AGE_S, "outbox_dir": None},
        )
        async with ingest_running(site, influxd) as ingest:
            agent = Agent(site)
            agent_task = asyncio.create_task(agent.run())
            await asyncio.wait_for(agent.started.wait(), 10)
            await asyncio.sleep(1.0)
            fault_start = time.time_ns()
            sims[0].inject("meter-a", "timeout", fault_s)
            await asyncio.sleep(fault_s)
            fault_end = time.time_ns()
            await asyncio.sleep(1.5)
            agent.stop()
            await asyncio.wait_for(agent_task, 30)
            await settle(ingest, at_least=agent.counters["samples_published"])

    missing, bad, _good = compare(truth, influxd)
    # Every served value of both meters is stored exactly (a timed-out read serves nothing).
    assert {k: len(v) for k, v in missing.items() if v} == {}
    assert not any(v for k, v in bad.items() if k.startswith("meter-b/"))
    # meter-a: BAD with NaN (no value) only during the fault, plus after it at most one read
    # timeout (0.2 s) and one reconnect back-off (<= 0.3 s), then good again.
    bad_a = [p for k, v in bad.items() if k.startswith("meter-a/") for p in v]
    assert bad_a, "the fault produced no BAD samples"
    assert {p.quality for p in bad_a} == {2}
    assert {p.value for p in bad_a} == {None}
    slack = int((0.2 + 0.3 + POLL_S + 0.1) * 1e9)
    outside = [
        (p.received_ns - fault_end) / 1e6 for p in bad_a if p.received_ns > fault_end + slack
    ]
    assert not outside, f"BAD samples {outside[:5]} ms after the fault ended"
    assert all(p.received_ns >= fault_start for p in bad_a)
    a_after = [r for r in truth.records("meter-a") if r.ts_ns > fault_end + slack]
    assert len(a_after) > 100  # good again after the fault
    # meter-b kept its pace during the fault: no gap longer than a few polls.
    b_times = sorted(
        p.received_ns
        for points in stored_points(influxd, "meter-b").values()
        for p in points
        if fault_start - 1e9 <= p.received_ns <= fault_end + 1e9
    )
    gaps = [b - a for a, b in itertools.pairwise(b_times)]
    assert max(gaps) < 4 * POLL_S * 1e9, f"meter-b stalled for {max(gaps) / 1e6:.0f} ms"
