"""Soak: the simulated campus through the agent for N minutes, the agent's RSS sampled.

Architecture target (section 7): agent RSS flat over 10 min. Runs the example campus
(sim/scenarios/tpo-campus.yaml, as ``tpo-edge demo`` does) in this process, the agent of the
example site (edge/sites/tpo-barleben.yaml, the simulator's endpoints patched in, KPIs on) as
``python -m edge agent`` and ingest as ``python -m edge ingest``, each in its own process, against
a test mosquitto and influxd (edge.services). Every ``--sample-s`` seconds it reads the agent's
VmRSS from /proc; at the end it prints the series, the slope of a least-squares line over the
second half (KiB/min; the first half holds the warm-up: imports, KPI windows filling, outbox
high-water mark) and whether the stored sample count equals the simulated one.

    .venv/bin/python bench/bench_soak.py [--minutes 10] [--sample-s 10] [--durable]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edge.config import load_site
from edge.demo import example_scenario_path, example_site_path
from edge.services import Influxd, Mosquitto
from sim.campus import Campus, load_scenario
from sim.truth import GroundTruth


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (Linux /proc)."""
    return memory_kib(pid)["VmRSS"]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and its parts RssAnon (heap: what a leak grows) and RssFile (mapped code) in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in {"VmRSS", "RssAnon", "RssFile"}:
            fields[name] = int(rest.split()[0])
    if "VmRSS" not in fields:
        msg = f"no VmRSS for pid {pid}"
        raise RuntimeError(msg)
    return fields


def slope_kib_per_min(t_s: list[float], rss: list[int]) -> float:
    """Least-squares slope of RSS over time, KiB per minute (0 with fewer than 2 points)."""
    if len(t_s) < 2:
        return 0.0
    k, _ = np.polyfit(np.asarray(t_s) / 60.0, np.asarray(rss, dtype=float), 1)
    return float(k)


def stored_count(influxd: Influxd) -> int:
    """Points in ``signal`` (counted via ``quality``, which every signal point carries)."""
    series = influxd.query('SELECT COUNT("quality") FROM "signal"')
    if not series:
        return 0
    values: list[list[Any]] = series[0]["values"]  # type: ignore[assignment]
    return int(values[0][1])


async def _spawn(work: Path, name: str, *argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge",
        *argv,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=(work / f"{name}.log").open("wb"),
    )


async def _wait_log(work: Path, name: str, needle: str, proc: Any, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while needle not in (work / f"{name}.log").read_text():
        if proc.returncode is not None or time.monotonic() > deadline:
            msg = f"{name} did not log {needle!r}; see {work / name}.log"
            raise RuntimeError(msg)
        await asyncio.sleep(0.1)


async def _stop(proc: asyncio.subprocess.Process, timeout_s: float = 60) -> None:
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def soak(
    work: Path, minutes: float, sample_s: float, *, durable: bool, only: set[str] | None = None
) -> dict[str, Any]:
    """One soak run; returns the RSS series and the counts."""
    os.environ.setdefault("TPO_SITE_SECRET", secrets.token_hex(32))  # children inherit it
    broker = Mosquitto(work / "mosquitto").start()
    influxd = Influxd(work / "influxd").start()
    truth = GroundTruth(None, keep=False)  # counts only: 10 min of records are not needed
    campus = Campus(
        load_scenario(example_scenario_path()), truth, broker=(broker.host, broker.port)
    )
    procs: list[asyncio.subprocess.Process] = []
    try:
        await campus.start(paused=True)
        base = load_site(example_site_path())
        site = campus.patch_site(
            base,
            broker=(broker.host, broker.port),
            database=base.database.model_copy(
                update={"url": influxd.url, "database": influxd.database}
            ),
        )
        if only:
            # Bisecting growth by driver: keep only these source types (the campus runs all).
            kept = tuple(src for src in site.sources if src.type in only)
            site = site.model_copy(update={"sources": kept})
        if durable:
            site = site.model_copy(
                update={"agent": site.agent.model_copy(update={"outbox_dir": work / "outbox"})}
            )
        site_file = work / "site.yaml"
        site_file.write_text(yaml.safe_dump(site.model_dump(mode="json", exclude_none=True)))
        ingest = await _spawn(work, "ingest", "ingest", "-c", str(site_file), "--client-id", "soak")
        procs.append(ingest)
        await _wait_log(work, "ingest", "ready", ingest)
        agent = await _spawn(work, "agent", "agent", "-c", str(site_file))
        procs.append(agent)
        await _wait_log(work, "agent", " online at ", agent)
        await asyncio.sleep(3.0)  # every source connects and subscribes
        campus.resume()
        t0 = time.monotonic()
        series: list[tuple[float, dict[str, int]]] = [(0.0, memory_kib(agent.pid))]
        print(f"agent pid {agent.pid}; t=0 s {_fmt(series[0][1])}", flush=True)
        end = t0 + minutes * 60
        while (now := time.monotonic()) < end:
            await asyncio.sleep(min(sample_s, end - now))
            if agent.returncode is not None:
                msg = f"agent exited with {agent.returncode}; see {work}/agent.log"
                raise RuntimeError(msg)
            t, kib = time.monotonic() - t0, memory_kib(agent.pid)
            series.append((t, kib))
            print(f"t={t:6.0f} s {_fmt(kib)}", flush=True)
        campus.pause()
        await asyncio.sleep(2.0)  # in-flight notifications and link-delayed messages land
        await _stop(agent)
        simulated = truth.delivered_count()
        deadline, stored, last_change, last = time.monotonic() + 120, 0, time.monotonic(), -1
        while time.monotonic() < deadline:
            stored = await asyncio.to_thread(stored_count, influxd)
            if stored != last:
                last, last_change = stored, time.monotonic()
            if stored >= simulated or time.monotonic() - last_change > 15:
                break
            await asyncio.sleep(1.0)
        return {"series": series, "simulated": simulated, "stored": stored, "only": only}
    finally:
        for proc in reversed(procs):
            await _stop(proc)
        with contextlib.suppress(Exception):
            await campus.stop()
        truth.close()
        influxd.stop()
        broker.stop()


def _fmt(kib: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,} KiB" for k, v in kib.items())


def main() -> None:
    """Parse arguments, run, print the report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling interval")
    ap.add_argument("--durable", action="store_true", help="agent with a disk outbox")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    ap.add_argument(
        "--only", default="", help="comma list of source types to run (modbus,opcua,mqtt)"
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tpo-bench-soak-"))
    try:
        only = {t for t in args.only.split(",") if t} or None
        r = asyncio.run(soak(work, args.minutes, args.sample_s, durable=args.durable, only=only))
    finally:
        if not args.keep:
            import shutil  # noqa: PLC0415

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work dir kept: {work}")
    series: list[tuple[float, dict[str, int]]] = r["series"]
    t_s = [t for t, _ in series]
    second = [i for i, t in enumerate(t_s) if t >= t_s[-1] / 2]
    print()
    print("t_s " + " ".join(f"{t:.0f}" for t in t_s))
    for name in series[0][1]:
        kib = [m[name] for _, m in series]
        slope = slope_kib_per_min([t_s[i] for i in second], [kib[i] for i in second])
        print(f"{name}_KiB " + " ".join(str(k) for k in kib))
        print(
            f"{name}: start {kib[0]:,} KiB, min {min(kib):,}, max {max(kib):,},"
            f" end {kib[-1]:,} KiB; second-half slope {slope:+.1f} KiB/min"
            f" over {len(second)} samples"
        )
    if r["only"]:
        # The campus simulated every device; only some were read: counts do not compare.
        print(f"simulated {r['simulated']:,} (all devices), stored {r['stored']:,} (--only)")
        return
    ok = r["stored"] == r["simulated"]
    print(
        f"simulated {r['simulated']:,}, stored {r['stored']:,}:"
        f" {'stored == simulated' if ok else 'MISMATCH'}"
    )
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
