"""Data changes/s through OpcUaDriver vs a bare asyncua subscription loop, same sim server, one run.

The simulator runs in a child process (so its CPU does not count against the
clients); each client subscribes to every channel of every machine for the same
duration. Printed: changes/s received and client CPU-us per change, and the ratios.
Target: ours within 20 % of bare asyncua.

    .venv/bin/python bench/bench_opcua.py [--machines 24] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import time

from asyncua import Client

from drivers.base import DriverContext, SeriesKey, SeriesTable
from drivers.opcua.config import OpcUaSource
from drivers.opcua.driver import OpcUaDriver
from sim.clock import SimClock
from sim.opcua import MACHINE_TOOL_CHANNELS, SIM_NAMESPACES, OpcUaMachineSpec, OpcUaServerSim
from sim.truth import GroundTruth


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def names(n: int) -> list[str]:
    return [f"M{i:03d}" for i in range(n)]


def run_sim(port: int, machines: int, interval: float, ready: mp.Event, stop: mp.Event) -> None:
    async def main() -> None:
        specs = [
            OpcUaMachineSpec(
                name=m, seed=i, update_interval_s=interval, cycle_s=(2, 5), idle_s=(1, 2)
            )
            for i, m in enumerate(names(machines))
        ]
        sim = OpcUaServerSim(
            "127.0.0.1", port, specs, GroundTruth(keep=False), clock=SimClock(speed=10.0)
        )
        async with sim:
            ready.set()
            await asyncio.to_thread(stop.wait)

    asyncio.run(main())


def paths(machines: int) -> list[tuple[str, str]]:
    return [
        (f"{m}.{c.channel}", c.browse_path(m))
        for m in names(machines)
        for c in MACHINE_TOOL_CHANNELS
    ]


async def bare(endpoint: str, machines: int, seconds: float) -> tuple[int, float]:
    """The loop a user would write with asyncua alone: handler counting notifications."""
    count = 0

    class Handler:
        def datachange_notification(self, _node, _val, _data) -> None:
            nonlocal count
            count += 1

    async with Client(endpoint) as client:
        ns = {a: await client.get_namespace_index(u) for a, u in SIM_NAMESPACES.items()}
        nodes = []
        for _, path in paths(machines):
            rel = "/".join(f"{ns[s.split(':')[0]]}:{s.split(':')[1]}" for s in path.split("/"))
            nodes.append(await client.nodes.objects.get_child(rel))
        sub = await client.create_subscription(100, Handler())
        await sub.subscribe_data_change(nodes, queuesize=10, sampling_interval=100)
        await asyncio.sleep(1.0)  # settle: initial values
        count = 0
        cpu0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        got, cpu = count, time.process_time() - cpu0
        rate = got / (time.monotonic() - t0)
        await sub.delete()
    return int(rate), cpu / max(got, 1) * 1e6


async def ours(endpoint: str, machines: int, seconds: float) -> tuple[int, float, dict]:
    cfg = OpcUaSource(
        area="bench",
        device="bench",
        endpoint=endpoint,
        namespaces=SIM_NAMESPACES,
        publishing_interval_ms=100,
        nodes=[{"channel": ch, "browse_path": p} for ch, p in paths(machines)],
    )
    table = SeriesTable(
        SeriesKey("tpo", "bench", s.device, s.channel, s.unit, "opcua") for s in cfg.channel_specs()
    )
    ctx = DriverContext(site="tpo")
    driver = OpcUaDriver(cfg, table, ctx)
    async with driver:
        stream = driver.stream()
        t_settle = time.monotonic() + 1.0
        async for _ in stream:
            if time.monotonic() > t_settle:
                break
        got = 0
        cpu0, t0 = time.process_time(), time.monotonic()
        async for batch in stream:
            got += len(batch)
            if time.monotonic() - t0 >= seconds:
                break
        cpu = time.process_time() - cpu0
        rate = got / (time.monotonic() - t0)
        await stream.aclose()
    return int(rate), cpu / max(got, 1) * 1e6, dict(ctx.counters)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--machines", type=int, default=24)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    port = free_port()
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=run_sim, args=(port, args.machines, args.interval, ready, stop))
    proc.start()
    try:
        if not ready.wait(60):
            raise SystemExit("sim did not start")
        endpoint = f"opc.tcp://127.0.0.1:{port}/tpo/sim/"
        nodes = args.machines * len(MACHINE_TOOL_CHANNELS)
        print(
            f"OPC UA sim: {args.machines} machines, {nodes} nodes, update every {args.interval} s"
        )
        results = {}
        for name in ("bare", "ours", "bare", "ours"):  # interleaved, best of two each
            if name == "bare":
                r = asyncio.run(bare(endpoint, args.machines, args.seconds))
            else:
                r = asyncio.run(ours(endpoint, args.machines, args.seconds))
            print(
                f"  {name:5s} {r[0]:8d} changes/s  {r[1]:7.1f} CPU-us/change"
                + (f"  {r[2]}" if len(r) > 2 else "")
            )
            if name not in results or r[0] > results[name][0]:
                results[name] = r
        b, o = results["bare"], results["ours"]
        print(
            f"ratio ours/bare: throughput {o[0] / b[0]:.2f}x, "
            f"CPU per change {o[1] / b[1]:.2f}x (target: throughput >= 0.80x)"
        )
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.terminate()


if __name__ == "__main__":
    main()
