"""Simulated Modbus TCP devices on a pymodbus server, with ground truth and fault injection.

One :class:`ModbusServerSim` is one TCP endpoint hosting several unit ids, like a
gateway (run one per device to model devices with their own IP). Each device
keeps its four tables as numpy arrays; values evolve lazily at each read from a
seeded generator and the :class:`~sim.clock.SimClock`, and are written through
:func:`drivers.modbus.codec.encode`, so they are quantised exactly as a real
register holds them (float32 rounding, x0.01 scaling).

Every read served is logged to :class:`~sim.truth.GroundTruth`: one record per
channel fully covered by the served block, with the value decoded from the
served words the way the driver must decode it. During a fault nothing is
logged as delivered (a "slow" reply is logged with ``dropped=True``).

Device behaviour worth knowing (see drivers/modbus/README.md):

* a read longer than the device's ``max_block`` gets exception 03 (ILLEGAL
  DATA VALUE, as the protocol prescribes for a bad quantity);
* a read touching an address marked illegal gets exception 02; unmapped
  addresses read as 0, as most meters answer;
* an unknown unit id gets exception 0B (gateway target failed to respond).

The register tables (``SDM630_REGISTERS`` ...) are the single source of truth for
the simulator and for generated site configs (:meth:`SimulatedDevice.source_config`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler

from drivers.modbus.codec import decode_value, encode
from drivers.modbus.config import ModbusRegister, ModbusSource, Order
from sim.clock import SimClock

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    import numpy.typing as npt

    from sim.truth import GroundTruth

log = logging.getLogger(__name__)

Fault = Literal["exception_02", "exception_04", "exception_0B", "timeout", "slow", "silence"]
FAULTS: tuple[str, ...] = (
    "exception_02",
    "exception_04",
    "exception_0B",
    "timeout",
    "slow",
    "silence",
)
_FAULT_CODE = {
    "exception_02": ExcCodes.ILLEGAL_ADDRESS,
    "exception_04": ExcCodes.DEVICE_FAILURE,
    "exception_0B": ExcCodes.GATEWAY_NO_RESPONSE,
}
_TABLE_OF_FC = {1: "coil", 2: "discrete", 3: "holding", 4: "input", 5: "coil", 15: "coil"}
_TABLE_OF_FC.update({6: "holding", 16: "holding", 22: "holding", 23: "holding"})
_SLOW: contextvars.ContextVar[bool] = contextvars.ContextVar("modbus_sim_slow", default=False)


def _reg(
    channel: str,
    address: int,
    type_: str,
    unit: str,
    *,
    table: str = "input",
    **kw: Any,
) -> ModbusRegister:
    return ModbusRegister.model_validate(
        {"channel": channel, "table": table, "address": address, "type": type_, "unit": unit, **kw}
    )


SDM630_REGISTERS: tuple[ModbusRegister, ...] = (
    _reg("voltage_l1", 0x00, "float32", "V"),
    _reg("voltage_l2", 0x02, "float32", "V"),
    _reg("voltage_l3", 0x04, "float32", "V"),
    _reg("current_l1", 0x06, "float32", "A"),
    _reg("current_l2", 0x08, "float32", "A"),
    _reg("current_l3", 0x0A, "float32", "A"),
    _reg("power_l1", 0x0C, "float32", "W"),
    _reg("power_l2", 0x0E, "float32", "W"),
    _reg("power_l3", 0x10, "float32", "W"),
    _reg("power_total", 0x34, "float32", "W"),
    _reg("power_factor", 0x3E, "float32", ""),
    _reg("frequency", 0x46, "float32", "Hz"),
    _reg("energy_import", 0x48, "float32", "kWh"),
    _reg("energy_export", 0x4A, "float32", "kWh"),
    _reg("energy_total", 0x156, "float32", "kWh"),
)
"""Eastron SDM630, FC04 input registers, float32 (DEVICES.md)."""

UMG604_REGISTERS: tuple[ModbusRegister, ...] = (
    _reg("voltage_l1", 1317, "float32", "V", table="holding"),
    _reg("voltage_l2", 1319, "float32", "V", table="holding"),
    _reg("voltage_l3", 1321, "float32", "V", table="holding"),
    _reg("current_l1", 1325, "float32", "A", table="holding"),
    _reg("current_l2", 1327, "float32", "A", table="holding"),
    _reg("current_l3", 1329, "float32", "A", table="holding"),
    _reg("power_l1", 1333, "float32", "W", table="holding"),
    _reg("power_l2", 1335, "float32", "W", table="holding"),
    _reg("power_l3", 1337, "float32", "W", table="holding"),
    _reg("power_total", 1369, "float32", "W", table="holding"),
    _reg("frequency", 1439, "float32", "Hz", table="holding"),
)
"""Janitza UMG 604, FC03 holding registers, float32; manual addresses used as PDU addresses."""

COMPRESSOR_STATES = ("stop", "starting", "unloaded", "loaded", "fault")
COMPRESSOR_REGISTERS: tuple[ModbusRegister, ...] = (
    _reg("running", 0, "bool", "", table="holding", bit=0),
    _reg("loaded", 0, "bool", "", table="holding", bit=1),
    _reg("remote", 0, "bool", "", table="holding", bit=2),
    _reg("warning", 0, "bool", "", table="holding", bit=3),
    _reg("fault", 0, "bool", "", table="holding", bit=4),
    _reg("state", 1, "uint16", "", table="holding", codes=COMPRESSOR_STATES),
    _reg("pressure", 2, "uint16", "bar", table="holding", scale=0.01),
    _reg("element_temperature", 3, "int16", "degC", table="holding", scale=0.1),
    _reg("ambient_temperature", 4, "int16", "degC", table="holding", scale=0.1),
    _reg("motor_current", 5, "uint16", "A", table="holding", scale=0.1),
    _reg("running_hours", 6, "uint32", "h", table="holding"),
    _reg("loaded_hours", 8, "uint32", "h", table="holding"),
    _reg("alarm_code", 12, "uint16", "", table="holding"),
    _reg("pressure_setpoint", 100, "uint16", "bar", table="holding", scale=0.01),
)
"""Screw compressor (proposed map in DEVICES.md), holding registers, 32-bit high word first."""

_INT_RANGE = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


class SimulatedDevice:
    """One unit id: four tables of register/bit values, a channel map, and a model that moves."""

    kind: ClassVar[str] = "raw"
    base_registers: ClassVar[tuple[ModbusRegister, ...]] = ()
    default_max_block: ClassVar[int] = 125

    def __init__(
        self,
        name: str,
        unit_id: int,
        *,
        order: Order = "ABCD",
        max_block: int | None = None,
        seed: int = 0,
        registers: Sequence[ModbusRegister] | None = None,
    ) -> None:
        """A device named ``name`` answering as ``unit_id``; registers get ``order`` applied."""
        self.name = name
        self.unit_id = unit_id
        self.order: Order = order
        self.max_block = max_block or self.default_max_block
        self.rng = np.random.default_rng(seed)
        base = self.base_registers if registers is None else tuple(registers)
        self.registers: tuple[ModbusRegister, ...] = tuple(
            r if r.table in {"coil", "discrete"} else r.model_copy(update={"order": order})
            for r in base
        )
        self.tables: dict[str, npt.NDArray[np.uint16]] = {
            t: np.zeros(0x10000, dtype=np.uint16) for t in ("coil", "discrete", "input", "holding")
        }
        self.illegal: dict[str, npt.NDArray[np.bool_]] = {}
        self._by_table: dict[str, list[ModbusRegister]] = {}
        for r in self.registers:
            self._by_table.setdefault(r.table, []).append(r)
        self._last_sim_s: float | None = None

    # -- register access -----------------------------------------------------------------

    def set_raw(self, table: str, address: int, words: Iterable[int]) -> None:
        """Write raw uint16 words (or 0/1 bits) from ``address``."""
        data = np.asarray(list(words), dtype=np.uint16)
        self.tables[table][address : address + len(data)] = data

    def mark_illegal(self, table: str, start: int, end: int) -> None:
        """Reads touching ``start..end-1`` of ``table`` get exception 02."""
        mask = self.illegal.setdefault(table, np.zeros(0x10000, dtype=np.bool_))
        mask[start:end] = True

    def write_value(self, reg: ModbusRegister, value: float) -> None:
        """Store an engineering value the way the device holds it (scaled, rounded, clipped)."""
        table = self.tables[reg.table]
        if reg.table in {"coil", "discrete"}:
            table[reg.address] = 1 if value else 0
            return
        if reg.type == "bool":
            mask = encode(1, "bool", reg.order, bit=reg.bit)[0]
            word = int(table[reg.address]) & ~mask
            table[reg.address] = word | (mask if value else 0)
            return
        raw: float = (value - reg.offset) / reg.scale
        if reg.type in _INT_RANGE:
            lo, hi = _INT_RANGE[reg.type]
            raw = min(max(round(raw), lo), hi)
        words = encode(raw, reg.type, reg.order, length=reg.length)
        table[reg.address : reg.address + len(words)] = words

    def value_of(self, reg: ModbusRegister) -> float:
        """The value the driver decodes from the registers right now."""
        return decode_value(self.tables[reg.table][reg.address : reg.end].tolist(), reg)

    # -- model ---------------------------------------------------------------------------

    def evolve(self, sim_s: float) -> None:
        """Advance the model to simulated time ``sim_s`` and write its values."""
        dt = 0.0 if self._last_sim_s is None else max(0.0, sim_s - self._last_sim_s)
        if self._last_sim_s is not None and dt == 0.0:
            return
        self._last_sim_s = sim_s
        values = self.step(sim_s, dt)
        by_channel = {r.channel: r for r in self.registers}
        for channel, value in values.items():
            self.write_value(by_channel[channel], value)

    def step(self, sim_s: float, dt: float) -> Mapping[str, float]:  # noqa: ARG002 - model hook
        """New engineering values per channel; raw devices keep what was set."""
        return {}

    def write_request(self, table: str, address: int, values: Sequence[int]) -> ExcCodes | None:
        """A client write; raw and meter devices refuse (02), models may accept."""
        _ = table, address, values
        return ExcCodes.ILLEGAL_ADDRESS

    # -- serving -------------------------------------------------------------------------

    def serve(
        self, table: str, address: int, count: int, truth: GroundTruth | None, *, dropped: bool
    ) -> list[int] | list[bool] | ExcCodes:
        """Answer one read and log each fully covered channel to ``truth``."""
        if count > self.max_block:
            return ExcCodes.ILLEGAL_VALUE
        mask = self.illegal.get(table)
        if mask is not None and mask[address : address + count].any():
            return ExcCodes.ILLEGAL_ADDRESS
        words = self.tables[table][address : address + count]
        if len(words) < count:
            return ExcCodes.ILLEGAL_ADDRESS
        served_ns = time.time_ns()
        if truth is not None:
            for reg in self._by_table.get(table, ()):
                if reg.address >= address and reg.end <= address + count:
                    off = reg.address - address
                    value = decode_value(words[off : off + reg.count].tolist(), reg)
                    truth.record(self.name, reg.channel, value, served_ns, dropped=dropped)
        if table in {"coil", "discrete"}:
            return [bool(b) for b in words]
        registers: list[int] = words.tolist()
        return registers

    def source_config(self, area: str, host: str, port: int, **overrides: Any) -> ModbusSource:
        """A driver config reading every channel of this device (the site/test generator)."""
        fields: dict[str, Any] = {
            "type": "modbus",
            "area": area,
            "device": self.name,
            "host": host,
            "port": port,
            "unit_id": self.unit_id,
            "max_block": min(self.max_block, 125),
            "registers": self.registers,
        }
        fields.update(overrides)
        return ModbusSource.model_validate(fields)


class _ThreePhase:
    """Correlated three-phase quantities: U ~230 V, I as a mean-reverting walk, P = U*I*pf."""

    def __init__(self, rng: np.random.Generator, mean_current_a: float) -> None:
        self.rng = rng
        self.mean_current = mean_current_a
        self.current = np.full(3, mean_current_a)
        self.pf = 0.92
        self.freq = 50.0
        self.energy_import_kwh = float(rng.uniform(1000, 5000))
        self.energy_export_kwh = float(rng.uniform(0, 10))

    def step(self, sim_s: float, dt: float) -> dict[str, float]:
        rng = self.rng
        # Ornstein-Uhlenbeck walks: shapes that look like a real load, but stay bounded.
        k = min(1.0, dt / 30.0)
        self.current += k * (self.mean_current - self.current) + rng.normal(0, 0.4, 3) * math.sqrt(
            min(dt, 60.0)
        )
        self.current = np.clip(self.current, 0.0, 6 * self.mean_current)
        self.pf = float(np.clip(self.pf + k * (0.92 - self.pf) + rng.normal(0, 0.005), 0.5, 1.0))
        self.freq = float(self.freq + k * (50.0 - self.freq) + rng.normal(0, 0.003))
        voltage = 230.0 + 1.5 * math.sin(sim_s / 600.0) + rng.normal(0, 0.3, 3)
        power = voltage * self.current * self.pf
        total = float(power.sum())
        self.energy_import_kwh += max(total, 0.0) * dt / 3.6e6
        values = {f"voltage_l{i + 1}": float(voltage[i]) for i in range(3)}
        values.update({f"current_l{i + 1}": float(self.current[i]) for i in range(3)})
        values.update({f"power_l{i + 1}": float(power[i]) for i in range(3)})
        values.update(
            power_total=total,
            power_factor=self.pf,
            frequency=self.freq,
            energy_import=self.energy_import_kwh,
            energy_export=self.energy_export_kwh,
            energy_total=self.energy_import_kwh + self.energy_export_kwh,
        )
        return values


class Sdm630(SimulatedDevice):
    """Eastron SDM630 three-phase energy meter (FC04 float32); 40 values = 80 registers a read."""

    kind = "sdm630"
    base_registers = SDM630_REGISTERS
    default_max_block = 80

    def __init__(self, name: str, unit_id: int, **kw: Any) -> None:
        """See :class:`SimulatedDevice`; ``mean_current_a`` sets the load."""
        mean_current = float(kw.pop("mean_current_a", 12.0))
        super().__init__(name, unit_id, **kw)
        self.model = _ThreePhase(self.rng, mean_current)

    def step(self, sim_s: float, dt: float) -> Mapping[str, float]:
        """Three-phase values, energy integrated over ``dt``."""
        return self.model.step(sim_s, dt)


class JanitzaUmg604(SimulatedDevice):
    """Janitza UMG 604 power analyser (FC03 float32 at its manual's addresses)."""

    kind = "umg604"
    base_registers = UMG604_REGISTERS
    default_max_block = 125

    def __init__(self, name: str, unit_id: int, **kw: Any) -> None:
        """See :class:`SimulatedDevice`; ``mean_current_a`` sets the load."""
        mean_current = float(kw.pop("mean_current_a", 40.0))
        super().__init__(name, unit_id, **kw)
        self.model = _ThreePhase(self.rng, mean_current)
        self._channels = {r.channel for r in self.registers}

    def step(self, sim_s: float, dt: float) -> Mapping[str, float]:
        """Three-phase values for the channels this map has."""
        return {k: v for k, v in self.model.step(sim_s, dt).items() if k in self._channels}


class Compressor(SimulatedDevice):
    """Screw compressor controller: load/unload cycling around a writable pressure set point."""

    kind = "compressor"
    base_registers = COMPRESSOR_REGISTERS
    default_max_block = 10

    def __init__(self, name: str, unit_id: int, **kw: Any) -> None:
        """See :class:`SimulatedDevice`; starts stopped and starts itself after 2 s."""
        super().__init__(name, unit_id, **kw)
        self.state = 0
        self.state_since = 0.0
        self.pressure = 6.0
        self.setpoint = 7.5
        self.element_temp = 25.0
        self.running_s = float(self.rng.uniform(1e6, 3e7))
        self.loaded_s = self.running_s * 0.6
        self.alarm = 0

    def _next_state(self, sim_s: float, dt: float) -> int:
        age = sim_s - self.state_since
        band = 0.5
        rng = self.rng
        if self.state == 4:
            return 0 if age > 120 else 4
        if self.state in {2, 3} and rng.random() < dt / (8 * 3600):
            self.alarm = int(rng.choice([1201, 2105, 3301]))
            return 4
        match self.state:
            case 0:
                return 1 if age > 2 else 0
            case 1:
                return 2 if age > 5 else 1
            case 2:
                return 3 if self.pressure < self.setpoint - band else 2
            case _:
                return 2 if self.pressure > self.setpoint else 3

    def step(self, sim_s: float, dt: float) -> Mapping[str, float]:
        """Advance the state machine, pressure, temperatures and hour counters."""
        state = self._next_state(sim_s, dt)
        if state != self.state:
            self.state, self.state_since = state, sim_s
            if state == 0:
                self.alarm = 0
        loaded = self.state == 3
        running = self.state in {1, 2, 3}
        demand = 0.03 + 0.01 * self.rng.standard_normal()
        self.pressure += ((0.12 if loaded else 0.0) - demand) * dt
        self.pressure = float(np.clip(self.pressure, 0.0, 10.0))
        target = 82.0 if loaded else 65.0 if running else 25.0
        self.element_temp += min(1.0, dt / 60.0) * (target - self.element_temp)
        if running:
            self.running_s += dt
        if loaded:
            self.loaded_s += dt
        current = 62.0 if loaded else 24.0 if running else 0.0
        return {
            "running": float(running),
            "loaded": float(loaded),
            "remote": 1.0,
            "warning": float(self.element_temp > 95.0),
            "fault": float(self.state == 4),
            "state": float(self.state),
            "pressure": self.pressure,
            "element_temperature": self.element_temp + self.rng.normal(0, 0.2),
            "ambient_temperature": 22.0 + self.rng.normal(0, 0.2),
            "motor_current": current + (self.rng.normal(0, 0.5) if running else 0.0),
            "running_hours": self.running_s // 3600,
            "loaded_hours": self.loaded_s // 3600,
            "alarm_code": float(self.alarm),
            "pressure_setpoint": self.setpoint,
        }

    def write_request(self, table: str, address: int, values: Sequence[int]) -> ExcCodes | None:
        """Only the set point (holding 100) is writable."""
        if table != "holding" or address != 100 or len(values) != 1:
            return ExcCodes.ILLEGAL_ADDRESS
        self.tables["holding"][100] = values[0]
        reg = next(r for r in self.registers if r.channel == "pressure_setpoint")
        self.setpoint = self.value_of(reg)
        return None


DEVICE_KINDS: dict[str, type[SimulatedDevice]] = {
    "sdm630": Sdm630,
    "umg604": JanitzaUmg604,
    "compressor": Compressor,
}


class ModbusDeviceSpec(BaseModel):
    """A simulated Modbus device as a scenario YAML describes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sdm630", "umg604", "compressor"]
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    unit_id: int = Field(default=1, ge=1, le=247)
    order: Order = "ABCD"
    max_block: int | None = Field(default=None, ge=1, le=125)
    seed: int = 0
    mean_current_a: float | None = Field(default=None, gt=0)

    def build(self) -> SimulatedDevice:
        """The device object."""
        kw: dict[str, Any] = {"order": self.order, "max_block": self.max_block, "seed": self.seed}
        if self.mean_current_a is not None:
            kw["mean_current_a"] = self.mean_current_a
        return DEVICE_KINDS[self.kind](self.name, self.unit_id, **kw)


def channel_map(device: SimulatedDevice | ModbusDeviceSpec) -> tuple[ModbusRegister, ...]:
    """The register definitions of a simulated device, with its word order applied."""
    dev = device.build() if isinstance(device, ModbusDeviceSpec) else device
    return dev.registers


@dataclass
class _ActiveFault:
    fault: str
    until: float
    delay_s: float


class _SimContext(ModbusServerContext):
    """The datastore pymodbus calls: routes to devices, applies faults, logs ground truth."""

    def __init__(self, sim: ModbusServerSim) -> None:
        # Deliberately not calling super().__init__: its deprecation path converts the old
        # datastore into SimDevices; "old_simulator" makes the server call us directly.
        self.sim = sim
        self.old_simulator = True
        self.simdevices = []

    def device_ids(self) -> list[int]:
        """Unit ids hosted."""
        return list(self.sim.by_unit)

    async def async_getValues(  # noqa: N802 - pymodbus' name
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        """Serve one read."""
        device = self.sim.by_unit.get(device_id)
        if device is None:
            return ExcCodes.GATEWAY_NO_RESPONSE
        fault = self.sim.active_fault(device.name)
        if fault is not None and fault.fault in _FAULT_CODE:
            self.sim.faults_served[device.name] += 1
            return _FAULT_CODE[fault.fault]
        device.evolve(self.sim.clock.sim_seconds())
        return device.serve(
            _TABLE_OF_FC.get(func_code, "holding"),
            address,
            count,
            self.sim.truth,
            dropped=_SLOW.get(),
        )

    async def async_setValues(  # noqa: N802 - pymodbus' name
        self,
        device_id: int,
        func_code: int,
        address: int,
        values: Sequence[int] | Sequence[bool],
    ) -> ExcCodes | None:
        """Serve one write."""
        device = self.sim.by_unit.get(device_id)
        if device is None:
            return ExcCodes.GATEWAY_NO_RESPONSE
        return device.write_request(
            _TABLE_OF_FC.get(func_code, "holding"), address, [int(v) for v in values]
        )


class _SimRequestHandler(ServerRequestHandler):
    """Per-connection handler that applies connection-level faults before answering."""

    sim: ModbusServerSim

    async def handle_request(self) -> None:
        """Answer, delay, stay silent or drop the connection, as the unit's fault says."""
        pdu = self.last_pdu
        if pdu is None:
            return
        device = self.sim.by_unit.get(pdu.dev_id)
        fault = self.sim.active_fault(device.name) if device is not None else None
        if fault is None or fault.fault in _FAULT_CODE:
            await super().handle_request()  # type: ignore[no-untyped-call]
            return
        assert device is not None
        self.sim.faults_served[device.name] += 1
        if fault.fault == "timeout":
            return  # swallowed: the client hears nothing
        if fault.fault == "silence":
            self.close()  # the unit (or its gateway port) is gone: connection reset
            return
        task = asyncio.current_task()
        if task is not None:
            self.sim.slow_tasks.add(task)
        try:
            await asyncio.sleep(fault.delay_s)
            self.last_pdu = pdu
            _SLOW.set(True)
            await super().handle_request()  # type: ignore[no-untyped-call]
        finally:
            if task is not None:
                self.sim.slow_tasks.discard(task)


class _SimTcpServer(ModbusTcpServer):
    """pymodbus TCP server whose connections use :class:`_SimRequestHandler`."""

    def __init__(
        self, sim: ModbusServerSim, context: _SimContext, address: tuple[str, int]
    ) -> None:
        super().__init__(context, address=address)
        self.sim = sim

    def callback_new_connection(self) -> ServerRequestHandler:
        """A handler that knows the simulator."""
        handler = _SimRequestHandler(  # type: ignore[no-untyped-call]
            self, self.trace_packet, self.trace_pdu, self.trace_connect
        )
        handler.sim = self.sim
        return handler


class ModbusServerSim:
    """One Modbus TCP server hosting simulated devices by unit id (a gateway)."""

    def __init__(
        self,
        host: str,
        port: int,
        devices: Iterable[SimulatedDevice | ModbusDeviceSpec],
        truth: GroundTruth | None = None,
        *,
        clock: SimClock | None = None,
    ) -> None:
        """Serve ``devices`` on ``host:port`` (port 0: any free port, see :attr:`port`)."""
        self.host = host
        self.port = port
        self.truth = truth
        self.clock = clock or SimClock()
        self.devices: list[SimulatedDevice] = [
            d.build() if isinstance(d, ModbusDeviceSpec) else d for d in devices
        ]
        self.by_unit: dict[int, SimulatedDevice] = {}
        self.by_name: dict[str, SimulatedDevice] = {}
        for dev in self.devices:
            if dev.unit_id in self.by_unit or dev.name in self.by_name:
                raise ValueError(f"duplicate unit id {dev.unit_id} or name {dev.name!r}")
            self.by_unit[dev.unit_id] = dev
            self.by_name[dev.name] = dev
        self.faults: dict[str, _ActiveFault] = {}
        self.faults_served: dict[str, int] = dict.fromkeys(self.by_name, 0)
        self.slow_tasks: set[asyncio.Task[Any]] = set()
        self._timers: list[asyncio.TimerHandle] = []
        self._server: _SimTcpServer | None = None

    async def start(self) -> None:
        """Listen; afterwards :attr:`port` is the bound port."""
        for dev in self.devices:
            dev.evolve(self.clock.sim_seconds())
        server = _SimTcpServer(self, _SimContext(self), (self.host, self.port))
        await server.serve_forever(background=True)
        self._server = server
        sockets = getattr(server.transport, "sockets", None)
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("modbus sim on %s:%d units %s", self.host, self.port, sorted(self.by_unit))

    async def stop(self) -> None:
        """Close the listener and every connection; cancel pending slow replies."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for task in list(self.slow_tasks):
            task.cancel()
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]
        if self.slow_tasks:
            await asyncio.gather(*self.slow_tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        """Start."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop."""
        await self.stop()

    # -- faults --------------------------------------------------------------------------

    def inject(
        self, device: str, fault: Fault | str, duration_s: float, *, delay_s: float = 2.0
    ) -> None:
        """Make ``device`` misbehave for ``duration_s`` wall seconds (``delay_s``: for "slow")."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r} (known: {', '.join(FAULTS)})")
        if device not in self.by_name:
            raise KeyError(f"no simulated modbus device {device!r}")
        self.faults[device] = _ActiveFault(fault, time.monotonic() + duration_s, delay_s)

    def schedule(
        self,
        at_s: float,
        device: str,
        fault: Fault | str,
        duration_s: float,
        *,
        delay_s: float = 2.0,
    ) -> None:
        """Inject a fault ``at_s`` wall seconds from now (needs a running loop)."""
        loop = asyncio.get_running_loop()
        inject = functools.partial(self.inject, device, fault, duration_s, delay_s=delay_s)
        self._timers.append(loop.call_later(at_s, inject))

    def clear(self, device: str | None = None) -> None:
        """End the fault of one device, or of all."""
        if device is None:
            self.faults.clear()
        else:
            self.faults.pop(device, None)

    def active_fault(self, device: str) -> _ActiveFault | None:
        """The fault in force for ``device`` now, if any."""
        fault = self.faults.get(device)
        if fault is not None and time.monotonic() >= fault.until:
            del self.faults[device]
            return None
        return fault
