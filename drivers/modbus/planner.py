"""Request planning: which reads cover a device's registers, computed once at config time.

Per table, the register definitions are sorted by address and neighbours are
merged into one request while the request stays within ``max_block`` registers
(``max_bits`` for coil/discrete tables) and the unused gap between them is at
most ``max_gap``. Overlapping definitions (the same registers read as two
channels) share a request. Every request carries its fields with their offsets
into the reply, so decoding never searches.
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.modbus.config import BIT_TABLES, ModbusRegister, ModbusSource, Table

FUNCTION_CODE: dict[str, int] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
"""Modbus read function code of each table."""

_TABLE_ORDER: tuple[Table, ...] = ("coil", "discrete", "holding", "input")


@dataclass(frozen=True, slots=True)
class ModbusRequest:
    """One read: ``count`` registers (or bits) of ``table`` from ``address``, and what it feeds."""

    table: Table
    address: int
    count: int
    fields: tuple[tuple[int, ModbusRegister], ...]
    """(offset of the field in the reply, register definition), in address order."""

    @property
    def function_code(self) -> int:
        """FC01..FC04."""
        return FUNCTION_CODE[self.table]

    @property
    def is_bits(self) -> bool:
        """True for coil/discrete reads (replies are bits)."""
        return self.table in BIT_TABLES

    @property
    def end(self) -> int:
        """First address after the request."""
        return self.address + self.count


def _merge(regs: list[ModbusRegister], limit: int, max_gap: int) -> list[list[ModbusRegister]]:
    """Group address-sorted registers into runs that fit ``limit`` with gaps <= ``max_gap``."""
    runs: list[list[ModbusRegister]] = []
    start = end = 0
    for reg in regs:
        if runs and reg.address - end <= max_gap and max(end, reg.end) - start <= limit:
            runs[-1].append(reg)
            end = max(end, reg.end)
        else:
            runs.append([reg])
            start, end = reg.address, reg.end
    return runs


def plan(source: ModbusSource) -> tuple[ModbusRequest, ...]:
    """The requests that read every register of ``source``, per table in address order."""
    requests: list[ModbusRequest] = []
    for table in _TABLE_ORDER:
        regs = sorted(
            (r for r in source.registers if r.table == table),
            key=lambda r: (r.address, r.count),
        )
        if not regs:
            continue
        limit = source.max_bits if table in BIT_TABLES else source.max_block
        for run in _merge(regs, limit, source.max_gap):
            address = run[0].address
            count = max(r.end for r in run) - address
            fields = tuple((r.address - address, r) for r in run)
            requests.append(ModbusRequest(table, address, count, fields))
    return tuple(requests)


def _describe_field(offset: int, reg: ModbusRegister) -> str:
    kind: str = reg.type
    if reg.bit is not None:
        kind = f"bit {reg.bit}"
    elif reg.type == "string":
        kind = f"string[{reg.length}]"
    order = "" if reg.table in BIT_TABLES else f" {reg.order}"
    return f"{reg.channel}@{offset} {kind}{order}"


def describe_plan(source: ModbusSource) -> list[str]:
    """Human-readable lines, one per request (``tpo-edge check --plan``)."""
    lines = []
    for req in plan(source):
        unit = "bits" if req.is_bits else "regs"
        fields = ", ".join(_describe_field(off, reg) for off, reg in req.fields)
        lines.append(
            f"{req.table} {req.address:#x}..{req.end - 1:#x} ({req.count} {unit}, "
            f"FC{req.function_code:02d}): {fields}"
        )
    return lines
