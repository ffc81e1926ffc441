"""OPC UA driver against the asyncua machine simulator on a free loopback port."""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from asyncua import Client, ua

from drivers.base import DriverContext, SampleBatch, SeriesKey, SeriesTable
from drivers.opcua.config import OpcUaSource
from drivers.opcua.driver import OpcUaDriver
from edge.errors import ConnectError
from sim.clock import SimClock
from sim.opcua import MACHINE_TOOL_CHANNELS, SIM_NAMESPACES, OpcUaMachineSpec, OpcUaServerSim
from sim.truth import GroundTruth

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine(name: str = "Mill-1", seed: int = 1) -> OpcUaMachineSpec:
    return OpcUaMachineSpec(
        name=name, seed=seed, update_interval_s=0.1, cycle_s=(3.0, 6.0), idle_s=(1.0, 3.0)
    )


@pytest.fixture
async def sim() -> AsyncIterator[OpcUaServerSim]:
    server = OpcUaServerSim(
        "127.0.0.1", free_port(), [machine()], GroundTruth(), clock=SimClock(speed=20.0)
    )
    await server.start()
    yield server
    await server.stop()


def make_driver(endpoint: str, machines: list[str], **kw: Any) -> tuple[OpcUaDriver, DriverContext]:
    mode = kw.pop("mode", "subscribe")
    nodes = [
        {
            "channel": f"{m}.{c.channel}" if len(machines) > 1 else c.channel,
            "browse_path": c.browse_path(m),
            "unit": c.unit,
            "codes": c.codes,
            "mode": mode,
        }
        for m in machines
        for c in MACHINE_TOOL_CHANNELS
    ]
    cfg = OpcUaSource(
        area="hall1",
        device=machines[0],
        endpoint=endpoint,
        namespaces=SIM_NAMESPACES,
        nodes=kw.pop("nodes", nodes),
        **kw,
    )
    table = SeriesTable(
        SeriesKey("tpo", "hall1", s.device, s.channel, s.unit, "opcua", s.codes)
        for s in cfg.channel_specs()
    )
    ctx = DriverContext(site="tpo")
    return OpcUaDriver(cfg, table, ctx), ctx


async def collect(
    driver: OpcUaDriver, stop: Callable[[SampleBatch], bool], timeout: float = 8.0
) -> SampleBatch:
    """Run the stream until ``stop(all samples so far)`` holds."""
    got: list[SampleBatch] = []
    async with asyncio.timeout(timeout):
        async for batch in driver.stream():
            got.append(batch)
            if stop(SampleBatch.concat(got)):
                break
    return SampleBatch.concat(got)


def channel_of(driver: OpcUaDriver, series: int) -> str:
    return driver.series[series].channel


async def test_subscription_values_equal_ground_truth(sim: OpcUaServerSim) -> None:
    driver, ctx = make_driver(sim.endpoint, ["Mill-1"])
    async with driver:
        t0 = time.time_ns()
        data = await collect(driver, lambda b: time.time_ns() - t0 > 2.5e9)
    truth = {(r.channel, r.ts_ns): r for r in sim.truth.records("Mill-1")}
    got = {}
    for s, ts, v, q in zip(data.series, data.ts_source, data.value, data.quality, strict=True):
        key = (channel_of(driver, int(s)), int(ts))
        assert key in truth, f"sample {key} was never served"
        assert q == truth[key].quality == 0
        assert v == truth[key].value
        got[key] = v
    # Everything the sim served in the settled middle of the window reached us.
    lo, hi = t0 + 1.0e9, t0 + 2.0e9
    window = {k for k in truth if lo <= k[1] <= hi}
    assert len(window) > 50
    assert window <= got.keys()
    assert ctx.counters["opcua_queue_full"] == 0
    assert np.all(data.ts_receive >= data.ts_source)


async def test_bad_node_is_stored_bad_with_nan(sim: OpcUaServerSim) -> None:
    driver, _ = make_driver(sim.endpoint, ["Mill-1"])
    channel = "Monitoring.Temperatures.Bearing"
    async with driver:
        await collect(driver, lambda b: len(b) > 20)
        sim.set_bad("Mill-1", channel, 0.6, "BadSensorFailure")
        bad_at = time.time_ns()
        data = await collect(driver, lambda b: time.time_ns() - bad_at > 1.5e9)
    idx = driver.series.index("hall1", "Mill-1", channel)
    mine = data.take(data.series == idx)
    bad = mine.quality == 2
    assert bad.sum() == 1
    assert math.isnan(mine.value[bad][0])  # never the last good value
    good_after = mine.ts_source[~bad] > mine.ts_source[bad][0]
    assert good_after.any()  # and it recovers
    bad_truth = [r for r in sim.truth.records("Mill-1") if r.quality == 2]
    assert [(r.channel, r.ts_ns) for r in bad_truth] == [(channel, int(mine.ts_source[bad][0]))]


async def test_server_restart_recreates_subscription(sim: OpcUaServerSim) -> None:
    driver, ctx = make_driver(sim.endpoint, ["Mill-1"], reconnect_min_s=0.2, reconnect_max_s=1.0)
    async with driver:
        await collect(driver, lambda b: len(b) > 20)
        await sim.restart()
        restarted = time.time_ns()
        data = await collect(driver, lambda b: bool((b.ts_source > restarted).sum() > 20), 6.0)
    assert (data.ts_source > restarted).sum() > 20
    assert ctx.counters["opcua_reconnects"] >= 1


async def test_poll_250_nodes_against_limit_100() -> None:
    names = [f"M{i:02d}" for i in range(14)]
    sim = OpcUaServerSim(
        "127.0.0.1",
        free_port(),
        [machine(n, i) for i, n in enumerate(names)],
        GroundTruth(),
        max_nodes_per_read=100,
    )
    async with sim:
        # The server really refuses a 250-node read ...
        async with Client(sim.endpoint) as client:
            ids = [client.get_node(sim.nodeid("M00", c.channel)) for c in MACHINE_TOOL_CHANNELS]
            with pytest.raises(ua.uaerrors.BadTooManyOperations):
                await client.read_attributes(ids * 14)
        every, _ = make_driver(sim.endpoint, names, mode="poll")
        nodes = [n.model_dump() for n in every.config.nodes[:250]]
        driver, ctx = make_driver(sim.endpoint, names, nodes=nodes, poll_interval_s=0.3)
        # ... while the driver splits by the advertised MaxNodesPerRead.
        async with driver:
            data = await collect(driver, lambda b: len(b) >= 500)
    assert len(data) >= 500
    first = data.take(slice(0, 250))
    assert sorted(first.series.tolist()) == list(range(250))
    assert (first.quality == 0).all()
    assert ctx.counters["opcua_read_split"] == 0


@pytest.fixture
async def secure_sim(tmp_path: Path) -> AsyncIterator[OpcUaServerSim]:
    server = OpcUaServerSim(
        "127.0.0.1",
        free_port(),
        [machine()],
        GroundTruth(),
        security=True,
        allow_none=False,
        cert_dir=tmp_path / "server",
    )
    await server.start()
    yield server
    await server.stop()


@pytest.mark.parametrize("mode", ["Sign", "SignAndEncrypt"])
async def test_security_with_trust_list(
    secure_sim: OpcUaServerSim, tmp_path: Path, mode: str
) -> None:
    trust = tmp_path / "trust"
    trust.mkdir()
    assert secure_sim.cert_path is not None
    shutil.copy(secure_sim.cert_path, trust / "sim.der")
    kw = {
        "security_policy": "Basic256Sha256",
        "security_mode": mode,
        "client_cert_dir": tmp_path / "client",
        "trust_dir": trust,
    }
    driver, _ = make_driver(secure_sim.endpoint, ["Mill-1"], **kw)
    async with driver:
        data = await collect(driver, lambda b: len(b) > 20)
    assert (data.quality == 0).all()
    key = tmp_path / "client" / "client_key.pem"
    assert key.stat().st_mode & 0o077 == 0
    # The client certificate persists: a second driver reuses it.
    cert = (tmp_path / "client" / "client_cert.der").read_bytes()
    driver, _ = make_driver(secure_sim.endpoint, ["Mill-1"], **kw)
    async with driver:
        await collect(driver, lambda b: len(b) > 5)
    assert (tmp_path / "client" / "client_cert.der").read_bytes() == cert


async def test_untrusted_server_rejected(secure_sim: OpcUaServerSim, tmp_path: Path) -> None:
    trust = tmp_path / "trust"
    trust.mkdir()
    kw = {
        "security_policy": "Basic256Sha256",
        "security_mode": "SignAndEncrypt",
        "client_cert_dir": tmp_path / "client",
        "trust_dir": trust,
    }
    driver, _ = make_driver(secure_sim.endpoint, ["Mill-1"], **kw)
    with pytest.raises(ConnectError, match=r"'Mill-1' at opc\.tcp://127\.0\.0\.1.*not trusted"):
        async with driver:
            pass
    assert list((tmp_path / "client" / "rejected").glob("*.der"))
    # Trust on first use stores it and connects.
    driver, _ = make_driver(secure_sim.endpoint, ["Mill-1"], trust_on_first_use=True, **kw)
    async with driver:
        await collect(driver, lambda b: len(b) > 5)
    assert len(list(trust.glob("*.der"))) == 1


@pytest.fixture
async def offering_sim(tmp_path: Path) -> AsyncIterator[OpcUaServerSim]:
    """Secure endpoints (Basic256Sha256 Sign, SignAndEncrypt) beside the unsecured one."""
    server = OpcUaServerSim(
        "127.0.0.1",
        free_port(),
        [machine()],
        GroundTruth(),
        security=True,
        allow_none=True,
        cert_dir=tmp_path / "server",
    )
    await server.start()
    yield server
    await server.stop()


def trusting(sim: OpcUaServerSim, tmp_path: Path) -> dict[str, Path]:
    trust = tmp_path / "trust"
    trust.mkdir()
    assert sim.cert_path is not None
    shutil.copy(sim.cert_path, trust / "sim.der")
    return {"client_cert_dir": tmp_path / "client", "trust_dir": trust}


async def test_auto_security_takes_sign_and_encrypt(
    offering_sim: OpcUaServerSim, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.opcua.driver")
    driver, _ = make_driver(offering_sim.endpoint, ["Mill-1"], **trusting(offering_sim, tmp_path))
    assert driver.config.security_mode == "auto"  # the default
    async with driver:
        assert driver._session is not None
        policy = driver._session.client.security_policy
        assert policy.URI.endswith("#Basic256Sha256")
        assert policy.Mode == ua.MessageSecurityMode.SignAndEncrypt
        data = await collect(driver, lambda b: len(b) > 20)
    assert (data.quality == 0).all()
    assert driver.security_in_use == "Basic256Sha256/SignAndEncrypt"
    chosen = [r for r in caplog.records if "security Basic256Sha256/SignAndEncrypt" in r.message]
    assert chosen
    assert chosen[0].levelno == logging.INFO
    assert "None/None" in chosen[0].message  # what the server offered, for the operator


async def test_auto_security_never_falls_back_to_none(
    offering_sim: OpcUaServerSim, tmp_path: Path
) -> None:
    # No certificate directories: the server offers security, so connecting unsecured is refused.
    driver, _ = make_driver(offering_sim.endpoint, ["Mill-1"])
    with pytest.raises(ConnectError, match=r"'Mill-1' at .*offers Basic256Sha256/SignAndEncrypt"):
        async with driver:
            pass
    # The trust list still applies: an untrusted server certificate is rejected, not bypassed.
    empty = tmp_path / "empty"
    empty.mkdir()
    driver, _ = make_driver(
        offering_sim.endpoint, ["Mill-1"], client_cert_dir=tmp_path / "client", trust_dir=empty
    )
    with pytest.raises(ConnectError, match="not trusted"):
        async with driver:
            pass
    # Opting out explicitly still connects to the unsecured endpoint.
    driver, _ = make_driver(offering_sim.endpoint, ["Mill-1"], security_mode="None")
    async with driver:
        await collect(driver, lambda b: len(b) > 5)
    assert driver.security_in_use is None  # GetEndpoints was not even asked


async def test_auto_security_without_secure_endpoints_is_none(sim: OpcUaServerSim) -> None:
    driver, _ = make_driver(sim.endpoint, ["Mill-1"])
    async with driver:
        data = await collect(driver, lambda b: len(b) > 5)
    assert (data.quality == 0).all()
    assert driver.security_in_use == "None/None"


async def test_watchdog_reconnects_after_server_hang(sim: OpcUaServerSim) -> None:
    driver, ctx = make_driver(
        sim.endpoint,
        ["Mill-1"],
        watchdog_s=1.0,
        timeout_s=1.0,
        reconnect_min_s=0.2,
        reconnect_max_s=0.5,
    )
    async with driver:
        await collect(driver, lambda b: len(b) > 20)
        sim.freeze(2.5)
        hung = time.time_ns()
        data = await collect(driver, lambda b: bool((b.ts_source > hung + 2.5e9).sum() > 10), 9.0)
    assert (data.ts_source > hung + 2.5e9).sum() > 10
    assert ctx.counters["opcua_reconnects"] >= 1


async def test_connect_refused_names_device_and_endpoint() -> None:
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}"
    driver, _ = make_driver(endpoint, ["Mill-1"], timeout_s=1.0)
    with pytest.raises(ConnectError, match=rf"'Mill-1' at {endpoint}: connect"):
        async with driver:
            pass
