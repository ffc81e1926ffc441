"""Shared pieces of the end-to-end tests: run agent + ingest, read back what was stored."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

from edge.agent import Agent
from edge.config import SiteConfig
from edge.influx import InfluxV1Writer
from edge.ingest import Ingest
from edge.services import Influxd, Mosquitto
from sim.truth import GroundTruth

SITE_DEFAULTS: dict[str, Any] = {
    "site": "tpo",
    "agent": {"id": "it-edge", "batch_max_age_s": 0.2, "metrics_interval_s": 1.0},
    "database": {"flush_interval_s": 0.2},
}


def make_site(sources: list[Any], broker_port: int, **overrides: Any) -> SiteConfig:
    """A site for tests: given sources, the test broker, quick batching."""
    doc = {**SITE_DEFAULTS, **overrides}
    doc["broker"] = {"host": "127.0.0.1", "port": broker_port}
    doc["sources"] = [s.model_dump() if hasattr(s, "model_dump") else s for s in sources]
    return SiteConfig.model_validate(doc)


@contextlib.asynccontextmanager
async def running_platform(
    site: SiteConfig, influxd: Influxd
) -> AsyncIterator[tuple[Agent, Ingest]]:
    """Ingest and agent running against the test servers; stopped in order on exit."""
    writer = InfluxV1Writer(url=influxd.url, database=influxd.database)
    await writer.ensure_database()
    ingest = Ingest(site, writer, client_id=f"it-ingest-{id(site)}")
    ingest_task = asyncio.create_task(ingest.run())
    await asyncio.wait_for(ingest.ready.wait(), 10)
    agent = Agent(site)
    agent_task = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.started.wait(), 10)
    # Pushed sources must be subscribed before a test's simulator sends its first message.
    await asyncio.wait_for(agent.sources_ready.wait(), 20)
    try:
        yield agent, ingest
    finally:
        agent.stop()
        await asyncio.wait_for(agent_task, 30)
        published = agent.counters["samples_published"]
        for _ in range(200):
            if ingest.stats.samples >= published:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        ingest.stop()
        await asyncio.wait_for(ingest_task, 30)
        await writer.close()


def stored_values(influxd: Influxd, device: str) -> dict[str, list[tuple[float | None, int]]]:
    """(value, quality) per channel of one device, in time order, from InfluxDB."""
    out: dict[str, list[tuple[float | None, int]]] = defaultdict(list)
    series = influxd.query(
        f'SELECT "value", "quality" FROM "signal" WHERE "device" = \'{device}\' GROUP BY "channel"'
    )
    for s in series:
        channel = s["tags"]["channel"]  # type: ignore[index]
        for _ts, value, quality in s["values"]:  # type: ignore[attr-defined]
            out[channel].append((value, quality))
    return out


def truth_values(truth: GroundTruth, device: str) -> dict[str, list[float | None]]:
    """Delivered ground-truth values per channel of one device, in order."""
    out: dict[str, list[float | None]] = defaultdict(list)
    for r in truth.records(device):
        if not r.dropped:
            out[r.channel].append(r.value)
    return out


@dataclass
class PersistentMosquitto(Mosquitto):
    """The test mosquitto with sessions persisted (autosave every second, and at stop)."""

    autosave_s: ClassVar[int] = 1

    def config_text(self) -> str:
        """Persistence on, in the broker's work dir."""
        persist = (
            f"persistence true\npersistence_location {self.workdir}/\n"
            f"autosave_interval {self.autosave_s}\npersistent_client_expiration 1h"
        )
        if os.geteuid() == 0:  # as root mosquitto drops to its own user, who may not write here
            persist += "\nuser root"
        return super().config_text().replace("persistence false", persist)


@dataclass
class VolatileMosquitto(PersistentMosquitto):
    """Persistence on, but saved only once an hour: a SIGKILL loses what arrived since start.

    It also sends each client at most 10 unacknowledged messages (``max_inflight_messages``),
    so that what ingest cannot take yet waits in the broker's memory, as in production when
    ingest's receive window is full.
    """

    autosave_s: ClassVar[int] = 3600

    def config_text(self) -> str:
        """Persistence with a long autosave; at most 10 messages in flight per client."""
        text = super().config_text()
        return text.replace("max_inflight_messages 1000", "max_inflight_messages 10")
