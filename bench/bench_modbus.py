"""Modbus southbound: our driver's read_batch vs a bare pymodbus loop, same server, one run.

Both sides hold one connection each to the same simulator process (a pymodbus server
in a child process) and issue the same requests (the driver's plan) through the same
client class with the same settings; the bare side only awaits the replies and checks
them, the driver also runs a deadline per read, decodes every field and builds the
SampleBatch. Single polls alternate between the two sides (ABBA order), so load drift
on a shared machine hits both alike; each round of ``--polls`` pairs gives one ratio
(bare time / our time, i.e. our samples/s over bare samples/s) and the printed ratio
is the median over rounds, with its min..max. "CPU us/poll" is this process's CPU time
per poll (the server runs in the child process): each side's cost apart from the
round trip.

    .venv/bin/python bench/bench_modbus.py [--polls 200] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import time
from typing import TYPE_CHECKING, Any

from pymodbus.client import AsyncModbusTcpClient

from drivers.base import DriverContext, SeriesKey, SeriesTable
from drivers.modbus.config import ModbusRegister, ModbusSource
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.planner import plan
from sim.modbus import ModbusServerSim, Sdm630, SimulatedDevice

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

WIDE = tuple(
    ModbusRegister(channel=f"v{i}", table="holding", address=2 * i, type="float32", order="CDAB")
    for i in range(60)
)


def _serve(conn: Any) -> None:
    async def serve() -> None:
        devices = [
            Sdm630("sdm630", 1, max_block=125),
            SimulatedDevice("wide", 2, registers=WIDE, order="CDAB"),
        ]
        async with ModbusServerSim("127.0.0.1", 0, devices) as sim:
            conn.send(sim.port)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    asyncio.run(serve())


async def open_driver(source: ModbusSource) -> ModbusDriver:
    """Our driver on its own connection."""
    table = SeriesTable(
        SeriesKey("b", source.area, c.device, c.channel, c.unit, "modbus")
        for c in source.channel_specs()
    )
    driver = ModbusDriver(source, table, DriverContext(site="b"))
    await driver.connect()
    return driver


async def open_bare(source: ModbusSource) -> tuple[AsyncModbusTcpClient, list[Any]]:
    """A pymodbus client configured like the driver's, and the driver's plan as bound calls."""
    client = AsyncModbusTcpClient(
        source.host,
        port=source.port,
        timeout=2 * source.timeout_s + 1.0,
        retries=0,
        reconnect_delay=0,
    )
    await client.connect()
    calls = [
        (
            client.read_input_registers if r.table == "input" else client.read_holding_registers,
            r.address,
            r.count,
            len(r.fields),
        )
        for r in plan(source)
    ]
    return client, calls


async def bare_poll(calls: list[Any], unit: int) -> int:
    """One poll of the driver's plan issued straight on pymodbus; the number of samples."""
    n = 0
    for call, address, count, fields in calls:
        reply = await call(address, count=count, device_id=unit)
        assert not reply.isError()
        n += fields
    return n


async def compare(name: str, source: ModbusSource, polls: int, rounds: int) -> None:
    """Alternate single polls of both sides (ABBA); print medians over rounds of ``polls``."""
    driver = await open_driver(source)
    client, calls = await open_bare(source)

    async def ours() -> int:
        return len(await driver.read_batch())

    async def bare() -> int:
        return await bare_poll(calls, source.unit_id)

    sides: tuple[Callable[[], Awaitable[int]], ...] = (ours, bare)
    for _ in range(100):  # warm-up both paths
        await ours()
        await bare()
    wall: dict[str, list[float]] = {"ours": [], "bare": []}
    cpu: dict[str, list[float]] = {"ours": [], "bare": []}
    ratios = []
    samples = 0
    for _ in range(rounds):
        wall_ns = [0, 0]
        cpu_ns = [0, 0]
        for k in range(polls):
            for i in (0, 1) if k % 2 == 0 else (1, 0):
                c0, t0 = time.process_time_ns(), time.perf_counter_ns()
                samples = await sides[i]()
                wall_ns[i] += time.perf_counter_ns() - t0
                cpu_ns[i] += time.process_time_ns() - c0
        for i, side in enumerate(("ours", "bare")):
            wall[side].append(wall_ns[i] / polls)
            cpu[side].append(cpu_ns[i] / polls / 1e3)
        ratios.append(wall_ns[1] / wall_ns[0])  # same samples per poll: throughput ratio
    assert driver.ctx.counters.total() == 0, driver.ctx.counters
    await driver.close()
    client.close()
    med = statistics.median
    print(
        f"{name:22} {samples * 1e9 / med(wall['ours']):14,.0f}"
        f" {samples * 1e9 / med(wall['bare']):14,.0f} {med(ratios):6.2f}"
        f"  {min(ratios):4.2f}..{max(ratios):4.2f}"
        f" {med(cpu['ours']):10.0f} {med(cpu['bare']):10.0f}"
    )


async def main(polls: int, rounds: int) -> None:
    """Start the simulator, compare on both devices, stop it."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child,), daemon=True)
    server.start()
    port = parent.recv()
    try:
        sources = {
            "sdm630 (15 ch, 3 req)": Sdm630("sdm630", 1).source_config("b", "127.0.0.1", port),
            "wide (60 ch, 1 req)": ModbusSource(
                area="b", device="wide", host="127.0.0.1", port=port, unit_id=2, registers=WIDE
            ),
        }
        print(f"load average at start: {os.getloadavg()[0]:.2f}")
        print(
            f"{'device':22} {'ours samples/s':>14} {'bare samples/s':>14} {'ratio':>6}"
            f"  {'min..max':>10} {'CPU us/poll':>10} {'(bare)':>10}"
        )
        for name, source in sources.items():
            await compare(name, source, polls, rounds)
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
    finally:
        parent.send("stop")
        server.join(timeout=10)
        if server.is_alive():
            server.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    asyncio.run(main(args.polls, args.rounds))
