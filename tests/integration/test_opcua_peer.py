"""OPC UA driver against node-opcua, a server implementation independent of asyncua."""

from __future__ import annotations

import asyncio
import math
import os
import socket
from collections.abc import Iterator, Mapping, Sequence

import pytest

from drivers.base import DriverContext, SeriesKey, SeriesTable
from drivers.opcua.config import OpcUaSource
from drivers.opcua.driver import OpcUaDriver
from edge.errors import ConnectError
from tests.peers.nodeopcua import NodeOpcuaServer, PeerUnavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
CHANNELS = [*NodeOpcuaServer.VALUES, "OilLevel", "Ticks"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeOpcuaServer]:
    try:
        server = NodeOpcuaServer(free_port(), tmp_path_factory.mktemp("nodeopcua")).start()
    except PeerUnavailable as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    yield server
    server.stop()


def driver_for(
    peer: NodeOpcuaServer, nodes: Sequence[Mapping[str, object]], **kw: object
) -> OpcUaDriver:
    # node-opcua offers Basic256Sha256 endpoints, so the default security_mode auto encrypts:
    # this also checks our secure channel against an independent stack.
    cfg = OpcUaSource.model_validate(
        {
            "area": "hall2",
            "device": "Press-1",
            "endpoint": peer.endpoint,
            "namespaces": {"peer": NodeOpcuaServer.NAMESPACE},
            "nodes": nodes,
            "client_cert_dir": peer.workdir / "client",
            "trust_dir": peer.workdir / "trust",
            "trust_on_first_use": True,
        }
        | kw
    )
    table = SeriesTable(
        SeriesKey("tpo", "hall2", s.device, s.channel, s.unit, "opcua") for s in cfg.channel_specs()
    )
    return OpcUaDriver(cfg, table, DriverContext(site="tpo"))


async def latest(driver: OpcUaDriver, want: int) -> dict[str, tuple[float, int, int]]:
    """Last (value, quality, ts_source) per channel once ``want`` channels were seen."""
    seen: dict[str, tuple[float, int, int]] = {}
    async with asyncio.timeout(15):
        async for batch in driver.stream():
            for s, v, q, ts in zip(
                batch.series, batch.value, batch.quality, batch.ts_source, strict=True
            ):
                seen[driver.series[int(s)].channel] = (float(v), int(q), int(ts))
            if len(seen) >= want and seen.get("Ticks", (0.0,))[0] >= 3:
                return seen
    return seen


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_browse_path_values_and_quality(peer: NodeOpcuaServer, mode: str) -> None:
    nodes = [
        {"channel": name, "browse_path": f"peer:Machines/Press-1/{name}", "mode": mode}
        for name in CHANNELS
    ]
    driver = driver_for(peer, nodes)
    async with driver:
        seen = await latest(driver, len(CHANNELS))
    for name, value in NodeOpcuaServer.VALUES.items():
        assert seen[name][:2] == (value, 0), name
        assert seen[name][2] > 1_600_000_000 * 10**9  # a real source timestamp
    oil_value, oil_quality, _ = seen["OilLevel"]
    assert oil_quality == 2
    assert math.isnan(oil_value)  # 87.5 is served, but Bad never carries a value
    assert seen["Ticks"][1] == 0


async def test_node_id_with_namespace_uri(peer: NodeOpcuaServer) -> None:
    nodes = [
        {"channel": "Pressure", "node_id": f"nsu={NodeOpcuaServer.NAMESPACE};s=Press-1.Pressure"},
        {"channel": "Ticks", "node_id": f"nsu={NodeOpcuaServer.NAMESPACE};s=Press-1.Ticks"},
    ]
    driver = driver_for(peer, nodes)
    async with driver:
        seen = await latest(driver, 2)
    assert seen["Pressure"][:2] == (123.5, 0)
    assert driver.security_in_use == "Basic256Sha256/SignAndEncrypt"


async def test_missing_browse_path_names_node(peer: NodeOpcuaServer) -> None:
    driver = driver_for(peer, [{"channel": "x", "browse_path": "peer:Machines/Press-1/Nope"}])
    with pytest.raises(
        ConnectError, match=r"browse paths not found: x \(peer:Machines/Press-1/Nope"
    ):
        async with driver:
            pass
