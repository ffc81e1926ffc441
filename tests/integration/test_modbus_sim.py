"""The Modbus driver against the simulator's pymodbus server: exact values, faults, recovery."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from drivers.base import BAD, GOOD, DriverContext, SampleBatch, SeriesKey, SeriesTable
from drivers.modbus.config import ModbusSource
from drivers.modbus.driver import ModbusDriver
from edge.errors import ConnectError
from sim.clock import SimClock
from sim.modbus import Compressor, JanitzaUmg604, ModbusDeviceSpec, ModbusServerSim, Sdm630
from sim.truth import GroundTruth

pytestmark = pytest.mark.integration

FAST = {"timeout_s": 0.2, "reconnect_min_s": 0.05, "reconnect_max_s": 0.4}


def _driver(source: ModbusSource) -> ModbusDriver:
    table = SeriesTable(
        SeriesKey("t", source.area, c.device, c.channel, c.unit, "modbus", c.codes)
        for c in source.channel_specs()
    )
    return ModbusDriver(source, table, DriverContext(site="t"))


def _by_channel(driver: ModbusDriver, batch: SampleBatch) -> dict[str, tuple[float, int]]:
    return {
        driver.series[int(s)].channel: (float(v), int(q))
        for s, v, q in zip(batch.series, batch.value, batch.quality, strict=True)
    }


@pytest.fixture
async def gateway() -> Any:
    truth = GroundTruth()
    devices = [
        Sdm630("meter-1", 1, seed=1),
        Compressor("comp-1", 2, seed=2),
        JanitzaUmg604("umg-1", 3, order="CDAB", seed=3),
    ]
    sim = ModbusServerSim("127.0.0.1", 0, devices, truth, clock=SimClock(speed=600.0))
    await sim.start()
    yield sim
    await sim.stop()


async def test_stored_values_equal_served_values(gateway: ModbusServerSim) -> None:
    got: dict[tuple[str, str], list[float]] = defaultdict(list)
    for dev in gateway.devices:
        driver = _driver(dev.source_config("hall", "127.0.0.1", gateway.port, **FAST))
        async with driver:
            for _ in range(5):
                batch = await driver.read_batch()
                assert (batch.quality == GOOD).all()
                for ch, (v, _q) in _by_channel(driver, batch).items():
                    got[(dev.name, ch)].append(v)
                await asyncio.sleep(0.01)
    assert gateway.truth is not None
    served: dict[tuple[str, str], list[float | None]] = defaultdict(list)
    for rec in gateway.truth.records():
        assert not rec.dropped
        served[(rec.device, rec.channel)].append(rec.value)
    assert served == got  # exact float equality, one record per sample, same order
    assert gateway.truth.delivered_count() == sum(len(v) for v in got.values())
    # the model moves: energy rises, the three-phase values are plausible
    energy = got[("meter-1", "energy_import")]
    assert energy[-1] > energy[0]
    assert all(200 < v < 260 for v in got[("meter-1", "voltage_l1")])
    assert all(49 < v < 51 for v in got[("umg-1", "frequency")])


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("exception_02", "exception_02"),
        ("exception_04", "exception_04"),
        ("exception_0B", "exception_0b"),
    ],
)
async def test_exception_faults_give_bad_nan_and_recover(
    gateway: ModbusServerSim, fault: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="drivers.modbus.driver")
    driver = _driver(
        gateway.by_name["meter-1"].source_config("hall", "127.0.0.1", gateway.port, **FAST)
    )
    async with driver:
        good = await driver.read_batch()
        assert (good.quality == GOOD).all()
        assert gateway.truth is not None
        before = gateway.truth.delivered_count()
        gateway.inject("meter-1", fault, 0.3)
        for _ in range(2):
            bad = await driver.read_batch()
            assert (bad.quality == BAD).all()
            assert np.isnan(bad.value).all()
        assert gateway.truth.delivered_count() == before  # nothing served during the fault
        assert driver.ctx.counters[f"modbus_{reason}"] == 2 * len(driver.plan)
        assert driver.connected  # an exception reply keeps the connection
        await asyncio.sleep(0.35)
        again = await driver.read_batch()
        assert (again.quality == GOOD).all()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(driver.plan)  # first failure of each request, loudly
    assert "meter-1" in warnings[0].getMessage()
    assert "unit 1" in warnings[0].getMessage()
    assert "address 0 count 18" in warnings[0].getMessage()
    assert f"exception {fault[-2:].upper()}" in warnings[0].getMessage()
    assert any(r.levelno == logging.DEBUG and "failure 2" in r.getMessage() for r in caplog.records)
    assert sum(
        "recovered" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO
    ) == len(driver.plan)


async def test_timeout_returns_quickly_and_backs_off(gateway: ModbusServerSim) -> None:
    driver = _driver(
        gateway.by_name["comp-1"].source_config("hall", "127.0.0.1", gateway.port, **FAST)
    )
    async with driver:
        gateway.inject("comp-1", "timeout", 0.6)
        t0 = time.perf_counter()
        batch = await driver.read_batch()
        assert time.perf_counter() - t0 < 0.2 + 0.15  # one timeout, not one per request
        assert (batch.quality == BAD).all()
        assert driver.ctx.counters["modbus_timeout"] == 1
        assert driver.ctx.counters["modbus_not_connected"] == len(driver.plan) - 1
        t0 = time.perf_counter()
        batch = await driver.read_batch()  # inside the backoff: no network at all
        assert time.perf_counter() - t0 < 0.02
        assert (batch.quality == BAD).all()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            batch = await driver.read_batch()
            if (batch.quality == GOOD).all():
                break
            await asyncio.sleep(0.02)
        assert (batch.quality == GOOD).all()


async def test_slow_replies(gateway: ModbusServerSim) -> None:
    driver = _driver(
        gateway.by_name["meter-1"].source_config("hall", "127.0.0.1", gateway.port, **FAST)
    )
    async with driver:
        gateway.inject("meter-1", "slow", 0.5, delay_s=0.05)
        batch = await driver.read_batch()
        assert (batch.quality == GOOD).all()  # slower than usual, within the timeout
        assert gateway.truth is not None
        assert all(r.dropped for r in gateway.truth.records()[-len(batch) :])
        gateway.inject("meter-1", "slow", 0.5, delay_s=0.5)
        batch = await driver.read_batch()
        assert (batch.quality == BAD).all()
        assert driver.ctx.counters["modbus_timeout"] == 1


async def test_silence_drops_the_connection_and_reconnects(gateway: ModbusServerSim) -> None:
    driver = _driver(
        gateway.by_name["umg-1"].source_config("hall", "127.0.0.1", gateway.port, **FAST)
    )
    async with driver:
        gateway.inject("umg-1", "silence", 0.3)
        batch = await driver.read_batch()
        assert (batch.quality == BAD).all()
        assert driver.ctx.counters["modbus_connection_lost"] == 1
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            await asyncio.sleep(0.03)
            batch = await driver.read_batch()
            if (batch.quality == GOOD).all():
                break
        assert (batch.quality == GOOD).all()
        assert not math.isnan(_by_channel(driver, batch)["frequency"][0])


async def test_one_dead_unit_never_stalls_another(gateway: ModbusServerSim) -> None:
    healthy = _driver(
        gateway.by_name["meter-1"].source_config("hall", "127.0.0.1", gateway.port, **FAST)
    )
    dead = _driver(
        gateway.by_name["comp-1"].source_config("hall", "127.0.0.1", gateway.port, **FAST)
    )
    gateway.inject("comp-1", "timeout", 5)
    polls = {"healthy": 0, "dead": 0}
    good = {"healthy": 0, "dead": 0}

    async def poll(name: str, driver: ModbusDriver) -> None:
        async with driver:
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                batch = await driver.read_batch()
                polls[name] += 1
                good[name] += int((batch.quality == GOOD).all())
                await asyncio.sleep(0.02)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(poll("healthy", healthy))
        tg.create_task(poll("dead", dead))
    assert good["dead"] == 0
    assert polls["healthy"] >= 25
    assert good["healthy"] == polls["healthy"]


async def test_connect_error_names_the_device() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        source = Sdm630("meter-9", 4).source_config("hall", "127.0.0.1", port, **FAST)
        driver = _driver(source)
        with pytest.raises(ConnectError, match=rf"meter-9 \(127\.0\.0\.1:{port} unit 4\)"):
            await driver.connect()
        # read_batch keeps answering BAD at once and spaces its reconnects by the backoff
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.6:
            batch = await driver.read_batch()
            assert (batch.quality == BAD).all()
            await asyncio.sleep(0.005)
        attempts = driver.ctx.counters["modbus_connect_failed"]
        assert 3 <= attempts <= 8  # 0.05, 0.1, 0.2, 0.4 (capped) with jitter, not ~100
        await driver.close()


async def test_device_spec_builds_devices() -> None:
    spec = ModbusDeviceSpec(
        kind="umg604", name="umg-2", unit_id=9, order="DCBA", max_block=40, seed=5
    )
    dev = spec.build()
    assert dev.max_block == 40
    assert all(r.order == "DCBA" for r in dev.registers)
    async with ModbusServerSim("127.0.0.1", 0, [spec], GroundTruth()) as sim:
        driver = _driver(sim.devices[0].source_config("hall", "127.0.0.1", sim.port, **FAST))
        async with driver:
            batch = await driver.read_batch()
        values = _by_channel(driver, batch)
        assert 200 < values["voltage_l1"][0] < 260
