"""Per-read deadlines of the Modbus driver (drivers/modbus/driver.py _Deadline) against the sim."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from drivers.base import BAD, GOOD, DriverContext, SeriesKey, SeriesTable
from drivers.modbus.config import ModbusSource
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.planner import plan
from sim.modbus import ModbusServerSim, Sdm630

pytestmark = pytest.mark.integration

FAST = {"timeout_s": 0.2, "reconnect_min_s": 0.05, "reconnect_max_s": 0.4}


def _driver(source: ModbusSource) -> ModbusDriver:
    table = SeriesTable(
        SeriesKey("t", source.area, c.device, c.channel, c.unit, "modbus")
        for c in source.channel_specs()
    )
    return ModbusDriver(source, table, DriverContext(site="t"))


@pytest.fixture
async def meter() -> Any:
    async with ModbusServerSim("127.0.0.1", 0, [Sdm630("m", 1, seed=1)]) as sim:
        yield sim


async def test_each_read_gets_the_full_timeout(meter: ModbusServerSim) -> None:
    source = meter.by_name["m"].source_config("h", "127.0.0.1", meter.port, **FAST)
    assert len(plan(source)) == 3
    async with _driver(source) as driver:
        meter.inject("m", "slow", 5, delay_s=0.12)  # each read < 0.2 s, the poll > 0.3 s
        t0 = time.perf_counter()
        batch = await driver.read_batch()
        assert time.perf_counter() - t0 > 0.3
        assert (batch.quality == GOOD).all()
        assert driver.ctx.counters.total() == 0


async def test_a_stall_after_idle_times_out_on_time(meter: ModbusServerSim) -> None:
    source = meter.by_name["m"].source_config("h", "127.0.0.1", meter.port, **FAST)
    async with _driver(source) as driver:
        await driver.read_batch()
        await asyncio.sleep(0.5)  # the timer fired while idle and disarmed
        meter.inject("m", "timeout", 1.0)
        t0 = time.perf_counter()
        batch = await driver.read_batch()
        assert 0.19 < time.perf_counter() - t0 < 0.35
        assert (batch.quality == BAD).all()
        assert driver.ctx.counters["modbus_timeout"] == 1


async def test_a_late_read_is_timed_from_its_own_start(meter: ModbusServerSim) -> None:
    source = meter.by_name["m"].source_config("h", "127.0.0.1", meter.port, **FAST)
    async with _driver(source) as driver:
        meter.inject("m", "slow", 5, delay_s=0.15)
        asyncio.get_running_loop().call_later(0.25, meter.inject, "m", "timeout", 1.0)
        t0 = time.perf_counter()
        batch = await driver.read_batch()
        # reads 1 and 2 answer at 0.15 and 0.30 s; read 3 stalls and ends at 0.30 + 0.2 s
        assert 0.45 < time.perf_counter() - t0 < 0.65
        assert (batch.quality[:-1] == GOOD).all()
        assert batch.quality[-1] == BAD
        assert driver.ctx.counters["modbus_timeout"] == 1


async def test_an_outside_cancel_is_never_a_timeout(meter: ModbusServerSim) -> None:
    source = meter.by_name["m"].source_config("h", "127.0.0.1", meter.port, **FAST)
    async with _driver(source) as driver:
        meter.inject("m", "slow", 5, delay_s=0.15)
        task = asyncio.ensure_future(driver.read_batch())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert driver.ctx.counters["modbus_timeout"] == 0
        meter.clear()
        await driver.close()
        await asyncio.sleep(0.3)
        await driver.connect()
        batch = await driver.read_batch()
        assert (batch.quality == GOOD).all()
