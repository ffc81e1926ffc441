"""Broker security against the real mosquitto, with the shipped config and generated secrets.

The broker runs deploy/mosquitto/mosquitto.conf (only paths, port and data dir
rewritten for loopback) with the password file, ACL and TLS files that
``tpo-edge secrets init`` writes. mosquitto drops unauthorised publishes
silently, so each "not delivered" check publishes the forbidden messages first
and an allowed marker last from the same client: once the marker arrives, any
earlier message would have arrived before it.
"""

from __future__ import annotations

import shlex
import shutil
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge.backbone import Backbone
from edge.config import BrokerConfig, TlsConfig
from edge.errors import SinkError
from edge.secrets import SecretsLayout, init_secrets
from edge.services import free_port, wait_for_port
from tests.conftest import require_binary
from tests.deploy.helpers import REPO, field_site, install_like_compose, loopback_conf

pytestmark = pytest.mark.integration


class Broker:
    """The shipped mosquitto.conf on loopback, with the generated secrets."""

    def __init__(self, root: Path) -> None:
        site = field_site()
        self.site = site
        self.layout = SecretsLayout(root / "secrets", root / ".env")
        self.result = init_secrets(site, self.layout.root, self.layout.env_file)
        self.env = self.result.env
        self.port = free_port()
        self.installed = install_like_compose(self.layout)
        conf = root / "mosquitto.conf"
        conf.write_text(loopback_conf(self.installed, self.port))
        self.log = (root / "mosquitto.log").open("ab")
        binary = require_binary("mosquitto", "mosquitto")
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT
        )
        try:
            wait_for_port("127.0.0.1", self.port)
        except TimeoutError:
            self.stop()
            raise

    def password(self, account: str) -> str:
        return (self.layout.credentials / account).read_text().strip()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.installed, ignore_errors=True)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("secured-broker"))
    yield b
    b.stop()


class Client:
    """A blocking paho client for the checks (MQTT 5, TLS with a given CA)."""

    def __init__(
        self,
        broker: Broker,
        user: str | None,
        password: str | None,
        *,
        ca: Path | None = None,
        tls: bool = True,
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"t-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls:
            self.client.tls_set(
                ca_certs=str(ca or broker.layout.ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT
            )
        self.port = broker.port
        self.connack = threading.Event()
        self.reason: str | None = None
        self.failed = False
        self.received: list[tuple[str, bytes]] = []
        self.got = threading.Condition()
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, _c: object, _u: object, _f: object, rc: object, _p: object) -> None:
        self.reason = str(rc)
        self.failed = bool(getattr(rc, "is_failure", True))
        self.connack.set()

    def _on_disconnect(self, _c: object, _u: object, _f: object, rc: object, _p: object) -> None:
        if not self.connack.is_set():
            self.reason, self.failed = f"disconnected: {rc}", True
            self.connack.set()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.got:
            self.received.append((msg.topic, msg.payload))
            self.got.notify_all()

    def connect(self) -> bool:
        """True when the broker accepted the login."""
        try:
            self.client.connect("127.0.0.1", self.port)
        except (ssl.SSLError, OSError) as exc:
            self.reason, self.failed = repr(exc), True
            return False
        self.client.loop_start()
        assert self.connack.wait(10), "no CONNACK"
        return not self.failed

    def subscribe(self, topic: str) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(10)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)

    def wait_for(self, payload: bytes) -> list[tuple[str, bytes]]:
        with self.got:
            ok = self.got.wait_for(lambda: any(p == payload for _t, p in self.received), 10)
        assert ok, f"{payload!r} never arrived; got {self.received}"
        return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def _client(clients: list[Client], broker: Broker, user: str | None, **kw: object) -> Client:
    password = kw.pop("password", None if user is None else broker.password(user))
    c = Client(broker, user, password, **kw)  # type: ignore[arg-type]
    clients.append(c)
    return c


def test_anonymous_is_refused(broker: Broker, clients: list[Client]) -> None:
    c = _client(clients, broker, None)
    assert not c.connect(), c.reason


def test_wrong_password_is_refused(broker: Broker, clients: list[Client]) -> None:
    c = _client(clients, broker, "bench-01", password=broker.password("bench-02"))
    assert not c.connect(), c.reason
    right = _client(clients, broker, "bench-01")
    assert right.connect(), right.reason


def test_plain_mqtt_without_tls_gets_nothing(broker: Broker, clients: list[Client]) -> None:
    c = _client(clients, broker, "bench-01", tls=False)
    assert not c.connect(), c.reason


def test_a_foreign_ca_is_not_trusted(broker: Broker, clients: list[Client], tmp_path: Path) -> None:
    other = init_secrets(field_site(), tmp_path / "other", tmp_path / "other.env")
    c = _client(clients, broker, "bench-01", ca=other.layout.ca_cert)
    assert not c.connect()
    assert "CERTIFICATE_VERIFY_FAILED" in (c.reason or ""), c.reason


def test_bench_publishes_only_as_itself(broker: Broker, clients: list[Client]) -> None:
    agent = _client(clients, broker, "it-edge")  # the agent reads field/#
    assert agent.connect(), agent.reason
    agent.subscribe("field/#")
    bench = _client(clients, broker, "bench-01")
    assert bench.connect(), bench.reason
    bench.publish("field/charger/charger-01/meter", b"as-charger")
    bench.publish("field/charger/bench-01/meter", b"as-charger-same-id")
    bench.publish("field/bench/bench-02/telemetry", b"as-other-bench")
    bench.publish("tpo/v1/tpo/street/bench-01/data", b"as-agent")
    bench.publish("field/bench/bench-01/telemetry", b"own")
    got = agent.wait_for(b"own")
    assert got == [("field/bench/bench-01/telemetry", b"own")]


def test_charger_publishes_only_as_itself(broker: Broker, clients: list[Client]) -> None:
    agent = _client(clients, broker, "it-edge")
    assert agent.connect()
    agent.subscribe("field/#")
    charger = _client(clients, broker, "charger-01")
    assert charger.connect(), charger.reason
    charger.publish("field/bench/bench-01/telemetry", b"as-bench")
    charger.publish("field/charger/charger-02/status", b"as-other-charger")
    charger.publish("field/charger/charger-01/status", b"own")
    assert agent.wait_for(b"own") == [("field/charger/charger-01/status", b"own")]


def test_devices_cannot_eavesdrop(broker: Broker, clients: list[Client]) -> None:
    spy = _client(clients, broker, "bench-02")
    assert spy.connect()
    spy.subscribe("field/#")  # granted or not, nothing may be delivered to it
    marker = _client(clients, broker, "it-edge")
    assert marker.connect()
    marker.subscribe("field/#")
    bench = _client(clients, broker, "bench-01")
    assert bench.connect()
    bench.publish("field/bench/bench-01/telemetry", b"private")
    marker.wait_for(b"private")
    assert spy.received == []


def test_ingest_reads_the_backbone_but_cannot_write_it(
    broker: Broker, clients: list[Client]
) -> None:
    ingest = _client(clients, broker, "ingest-1")
    assert ingest.connect(), ingest.reason
    ingest.subscribe("$share/ingest/tpo/v1/tpo/#")
    agent = _client(clients, broker, "it-edge")
    assert agent.connect()
    ingest.publish("tpo/v1/tpo/hall-a/forged/data", b"forged-by-ingest")
    agent.publish("tpo/v1/other-site/hall-a/x/data", b"other-site")
    agent.publish("tpo/v1/tpo/hall-a/meter-1/data", b"from-agent")
    got = ingest.wait_for(b"from-agent")
    assert got == [("tpo/v1/tpo/hall-a/meter-1/data", b"from-agent")]


def test_only_ingest_may_confirm_delivery_to_an_agent(
    broker: Broker, clients: list[Client]
) -> None:
    agent = _client(clients, broker, "it-edge")
    assert agent.connect(), agent.reason
    agent.subscribe("tpo/v1/tpo/_agent/it-edge/stored")
    bench = _client(clients, broker, "bench-01")
    assert bench.connect(), bench.reason
    bench.publish("tpo/v1/tpo/_agent/it-edge/stored", b"forged-by-bench")
    ingest = _client(clients, broker, "ingest-1")
    assert ingest.connect(), ingest.reason
    ingest.publish("tpo/v1/tpo/_agent/it-edge/stored", b"confirmed-by-ingest")
    got = agent.wait_for(b"confirmed-by-ingest")
    assert got == [("tpo/v1/tpo/_agent/it-edge/stored", b"confirmed-by-ingest")]


def test_an_agent_cannot_read_another_agents_confirmations(
    broker: Broker, clients: list[Client]
) -> None:
    agent = _client(clients, broker, "it-edge")
    assert agent.connect(), agent.reason
    agent.subscribe("tpo/v1/tpo/_agent/+/stored")  # granted or not, only its own may arrive
    ingest = _client(clients, broker, "ingest-1")
    assert ingest.connect(), ingest.reason
    ingest.publish("tpo/v1/tpo/_agent/other-edge/stored", b"for-another-agent")
    ingest.publish("tpo/v1/tpo/_ingest/ingest-1/status", b"ingest-online")
    ingest.publish("tpo/v1/tpo/_agent/it-edge/stored", b"for-it-edge")
    got = agent.wait_for(b"for-it-edge")
    assert got == [("tpo/v1/tpo/_agent/it-edge/stored", b"for-it-edge")]
    status = _client(clients, broker, "it-edge")
    assert status.connect()
    status.subscribe("tpo/v1/tpo/_ingest/+/status")  # the worker's status: readable
    ingest.publish("tpo/v1/tpo/_ingest/ingest-1/status", b"ingest-online-again")
    status.wait_for(b"ingest-online-again")


async def test_agent_backbone_connects_over_tls_with_its_account(
    broker: Broker, clients: list[Client]
) -> None:
    ingest = _client(clients, broker, "ingest-1")
    assert ingest.connect()
    ingest.subscribe("tpo/v1/tpo/#")
    config = BrokerConfig(
        host="127.0.0.1",
        port=broker.port,
        username="it-edge",
        password_env="TPO_AGENT_MQTT_PASSWORD",
        tls=TlsConfig(ca_file=broker.layout.ca_cert),
    )
    # The password reaches the agent the way compose hands it over: from .env's variable.
    assert broker.env["TPO_AGENT_MQTT_PASSWORD"] == broker.password("it-edge")
    backbone = Backbone(
        config, client_id="it-agent-tls", password=broker.env["TPO_AGENT_MQTT_PASSWORD"]
    )
    await backbone.connect()
    try:
        await backbone.publish("tpo/v1/tpo/hall-a/meter-1/data", b"over-tls")
    finally:
        await backbone.close()
    ingest.wait_for(b"over-tls")


async def test_agent_backbone_with_a_wrong_password_fails(broker: Broker) -> None:
    config = BrokerConfig(
        host="127.0.0.1",
        port=broker.port,
        username="it-edge",
        tls=TlsConfig(ca_file=broker.layout.ca_cert),
    )
    backbone = Backbone(config, client_id="it-agent-bad", password="not-the-password")
    with pytest.raises(SinkError):
        await backbone.connect(timeout_s=5)


def test_compose_healthcheck_command_passes(broker: Broker) -> None:
    """The mosquitto health check of docker-compose.yml, run as written against this broker."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    test = compose["services"]["mosquitto"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    command = (
        test[1]
        .replace("$$", "$")
        .replace("-p 8883", f"-p {broker.port}")
        .replace("/mosquitto/secrets/ca.pem", str(broker.layout.ca_cert))
    )
    require_binary("mosquitto_sub", "mosquitto-clients")
    env = {
        "PATH": "/usr/bin:/bin",
        "TPO_HEALTH_MQTT_PASSWORD": broker.env["TPO_HEALTH_MQTT_PASSWORD"],
    }
    ok = subprocess.run(["sh", "-c", command], env=env, timeout=15, check=False)
    assert ok.returncode == 0
    env["TPO_HEALTH_MQTT_PASSWORD"] = "wrong"
    bad = subprocess.run(
        ["sh", "-c", command], env=env, timeout=15, check=False, capture_output=True
    )
    assert bad.returncode != 0, shlex.quote(command)


async def test_field_driver_reads_devices_over_tls_with_the_agents_account(
    broker: Broker, clients: list[Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The street furniture path as deployed: bench -> TLS broker -> agent's MQTT field driver."""
    import asyncio
    import time

    import orjson

    from drivers.base import DriverContext
    from drivers.mqtt.config import TlsFiles
    from drivers.mqtt.driver import MqttFieldDriver

    monkeypatch.setenv("TPO_AGENT_MQTT_PASSWORD", broker.password("it-edge"))
    [source] = [
        s.model_copy(
            update={
                "broker": s.broker.model_copy(
                    update={
                        "port": broker.port,
                        "username": "it-edge",
                        "password_env": "TPO_AGENT_MQTT_PASSWORD",
                        "tls": TlsFiles(ca_file=broker.layout.ca_cert),
                    }
                )
            }
        )
        for s in broker.site.sources
        if s.type == "mqtt"
    ]
    table = broker.site.series_table()
    ctx = DriverContext(site="tpo", secret=b"test-site-secret")
    bench = _client(clients, broker, "bench-01")
    assert bench.connect(), bench.reason
    body = {
        "ts": "2026-06-21T12:00:00Z",
        "seq": 7,
        "pv_w": 61.5,
        "pv_wh_total": 18342.0,
        "batt_v": 12.9,
        "batt_soc_pct": 78.0,
        "protect_mode": False,
        "usb_active": 1,
        "qi_active": 0,
        "sessions_today": 14,
        "occupancy": 2,
        "temp_c": 24.1,
        "rh_pct": 48.0,
        "pm2_5": 7.2,
        "noise_dba": 58.3,
        "rssi_dbm": -97.0,
    }
    async with MqttFieldDriver(source, table, ctx) as driver:
        stream = driver.stream()
        deadline = time.monotonic() + 10
        got = None
        while got is None and time.monotonic() < deadline:
            bench.publish("field/bench/bench-01/telemetry", orjson.dumps(body))
            try:
                batch = await asyncio.wait_for(anext(stream), 1.0)
            except TimeoutError:
                continue
            got = batch
        assert got is not None, "nothing arrived over TLS"
    values = {table[int(s)].channel: float(v) for s, v in zip(got.series, got.value, strict=True)}
    assert values["batt_soc_pct"] == 78.0
    assert values["pv_w"] == 61.5
    assert {table[int(s)].device for s in got.series} == {"bench-01"}
