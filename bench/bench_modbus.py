"""Modbus southbound: our driver's read_batch vs a bare pymodbus loop, same server, one run.

Both sides hold one connection to the same simulator process (a pymodbus server in
a child process) and issue the same requests (the driver's plan); the bare loop only
awaits the replies, the driver also decodes every field and builds the SampleBatch.
Short rounds alternate between the two so load drift on a shared machine hits both
alike; the printed ratio is the median of the per-round ratios.

    .venv/bin/python bench/bench_modbus.py [--polls 200] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
from typing import Any

from pymodbus.client import AsyncModbusTcpClient

from drivers.base import DriverContext, SeriesKey, SeriesTable
from drivers.modbus.config import ModbusRegister, ModbusSource
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.planner import plan
from sim.modbus import ModbusServerSim, Sdm630, SimulatedDevice

WIDE = tuple(
    ModbusRegister(channel=f"v{i}", table="holding", address=2 * i, type="float32", order="CDAB")
    for i in range(60)
)


def _serve(conn: Any) -> None:
    async def main() -> None:
        devices = [
            Sdm630("sdm630", 1, max_block=125),
            SimulatedDevice("wide", 2, registers=WIDE, order="CDAB"),
        ]
        async with ModbusServerSim("127.0.0.1", 0, devices) as sim:
            conn.send(sim.port)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    asyncio.run(main())


async def open_driver(source: ModbusSource) -> ModbusDriver:
    table = SeriesTable(
        SeriesKey("b", source.area, c.device, c.channel, c.unit, "modbus")
        for c in source.channel_specs()
    )
    driver = ModbusDriver(source, table, DriverContext(site="b"))
    await driver.connect()
    return driver


async def run_driver(driver: ModbusDriver, polls: int) -> float:
    n = 0
    t0 = time.perf_counter()
    for _ in range(polls):
        n += len(await driver.read_batch())
    elapsed = time.perf_counter() - t0
    assert driver.ctx.counters.total() == 0, driver.ctx.counters
    return n / elapsed


async def open_bare(source: ModbusSource) -> tuple[AsyncModbusTcpClient, list[Any]]:
    client = AsyncModbusTcpClient(source.host, port=source.port, retries=0, reconnect_delay=0)
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


async def run_bare(calls: list[Any], unit: int, polls: int) -> float:
    n = 0
    t0 = time.perf_counter()
    for _ in range(polls):
        for call, address, count, fields in calls:
            reply = await call(address, count=count, device_id=unit)
            assert not reply.isError()
            n += fields
    return n / (time.perf_counter() - t0)


async def main(polls: int, rounds: int) -> None:
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
        print(f"{'device':24} {'ours samples/s':>15} {'bare samples/s':>15} {'ratio':>7}")
        for name, source in sources.items():
            driver = await open_driver(source)
            client, calls = await open_bare(source)
            await run_driver(driver, 100)  # warm-up both paths
            await run_bare(calls, source.unit_id, 100)
            ours, bare, ratios = [], [], []
            for _ in range(rounds):
                o = await run_driver(driver, polls)
                b = await run_bare(calls, source.unit_id, polls)
                ours.append(o)
                bare.append(b)
                ratios.append(o / b)
            await driver.close()
            client.close()
            print(
                f"{name:24} {statistics.median(ours):15,.0f} {statistics.median(bare):15,.0f}"
                f" {statistics.median(ratios):7.2f}"
            )
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
