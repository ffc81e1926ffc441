"""Configuration of a Modbus TCP source: one device (unit id) behind one host:port."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.base import ChannelSpec, SourceConfig

Table = Literal["coil", "discrete", "input", "holding"]
DataType = Literal[
    "bool",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
    "string",
]
Order = Literal["ABCD", "CDAB", "BADC", "DCBA"]

BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete"})
"""Tables addressed in bits (FC01/FC02); the others are 16-bit registers (FC03/FC04)."""

MAX_REGISTERS = 125
"""Largest FC03/FC04 read the protocol allows."""
MAX_BITS = 2000
"""Largest FC01/FC02 read the protocol allows."""

REGISTER_COUNT: dict[str, int] = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
"""Registers each fixed-size type spans (a string spans its ``length``)."""


class ModbusRegister(BaseModel):
    """One channel: where its value lives on the device and how to decode it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    table: Table
    address: int = Field(ge=0, le=0xFFFF)
    """PDU address, 0-based: register "40001" / "30001" is address 0."""
    type: DataType
    bit: int | None = Field(default=None, ge=0, le=15)
    """For ``type: bool`` in a register table: the bit of the register (0 = least significant)."""
    length: int | None = Field(default=None, ge=1, le=MAX_REGISTERS)
    """For ``type: string``: number of registers (two characters each)."""
    order: Order = "ABCD"
    """Byte/word order; for 16-bit types only the byte order matters (ABCD/CDAB = AB)."""
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    codes: tuple[str, ...] | None = None
    """Names of the numeric codes of an enumeration; required for strings (value = index)."""

    @property
    def count(self) -> int:
        """Registers (or bits, in bit tables) the value spans."""
        if self.type == "string":
            assert self.length is not None
            return self.length
        return REGISTER_COUNT[self.type]

    @property
    def end(self) -> int:
        """First address after the value."""
        return self.address + self.count

    @model_validator(mode="after")
    def _check_type(self) -> Self:
        """Tie type, table, bit and length together; messages name the channel."""
        bit_table = self.table in BIT_TABLES
        string = self.type == "string"
        rules = (
            (bit_table and self.type != "bool", f"table {self.table!r} holds only bool"),
            (bit_table and self.bit is not None, "bit is only for register tables"),
            (
                not bit_table and self.type == "bool" and self.bit is None,
                f"bool in table {self.table!r} needs bit: 0..15 (which bit of the register)",
            ),
            (self.bit is not None and self.type != "bool", "bit is only valid with type bool"),
            (string and self.length is None, "type string needs length (registers)"),
            (
                string and not self.codes,
                "type string needs codes (samples are numeric: value = index in codes)",
            ),
            (not string and self.length is not None, "length is only valid with type string"),
        )
        problems = [msg for broken, msg in rules if broken]
        if not problems and self.address + self.count > 0x10000:
            problems.append(f"address {self.address} + {self.count} registers runs past 65535")
        if problems:
            raise ValueError(f"channel {self.channel!r}: {'; '.join(problems)}")
        return self


class ModbusSource(SourceConfig):
    """A Modbus TCP device (one unit id); its registers are read every ``poll_interval_s``."""

    type: Literal["modbus"] = "modbus"
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)
    unit_id: int = Field(default=1, ge=0, le=255)
    poll_interval_s: float = Field(default=1.0, gt=0)
    timeout_s: float = Field(default=1.0, gt=0)
    max_block: int = Field(default=MAX_REGISTERS, ge=1, le=MAX_REGISTERS)
    """Most registers per FC03/FC04 request (set lower for devices that allow fewer)."""
    max_bits: int = Field(default=MAX_BITS, ge=1, le=MAX_BITS)
    """Most bits per FC01/FC02 request."""
    max_gap: int = Field(default=10, ge=0)
    """Unused registers (or bits) a request may read to merge two neighbours."""
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    registers: tuple[ModbusRegister, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_registers(self) -> Self:
        """Duplicate channels and values longer than a request are errors."""
        seen: set[str] = set()
        for reg in self.registers:
            if reg.channel in seen:
                raise ValueError(f"duplicate channel {reg.channel!r} in device {self.device!r}")
            seen.add(reg.channel)
            limit = self.max_bits if reg.table in BIT_TABLES else self.max_block
            if reg.count > limit:
                raise ValueError(
                    f"channel {reg.channel!r}: spans {reg.count} registers, "
                    f"more than max_block {limit} of device {self.device!r}"
                )
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    def channel_specs(self) -> list[ChannelSpec]:
        """One channel per register definition."""
        return [
            ChannelSpec(device=self.device, channel=r.channel, unit=r.unit, codes=r.codes)
            for r in self.registers
        ]
