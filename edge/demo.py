"""``tpo-edge demo``: a simulated campus through the whole platform, every sample counted.

Starts a broker (mosquitto if installed, else an in-process Python broker), a
database (influxd if installed, else the SQLite store), the simulated campus,
the ingest service and the agent running the example TPO site (with the
simulator's endpoints patched in). The simulator runs paused until every
source is connected and pauses again before the agent stops, so each stage is
counted over the same span: simulated (the ground truth), published (acknowledged
by the broker), stored (points in the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from rich.live import Live
from rich.table import Table

from edge.agent import Agent
from edge.config import SiteConfig, load_site
from edge.ingest import Ingest, Sink
from edge.services import Influxd, Mosquitto, find_binary
from sim.campus import Campus, load_scenario
from sim.truth import GroundTruth

log = logging.getLogger(__name__)


def example_site_path() -> Path:
    """The example TPO site shipped with the package."""
    return Path(str(resources.files("edge") / "sites" / "tpo-barleben.yaml"))


def example_scenario_path() -> Path:
    """The example campus scenario shipped with the simulator."""
    return Path(str(resources.files("sim") / "scenarios" / "tpo-campus.yaml"))


class Demo:
    """One demo run."""

    def __init__(
        self,
        *,
        site_file: Path | None = None,
        scenario: Path | None = None,
        workdir: Path | None = None,
        duration_s: float = 30.0,
        broker: Literal["auto", "mosquitto", "python"] = "auto",
        database: Literal["auto", "influxd", "sqlite"] = "auto",
        report: Path | None = None,
    ) -> None:
        """Load the site and scenario (ConfigError on a bad file); ``report``: HTML file or None."""
        self.site_file = site_file or example_site_path()
        self.site = load_site(self.site_file)
        if not os.environ.get(self.site.secret_env):
            # Pseudonyms of charging idTags are keyed by the site secret. A demo has no
            # campus secret: use a random one for this run (pseudonyms differ per run).
            log.warning(
                "%s is not set: using a random site secret for this demo run", self.site.secret_env
            )
            os.environ[self.site.secret_env] = secrets.token_hex(32)
        self.scenario = load_scenario(scenario or example_scenario_path())
        self.duration_s = duration_s
        self.broker_choice = broker
        self.database_choice = database
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tpo-demo-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self._stop = asyncio.Event()
        self.summary: dict[str, Any] = {}
        # -- report (edge/report.py) --
        self.report_path = report
        self._report_source: Any = None  # () -> edge.report.ReportSource, set with the database
        # -- end report --

    def stop(self) -> None:
        """Ctrl-C: end the run early, cleanly."""
        self._stop.set()

    async def run(self, *, live: bool = False) -> dict[str, Any]:
        """Run and return the stage counts."""
        broker = database = None
        async with contextlib.AsyncExitStack() as stack:
            broker_host, broker_port, broker_kind = await self._start_broker(stack)
            sink, count_stored, db_kind = await self._start_database(stack)
            truth = GroundTruth(self.workdir / "ground-truth.jsonl")
            stack.callback(truth.close)
            campus = Campus(self.scenario, truth, broker=(broker_host, broker_port))
            await campus.start(paused=True)
            stack.push_async_callback(campus.stop)
            site = campus.patch_site(
                self.site,
                broker=(broker_host, broker_port),
                database=self.site.database,
                protocol="5" if broker_kind == "mosquitto" else "3.1.1",
            )
            ingest = Ingest(site, sink, client_id=f"tpo-demo-ingest-{time.time_ns()}")
            ingest_task = asyncio.create_task(ingest.run(), name="demo.ingest")
            await asyncio.wait_for(ingest.ready.wait(), 15)
            agent = Agent(site)
            agent_task = asyncio.create_task(agent.run(), name="demo.agent")
            await asyncio.wait_for(agent.started.wait(), 15)
            # Every source connected (pushed ones subscribed) before the campus produces.
            await asyncio.wait_for(agent.sources_ready.wait(), 30)
            t0 = time.monotonic()
            campus.resume()
            await self._watch(agent, ingest, t0, live=live)
            campus.pause()
            await asyncio.sleep(1.5)  # in-flight notifications and link-delayed messages land
            agent.stop()
            await agent_task
            published = agent.counters["samples_published"]
            await self._wait_stored(ingest, published)
            ingest.stop()
            await ingest_task
            await sink.close()
            stored = await count_stored()
            simulated = truth.delivered_count()
            self.summary = {
                "simulated": simulated,
                "read": agent.counters["samples_read"],
                "published": published,
                "stored": stored,
                "lost": simulated - stored,
                "dropped_by_link": sum(1 for r in truth.records() if r.dropped),
                "dead_letters": agent.counters["dead_letters"],
                "ingest_rejected": sum(ingest.stats.rejected.values()),
                "duration_s": round(time.monotonic() - t0, 3),
                "broker": broker_kind,
                "database": db_kind,
                "per_device": {
                    f"{a}/{d}": n for (a, d), n in sorted(ingest.stats.per_device.items())
                },
            }
            # -- report (edge/report.py): written while the database still runs --
            self.summary["report"] = await self._write_report()
            # -- end report --
        del broker, database
        if self._tmp is not None:
            self._tmp.cleanup()
        return self.summary

    async def _start_broker(self, stack: contextlib.AsyncExitStack) -> tuple[str, int, str]:
        use_mosquitto = self.broker_choice == "mosquitto" or (
            self.broker_choice == "auto" and find_binary("mosquitto") is not None
        )
        if use_mosquitto:
            broker = Mosquitto(self.workdir / "mosquitto").start()
            stack.callback(broker.stop)
            return broker.host, broker.port, "mosquitto"
        from edge.pybroker import start_python_broker  # noqa: PLC0415

        host, port, stop = await start_python_broker()
        stack.push_async_callback(stop)
        return host, port, "python"

    async def _start_database(self, stack: contextlib.AsyncExitStack) -> tuple[Sink, Any, str]:
        use_influxd = self.database_choice == "influxd" or (
            self.database_choice == "auto" and find_binary("influxd") is not None
        )
        if use_influxd:
            server = Influxd(self.workdir / "influxd").start()
            stack.callback(server.stop)
            from edge.influx import InfluxV1Writer  # noqa: PLC0415

            writer = InfluxV1Writer(url=server.url, database=server.database)
            await writer.ensure_database()
            # -- report (edge/report.py) --
            from edge.report import influx_source  # noqa: PLC0415

            self._report_source = lambda: influx_source(server.url, server.database)
            # -- end report --

            async def count_influx() -> int:
                return await asyncio.to_thread(_influx_count, server)

            return writer, count_influx, "influxd"
        from edge.store import SqliteStore  # noqa: PLC0415

        store = SqliteStore(self.workdir / "demo.sqlite")
        # -- report (edge/report.py) --
        from edge.report import sqlite_source  # noqa: PLC0415

        self._report_source = lambda: sqlite_source(self.workdir / "demo.sqlite")
        # -- end report --

        async def count_sqlite() -> int:
            reader = SqliteStore(self.workdir / "demo.sqlite")
            try:
                return await reader.count("signal")
            finally:
                await reader.close()

        return store, count_sqlite, "sqlite"

    # -- report (edge/report.py) --
    async def _write_report(self) -> str | None:
        """Write the HTML report of this run; its path, or None when skipped or failed."""
        if self.report_path is None or self._report_source is None:
            return None
        from edge.errors import EdgeError  # noqa: PLC0415
        from edge.report import write_report  # noqa: PLC0415

        source = self._report_source()
        try:
            path = await write_report(
                source,
                self.report_path,
                since_s=None,  # the run's own database: everything in it
                deadlines_ms=self.site.kpi.deadlines_ms,
                summary=self.summary,
                site=self.site.site,
                title=f"tpo-edge demo: site {self.site.site}",
            )
        except (EdgeError, OSError) as exc:
            log.warning("demo report not written: %s", exc)  # the run itself succeeded
            return None
        finally:
            await source.close()
        log.info("demo report: %s", path.resolve())
        return str(path.resolve())

    # -- end report --

    async def _wait_stored(self, ingest: Ingest, published: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while ingest.stats.samples < published and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        # one more flush interval so the last batch is written and acknowledged
        await asyncio.sleep(self.site.database.flush_interval_s + 0.2)

    async def _watch(self, agent: Agent, ingest: Ingest, t0: float, *, live: bool) -> None:
        duration = self.duration_s or float("inf")
        last = dict.fromkeys(agent.stats, 0)
        last_t = time.monotonic()
        ctx = Live(self._table(agent, ingest, {}, 1.0), refresh_per_second=2) if live else None
        with ctx or contextlib.nullcontext():
            while time.monotonic() - t0 < duration and not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
                now = time.monotonic()
                if ctx is not None:
                    ctx.update(self._table(agent, ingest, last, now - last_t))
                last = {k: v.samples for k, v in agent.stats.items()}
                last_t = now

    @staticmethod
    def _table(agent: Agent, ingest: Ingest, last: dict[Any, int], dt: float) -> Table:
        table = Table(title="tpo-edge demo: live")
        for col in ("area", "device", "samples/s", "last channel", "last value", "lag ms"):
            table.add_column(
                col, justify="right" if col in {"samples/s", "last value", "lag ms"} else "left"
            )
        for (area, device), stats in sorted(agent.stats.items()):
            rate = (stats.samples - last.get((area, device), 0)) / max(dt, 1e-6)
            lag = ingest.stats.last_lag_ms.get((area, device))
            table.add_row(
                area,
                device,
                f"{rate:,.0f}",
                stats.last_channel,
                f"{stats.last_value:.6g}",
                "-" if lag is None else f"{lag:.0f}",
            )
        m = agent.metrics()
        drops = sum(v for k, v in m.items() if k.startswith("drops."))
        lags = ingest.stats.last_lag_ms.values()
        table.caption = (
            f"read {int(m.get('samples_read', 0)):,}  "
            f"published {int(m.get('samples_published', 0)):,}  "
            f"stored {ingest.stats.samples:,}  outbox {int(m.get('outbox_depth', 0))} msgs"
            f" {m.get('outbox_bytes', 0) / 1024:,.0f} KiB  drops {int(drops)}  "
            f"ingest lag max {max(lags, default=0.0):,.0f} ms"
        )
        return table


def _influx_count(server: Influxd) -> int:
    # COUNT over one field misses rows where it is absent: count rows via the quality field,
    # which every signal point carries.
    series = server.query('SELECT COUNT("quality") FROM "signal"')
    if not series:
        return 0
    values: list[list[Any]] = series[0]["values"]  # type: ignore[assignment]
    return int(values[0][1])


__all__ = ["Demo", "SiteConfig", "example_scenario_path", "example_site_path"]
