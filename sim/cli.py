"""``tpo-edge sim``: serve a scenario's simulated devices on fixed ports until stopped.

Unlike :class:`sim.campus.Campus` (free loopback ports, for tests and the demo),
this is the simulator as a long-running service, e.g. the ``sim`` profile of
docker-compose.yml: every Modbus device of the scenario behind one gateway
port (by unit id, as a real Modbus TCP gateway does), every OPC UA machine on
one server port, and the MQTT field devices publishing to the broker with the
simulator's account. Ground truth is not kept (it would grow without bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path  # noqa: TC003 - typer resolves the annotations at runtime
from typing import Annotated, Any

import typer

from sim.clock import SimClock
from sim.truth import GroundTruth

log = logging.getLogger(__name__)


async def serve(
    scenario_file: Path,
    *,
    host: str,
    modbus_port: int,
    opcua_port: int,
    broker: tuple[str, int] | None,
    username: str | None,
    password: str | None,
    tls_ca: Path | None,
    duration_s: float,
    stop: asyncio.Event,
) -> None:
    """Run the scenario's devices until ``stop`` is set (or ``duration_s`` > 0 elapses)."""
    from sim.campus import load_scenario  # noqa: PLC0415
    from sim.field import FieldSim  # noqa: PLC0415
    from sim.modbus import ModbusServerSim  # noqa: PLC0415
    from sim.opcua import OpcUaServerSim  # noqa: PLC0415

    scenario = load_scenario(scenario_file)
    truth = GroundTruth(keep=False)
    clock = SimClock(scenario.speed)
    parts: list[Any] = []
    try:
        if scenario.modbus:
            modbus = ModbusServerSim(host, modbus_port, list(scenario.modbus), truth, clock=clock)
            await modbus.start()
            parts.append(modbus)
            log.info("modbus gateway on %s:%s (%d units)", host, modbus.port, len(scenario.modbus))
        if scenario.opcua.machines:
            opcua = OpcUaServerSim(
                host,
                opcua_port,
                list(scenario.opcua.machines),
                truth,
                security=scenario.opcua.security,
                max_nodes_per_read=scenario.opcua.max_nodes_per_read,
                clock=clock,
            )
            await opcua.start()
            parts.append(opcua)
        if scenario.field:
            if broker is None:
                raise typer.BadParameter("the scenario has field devices: give --broker HOST:PORT")
            field = FieldSim(
                broker[0],
                broker[1],
                list(scenario.field),
                truth,
                clock=clock,
                username=username,
                password=password,
                tls_ca=tls_ca,
            )
            await field.start()
            parts.append(field)
        log.info("scenario %s running (speed %s)", scenario.name, scenario.speed)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(duration_s if duration_s > 0 else None):
                await stop.wait()
    finally:
        for part in reversed(parts):
            try:
                await part.stop()
            except Exception as exc:
                log.warning("stopping %r failed: %s", part, exc)


def _broker(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter(f"--broker {value!r}: expected HOST:PORT")
    return host, int(port)


def sim_command(
    scenario: Annotated[Path, typer.Option("--scenario", help="Scenario file (YAML).")],
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    modbus_port: Annotated[int, typer.Option(help="Modbus TCP gateway port.")] = 5020,
    opcua_port: Annotated[int, typer.Option(help="OPC UA server port.")] = 4840,
    broker: Annotated[
        str | None, typer.Option(help="HOST:PORT of the broker the field devices publish to.")
    ] = None,
    username: Annotated[str | None, typer.Option(help="Broker account of the simulator.")] = None,
    password_env: Annotated[
        str | None, typer.Option(help="Environment variable holding that account's password.")
    ] = None,
    tls_ca: Annotated[
        Path | None, typer.Option(help="CA file: connect to the broker over TLS.")
    ] = None,
    duration: Annotated[float, typer.Option(help="Seconds to run (0: until stopped).")] = 0.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve a scenario's simulated machines, meters and field devices until Ctrl-C."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    password = None
    if password_env:
        password = os.environ.get(password_env)
        if password is None:
            raise typer.BadParameter(f"environment variable {password_env} is not set")
    target = _broker(broker)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve(
            scenario,
            host=host,
            modbus_port=modbus_port,
            opcua_port=opcua_port,
            broker=target,
            username=username,
            password=password,
            tls_ca=tls_ca,
            duration_s=duration,
            stop=stop,
        )

    asyncio.run(main())
