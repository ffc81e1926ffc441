"""The simulated campus: every device of a scenario file, served on free loopback ports.

A scenario (YAML) lists Modbus devices, OPC UA machines and MQTT field devices,
a seed and the process speed-up. :class:`Campus` starts one Modbus server per
device (so one dead unit never shares a socket with another), one OPC UA server
for all machines, and the field devices publishing to a broker. Everything it
serves or sends lands in one :class:`~sim.truth.GroundTruth`.

``start(paused=True)`` serves but writes no new values until :meth:`resume`,
so a test or the demo can connect every source first and count each stage over
the same span; :meth:`pause` ends that span.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from edge.kpi import DEFAULT_IDEAL_CYCLE_S
from edge.services import free_port
from edge.yamlpath import load_model
from sim.clock import SimClock
from sim.field import FieldDeviceSpec, FieldSim
from sim.modbus import ModbusDeviceSpec, ModbusServerSim
from sim.opcua import OpcUaMachineSpec, OpcUaServerSim

if TYPE_CHECKING:
    from pathlib import Path

    from edge.config import DatabaseConfig, KpiConfig, SiteConfig
    from sim.truth import GroundTruth

log = logging.getLogger(__name__)

PAUSE_FOREVER_S = 10.0 * 365 * 24 * 3600


class OpcUaScenario(BaseModel):
    """The OPC UA part of a scenario: machines on one server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    machines: tuple[OpcUaMachineSpec, ...] = ()
    security: bool = False
    max_nodes_per_read: int | None = Field(default=100, ge=1)


class Scenario(BaseModel):
    """A whole scenario file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "campus"
    speed: float = Field(default=1.0, gt=0, le=10_000)
    """Process speed-up: machine cycles, batteries and charging sessions run this much faster."""
    modbus: tuple[ModbusDeviceSpec, ...] = ()
    opcua: OpcUaScenario = OpcUaScenario()
    field: tuple[FieldDeviceSpec, ...] = ()


def load_scenario(path: Path) -> Scenario:
    """Load a scenario file (ConfigError with YAML paths on a bad one)."""
    return load_model(Scenario, path)


class Campus:
    """Runs a scenario's simulated devices."""

    def __init__(
        self,
        scenario: Scenario,
        truth: GroundTruth,
        *,
        broker: tuple[str, int] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        """Prepare the servers; nothing listens until :meth:`start`."""
        self.scenario = scenario
        self.truth = truth
        self.host = host
        self.clock = SimClock(scenario.speed)
        self.modbus: dict[str, ModbusServerSim] = {
            spec.name: ModbusServerSim(host, 0, [spec], truth, clock=self.clock)
            for spec in scenario.modbus
        }
        self.opcua: OpcUaServerSim | None = None
        if scenario.opcua.machines:
            self.opcua = OpcUaServerSim(
                host,
                free_port(host),
                list(scenario.opcua.machines),
                truth,
                security=scenario.opcua.security,
                max_nodes_per_read=scenario.opcua.max_nodes_per_read,
                clock=self.clock,
            )
        self.field: FieldSim | None = None
        if scenario.field:
            if broker is None:
                msg = "the scenario has MQTT field devices: give the campus a broker"
                raise ValueError(msg)
            self.field = FieldSim(
                broker[0], broker[1], list(scenario.field), truth, clock=self.clock
            )

    async def start(self, *, paused: bool = False) -> None:
        """Start every server; with ``paused`` they serve but write no new values yet."""
        await asyncio.gather(*(m.start() for m in self.modbus.values()))
        if self.opcua is not None:
            await self.opcua.start()
            if paused:
                self.opcua.silence(None, PAUSE_FOREVER_S)
        if self.field is not None:
            await self.field.start()
            if paused:
                self.field.pause()
        log.info(
            "campus %s: %d modbus devices, %d machines, %d field devices",
            self.scenario.name,
            len(self.modbus),
            len(self.scenario.opcua.machines),
            len(self.scenario.field),
        )

    def pause(self) -> None:
        """Stop producing new values (Modbus reads are still served and logged)."""
        if self.opcua is not None:
            self.opcua.silence(None, PAUSE_FOREVER_S)
        if self.field is not None:
            self.field.pause()

    def resume(self) -> None:
        """Produce values again."""
        if self.opcua is not None:
            self.opcua.silence(None, 0.0)
        if self.field is not None:
            self.field.resume()

    async def stop(self) -> None:
        """Stop everything, carrying on past a failing step."""
        parts: list[Any] = [*self.modbus.values(), self.opcua, self.field]
        for part in parts:
            if part is None:
                continue
            try:
                await part.stop()
            except Exception as exc:
                log.warning("stopping %r failed: %s", part, exc)

    async def __aenter__(self) -> Campus:
        """Start."""
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        """Stop."""
        with contextlib.suppress(asyncio.CancelledError):
            await self.stop()

    def _scaled_kpi(self, site: SiteConfig) -> KpiConfig:
        """KPI settings with ideal cycle times on the simulator's accelerated clock.

        Machines cycle ``speed`` times faster than on the shop floor, while every
        timestamp is wall-clock: an ideal cycle of 30 s is 0.5 s of wall time at speed 60.
        """
        speed = self.scenario.speed
        cycles = site.kpi.ideal_cycle_s
        scaled: float | dict[str, float]
        if cycles is None:
            scaled = DEFAULT_IDEAL_CYCLE_S / speed
        elif isinstance(cycles, dict):
            scaled = {device: s / speed for device, s in cycles.items()}
        else:
            scaled = cycles / speed
        return site.kpi.model_copy(update={"ideal_cycle_s": scaled})

    def patch_site(
        self,
        site: SiteConfig,
        *,
        broker: tuple[str, int],
        database: DatabaseConfig,
        protocol: str = "5",
    ) -> SiteConfig:
        """The site with the simulator's endpoints, the broker and the database patched in.

        Sources are matched to simulated devices by device name; a source the
        scenario does not simulate is an error, so a demo never half-runs.
        """
        sources = []
        for source in site.sources:
            update: dict[str, Any]
            if source.type == "modbus":
                sim = self.modbus.get(source.device)
                if sim is None:
                    msg = (
                        f"site source modbus:{source.device} is not in "
                        f"scenario {self.scenario.name!r}"
                    )
                    raise ValueError(msg)
                update = {"host": sim.host, "port": sim.port}
            elif source.type == "opcua":
                if self.opcua is None:
                    msg = f"site source opcua:{source.device} but the scenario has no machines"
                    raise ValueError(msg)
                update = {"endpoint": self.opcua.endpoint}
            else:
                update = {
                    "broker": source.broker.model_copy(
                        update={"host": broker[0], "port": broker[1]}
                    )
                }
            sources.append(source.model_copy(update=update))
        return site.model_copy(
            update={
                "kpi": self._scaled_kpi(site),
                "sources": tuple(sources),
                "broker": site.broker.model_copy(
                    update={"host": broker[0], "port": broker[1], "protocol": protocol}
                ),
                "database": database,
            }
        )
