"""Soak: the simulated campus through the agent for N minutes, the agent's RSS sampled.

Architecture target (section 7): agent RSS flat over 10 min. Runs the example campus
(sim/scenarios/tpo-campus.yaml, as ``tpo-edge demo`` does) in this process, the agent of the
example site (edge/sites/tpo-barleben.yaml, the simulator's endpoints patched in, KPIs on) as
``python -m edge agent`` and ingest as ``python -m edge ingest``, each in its own process, against
a test mosquitto and influxd (edge.services). Every ``--sample-s`` seconds it reads the agent's
VmRSS from /proc; at the end it prints the series, the slope of a least-squares line over the
second half (KiB/min; the first half holds the warm-up: imports, KPI windows filling, outbox
high-water mark) and whether the stored sample count equals the simulated one.

``--rate N`` (architecture target: 10 min at 20 k samples/s, RSS flat, outbox bounded) runs the
full path at a high rate instead of the campus: bench_e2e.py's Modbus simulator processes (120
float32 channels each, polled at units x 120 / N s) -> ``python -m edge agent`` -> mosquitto ->
``python -m edge ingest`` -> influxd, all in their own processes. Every ``--sample-s`` seconds it
records the agent's and ingest's VmRSS and the agent's ``outbox_bytes`` (its tpo.metrics/1
self-metrics, subscribed on MQTT once a second, the max in each interval); at the end the agent
stops and the stored count must equal the samples it published, counted on the broker by a
subscriber (the agent sends no metrics on the way out, so its own counter lags by up to 1 s).

    .venv/bin/python bench/bench_soak.py [--minutes 10] [--sample-s 10] [--durable]
    .venv/bin/python bench/bench_soak.py --rate 20000 [--units 4] [--minutes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from bench_e2e import CHANNELS, _serve, site_for

from edge.config import load_site
from edge.demo import example_scenario_path, example_site_path
from edge.payload import decode_samples
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


def heap_kib(pid: int) -> int:
    """RSS of the brk heap (``[heap]`` in /proc/PID/smaps) in KiB: where glibc malloc keeps
    small and mid-sized blocks; Python's 1 MiB object arenas and large buffers are mmapped
    outside it, so a heap that stays put while VmRSS steps points at arenas or big buffers."""
    in_heap = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if not line[:1].isupper() or ":" not in line.split()[0]:
            in_heap = line.rstrip().endswith("[heap]")
        elif in_heap and line.startswith("Rss:"):
            return int(line.split()[1])
    return 0


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


MEMRAY: set[str] = set()
"""Processes (``agent``, ``ingest``) to run under ``memray run --native`` (``--memray``)."""


async def settled_count(influxd: Influxd, target: int, *, timeout_s: float, stall_s: float) -> int:
    """The stored count once it reaches ``target``, stops moving for ``stall_s``, or times out."""
    deadline, stored, last, last_change = time.monotonic() + timeout_s, 0, -1, time.monotonic()
    while time.monotonic() < deadline:
        stored = await asyncio.to_thread(stored_count, influxd)
        if stored != last:
            last, last_change = stored, time.monotonic()
        if stored >= target or time.monotonic() - last_change > stall_s:
            break
        await asyncio.sleep(1.0)
    return stored


async def _spawn(work: Path, name: str, *argv: str) -> asyncio.subprocess.Process:
    # memray (not a dependency: ``pip install memray``) records every native allocation with
    # its stack, to find growth that tracemalloc cannot see (C extensions, pymalloc arenas).
    profile = ("-m", "memray", "run", "--native", "-q", "-o", str(work / f"{name}.memray"))
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *(profile if name in MEMRAY else ()),
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
    work: Path,
    minutes: float,
    sample_s: float,
    *,
    durable: bool,
    only: set[str] | None = None,
    kpi: bool = True,
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
        if not kpi:
            site = site.model_copy(update={"kpi": site.kpi.model_copy(update={"enabled": False})})
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
        series: list[tuple[float, dict[str, int]]] = [
            (0.0, {**memory_kib(agent.pid), "heap": heap_kib(agent.pid)})
        ]
        print(f"agent pid {agent.pid}; t=0 s {_fmt(series[0][1])}", flush=True)
        end = t0 + minutes * 60
        while (now := time.monotonic()) < end:
            await asyncio.sleep(min(sample_s, end - now))
            if agent.returncode is not None:
                msg = f"agent exited with {agent.returncode}; see {work}/agent.log"
                raise RuntimeError(msg)
            t = time.monotonic() - t0
            kib = {**memory_kib(agent.pid), "heap": heap_kib(agent.pid)}
            series.append((t, kib))
            print(f"t={t:6.0f} s {_fmt(kib)}", flush=True)
        campus.pause()
        await asyncio.sleep(2.0)  # in-flight notifications and link-delayed messages land
        await _stop(agent)
        simulated = truth.delivered_count()
        stored = await settled_count(influxd, simulated, timeout_s=120, stall_s=15)
        return {"series": series, "simulated": simulated, "stored": stored, "only": only}
    finally:
        for proc in reversed(procs):
            await _stop(proc)
        with contextlib.suppress(Exception):
            await campus.stop()
        truth.close()
        influxd.stop()
        broker.stop()


class Sims:
    """bench_e2e.py's Modbus simulators (one unit of 120 float32 channels each) in processes."""

    def __init__(self, units: int) -> None:
        """Start ``units`` simulator processes; their ports are in :attr:`ports`."""
        ctx = mp.get_context("spawn")
        self.pipes: list[Any] = []  # kept open: _serve exits when its pipe is sent to or closed
        self.procs: list[Any] = []
        self.ports: list[int] = []
        for _ in range(units):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child,), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)
            self.ports.append(parent.recv())

    def stop(self) -> None:
        """Stop every simulator at once (idempotent): SIGTERM, as a graceful close can hang."""
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(5)


class AgentMetrics:
    """The agent's tpo.metrics/1 self-metrics (latest, outbox maxima) and its samples, on MQTT."""

    def __init__(self, host: str, port: int, site: str, agent: str) -> None:
        """Subscribe to ``tpo/v1/{site}/_agent/{agent}/metrics`` (paho, its own thread)."""
        self.agent = agent
        self.latest: dict[str, float] = {}
        self.interval_max_outbox = 0.0
        self.max_outbox = 0.0
        self.messages = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-metrics")
        topic = f"tpo/v1/{site}/_agent/+/metrics"
        data = f"tpo/v1/{site}/+/+/data"
        self.batches: dict[tuple[str, int], int] = {}  # (device, batch_seq) -> samples
        self.client.on_connect = lambda c, *_: c.subscribe([(topic, 0), (data, 1)])
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()

    def samples_seen(self) -> int:
        """Samples published by the agent as observed on the broker (duplicates counted once)."""
        return sum(self.batches.values())

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        if msg.topic.endswith("/data"):
            batch = decode_samples(msg.payload)
            self.batches[batch.device, batch.batch_seq] = len(batch)
            return
        doc = json.loads(msg.payload)
        if doc.get("schema") != "tpo.metrics/1" or doc.get("agent") != self.agent:
            return
        self.latest = doc["metrics"]
        self.messages += 1
        nbytes = float(self.latest.get("outbox_bytes") or 0)
        self.interval_max_outbox = max(self.interval_max_outbox, nbytes)
        self.max_outbox = max(self.max_outbox, nbytes)

    def take_interval_max(self) -> float:
        """Max outbox bytes since the previous call."""
        out, self.interval_max_outbox = self.interval_max_outbox, 0.0
        return out

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


async def soak_rate(
    work: Path, minutes: float, sample_s: float, rate: float, units: int, *, durable: bool
) -> dict[str, Any]:
    """The full path at ``rate`` samples/s for ``minutes``; returns the series and the counts."""
    os.environ.setdefault("TPO_SITE_SECRET", secrets.token_hex(32))  # children inherit it
    sims = Sims(units)
    broker = Mosquitto(work / "mosquitto").start()
    influxd = Influxd(work / "influxd").start()
    interval_s = units * CHANNELS / rate
    site = site_for(sims.ports, interval_s, broker.port, influxd.url, {"durable": durable}, work)
    site_file = work / "site.yaml"
    site_file.write_text(yaml.safe_dump(site.model_dump(mode="json", exclude_none=True)))
    agent_id = site.agent.id
    procs: list[asyncio.subprocess.Process] = []
    metrics: AgentMetrics | None = None
    try:
        ingest = await _spawn(work, "ingest", "ingest", "-c", str(site_file), "--client-id", "soak")
        procs.append(ingest)
        await _wait_log(work, "ingest", "ready", ingest)
        metrics = AgentMetrics(broker.host, broker.port, site.site, agent_id)
        agent = await _spawn(work, "agent", "agent", "-c", str(site_file))
        procs.append(agent)
        await _wait_log(work, "agent", " online at ", agent)
        t0 = time.monotonic()
        rows: list[dict[str, float]] = []

        def sample() -> dict[str, float]:
            published = float(metrics.latest.get("samples_published", 0)) if metrics else 0.0
            return {
                "t": time.monotonic() - t0,
                "agent": memory_kib(agent.pid)["VmRSS"],
                "ingest": memory_kib(ingest.pid)["VmRSS"],
                "agent_heap": heap_kib(agent.pid),
                "ingest_heap": heap_kib(ingest.pid),
                "outbox": metrics.take_interval_max() if metrics else 0.0,
                "published": published,
            }

        rows.append(sample())
        print(f"agent pid {agent.pid}, ingest pid {ingest.pid}; offered {rate:,.0f}/s", flush=True)
        end = t0 + minutes * 60
        while (now := time.monotonic()) < end:
            await asyncio.sleep(min(sample_s, end - now))
            for name, proc in (("agent", agent), ("ingest", ingest)):
                if proc.returncode is not None:
                    msg = f"{name} exited with {proc.returncode}; see {work}/{name}.log"
                    raise RuntimeError(msg)
            row = sample()
            prev = rows[-1]
            rate_now = (row["published"] - prev["published"]) / max(row["t"] - prev["t"], 1e-9)
            rows.append(row)
            print(
                f"t={row['t']:5.0f} s agent {row['agent']:,} KiB, ingest {row['ingest']:,} KiB,"
                f" outbox max {row['outbox']:,.0f} B, published {row['published']:,.0f}"
                f" ({rate_now:,.0f}/s)",
                flush=True,
            )
        # From the first sample on: the agent's first metrics message may come after t=0.
        sustained = (rows[-1]["published"] - rows[1]["published"]) / max(
            rows[-1]["t"] - rows[1]["t"], 1e-9
        )
        # The agent publishes BAD samples while a source is down, so stopping the simulators
        # does not freeze its count, and it sends no metrics on the way out: the published
        # count is the one observed on the broker (unique (device, batch_seq), QoS 1).
        await _stop(agent)
        await asyncio.sleep(1.0)
        seen, last = -1, time.monotonic()
        while time.monotonic() - last < 3:
            await asyncio.sleep(0.5)
            if metrics.samples_seen() != seen:
                seen, last = metrics.samples_seen(), time.monotonic()
        published = seen
        stored = await settled_count(influxd, published, timeout_s=180, stall_s=30)
        return {
            "rows": rows,
            "published": published,
            "agent_published": int(metrics.latest.get("samples_published", 0)),
            "stored": stored,
            "sustained": sustained,
            "max_outbox": metrics.max_outbox,
            "outbox_cap": float(site.agent.outbox_max_bytes),
            "drops": {k: v for k, v in metrics.latest.items() if k.startswith("drops.")},
            "outbox_dropped_samples": metrics.latest.get("outbox_dropped_samples", 0),
        }
    finally:
        for proc in reversed(procs):
            await _stop(proc)
        if metrics is not None:
            metrics.close()
        sims.stop()
        influxd.stop()
        broker.stop()


def report_rate(r: dict[str, Any]) -> bool:
    """Print the series, second-half RSS slopes, outbox max vs cap, stored vs published."""
    rows: list[dict[str, float]] = r["rows"]
    t_s = [row["t"] for row in rows]
    second = [i for i, t in enumerate(t_s) if t >= t_s[-1] / 2]
    print()
    print("t_s " + " ".join(f"{t:.0f}" for t in t_s))
    last_third = [i for i, t in enumerate(t_s) if t >= t_s[-1] * 2 / 3]
    for name, label in (
        ("agent", "agent VmRSS"),
        ("ingest", "ingest VmRSS"),
        ("agent_heap", "agent [heap]"),
        ("ingest_heap", "ingest [heap]"),
    ):
        kib = [int(row[name]) for row in rows]
        slope = slope_kib_per_min([t_s[i] for i in second], [kib[i] for i in second])
        slope3 = slope_kib_per_min([t_s[i] for i in last_third], [kib[i] for i in last_third])
        half = [kib[i] for i in second]
        print(f"{name}_KiB " + " ".join(str(k) for k in kib))
        print(
            f"{label}: start {kib[0]:,} KiB, min {min(kib):,}, max {max(kib):,},"
            f" end {kib[-1]:,} KiB; slope second half {slope:+.1f} KiB/min"
            f" ({len(second)} samples), last third {slope3:+.1f} KiB/min;"
            f" second-half range {max(half) - min(half):,} KiB"
        )
    print("outbox_max_bytes " + " ".join(f"{row['outbox']:.0f}" for row in rows))
    cap = r["outbox_cap"]
    print(
        f"outbox bytes: max {r['max_outbox']:,.0f} of cap {cap:,.0f}"
        f" ({r['max_outbox'] / cap:.2%}); dropped samples {r['outbox_dropped_samples']},"
        f" drops {r['drops'] or 'none'}"
    )
    print(f"sustained {r['sustained']:,.0f} samples/s (agent samples_published)")
    print(
        f"agent samples_published in its last metrics message {r['agent_published']:,}"
        f" (up to 1 s before it stopped)"
    )
    ok = bool(r["published"]) and r["stored"] == r["published"]
    print(
        f"published (seen on the broker) {r['published']:,}, stored {r['stored']:,}:"
        f" {'stored == published' if ok else 'MISMATCH'}"
    )
    return ok


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
    ap.add_argument(
        "--rate", type=float, help="full path at this many samples/s (Modbus sims, not the campus)"
    )
    ap.add_argument("--units", type=int, default=4, help="simulator processes with --rate")
    ap.add_argument("--no-kpi", action="store_true", help="campus with the KPI engine off")
    ap.add_argument(
        "--memray",
        default="",
        help="comma list of processes (agent,ingest) to record with memray (implies --keep)",
    )
    args = ap.parse_args()
    MEMRAY.update(n for n in args.memray.split(",") if n)
    args.keep = args.keep or bool(MEMRAY)
    work = Path(tempfile.mkdtemp(prefix="tpo-bench-soak-"))
    try:
        only = {t for t in args.only.split(",") if t} or None
        if args.rate:
            rr = asyncio.run(
                soak_rate(
                    work, args.minutes, args.sample_s, args.rate, args.units, durable=args.durable
                )
            )
        else:
            r = asyncio.run(
                soak(
                    work,
                    args.minutes,
                    args.sample_s,
                    durable=args.durable,
                    only=only,
                    kpi=not args.no_kpi,
                )
            )
    finally:
        if not args.keep:
            import shutil  # noqa: PLC0415

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work dir kept: {work}")
    if args.rate:
        if not report_rate(rr):
            sys.exit(1)
        return
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
