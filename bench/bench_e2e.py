"""End to end: Modbus sims -> agent -> mosquitto -> ingest (own process) -> influxd.

Each simulator process serves one unit of 120 float32 registers; the agent (this process)
polls every unit at a fixed interval, so the offered rate is units x 120 / interval samples/s.
Ingest runs as ``python -m edge ingest`` in its own process. After the run the agent stops,
and the stored point count must equal the samples the agent published (nothing lost).
Platform-added latency is ts_receive at the agent -> batch written to InfluxDB, per sample,
from ingest's own self-metrics (``stored_latency_p99_ms`` in the ``agent`` measurement).
The site uses the default batching settings (agent ``batch_max_age_s``, database
``flush_interval_s`` and ``batch_points``) unless overridden here, so the figures are
what a site file without tuning gets.

Where the time goes (``--stages``): the agent's own ``latency_ms.<stage>`` histograms
(receipt -> outbox, outbox -> handed to the client, handed -> PUBACK), accumulated over
the measured window, and ingest's ``arrival_latency`` (receipt -> decoded at ingest) next
to its ``stored_latency`` (receipt -> written).

    .venv/bin/python bench/bench_e2e.py [--seconds 20] [--rates 10000,max] [--stages]
        [--batch-max-age S] [--flush-interval S] [--durable]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from drivers.modbus.config import ModbusRegister
from edge.agent import LATENCY_STAGES, Agent
from edge.config import SiteConfig
from edge.services import Influxd, Mosquitto
from pipelines.histogram import ExpHistogram
from sim.modbus import ModbusServerSim, SimulatedDevice

CHANNELS = 120
REGISTERS = tuple(
    ModbusRegister(channel=f"v{i}", table="holding", address=2 * i, type="float32")
    for i in range(CHANNELS)
)


def _serve(conn: Any) -> None:
    async def main() -> None:
        device = SimulatedDevice("wide", 1, registers=REGISTERS)
        async with ModbusServerSim("127.0.0.1", 0, [device]) as sim:
            conn.send(sim.port)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    asyncio.run(main())


class BenchAgent(Agent):
    """The agent, keeping its per-interval stage histograms for the whole measured window."""

    def __init__(self, site: SiteConfig) -> None:
        """Start with empty cumulative histograms; nothing is kept until :attr:`measuring`."""
        super().__init__(site)
        self.measuring = False
        self.stages = {stage: ExpHistogram() for stage in LATENCY_STAGES}

    def metrics(self) -> dict[str, float]:
        """Called once per interval right before the agent starts its histograms afresh."""
        out = super().metrics()
        self.keep()
        return out

    def keep(self) -> None:
        """Merge the current interval's histograms into the cumulative ones (when measuring)."""
        if self.measuring:
            self.flush_latency()
            for stage, hist in self.latency.items():
                self.stages[stage].merge(hist)
            self.latency = {stage: ExpHistogram() for stage in LATENCY_STAGES}


def site_for(
    ports: list[int],
    interval_s: float,
    broker: int,
    influx: str,
    tuning: dict[str, Any],
    work: Path,
) -> SiteConfig:
    sources = [
        {
            "type": "modbus",
            "area": "bench",
            "device": f"unit-{i}",
            "host": "127.0.0.1",
            "port": port,
            "unit_id": 1,
            "poll_interval_s": interval_s,
            "registers": [r.model_dump() for r in REGISTERS],
        }
        for i, port in enumerate(ports)
    ]
    return SiteConfig.model_validate(
        {
            "site": "bench",
            "agent": {
                "id": "bench-edge",
                "metrics_interval_s": 1.0,
                **({"outbox_dir": str(work / "outbox")} if tuning.get("durable") else {}),
                **(
                    {"batch_max_age_s": tuning["batch_max_age_s"]}
                    if tuning.get("batch_max_age_s")
                    else {}
                ),
            },
            "broker": {"host": "127.0.0.1", "port": broker},
            "database": {
                "url": influx,
                **(
                    {"flush_interval_s": tuning["flush_interval_s"]}
                    if tuning.get("flush_interval_s")
                    else {}
                ),
            },
            "kpi": {"enabled": False},
            "sources": sources,
        }
    )


async def loop_lag(hist: ExpHistogram, period_s: float = 0.005) -> None:
    """How late the agent's event loop runs a timer: its stalls, which every stage waits out."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period_s
        await asyncio.sleep(period_s)
        hist.record([max(0.0, loop.time() - due) * 1e3])


def query(influxd: Influxd, q: str) -> list[list[Any]]:
    series = influxd.query(q)
    return series[0]["values"] if series else []  # type: ignore[return-value]


async def one_run(
    work: Path, ports: list[int], interval_s: float, seconds: float, tuning: dict[str, Any]
) -> dict[str, Any]:
    broker = Mosquitto(work / "mosquitto").start()
    influxd = Influxd(work / "influxd").start()
    site = site_for(ports, interval_s, broker.port, influxd.url, tuning, work)
    site_file = work / "site.yaml"
    site_file.write_text(yaml.safe_dump(site.model_dump(mode="json", exclude_none=True)))
    profile = tuning.get("profile_ingest")
    ingest = await asyncio.create_subprocess_exec(
        sys.executable,
        *(["-m", "cProfile", "-o", str(profile)] if profile else []),
        "-m",
        "edge",
        "ingest",
        "-c",
        str(site_file),
        "--client-id",
        "bench-in",
        stderr=(work / "ingest.log").open("wb"),
    )
    try:
        while "ready" not in (work / "ingest.log").read_text():
            await asyncio.sleep(0.05)
        agent = BenchAgent(site)
        task = asyncio.create_task(agent.run())
        await agent.started.wait()
        await asyncio.sleep(1.0)  # warm-up
        agent.flush_latency()
        agent.latency = {stage: ExpHistogram() for stage in LATENCY_STAGES}
        agent.measuring = True
        lag = ExpHistogram()
        lag_task = asyncio.create_task(loop_lag(lag))
        n0, t0, cpu0 = agent.counters["samples_published"], time.monotonic(), time.process_time()
        await asyncio.sleep(seconds)
        lag_task.cancel()
        cpu = time.process_time() - cpu0
        rate = (agent.counters["samples_published"] - n0) / (time.monotonic() - t0)
        agent_cpu_us = cpu / max(1, agent.counters["samples_published"] - n0) * 1e6
        agent.keep()
        agent.measuring = False
        agent.stop()
        await task
        published = agent.counters["samples_published"]
        stopped = time.monotonic()
        deadline = stopped + 60
        stored = 0
        while time.monotonic() < deadline:
            rows = query(influxd, 'SELECT COUNT("quality") FROM "signal"')
            stored = int(rows[0][1]) if rows else 0
            if stored >= published:
                break
            await asyncio.sleep(0.1)
        backlog_s = time.monotonic() - stopped  # ingest catching up after the agent stopped
        await asyncio.sleep(1.5)  # one more self-metrics point
        ingest.terminate()
        await ingest.wait()
        fields = [
            "stored_latency_p50_ms",
            "stored_latency_p99_ms",
            "arrival_latency_p50_ms",
            "arrival_latency_p99_ms",
            "writes",
            "points",
        ]
        rows = query(
            influxd,
            "SELECT "
            + ", ".join(f'last("{f}")' for f in fields)
            + ', max("write_ms_max") FROM "agent" WHERE "agent" = \'_ingest-bench-in\'',
        )
        got = dict(zip([*fields, "write_ms_max"], rows[0][1:], strict=True)) if rows else {}
        nan = float("nan")
        return {
            "rate": rate,
            "published": published,
            "stored": stored,
            "backlog_s": backlog_s,
            "agent_cpu_us": agent_cpu_us,
            "p50": got.get("stored_latency_p50_ms") or nan,
            "p99": got.get("stored_latency_p99_ms") or nan,
            "ingest": got,
            "stages": agent.stages,
            "loop_lag": lag,
        }
    finally:
        if ingest.returncode is None:
            ingest.kill()
            await ingest.wait()
        influxd.stop()
        broker.stop()


def print_stages(r: dict[str, Any]) -> None:
    """Where the time goes: agent stages (per message) and ingest's view (per sample)."""
    for stage, hist in r["stages"].items():
        if hist.n:
            p50, p99 = hist.quantiles([0.5, 0.99])
            print(
                f"    agent {stage:<7} (per message) p50 {p50:7.1f} ms, p99 {p99:7.1f} ms,"
                f" max {hist.max:7.1f} ms, n {hist.n}"
            )
    lag = r["loop_lag"]
    if lag.n:
        p50, p99 = lag.quantiles([0.5, 0.99])
        print(
            f"    agent event loop lag (5 ms timer) p50 {p50:7.1f} ms, p99 {p99:7.1f} ms,"
            f" max {lag.max:7.1f} ms"
        )
    got = r["ingest"]
    if got:
        writes = got.get("writes") or 0
        points = got.get("points") or 0
        print(
            f"    ingest arrival (per sample) p50 {got.get('arrival_latency_p50_ms') or 0:7.1f} ms,"
            f" p99 {got.get('arrival_latency_p99_ms') or 0:7.1f} ms;"
            f" {int(writes)} writes of {points / max(writes, 1):,.0f} points on average,"
            f" slowest {got.get('write_ms_max') or 0:.1f} ms"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--units", type=int, default=4)
    ap.add_argument("--rates", default="10000,max")
    ap.add_argument("--stages", action="store_true", help="print where the time goes")
    ap.add_argument("--batch-max-age", type=float, help="agent.batch_max_age_s (default: site's)")
    ap.add_argument("--flush-interval", type=float, help="database.flush_interval_s")
    ap.add_argument("--durable", action="store_true", help="durable (SQLite) agent outbox")
    ap.add_argument("--profile-ingest", type=Path, help="cProfile the ingest process into FILE")
    ap.add_argument("--profile-agent", type=Path, help="cProfile the agent into FILE.<rate>")
    args = ap.parse_args()
    tuning = {
        "batch_max_age_s": args.batch_max_age,
        "flush_interval_s": args.flush_interval,
        "durable": args.durable,
        "profile_ingest": args.profile_ingest,
    }
    ctx = mp.get_context("spawn")
    pipes, procs, ports = [], [], []
    for _ in range(args.units):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
        ports.append(parent.recv())
    try:
        print(f"cores: {os.cpu_count()}, units: {args.units} x {CHANNELS} channels")
        for want in args.rates.split(","):
            interval = 0.001 if want == "max" else args.units * CHANNELS / float(want)
            with tempfile.TemporaryDirectory(prefix="tpo-bench-e2e-") as tmp:
                profiler = cProfile.Profile() if args.profile_agent else None
                if profiler is not None:
                    profiler.enable()
                r = asyncio.run(one_run(Path(tmp), ports, interval, args.seconds, tuning))
                if profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(f"{args.profile_agent}.{want}")
            lost = r["published"] - r["stored"]
            print(
                f"offered {want:>6}: sustained {r['rate']:>9,.0f} samples/s,"
                f" published {int(r['published']):,}, stored {int(r['stored']):,},"
                f" lost {int(lost)}, all stored {r['backlog_s']:.1f} s after the agent stopped;"
                f" agent CPU {r['agent_cpu_us']:.2f} us/sample;"
                f" platform latency p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms"
            )
            if args.stages:
                print_stages(r)
    finally:
        for pipe in pipes:
            pipe.send(None)
        for proc in procs:
            proc.join(5)


if __name__ == "__main__":
    main()
