"""Fixtures of the Modbus driver tests: a series table and a driver for any source config."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from drivers.base import DriverContext, SeriesKey, SeriesTable
from drivers.modbus.config import ModbusSource
from drivers.modbus.driver import ModbusDriver

MakeDriver = Callable[[ModbusSource], ModbusDriver]


def series_table(*sources: ModbusSource) -> SeriesTable:
    """The series table the agent would build for these sources."""
    return SeriesTable(
        SeriesKey("test", s.area, c.device, c.channel, c.unit, "modbus", c.codes)
        for s in sources
        for c in s.channel_specs()
    )


@pytest.fixture
def make_driver() -> MakeDriver:
    """Build a driver (not yet connected) with its own series table and counters."""

    def make(source: ModbusSource) -> ModbusDriver:
        return ModbusDriver(source, series_table(source), DriverContext(site="test"))

    return make
