"""End-to-end delivery confirmation against a SIGKILLed broker that had messages queued.

mosquitto PUBACKs a QoS 1 message once it holds it in memory; it reaches disk only at
the next autosave. Here the broker autosaves once an hour, so nothing it acknowledged
since it started is on disk, and it sends ingest at most 10 unacknowledged messages
(``max_inflight_messages 10``): the rest wait in the broker's memory for ingest, as they do
in production whenever ingest's receive window is full or ingest is reconnecting.

Ingest (a real ``tpo-edge ingest`` process) is SIGSTOPped, so messages pile up in the broker,
acknowledged to the agent; the broker is SIGKILLed and restarted (it comes back without
ingest's session and without the queued messages); ingest is resumed.

* ``delivery: stored`` (the default): the agent kept every message until ingest confirmed it,
  and publishes the unconfirmed ones again once ingest is back. Stored == ground truth,
  exactly, and ingest counted every sample once (replays recognised, not stored again).
* ``delivery: broker`` (the control): the PUBACK ended the message, so what the broker held
  for ingest is gone: samples ARE lost. This shows the test can fail and documents the
  broker's limitation.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge.agent import Agent
from edge.config import SiteConfig
from edge.services import Influxd
from sim.modbus import ModbusServerSim
from sim.truth import GroundTruth

from .helpers import VolatileMosquitto, make_site
from .ingest_procs import IngestProc, query_ns, signal_count, write_site
from .test_faults_agent import POLL_S, compare, meters

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def site_for(
    sims: list[ModbusServerSim], broker_port: int, influxd: Influxd, delivery: str
) -> SiteConfig:
    """Both meters, one message per device and poll (batch age < poll interval)."""
    sources = [
        sim.devices[0].source_config("hall-a", sim.host, sim.port, poll_interval_s=POLL_S)
        for sim in sims
    ]
    return make_site(
        sources,
        broker_port,
        agent={
            "id": "kill-edge",
            "batch_max_age_s": 0.02,
            "metrics_interval_s": 1.0,
            "delivery": delivery,
        },
        database={"url": influxd.url, "flush_interval_s": 0.1},
    )


async def wait_quiet(influxd: Influxd, quiet_s: float = 1.5, timeout_s: float = 30.0) -> int:
    """Wait until the stored count stops changing for ``quiet_s``; returns it."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = signal_count(influxd)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return n
        await asyncio.sleep(0.1)
    pytest.fail(f"stored count still changing at {last}")


@dataclass
class Outcome:
    """What one run saw."""

    published: int
    published_at_kill: int
    stored_before_kill: int
    unconfirmed_at_kill: int
    stored: int
    missing: int
    good: int
    delivered: int
    agent_metrics: dict[str, float]
    ingest_samples: int
    ingest_duplicates: int


async def run_broker_kill(
    delivery: str, broker: VolatileMosquitto, influxd: Influxd, tmp_path: Path
) -> Outcome:
    """Deliver, pause ingest, SIGKILL and restart the broker, resume ingest, drain, compare."""
    truth = GroundTruth()
    async with meters(truth) as sims:
        site = site_for(sims, broker.port, influxd, delivery)
        worker = IngestProc(
            write_site(site, tmp_path / "site.yaml"), f"kill-{delivery}", tmp_path / "logs"
        )
        agent = Agent(site)
        agent_task: asyncio.Task[None] | None = None
        try:
            await worker.start()
            agent_task = asyncio.create_task(agent.run())
            await asyncio.wait_for(agent.started.wait(), 10)
            await asyncio.sleep(1.0)
            assert signal_count(influxd) > 0, worker.log_text()[-2000:]
            worker.pause()
            await asyncio.sleep(2.0)  # ~80 messages; at most 10 sent to ingest, the rest queued
            outbox = agent.outbox
            at_kill = set(outbox._unconfirmed)
            unconfirmed = sum(i.samples for i in outbox._unconfirmed.values())
            published = agent.counters["samples_published"]
            stored_before_kill = signal_count(influxd)
            broker.kill()
            broker.start()  # same port, no sessions, no queued messages
            worker.resume()
            # Reconnects, ingest's "online", republished messages confirmed (delivery: stored).
            await asyncio.sleep(3.0)
            async with asyncio.timeout(20):
                while at_kill & (outbox._unconfirmed.keys() | outbox._tracked.keys()):
                    await asyncio.sleep(0.1)
            agent.stop()
            await asyncio.wait_for(agent_task, 30)
            await wait_quiet(influxd, quiet_s=1.0)
            assert await worker.stop() == 0, worker.log_text()[-3000:]
        finally:
            if agent_task is not None and not agent_task.done():
                agent.stop()
                await asyncio.wait_for(agent_task, 30)
            if worker.proc is not None and worker.proc.returncode is None:
                worker.resume()
                await worker.stop()
    missing, bad, good = compare(truth, influxd)
    assert not any(bad.values())
    own = query_ns(
        influxd,
        'SELECT last("samples") AS samples, last("duplicates_skipped") AS dups FROM "agent" '
        f"WHERE \"agent\" = '_ingest-{worker.client_id}'",
    )
    return Outcome(
        published=agent.counters["samples_published"],
        published_at_kill=published,
        stored_before_kill=stored_before_kill,
        unconfirmed_at_kill=unconfirmed,
        stored=signal_count(influxd),
        missing=sum(len(v) for v in missing.values()),
        good=good,
        delivered=truth.delivered_count(),
        agent_metrics=agent.metrics(),
        ingest_samples=int(own[0]["samples"]),
        ingest_duplicates=int(own[0]["dups"]),
    )


async def test_broker_sigkill_with_messages_queued_for_ingest_loses_nothing(
    volatile_broker: VolatileMosquitto, influxd: Influxd, tmp_path: Path
) -> None:
    out = await run_broker_kill("stored", volatile_broker, influxd, tmp_path)
    sys.stderr.write(f"delivery stored: {out}\n")
    # The broker really held acknowledged, unstored samples when it was killed.
    assert out.unconfirmed_at_kill > 500
    assert out.published_at_kill - out.stored_before_kill > 500
    # Nothing missing, nothing stored twice (pair() asserts each truth record once), exactly.
    assert out.missing == 0
    assert out.good == out.stored == out.delivered == out.published
    # Ingest counted every sample once (a republished copy it had stored is recognised).
    assert out.ingest_samples == out.delivered
    m = out.agent_metrics
    assert m["republished_messages"] > 0
    assert m["outbox_unconfirmed"] == 0
    assert m["unconfirmed_evicted"] == 0
    assert m["latency_ms.confirm.n"] > 0


async def test_control_delivery_broker_loses_what_the_broker_held(
    volatile_broker: VolatileMosquitto, influxd: Influxd, tmp_path: Path
) -> None:
    out = await run_broker_kill("broker", volatile_broker, influxd, tmp_path)
    sys.stderr.write(f"delivery broker (control): {out}\n")
    assert out.published_at_kill - out.stored_before_kill > 500
    assert out.unconfirmed_at_kill == 0  # PUBACK ends a message: nothing kept
    # The broker's limitation: what it acknowledged and held for ingest is gone.
    assert out.missing > 0
    assert out.good + out.missing == out.delivered
    assert out.stored < out.published
    assert "republished_messages" not in out.agent_metrics or (
        out.agent_metrics["republished_messages"] == 0
    )
