"""Our driver against libmodbus, a Modbus server written independently of pymodbus."""

from __future__ import annotations

import importlib.util
import math
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from drivers.base import BAD, GOOD, DriverContext, SeriesKey, SeriesTable
from drivers.modbus.config import ModbusSource
from drivers.modbus.driver import ModbusDriver

pytestmark = pytest.mark.integration

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _load_helper() -> ModuleType:
    """tests/peers/libmodbus.py, loaded by path (tests/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "peers" / "libmodbus.py"
    spec = importlib.util.spec_from_file_location("tpo_test_peers_libmodbus", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


libmodbus = _load_helper()


@pytest.fixture(scope="module")
def libmodbus_server() -> Iterator[int]:
    try:
        proc, port = libmodbus.start()
    except libmodbus.PeerUnavailableError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    yield port
    libmodbus.stop(proc)


def _f32(value: float) -> float:
    return struct.unpack(">f", struct.pack(">f", value))[0]


# modbus_set_float_abcd/_cdab write host-memory order: on little-endian hosts the wire carries
# BADC/DCBA (libmodbus issues #611, #757, #807).
LIB_ABCD, LIB_CDAB = ("BADC", "DCBA") if sys.byteorder == "little" else ("ABCD", "CDAB")

REGISTERS = [
    {"channel": "f_abcd", "table": "holding", "address": 0, "type": "float32", "order": "ABCD"},
    {"channel": "f_cdab", "table": "holding", "address": 2, "type": "float32", "order": "CDAB"},
    {"channel": "f_badc", "table": "holding", "address": 4, "type": "float32", "order": "BADC"},
    {"channel": "f_dcba", "table": "holding", "address": 6, "type": "float32", "order": "DCBA"},
    {"channel": "f_wrong", "table": "holding", "address": 2, "type": "float32", "order": "ABCD"},
    # libmodbus' own setters, read with the order they really put on the wire (see the C file)
    {
        "channel": "lib_abcd",
        "table": "holding",
        "address": 30,
        "type": "float32",
        "order": LIB_ABCD,
    },
    {
        "channel": "lib_cdab",
        "table": "holding",
        "address": 32,
        "type": "float32",
        "order": LIB_CDAB,
    },
    {"channel": "i16", "table": "holding", "address": 8, "type": "int16"},
    {"channel": "u16", "table": "holding", "address": 9, "type": "uint16", "scale": 0.01},
    {"channel": "u32", "table": "holding", "address": 10, "type": "uint32"},
    {"channel": "i64", "table": "holding", "address": 12, "type": "int64"},
    {"channel": "bit0", "table": "holding", "address": 16, "type": "bool", "bit": 0},
    {"channel": "bit2", "table": "holding", "address": 16, "type": "bool", "bit": 2},
    {"channel": "bit15", "table": "holding", "address": 16, "type": "bool", "bit": 15},
    {
        "channel": "text",
        "table": "holding",
        "address": 20,
        "type": "string",
        "length": 5,
        "codes": ["PYMODBUS", "LIBMODBUS"],
    },
    {"channel": "kelvin", "table": "input", "address": 0, "type": "float32", "offset": 273.15},
    {"channel": "seven", "table": "input", "address": 2, "type": "uint16"},
    {"channel": "coil0", "table": "coil", "address": 0, "type": "bool"},
    {"channel": "coil1", "table": "coil", "address": 1, "type": "bool"},
    {"channel": "coil7", "table": "coil", "address": 7, "type": "bool"},
    {"channel": "di2", "table": "discrete", "address": 2, "type": "bool"},
    {"channel": "di3", "table": "discrete", "address": 3, "type": "bool"},
    {"channel": "unmapped", "table": "holding", "address": 150, "type": "uint16"},
]

EXPECTED = {
    "f_abcd": 123456.0,
    "f_cdab": 123456.0,
    "f_badc": 123456.0,
    "f_dcba": 123456.0,
    "f_wrong": struct.unpack(">f", bytes.fromhex("200047f1"))[0],
    "lib_abcd": 123456.0,
    "lib_cdab": 123456.0,
    "i16": -1234.0,
    "u16": 54321 * 0.01,
    "u32": 3000000000.0,
    "i64": -1234567890123.0,
    "bit0": 1.0,
    "bit2": 0.0,
    "bit15": 1.0,
    "text": 1.0,
    "kelvin": _f32(-273.15) + 273.15,
    "seven": 7.0,
    "coil0": 1.0,
    "coil1": 0.0,
    "coil7": 1.0,
    "di2": 1.0,
    "di3": 0.0,
}


async def test_driver_reads_libmodbus_exactly(libmodbus_server: int) -> None:
    source = ModbusSource.model_validate(
        {
            "area": "lab",
            "device": "libmodbus",
            "host": "127.0.0.1",
            "port": libmodbus_server,
            "unit_id": 1,
            "timeout_s": 1.0,
            "registers": REGISTERS,
        }
    )
    table = SeriesTable(
        SeriesKey("t", "lab", c.device, c.channel, c.unit, "modbus", c.codes)
        for c in source.channel_specs()
    )
    driver = ModbusDriver(source, table, DriverContext(site="t"))
    async with driver:
        for _ in range(3):  # several polls on one connection
            batch = await driver.read_batch()
            got = {
                table[int(s)].channel: (float(v), int(q))
                for s, v, q in zip(batch.series, batch.value, batch.quality, strict=True)
            }
            for channel, want in EXPECTED.items():
                assert got[channel] == (want, GOOD), channel
            # past libmodbus' mapping: its own exception 02, only that request BAD
            value, quality = got["unmapped"]
            assert quality == BAD
            assert math.isnan(value)
    assert driver.ctx.counters["modbus_exception_02"] == 3
    assert driver.ctx.counters["modbus_timeout"] == 0
