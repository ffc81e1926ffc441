"""``tpo-edge sim``: serves a scenario's devices on the fixed ports it is given."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge.services import free_port
from sim.cli import serve


async def test_serves_modbus_gateway_and_opcua_on_fixed_ports(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "name: t\nmodbus:\n"
        "  - {kind: sdm630, name: m1, unit_id: 1}\n"
        "  - {kind: compressor, name: c1, unit_id: 3}\n"
        "opcua:\n  machines:\n    - {name: mill-1, kind: machine_tool}\n"
    )
    modbus_port, opcua_port = free_port(), free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(
            scenario,
            host="127.0.0.1",
            modbus_port=modbus_port,
            opcua_port=opcua_port,
            broker=None,
            username=None,
            password=None,
            tls_ca=None,
            duration_s=0,
            stop=stop,
        )
    )
    try:
        for port in (modbus_port, opcua_port):
            for _ in range(200):
                try:
                    _r, w = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                w.close()
                await w.wait_closed()
                break
            else:
                raise AssertionError(f"nothing listens on {port}")
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
