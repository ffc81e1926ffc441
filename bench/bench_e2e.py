"""End to end: Modbus sims -> agent -> mosquitto -> ingest (own process) -> influxd.

Each simulator process serves one unit of 120 float32 registers; the agent (this process)
polls every unit at a fixed interval, so the offered rate is units x 120 / interval samples/s.
Ingest runs as ``python -m edge ingest`` in its own process. After the run the agent stops,
and the stored point count must equal the samples the agent published (nothing lost).
Platform-added latency is ts_receive at the agent -> batch written to InfluxDB, per sample,
from ingest's own self-metrics (``stored_latency_p99_ms`` in the ``agent`` measurement).

    .venv/bin/python bench/bench_e2e.py [--seconds 20] [--rates 10000,max]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from drivers.modbus.config import ModbusRegister
from edge.agent import Agent
from edge.config import SiteConfig
from edge.services import Influxd, Mosquitto
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


def site_for(ports: list[int], interval_s: float, broker: int, influx: str) -> SiteConfig:
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
            "agent": {"id": "bench-edge", "batch_max_age_s": 0.1, "metrics_interval_s": 1.0},
            "broker": {"host": "127.0.0.1", "port": broker},
            "database": {"url": influx, "flush_interval_s": 0.1, "batch_points": 5000},
            "kpi": {"enabled": False},
            "sources": sources,
        }
    )


def query(influxd: Influxd, q: str) -> list[list[Any]]:
    series = influxd.query(q)
    return series[0]["values"] if series else []  # type: ignore[return-value]


async def one_run(
    work: Path, ports: list[int], interval_s: float, seconds: float
) -> dict[str, float]:
    broker = Mosquitto(work / "mosquitto").start()
    influxd = Influxd(work / "influxd").start()
    site = site_for(ports, interval_s, broker.port, influxd.url)
    site_file = work / "site.yaml"
    site_file.write_text(yaml.safe_dump(site.model_dump(mode="json", exclude_none=True)))
    ingest = await asyncio.create_subprocess_exec(
        sys.executable,
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
        agent = Agent(site)
        task = asyncio.create_task(agent.run())
        await agent.started.wait()
        await asyncio.sleep(1.0)  # warm-up
        n0, t0 = agent.counters["samples_published"], time.monotonic()
        await asyncio.sleep(seconds)
        rate = (agent.counters["samples_published"] - n0) / (time.monotonic() - t0)
        agent.stop()
        await task
        published = agent.counters["samples_published"]
        deadline = time.monotonic() + 60
        stored = 0
        while time.monotonic() < deadline:
            rows = query(influxd, 'SELECT COUNT("quality") FROM "signal"')
            stored = int(rows[0][1]) if rows else 0
            if stored >= published:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.5)  # one more self-metrics point
        ingest.terminate()
        await ingest.wait()
        rows = query(
            influxd,
            'SELECT last("stored_latency_p50_ms"), last("stored_latency_p99_ms")'
            ' FROM "agent" WHERE "agent" = \'_ingest-bench-in\'',
        )
        p50, p99 = (rows[0][1], rows[0][2]) if rows else (float("nan"), float("nan"))
        return {"rate": rate, "published": published, "stored": stored, "p50": p50, "p99": p99}
    finally:
        if ingest.returncode is None:
            ingest.kill()
            await ingest.wait()
        influxd.stop()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--units", type=int, default=4)
    ap.add_argument("--rates", default="10000,max")
    args = ap.parse_args()
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
                r = asyncio.run(one_run(Path(tmp), ports, interval, args.seconds))
            lost = r["published"] - r["stored"]
            print(
                f"offered {want:>6}: sustained {r['rate']:>9,.0f} samples/s,"
                f" published {int(r['published']):,}, stored {int(r['stored']):,},"
                f" lost {int(lost)};"
                f" platform latency p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms"
            )
    finally:
        for pipe in pipes:
            pipe.send(None)
        for proc in procs:
            proc.join(5)


if __name__ == "__main__":
    main()
