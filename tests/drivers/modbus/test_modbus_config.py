"""Config validation: errors name the channel and say what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from drivers.modbus.config import ModbusRegister, ModbusSource

SAMPLE = Path(__file__).resolve().parents[3] / "drivers" / "modbus" / "sample.yaml"


def _src(regs: list[dict[str, Any]], **kw: Any) -> ModbusSource:
    return ModbusSource.model_validate(
        {"area": "a", "device": "meter-1", "host": "127.0.0.1", "registers": regs, **kw}
    )


def _reg(**kw: Any) -> dict[str, Any]:
    return {"channel": "x", "table": "holding", "address": 0, "type": "uint16", **kw}


def test_defaults() -> None:
    src = _src([_reg()])
    assert (src.port, src.unit_id, src.poll_interval_s, src.max_block, src.max_gap) == (
        502,
        1,
        1.0,
        125,
        10,
    )
    assert src.registers[0].order == "ABCD"
    assert src.channel_specs()[0].device == "meter-1"


def test_duplicate_channel_names_the_channel() -> None:
    with pytest.raises(ValidationError, match="duplicate channel 'x'"):
        _src([_reg(), _reg(address=5)])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"table": "coil", "type": "uint16"}, "holds only bool"),
        ({"table": "discrete", "type": "bool", "bit": 1}, "bit is only for register tables"),
        ({"type": "bool"}, "needs bit"),
        ({"type": "uint16", "bit": 3}, "bit is only valid with type bool"),
        ({"type": "string", "codes": ["a"]}, "needs length"),
        ({"type": "string", "length": 2}, "needs codes"),
        ({"type": "uint16", "length": 2}, "length is only valid"),
        ({"type": "float64", "address": 65534}, "runs past 65535"),
        ({"type": "bool", "bit": 16}, "less than or equal to 15"),
        ({"order": "ADCB"}, "ABCD"),
        ({"table": "register"}, "coil"),
    ],
)
def test_register_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        _src([_reg(**kw)])
    assert "x" in str(info.value)


def test_value_longer_than_max_block() -> None:
    with pytest.raises(ValidationError, match="more than max_block 3"):
        _src([_reg(type="float64")], max_block=3)


@pytest.mark.parametrize(
    "kw",
    [
        {"unit_id": 256},
        {"max_block": 126},
        {"max_bits": 2001},
        {"poll_interval_s": 0},
        {"extra": 1},
        {"registers": []},
        {"reconnect_min_s": 5, "reconnect_max_s": 1},
    ],
)
def test_source_errors(kw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        _src([_reg()], **kw)


def test_overlap_is_allowed_and_frozen() -> None:
    src = _src([_reg(channel="a", type="uint32"), _reg(channel="b")])
    assert len(src.registers) == 2
    with pytest.raises(ValidationError):
        src.registers[0].address = 3  # type: ignore[misc]


def test_sample_yaml_is_valid() -> None:
    src = ModbusSource.model_validate(yaml.safe_load(SAMPLE.read_text()))
    assert src.type == "modbus"
    assert all(isinstance(r, ModbusRegister) for r in src.registers)


def test_sample_yaml_matches_the_simulator_table() -> None:
    from sim.modbus import SDM630_REGISTERS

    src = ModbusSource.model_validate(yaml.safe_load(SAMPLE.read_text()))
    assert src.registers == SDM630_REGISTERS
