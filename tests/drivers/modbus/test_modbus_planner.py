"""Request planning: merging, gaps, splitting at 125 and at smaller device limits."""

from __future__ import annotations

from typing import Any

import pytest

from drivers.modbus.config import ModbusSource
from drivers.modbus.planner import describe_plan, plan
from sim.modbus import SDM630_REGISTERS


def _source(regs: list[dict[str, Any]], **kw: Any) -> ModbusSource:
    return ModbusSource.model_validate(
        {"area": "a", "device": "d", "host": "127.0.0.1", "registers": regs, **kw}
    )


def _f32(channel: str, address: int, table: str = "input") -> dict[str, Any]:
    return {"channel": channel, "table": table, "address": address, "type": "float32"}


def test_neighbours_merge_and_gaps_split() -> None:
    src = _source([_f32("a", 0), _f32("b", 2), _f32("c", 14), _f32("d", 40)], max_gap=10)
    reqs = plan(src)
    assert [(r.address, r.count) for r in reqs] == [(0, 16), (40, 2)]
    assert [off for off, _ in reqs[0].fields] == [0, 2, 14]


def test_max_gap_zero_reads_only_adjacent() -> None:
    src = _source([_f32("a", 0), _f32("b", 3)], max_gap=0)
    assert [(r.address, r.count) for r in plan(src)] == [(0, 2), (3, 2)]
    src = _source([_f32("a", 0), _f32("b", 2)], max_gap=0)
    assert [(r.address, r.count) for r in plan(src)] == [(0, 4)]


def test_split_at_125() -> None:
    regs = [_f32(f"v{i}", 2 * i) for i in range(100)]  # 200 registers, contiguous
    reqs = plan(_source(regs))
    assert [(r.address, r.count) for r in reqs] == [(0, 124), (124, 76)]
    assert all(r.count <= 125 for r in reqs)
    assert sum(len(r.fields) for r in reqs) == 100


def test_split_at_device_limit() -> None:
    regs = [_f32(f"v{i}", 2 * i) for i in range(10)]
    reqs = plan(_source(regs, max_block=8))
    assert [(r.address, r.count) for r in reqs] == [(0, 8), (8, 8), (16, 4)]


def test_tables_plan_separately_and_bits_use_max_bits() -> None:
    regs = [
        {"channel": f"c{i}", "table": "coil", "address": i * 100, "type": "bool"} for i in range(30)
    ] + [_f32("h", 0, "holding"), _f32("i", 0, "input")]
    reqs = plan(_source(regs, max_gap=100, max_bits=1000))
    assert [(r.table, r.address, r.count) for r in reqs] == [
        ("coil", 0, 901),
        ("coil", 1000, 901),
        ("coil", 2000, 901),
        ("holding", 0, 2),
        ("input", 0, 2),
    ]
    assert [r.function_code for r in reqs] == [1, 1, 1, 3, 4]


def test_overlapping_channels_share_a_request() -> None:
    regs = [
        {"channel": "word", "table": "holding", "address": 0, "type": "uint32"},
        {"channel": "high", "table": "holding", "address": 0, "type": "uint16"},
        {"channel": "bit", "table": "holding", "address": 1, "type": "bool", "bit": 3},
    ]
    (req,) = plan(_source(regs))
    assert (req.address, req.count) == (0, 2)
    assert sorted(r.channel for _, r in req.fields) == ["bit", "high", "word"]


def test_sdm630_plan_and_description() -> None:
    src = _source([r.model_dump() for r in SDM630_REGISTERS], max_block=80)
    lines = describe_plan(src)
    assert lines[0].startswith("input 0x0..0x11 (18 regs, FC04): voltage_l1@0 float32 ABCD")
    assert [(r.address, r.count) for r in plan(src)] == [(0, 18), (0x34, 24), (0x156, 2)]


def test_every_register_is_planned_once() -> None:
    regs = [_f32(f"v{i}", (i * 37) % 400) for i in range(60)]
    with pytest.raises(ValueError, match="duplicate"):
        _source([*regs, _f32("v0", 7)])
    reqs = plan(_source(regs, max_block=50, max_gap=3))
    planned = [r.channel for req in reqs for _, r in req.fields]
    assert sorted(planned) == sorted(f"v{i}" for i in range(60))
    for req in reqs:
        assert req.count <= 50
        for off, r in req.fields:
            assert req.address + off == r.address
            assert off + r.count <= req.count
