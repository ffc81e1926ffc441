"""Simulated OPC UA machines: machine tools (OPC 40001/40501) and a PackML line (OPC 30050).

Address space (browse names carry the companion-spec namespace URIs, the
machine instance lives in the simulator's own namespace; the full companion
nodesets are not imported because they cost seconds per server start and the
driver addresses nodes by browse path anyway)::

    Objects/ma:Machines/sim:<Machine>/
        ma:Identification/ma:{Manufacturer, Model, SerialNumber, ...}
        ma:MachineryBuildingBlocks/ma:{MachineryItemState, MachineryOperationMode,
                                       OperationCounters/ma:{PowerOnDuration, ...}}
        mt:Monitoring/mt:{Spindle/..., Drive/..., Temperatures/...}
        mt:Production/mt:{ActiveProgram/mt:State, Job/mt:{RunsPlanned, PartsCompleted, PartsGood}}
    Objects/ma:Machines/sim:<Line>/
        pk:Status/pk:{StateCurrent, UnitMode, CurMachSpeed}
        pk:Admin/pk:{ProdProcessedCount, ProdDefectiveCount}/pk:{Count, AccCount}

A channel is the browse path below the machine joined with ``.``
(``Monitoring.Spindle.ActSpeed``); :data:`MACHINE_TOOL_CHANNELS` and
:data:`PACKML_CHANNELS` are the tables site configs and tests derive from.
Every value written is recorded in :class:`~sim.truth.GroundTruth` with the
exact source timestamp the server hands out (microsecond resolution, because
that is what a Python ``datetime`` carries).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

from asyncua import ua as _ua
from asyncua.common.callback import CallbackType
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.server.server import Server
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import DNSName, IPAddress, UniformResourceIdentifier
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import BaseModel, ConfigDict, Field

from sim.clock import SimClock

if TYPE_CHECKING:
    from asyncua.common.callback import ServerItemCallback
    from asyncua.common.node import Node

    from sim.truth import GroundTruth

_log = logging.getLogger(__name__)
ua: Any = _ua
"""asyncua's type module, untyped here: its NewType aliases (Int16, UInt32...) reject plain ints."""

NS_MACHINERY = "http://opcfoundation.org/UA/Machinery/"
NS_MACHINE_TOOL = "http://opcfoundation.org/UA/MachineTool/"
NS_PACKML = "http://opcfoundation.org/UA/PackML/"
NS_SIM = "urn:tpo-edge:sim:machines"
SIM_NAMESPACES: dict[str, str] = {
    "ma": NS_MACHINERY,
    "mt": NS_MACHINE_TOOL,
    "pk": NS_PACKML,
    "sim": NS_SIM,
}
"""Namespace aliases used in browse paths (``mt:Monitoring``), as a driver config lists them."""

ITEM_STATES = ("NotAvailable", "OutOfService", "NotExecuting", "Executing")
OPERATION_MODES = ("None", "Maintenance", "Setup", "Processing")
PROGRAM_STATES = ("Initializing", "Running", "Ended", "Interrupted", "Aborted")
PACKML_STATES = (
    "Undefined", "Clearing", "Stopped", "Starting", "Idle", "Suspended", "Execute", "Stopping",
    "Aborting", "Aborted", "Holding", "Held", "Unholding", "Suspending", "Unsuspending",
    "Resetting", "Completing", "Completed",
)  # fmt: skip
UNIT_MODES = ("Undefined", "Production", "Maintenance", "Manual")

ValueKind = Literal["double", "bool", "uint32", "int32"]
_VARIANT = {
    "double": ua.VariantType.Double,
    "bool": ua.VariantType.Boolean,
    "uint32": ua.VariantType.UInt32,
    "int32": ua.VariantType.Int32,
}


@dataclass(frozen=True, slots=True)
class ChannelDef:
    """One simulated variable: its path below the machine, unit, value type and code table."""

    path: tuple[tuple[str, str], ...]
    """(namespace alias, browse name) segments below the machine object."""
    unit: str = ""
    kind: ValueKind = "double"
    codes: tuple[str, ...] | None = None

    @property
    def channel(self) -> str:
        """Channel name: the browse names joined with ``.``."""
        return ".".join(name for _, name in self.path)

    def browse_path(self, machine: str) -> str:
        """Browse path relative to Objects, with namespace aliases (see :data:`SIM_NAMESPACES`)."""
        segments = [("ma", "Machines"), ("sim", machine), *self.path]
        return "/".join(f"{alias}:{name}" for alias, name in segments)


def _ch(
    path: str, unit: str = "", kind: ValueKind = "double", codes: tuple[str, ...] | None = None
) -> ChannelDef:
    """Parse ``"ma:A/ma:B"`` into a :class:`ChannelDef`."""
    segments = tuple(tuple(s.split(":", 1)) for s in path.split("/"))
    return ChannelDef(segments, unit, kind, codes)  # type: ignore[arg-type]


MACHINE_TOOL_CHANNELS: tuple[ChannelDef, ...] = (
    _ch("ma:MachineryBuildingBlocks/ma:MachineryItemState", "", "int32", ITEM_STATES),
    _ch("ma:MachineryBuildingBlocks/ma:MachineryOperationMode", "", "int32", OPERATION_MODES),
    _ch("ma:MachineryBuildingBlocks/ma:OperationCounters/ma:PowerOnDuration", "s"),
    _ch("ma:MachineryBuildingBlocks/ma:OperationCounters/ma:OperationDuration", "s"),
    _ch("ma:MachineryBuildingBlocks/ma:OperationCounters/ma:OperationCycleCounter", "", "uint32"),
    _ch("mt:Monitoring/mt:Spindle/mt:ActSpeed", "1/min"),
    _ch("mt:Monitoring/mt:Spindle/mt:CmdSpeed", "1/min"),
    _ch("mt:Monitoring/mt:Spindle/mt:Override", "%"),
    _ch("mt:Monitoring/mt:Spindle/mt:IsRotating", "", "bool"),
    _ch("mt:Monitoring/mt:Drive/mt:ActLoad", "%"),
    _ch("mt:Monitoring/mt:Drive/mt:ActPower", "kW"),
    _ch("mt:Monitoring/mt:Drive/mt:ActTorque", "N.m"),
    _ch("mt:Monitoring/mt:Temperatures/mt:Bearing", "degC"),
    _ch("mt:Monitoring/mt:Temperatures/mt:Coolant", "degC"),
    _ch("mt:Production/mt:ActiveProgram/mt:State", "", "int32", PROGRAM_STATES),
    _ch("mt:Production/mt:Job/mt:RunsPlanned", "", "uint32"),
    _ch("mt:Production/mt:Job/mt:PartsCompleted", "", "uint32"),
    _ch("mt:Production/mt:Job/mt:PartsGood", "", "uint32"),
)
"""Channels of a simulated machine tool (OPC 40001 / 40501)."""

PACKML_CHANNELS: tuple[ChannelDef, ...] = (
    _ch("pk:Status/pk:StateCurrent", "", "int32", PACKML_STATES),
    _ch("pk:Status/pk:UnitMode", "", "int32", UNIT_MODES),
    _ch("pk:Status/pk:CurMachSpeed", "1/min"),
    _ch("pk:Admin/pk:ProdProcessedCount/pk:Count", "", "int32"),
    _ch("pk:Admin/pk:ProdProcessedCount/pk:AccCount", "", "int32"),
    _ch("pk:Admin/pk:ProdDefectiveCount/pk:Count", "", "int32"),
    _ch("pk:Admin/pk:ProdDefectiveCount/pk:AccCount", "", "int32"),
)
"""Channels of a simulated PackML packaging line (OPC 30050)."""

_IDENTIFICATION = ("Manufacturer", "Model", "SerialNumber", "ProductInstanceUri", "AssetId")

BadStatus = Literal[
    "BadSensorFailure", "BadCommunicationError", "BadDeviceFailure", "BadOutOfService"
]


class OpcUaMachineSpec(BaseModel):
    """One simulated machine as a scenario file lists it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    kind: Literal["machine_tool", "packml_line"] = "machine_tool"
    seed: int = 0
    update_interval_s: float = Field(default=0.5, ge=0.01, le=10.0)
    """How often analog values are written (states and counters are written on change)."""
    defect_rate: float = Field(default=0.03, ge=0.0, le=1.0)
    cycle_s: tuple[float, float] = (30.0, 300.0)
    """Range of an executing cycle in simulated seconds."""
    idle_s: tuple[float, float] = (5.0, 40.0)
    """Range of a pause between cycles in simulated seconds."""

    def channels(self) -> tuple[ChannelDef, ...]:
        """The channel table of this machine's kind."""
        return MACHINE_TOOL_CHANNELS if self.kind == "machine_tool" else PACKML_CHANNELS


def _to_datetime(ts_ns: int) -> datetime:
    """UTC datetime of a ns stamp that is a whole number of microseconds."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ts_ns // 1000)


def _stamp_ns() -> int:
    """Wall clock now, truncated to microseconds so that it survives the datetime round trip."""
    return SimClock.wall_ns() // 1000 * 1000


class _Machine:
    """Process model of one machine; produces {channel: value} updates."""

    def __init__(self, spec: OpcUaMachineSpec, clock: SimClock) -> None:
        self.spec = spec
        self.clock = clock
        self.rng = random.Random(spec.seed)
        self.last_t = clock.sim_seconds()
        self.executing = False
        self.phase_end = self.last_t + self.rng.uniform(*spec.idle_s)
        self.cmd_speed = 0.0
        self.act_speed = 0.0
        self.override = 100.0
        self.bearing = 25.0 + self.rng.uniform(-0.5, 0.5)
        self.coolant = 20.0
        self.cycles = 0
        self.parts_good = 0
        self.defects = 0
        self.power_on = 0.0
        self.op_duration = 0.0
        self.program_state = 0
        self.values: dict[str, float | bool | int] = {}

    def step(self) -> dict[str, float | bool | int]:
        """Advance to the clock's now; return every channel's current value."""
        now = self.clock.sim_seconds()
        dt = max(now - self.last_t, 0.0)
        self.last_t = now
        self.power_on += dt
        while now >= self.phase_end:  # a fast clock may cross several phases in one step
            self._switch_phase()
        if self.executing:
            self.op_duration += dt
        if self.spec.kind == "machine_tool":
            return self._machine_tool(dt)
        return self._packml(dt)

    def _switch_phase(self) -> None:
        spec = self.spec
        if self.executing:
            self.cycles += 1
            if self.rng.random() < spec.defect_rate:
                self.defects += 1
            else:
                self.parts_good += 1
            self.executing = False
            self.cmd_speed = 0.0
            self.program_state = 2  # Ended
            self.phase_end += self.rng.uniform(*spec.idle_s)
        else:
            self.executing = True
            self.cmd_speed = float(self.rng.randrange(3000, 12001, 500))
            self.override = float(self.rng.choice((80, 90, 100, 100, 100, 110, 120)))
            self.program_state = 1  # Running
            self.phase_end += self.rng.uniform(*spec.cycle_s)

    def _machine_tool(self, dt: float) -> dict[str, float | bool | int]:
        rng = self.rng
        # The drive follows the command with a ~2 s (sim) lag; load and power follow speed.
        target = self.cmd_speed * self.override / 100.0
        self.act_speed += (target - self.act_speed) * (1.0 - math.exp(-dt / 2.0))
        act = max(self.act_speed + rng.gauss(0.0, 5.0) * (self.act_speed > 1.0), 0.0)
        load = 10.0 + 70.0 * min(act / 12000.0, 1.0) + rng.gauss(0.0, 1.0) * self.executing
        power = 2.0 + 23.0 * (load - 10.0) / 70.0
        torque = power * 1000.0 / (2.0 * math.pi * act / 60.0) if act > 10.0 else 0.0
        # The bearing lags power with a 60 s (sim) time constant.
        bearing_target = 25.0 + 20.0 * (power - 2.0) / 23.0
        self.bearing += (bearing_target - self.bearing) * (1.0 - math.exp(-dt / 60.0))
        self.coolant += (20.0 + 0.2 * power - self.coolant) * (1.0 - math.exp(-dt / 120.0))
        return {
            "MachineryBuildingBlocks.MachineryItemState": 3 if self.executing else 2,
            "MachineryBuildingBlocks.MachineryOperationMode": 3,
            "MachineryBuildingBlocks.OperationCounters.PowerOnDuration": round(self.power_on, 3),
            "MachineryBuildingBlocks.OperationCounters.OperationDuration": round(
                self.op_duration, 3
            ),
            "MachineryBuildingBlocks.OperationCounters.OperationCycleCounter": self.cycles,
            "Monitoring.Spindle.ActSpeed": round(act, 3),
            "Monitoring.Spindle.CmdSpeed": self.cmd_speed,
            "Monitoring.Spindle.Override": self.override,
            "Monitoring.Spindle.IsRotating": act > 10.0,
            "Monitoring.Drive.ActLoad": round(load, 3),
            "Monitoring.Drive.ActPower": round(power, 4),
            "Monitoring.Drive.ActTorque": round(torque, 4),
            "Monitoring.Temperatures.Bearing": round(self.bearing + rng.gauss(0.0, 0.05), 3),
            "Monitoring.Temperatures.Coolant": round(self.coolant, 3),
            "Production.ActiveProgram.State": self.program_state,
            "Production.Job.RunsPlanned": 1000,
            "Production.Job.PartsCompleted": self.cycles,
            "Production.Job.PartsGood": self.parts_good,
        }

    def _packml(self, _dt: float) -> dict[str, float | bool | int]:
        speed = 120.0 + self.rng.gauss(0.0, 2.0) if self.executing else 0.0
        return {
            "Status.StateCurrent": 6 if self.executing else 4,  # Execute / Idle
            "Status.UnitMode": 1,
            "Status.CurMachSpeed": round(speed, 3),
            # Count resets never happen in the sim; AccCount is the never-resetting twin.
            "Admin.ProdProcessedCount.Count": self.cycles,
            "Admin.ProdProcessedCount.AccCount": self.cycles,
            "Admin.ProdDefectiveCount.Count": self.defects,
            "Admin.ProdDefectiveCount.AccCount": self.defects,
        }


@dataclass
class _Fault:
    """A node forced Bad until ``until`` (monotonic seconds)."""

    status: int
    until: float


@dataclass
class _Var:
    """One served variable."""

    machine: str
    channel: ChannelDef
    nodeid: ua.NodeId
    value: float | bool | int | None = None
    bad: bool = False


@dataclass
class _Runtime:
    """Everything that lives only while the server runs."""

    server: Server
    variables: dict[tuple[str, str], _Var] = field(default_factory=dict)


class OpcUaServerSim:
    """An asyncua server hosting simulated machines, with fault injection and ground truth."""

    def __init__(
        self,
        host: str,
        port: int,
        machines: list[OpcUaMachineSpec],
        truth: GroundTruth,
        *,
        security: bool = False,
        allow_none: bool = True,
        max_nodes_per_read: int | None = 100,
        clock: SimClock | None = None,
        cert_dir: Path | None = None,
    ) -> None:
        """Configure; nothing listens until :meth:`start`.

        ``security`` adds Basic256Sha256 Sign and SignAndEncrypt endpoints with a
        certificate generated into ``cert_dir`` (a temp dir by default);
        ``allow_none`` keeps the unsecured endpoint beside them.
        """
        names = [m.name for m in machines]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate machine names in {names}")
        self.host = host
        self.port = port
        self.machines = list(machines)
        self.truth = truth
        self.security = security
        self.allow_none = allow_none
        self.max_nodes_per_read = max_nodes_per_read
        self.clock = clock or SimClock()
        self._cert_dir_arg = cert_dir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.cert_path: Path | None = None
        """DER server certificate (what a client puts into its trust list)."""
        self._models = {m.name: _Machine(m, self.clock) for m in self.machines}
        self._rt: _Runtime | None = None
        self._task: asyncio.Task[None] | None = None
        self._faults: dict[tuple[str, str], _Fault] = {}
        self._silent_until: dict[str | None, float] = {}
        self._freeze_task: asyncio.Task[None] | None = None
        self.writes = 0
        """Values written so far (what a benchmark divides by time)."""

    @property
    def endpoint(self) -> str:
        """The ``opc.tcp://`` URL clients connect to."""
        return f"opc.tcp://{self.host}:{self.port}/tpo/sim/"

    @property
    def application_uri(self) -> str:
        """The server's ApplicationUri (also in its certificate)."""
        return f"urn:tpo-edge:sim:opcua:{self.port}"

    async def start(self) -> None:
        """Build the address space, listen, and start updating values."""
        if self._rt is not None:
            return
        self._rt = await self._build()
        await self._prime()
        await self._rt.server.start()
        self._task = asyncio.create_task(self._run(), name=f"sim[opcua:{self.port}].update")
        _log.info("OPC UA sim listening on %s", self.endpoint)

    async def stop(self) -> None:
        """Stop updating and close the server (clients lose their sessions)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._freeze_task is not None:
            self._freeze_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._freeze_task
            self._freeze_task = None
        if self._rt is not None:
            rt, self._rt = self._rt, None
            await rt.server.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def restart(self, downtime_s: float = 0.0) -> None:
        """Stop and start on the same port: sessions and subscriptions are gone afterwards.

        The new address space is built before the old server stops, so the port
        is closed for only ``downtime_s`` (the standard address space takes ~1 s to load).
        """
        fresh = await self._build()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._rt is not None:
            await self._rt.server.stop()
        await asyncio.sleep(downtime_s)
        self._rt = fresh
        await self._prime()
        await fresh.server.start()
        self._task = asyncio.create_task(self._run(), name=f"sim[opcua:{self.port}].update")

    def set_bad(
        self, machine: str, path: str, duration_s: float, status: BadStatus = "BadSensorFailure"
    ) -> None:
        """Serve ``machine``'s channel ``path`` with a Bad StatusCode for ``duration_s`` seconds."""
        if self._rt is None or (machine, path) not in self._rt.variables:
            raise KeyError(f"no channel {path!r} on machine {machine!r}")
        code = getattr(ua.StatusCodes, status)
        loop = asyncio.get_running_loop()
        self._faults[(machine, path)] = _Fault(code, loop.time() + duration_s)

    def silence(self, machine: str | None = None, duration_s: float = 10.0) -> None:
        """Stop writing values of one machine (or all) for a while; keepalives continue."""
        self._silent_until[machine] = asyncio.get_running_loop().time() + duration_s

    def freeze(self, duration_s: float) -> None:
        """Stop reading from every client connection: no responses or keepalives (hung server)."""
        if self._rt is None:
            return
        transports = list(self._rt.server.iserver.asyncio_transports)
        for tr in transports:
            tr.pause_reading()

        async def thaw() -> None:
            await asyncio.sleep(duration_s)
            for tr in transports:
                with contextlib.suppress(Exception):
                    tr.resume_reading()

        self._freeze_task = asyncio.create_task(thaw(), name=f"sim[opcua:{self.port}].thaw")

    def nodeid(self, machine: str, path: str) -> ua.NodeId:
        """NodeId of a channel (for tests that address by id)."""
        assert self._rt is not None
        return self._rt.variables[(machine, path)].nodeid

    async def __aenter__(self) -> Self:
        """Start."""
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        """Stop."""
        await self.stop()

    # --- building -----------------------------------------------------------

    async def _build(self) -> _Runtime:
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("tpo-edge OPC UA machine simulator")
        await server.set_application_uri(self.application_uri)
        server.disable_clock()  # the 1 s CurrentTime writer is noise for us
        policies = (
            [ua.SecurityPolicyType.NoSecurity] if self.allow_none or not self.security else []
        )
        if self.security:
            cert, key = self._server_cert()
            await server.load_certificate(cert)
            await server.load_private_key(key)
            policies += [
                ua.SecurityPolicyType.Basic256Sha256_Sign,
                ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ]
        server.set_security_policy(policies)
        if self.max_nodes_per_read is not None:
            await self._limit_reads(server, self.max_nodes_per_read)
        rt = _Runtime(server)
        idx = {alias: await server.register_namespace(uri) for alias, uri in SIM_NAMESPACES.items()}
        machines_folder = await server.nodes.objects.add_folder(
            ua.NodeId("Machines", idx["sim"]), ua.QualifiedName("Machines", idx["ma"])
        )
        for spec in self.machines:
            await self._add_machine(rt, machines_folder, spec, idx)
        return rt

    def _server_cert(self) -> tuple[Path, Path]:
        if self.cert_path is not None and self.cert_path.exists():
            return self.cert_path, self.cert_path.with_suffix(".pem")
        if self._cert_dir_arg is not None:
            directory = self._cert_dir_arg
            directory.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="tpo-opcua-sim-")
            directory = Path(self._tmp.name)
        key = cert_gen.generate_private_key()
        import ipaddress  # noqa: PLC0415 - only needed here

        cert = cert_gen.generate_self_signed_app_certificate(
            key,
            "tpo-edge OPC UA sim",
            {"organizationName": "tpo-edge"},
            [
                UniformResourceIdentifier(self.application_uri),
                DNSName(socket.gethostname()),
                IPAddress(ipaddress.ip_address(self.host)),
            ],
            extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            days=30,
        )
        self.cert_path = directory / f"sim-{self.port}.der"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        key_path = self.cert_path.with_suffix(".pem")
        key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
        key_path.chmod(0o600)
        return self.cert_path, key_path

    async def _limit_reads(self, server: Server, limit: int) -> None:
        """Advertise MaxNodesPerRead and reject bigger Read requests like a real device does."""
        node = server.get_node(
            ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead
        )
        await node.write_value(ua.Variant(limit, ua.VariantType.UInt32))

        async def pre_read(event: ServerItemCallback, _dispatcher: Any) -> None:
            if event.is_external and len(event.request_params.NodesToRead) > limit:
                raise ServiceError(ua.StatusCodes.BadTooManyOperations)

        server.subscribe_server_callback(CallbackType.PreRead, pre_read)

    async def _add_machine(
        self,
        rt: _Runtime,
        parent: Node,
        spec: OpcUaMachineSpec,
        idx: dict[str, int],
    ) -> None:
        sim_ns = idx["sim"]
        machine = await parent.add_object(
            ua.NodeId(spec.name, sim_ns), ua.QualifiedName(spec.name, sim_ns)
        )
        ident_ns = idx["ma"] if spec.kind == "machine_tool" else idx["pk"]
        ident = await machine.add_object(
            ua.NodeId(f"{spec.name}.Identification", sim_ns),
            ua.QualifiedName("Identification", ident_ns),
        )
        ident_values = {
            "Manufacturer": "TPO Sim Werke",
            "Model": "VMC-800" if spec.kind == "machine_tool" else "PackLine-3",
            "SerialNumber": f"SN-{spec.seed:06d}",
            "ProductInstanceUri": f"urn:tpo-edge:sim:{spec.name}",
            "AssetId": spec.name,
        }
        for name in _IDENTIFICATION:
            await ident.add_variable(
                ua.NodeId(f"{spec.name}.Identification.{name}", sim_ns),
                ua.QualifiedName(name, ident_ns),
                ident_values[name],
            )
        folders: dict[tuple[tuple[str, str], ...], Node] = {(): machine}
        for ch in spec.channels():
            parent_node = machine
            for depth in range(1, len(ch.path)):
                key = ch.path[:depth]
                if key not in folders:
                    alias, name = key[-1]
                    path_id = ".".join(n for _, n in key)
                    folders[key] = await folders[key[:-1]].add_object(
                        ua.NodeId(f"{spec.name}.{path_id}", sim_ns),
                        ua.QualifiedName(name, idx[alias]),
                    )
                parent_node = folders[key]
            alias, name = ch.path[-1]
            initial: Any = False if ch.kind == "bool" else 0 if ch.kind != "double" else 0.0
            var = await parent_node.add_variable(
                ua.NodeId(f"{spec.name}.{ch.channel}", sim_ns),
                ua.QualifiedName(name, idx[alias]),
                ua.Variant(initial, _VARIANT[ch.kind]),
            )
            rt.variables[(spec.name, ch.channel)] = _Var(spec.name, ch, var.nodeid)

    # --- running ------------------------------------------------------------

    async def _run(self) -> None:
        """Update every machine on its own interval (one loop, earliest deadline first)."""
        loop = asyncio.get_running_loop()
        due = dict.fromkeys(self._models, loop.time())
        while True:
            now = loop.time()
            for name, when in due.items():
                if when <= now:
                    await self._update(name, now)
                    interval = self._models[name].spec.update_interval_s
                    due[name] = max(when + interval, now)  # no catch-up bursts after a stall
            await asyncio.sleep(max(min(due.values()) - loop.time(), 0.0))

    async def _prime(self) -> None:
        """Write every machine's current values into a fresh address space, silenced or not.

        A new subscription's first notification carries each node's current value;
        priming makes that value one the ground truth has, not a placeholder 0.
        """
        now = asyncio.get_running_loop().time()
        for name in self._models:
            await self._update(name, now, prime=True)

    def _silent(self, machine: str, now: float) -> bool:
        return self._silent_until.get(machine, 0.0) > now or self._silent_until.get(None, 0.0) > now

    async def _update(self, machine: str, now: float, *, prime: bool = False) -> None:
        rt = self._rt
        assert rt is not None
        values = self._models[machine].step()
        if self._silent(machine, now) and not prime:
            return
        ts_ns = _stamp_ns()
        stamp = _to_datetime(ts_ns)
        for channel, value in values.items():
            var = rt.variables[(machine, channel)]
            fault = self._faults.get((machine, channel))
            if fault is not None and fault.until <= now:
                del self._faults[(machine, channel)]
                fault = None
            if fault is not None:
                if not var.bad:  # one Bad notification; the failed sensor then stays quiet
                    var.bad = True
                    await self._write(
                        rt=rt,
                        var=var,
                        value=var.value,
                        stamp=stamp,
                        ts_ns=ts_ns,
                        status=fault.status,
                    )
                continue
            if value == var.value and not var.bad:
                continue
            var.bad = False
            await self._write(
                rt=rt, var=var, value=value, stamp=stamp, ts_ns=ts_ns, status=ua.StatusCodes.Good
            )

    async def _write(
        self,
        *,
        rt: _Runtime,
        var: _Var,
        value: float | bool | None,
        stamp: datetime,
        ts_ns: int,
        status: int,
    ) -> None:
        kind = var.channel.kind
        if value is None:
            value = False if kind == "bool" else 0
        dv = ua.DataValue(
            ua.Variant(float(value) if kind == "double" else value, _VARIANT[kind]),
            StatusCode=ua.StatusCode(status),
            SourceTimestamp=stamp,
            ServerTimestamp=stamp,
        )
        await rt.server.write_attribute_value(var.nodeid, dv)
        good = status == ua.StatusCodes.Good
        if good:
            var.value = value
        self.writes += 1
        self.truth.record(
            device=var.machine,
            channel=var.channel.channel,
            value=float(value) if good else None,
            ts_ns=ts_ns,
            quality=0 if good else 2,
        )
