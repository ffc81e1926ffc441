"""Simulated street furniture: smart benches and EV chargers publishing JSON over MQTT.

Each device runs a small process model on simulated time (``SimClock``
acceleration: a tick every ``interval_s`` simulated seconds), builds its
messages, and sends each through its own :class:`~sim.link.LinkEmulator`. A
lost message is never published; a delivered one is published (paho, QoS 1) at
its delivery time by one scheduler task. Every numeric value of every message
goes to the ground truth with the message ``ts`` and ``seq`` and whether the
link dropped it.

Topics: ``field/bench/<id>/telemetry``; ``field/charger/<id>/status``,
``.../meter``, ``.../transaction``. Chargers speak OCPP 1.6 (sampled values as
strings, ``status``) or 2.0.1 (numbers, ``connectorStatus`` + ``chargingState``,
TransactionEvent) as configured per device. Every message carries ``ts``
(ISO 8601 UTC, microseconds) and a per-device ``seq`` that wraps at ``seq_modulus``.

This module deliberately shares no code with ``drivers/mqtt``: it is the
independent side the driver is tested against.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import ssl
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel, ConfigDict, Field, field_validator

from drivers.mqtt.config import CHARGER_STATUS_CODES
from sim.clock import SimClock
from sim.link import PROFILES, LinkEmulator, LinkProfile

if TYPE_CHECKING:
    from pathlib import Path

    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    from sim.truth import GroundTruth

log = logging.getLogger(__name__)

BENCH_CHANNELS = (
    "pv_w",
    "pv_wh_total",
    "batt_v",
    "batt_soc_pct",
    "protect_mode",
    "usb_active",
    "qi_active",
    "sessions_today",
    "occupancy",
    "temp_c",
    "rh_pct",
    "pm2_5",
    "noise_dba",
    "rssi_dbm",
)
CHARGER_CHANNELS = (
    "status",
    "charging_state",
    "energy_wh",
    "power_w",
    "power_offered_w",
    "current_l1",
    "current_l2",
    "current_l3",
    "voltage",
    "frequency_hz",
    "temperature_c",
    "soc",
    "transaction_active",
    "session_energy_wh",
)
STATUS_CODES = CHARGER_STATUS_CODES
"""OCPP 1.6 and 2.0.1 connector states, coded as the driver codes them."""
CHARGING_STATES = ("Idle", "EVConnected", "Charging", "SuspendedEV", "SuspendedEVSE")

MALFORMED_KINDS = (
    "not_json",
    "wrong_types",
    "nan",
    "oversized",
    "unknown_device",
    "missing_field",
    "wrong_topic",
)

_NS = 1_000_000_000


def expected_channels(kind: Literal["bench", "charger"], connectors: int = 1) -> list[str]:
    """Channel names a device of ``kind`` reports (connector n >= 2 suffixed ``_c<n>``)."""
    if kind == "bench":
        return list(BENCH_CHANNELS)
    return [_cch(c, n) for n in range(1, connectors + 1) for c in CHARGER_CHANNELS]


def _cch(channel: str, connector: int) -> str:
    return channel if connector == 1 else f"{channel}_c{connector}"


def iso(ts_ns: int) -> str:
    """ISO 8601 UTC with microseconds."""
    sec, ns = divmod(ts_ns, _NS)
    return datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ns // 1000:06d}Z"


class FieldDeviceSpec(BaseModel):
    """One simulated field device in a scenario file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["bench", "charger"]
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    interval_s: float = Field(default=300.0, gt=0)
    """Simulated seconds between periodic messages (telemetry, meter values)."""
    ocpp: Literal["1.6", "2.0.1"] = "1.6"
    link: str | LinkProfile = "ideal"
    """Name of a profile in :data:`sim.link.PROFILES`, or a profile of its own."""
    seed: int = 0
    connectors: int = Field(default=1, ge=1, le=8)
    max_power_kw: float = Field(default=11.0, gt=0)
    """AC charging power: 11 kW (3 x 16 A) or 22 kW (3 x 32 A)."""
    seq_modulus: int = Field(default=65536, ge=2)
    seq_start: int = Field(default=0, ge=0)
    count: int | None = Field(default=None, ge=1)
    """Stop after this many ticks (tests); None runs until stop()."""

    @field_validator("link")
    @classmethod
    def _known_link(cls, value: str | LinkProfile) -> str | LinkProfile:
        if isinstance(value, str) and value not in PROFILES:
            msg = f"unknown link profile {value!r} (known: {sorted(PROFILES)})"
            raise ValueError(msg)
        return value


@dataclass
class Message:
    """One message a device wants to send, with the truth of its numeric channels."""

    topic: str
    body: dict[str, Any]
    truth: list[tuple[str, float]]
    ts_ns: int
    seq: int = -1
    payload: bytes = b""
    needs: tuple[int, ...] = ()
    """Seq of earlier messages this value depends on (session energy needs the start)."""


# -- process models ------------------------------------------------------------------------------


class BenchModel:
    """A solar bench: PV on a day curve, battery, protection mode, USB/Qi use, sensors."""

    CAPACITY_WH = 480.0
    PV_PEAK_W = 90.0

    def __init__(self, spec: FieldDeviceSpec, rng: np.random.Generator, start_hour: float) -> None:
        """Initial state drawn from the device's generator."""
        self.spec = spec
        self.rng = rng
        self.start_hour = start_hour
        self.pv_wh_total = float(round(rng.uniform(5_000, 30_000), 1))
        self.soc = float(rng.uniform(40, 90))
        self.cloud = 1.0
        self.protect = False
        self.sessions = 0
        self.usb = 0
        self.qi = 0
        self.day = 0

    def tick(self, t_sim: float) -> list[tuple[str, dict[str, Any]]]:
        """Advance by one interval and return the telemetry message body."""
        rng, dt = self.rng, self.spec.interval_s
        hours = self.start_hour + t_sim / 3600.0
        hour = hours % 24.0
        if int(hours // 24) != self.day:
            self.day, self.sessions = int(hours // 24), 0
        self.cloud = float(np.clip(0.8 * self.cloud + 0.2 * rng.uniform(0.3, 1.1), 0.2, 1.0))
        sun = max(0.0, math.sin(math.pi * (hour - 6.0) / 14.0)) if 6.0 <= hour <= 20.0 else 0.0
        pv_w = round(self.PV_PEAK_W * sun * self.cloud, 1)
        self.pv_wh_total = round(self.pv_wh_total + pv_w * dt / 3600.0, 1)
        busy = 8.0 <= hour <= 21.0
        occupancy = int(rng.poisson(1.2 if busy else 0.1))
        usb = qi = 0
        if not self.protect and occupancy:
            usb = int(rng.integers(0, min(occupancy, 2) + 1))
            qi = int(rng.random() < 0.3)
        self.sessions += int(usb > self.usb) + int(qi > self.qi)
        self.usb, self.qi = usb, qi
        load_w = 1.5 + 7.5 * usb + 5.0 * qi + (0.0 if self.protect else 2.0)
        self.soc = float(
            np.clip(self.soc + (pv_w - load_w) * dt / 3600.0 / self.CAPACITY_WH * 100, 0, 100)
        )
        # Protection below 30 % (Aachen's benches); leave it at 35 % so it does not flap.
        self.protect = self.soc < 30.0 or (self.protect and self.soc < 35.0)
        soc = round(self.soc, 1)
        body = {
            "pv_w": pv_w,
            "pv_wh_total": self.pv_wh_total,
            "batt_v": round(11.8 + 1.4 * soc / 100.0, 2),
            "batt_soc_pct": soc,
            "protect_mode": self.protect,
            "usb_active": usb,
            "qi_active": qi,
            "sessions_today": self.sessions,
            "occupancy": occupancy,
            "temp_c": round(16.0 + 8.0 * sun + rng.normal(0, 0.3), 1),
            "rh_pct": round(float(np.clip(70.0 - 25.0 * sun + rng.normal(0, 2), 5, 100)), 1),
            "pm2_5": round(float(abs(6.0 + rng.normal(0, 2))), 1),
            "noise_dba": round(45.0 + (12.0 if busy else 0.0) + rng.normal(0, 3), 1),
            "rssi_dbm": round(-95.0 + rng.normal(0, 3), 0),
        }
        return [("telemetry", body)]


@dataclass
class _Connector:
    n: int
    state: str = "Available"
    until: float = 0.0
    energy_wh: float = 0.0
    power_w: float = 0.0
    tx_id: int | None = None
    id_tag: str | None = None
    meter_start: float = 0.0
    start_seq: int = -1
    target_wh: float = 0.0


class ChargerModel:
    """An AC charger: connector state machine, transactions, energy register, meter values."""

    def __init__(self, spec: FieldDeviceSpec, rng: np.random.Generator) -> None:
        """Initial register and first arrivals from the device's generator."""
        self.spec = spec
        self.rng = rng
        self.connectors = [
            _Connector(n, energy_wh=float(round(rng.uniform(1e5, 5e6), 1)))
            for n in range(1, spec.connectors + 1)
        ]
        for c in self.connectors:
            c.until = float(rng.exponential(2 * spec.interval_s))
        self.tx_counter = int(rng.integers(1, 10_000))
        self.id_tags: set[str] = set()

    def tick(self, t_sim: float) -> list[tuple[str, dict[str, Any]]]:
        """Advance every connector by one interval; status, transaction and meter bodies."""
        out: list[tuple[str, dict[str, Any]]] = []
        dt = self.spec.interval_s
        for c in self.connectors:
            if c.state in {"Charging", "SuspendedEV"}:
                c.energy_wh = round(c.energy_wh + c.power_w * dt / 3600.0, 1)
            while t_sim >= c.until:
                out += self._transition(c, t_sim)
        for c in self.connectors:
            out.append(("meter", self._meter(c)))
        return out

    def _transition(self, c: _Connector, t_sim: float) -> list[tuple[str, dict[str, Any]]]:
        rng, dt = self.rng, self.spec.interval_s
        out: list[tuple[str, dict[str, Any]]] = []
        old = c.state
        if old == "Available":
            if rng.random() < 0.03:
                c.state, c.until = "Faulted", t_sim + dt * float(rng.integers(1, 4))
            else:
                c.state, c.until = "Preparing", t_sim + dt
        elif old == "Faulted":
            c.state, c.until = "Available", t_sim + float(rng.exponential(3 * dt))
        elif old == "Preparing":
            c.state = "Charging"
            self.tx_counter += 1
            c.tx_id = self.tx_counter
            c.id_tag = rng.bytes(7).hex().upper()
            self.id_tags.add(c.id_tag)
            c.meter_start = c.energy_wh
            c.power_w = round(self.spec.max_power_kw * 1000 * float(rng.uniform(0.9, 1.0)), 1)
            c.target_wh = (
                float(rng.uniform(0.5, 1.0)) * self.spec.max_power_kw * 1000 * 4 * dt / 3600
            )
            c.until = t_sim + dt
            out.append(("transaction", self._tx_start(c)))
        elif old == "Charging":
            if c.energy_wh - c.meter_start >= c.target_wh:
                c.state, c.power_w = "SuspendedEV", 0.0
            c.until = t_sim + dt
        elif old == "SuspendedEV":
            c.state, c.until = "Finishing", t_sim + dt
            out.append(("transaction", self._tx_stop(c)))
        else:  # Finishing
            c.state, c.until = "Available", t_sim + float(rng.exponential(2 * dt))
        if c.state != old:
            out.insert(0, ("status", self._status(c)))
        return out

    def _status(self, c: _Connector) -> dict[str, Any]:
        if self.spec.ocpp == "1.6":
            return {"connectorId": c.n, "status": c.state, "errorCode": "NoError"}
        status, state = _STATUS_201[c.state]
        body: dict[str, Any] = {"evseId": c.n, "connectorId": 1, "connectorStatus": status}
        if state is not None:
            body["chargingState"] = state
        return body

    def _sv(
        self, value: float, measurand: str, unit: str, phase: str | None = None
    ) -> dict[str, Any]:
        if self.spec.ocpp == "1.6":
            sv: dict[str, Any] = {"value": repr(value), "measurand": measurand, "unit": unit}
        else:
            sv = {"value": value, "measurand": measurand, "unitOfMeasure": {"unit": unit}}
        if phase is not None:
            sv["phase"] = phase
        return sv

    def _meter(self, c: _Connector) -> dict[str, Any]:
        amps = round(c.power_w / 3 / 230.0, 2)
        volts = round(230.0 + float(self.rng.normal(0, 1.5)), 1)
        svs = [
            self._sv(c.energy_wh, "Energy.Active.Import.Register", "Wh"),
            self._sv(c.power_w, "Power.Active.Import", "W"),
            self._sv(amps, "Current.Import", "A", "L1"),
            self._sv(amps, "Current.Import", "A", "L2"),
            self._sv(amps, "Current.Import", "A", "L3"),
            self._sv(volts, "Voltage", "V"),
        ]
        body: dict[str, Any] = {"meterValue": [{"timestamp": None, "sampledValue": svs}]}
        if self.spec.ocpp == "1.6":
            body["connectorId"] = c.n
            if c.tx_id is not None:
                body["transactionId"] = c.tx_id
        else:
            body["evseId"] = c.n
            if c.tx_id is not None:
                body["transactionId"] = str(c.tx_id)
        return body

    def _tx_start(self, c: _Connector) -> dict[str, Any]:
        if self.spec.ocpp == "1.6":
            return {
                "event": "start",
                "connectorId": c.n,
                "transactionId": c.tx_id,
                "idTag": c.id_tag,
                "meterStart": c.meter_start,
            }
        return {
            "eventType": "Started",
            "triggerReason": "Authorized",
            "transactionInfo": {"transactionId": str(c.tx_id), "chargingState": "Charging"},
            "idToken": {"idToken": c.id_tag, "type": "ISO14443"},
            "evse": {"id": c.n, "connectorId": 1},
            "meterValue": [
                {
                    "timestamp": None,
                    "sampledValue": [
                        {
                            "value": c.meter_start,
                            "measurand": "Energy.Active.Import.Register",
                            "context": "Transaction.Begin",
                            "unitOfMeasure": {"unit": "Wh"},
                        }
                    ],
                }
            ],
        }

    def _tx_stop(self, c: _Connector) -> dict[str, Any]:
        tx_id, c.tx_id = c.tx_id, None
        if self.spec.ocpp == "1.6":
            return {
                "event": "stop",
                "transactionId": tx_id,
                "idTag": c.id_tag,
                "meterStop": c.energy_wh,
                "reason": "EVDisconnected",
            }
        return {
            "eventType": "Ended",
            "triggerReason": "EVCommunicationLost",
            "transactionInfo": {
                "transactionId": str(tx_id),
                "chargingState": "EVConnected",
                "stoppedReason": "EVDisconnected",
            },
            "evse": {"id": c.n, "connectorId": 1},
            "meterValue": [
                {
                    "timestamp": None,
                    "sampledValue": [
                        {
                            "value": c.energy_wh,
                            "measurand": "Energy.Active.Import.Register",
                            "context": "Transaction.End",
                            "unitOfMeasure": {"unit": "Wh"},
                        }
                    ],
                }
            ],
        }


_STATUS_201: dict[str, tuple[str, str | None]] = {
    "Available": ("Available", None),
    "Preparing": ("Occupied", "EVConnected"),
    "Charging": ("Occupied", "Charging"),
    "SuspendedEV": ("Occupied", "SuspendedEV"),
    "SuspendedEVSE": ("Occupied", "SuspendedEVSE"),
    "Finishing": ("Occupied", "EVConnected"),
    "Faulted": ("Faulted", None),
    "Unavailable": ("Unavailable", None),
    "Reserved": ("Reserved", None),
}

_MEASURAND_CHANNEL = {
    ("Energy.Active.Import.Register", None): "energy_wh",
    ("Power.Active.Import", None): "power_w",
    ("Current.Import", "L1"): "current_l1",
    ("Current.Import", "L2"): "current_l2",
    ("Current.Import", "L3"): "current_l3",
    ("Voltage", None): "voltage",
}


# -- devices: messages, truth, link ----------------------------------------------------------


class FieldDevice:
    """One simulated device: its model, seq counter, link and truth bookkeeping."""

    def __init__(self, spec: FieldDeviceSpec, start_hour: float) -> None:
        """Seed the process model and the link from the spec."""
        self.spec = spec
        value_seq, link_seq = np.random.SeedSequence(spec.seed).spawn(2)
        rng = np.random.default_rng(value_seq)
        self.model: BenchModel | ChargerModel = (
            BenchModel(spec, rng, start_hour) if spec.kind == "bench" else ChargerModel(spec, rng)
        )
        link_seed = int(link_seq.generate_state(1)[0])
        link = PROFILES[spec.link] if isinstance(spec.link, str) else spec.link
        self.link = LinkEmulator(link, link_seed)
        self.seq = spec.seq_start % spec.seq_modulus
        self.ticks = 0
        self.last_ts = 0
        self.sent = 0
        self.dropped = 0
        self._dropped_seqs: set[int] = set()
        self._tx_connector: dict[Any, int] = {}
        self.last_body: dict[str, dict[str, Any]] = {}

    @property
    def id_tags(self) -> set[str]:
        """Raw idTags this device used (tests check none of them leaks)."""
        return self.model.id_tags if isinstance(self.model, ChargerModel) else set()

    def next_ts(self) -> int:
        """A wall-clock stamp, strictly increasing in whole microseconds per device."""
        ts = time.time_ns() // 1000 * 1000
        ts = max(ts, self.last_ts + 1000)
        self.last_ts = ts
        return ts

    def tick(self) -> list[Message]:
        """One period: the model's messages, stamped, numbered, with their truth."""
        t_sim = self.ticks * self.spec.interval_s
        self.ticks += 1
        kind = self.spec.kind
        out = []
        for leaf, body in self.model.tick(t_sim):
            msg = self._finish(f"field/{kind}/{self.spec.id}/{leaf}", body)
            out.append(msg)
        return out

    def _finish(self, topic: str, body: dict[str, Any]) -> Message:
        ts = self.next_ts()
        stamp = iso(ts)
        seq = self.seq
        self.seq = (self.seq + 1) % self.spec.seq_modulus
        self.last_body[topic.rsplit("/", 1)[1]] = body
        for mv in body.get("meterValue", ()):
            mv["timestamp"] = stamp
        full = {"ts": stamp, "seq": seq, **body}
        msg = Message(topic, full, [], ts, seq, orjson.dumps(full))
        self._truth(msg, topic.rsplit("/", 1)[1], body)
        return msg

    def _truth(self, msg: Message, leaf: str, body: dict[str, Any]) -> None:
        t = msg.truth
        if leaf == "telemetry":
            t += [(ch, float(body[ch])) for ch in BENCH_CHANNELS]
            return
        n = body.get("evseId", body.get("connectorId", 1))
        if leaf == "status":
            name = body.get("status", body.get("connectorStatus"))
            t.append((_cch("status", n), float(STATUS_CODES.index(name))))
            if "chargingState" in body:
                t.append(
                    (_cch("charging_state", n), float(CHARGING_STATES.index(body["chargingState"])))
                )
            return
        if leaf == "meter":
            for mv in body["meterValue"]:
                for sv in mv["sampledValue"]:
                    ch = _MEASURAND_CHANNEL[(sv["measurand"], sv.get("phase"))]
                    t.append((_cch(ch, n), float(sv["value"])))
            return
        self._truth_transaction(msg, body)

    def _truth_transaction(self, msg: Message, body: dict[str, Any]) -> None:
        t = msg.truth
        assert isinstance(self.model, ChargerModel)
        if "event" in body:  # OCPP 1.6
            starting = body["event"] == "start"
            tx_id = body["transactionId"]
            n = body.get("connectorId") or self._tx_connector.pop(tx_id, 1)
            if starting:
                self._tx_connector[tx_id] = n
            meter = float(body["meterStart"] if starting else body["meterStop"])
        else:
            starting = body["eventType"] == "Started"
            n = body["evse"]["id"]
            meter = float(body["meterValue"][0]["sampledValue"][0]["value"])
        t.append((_cch("energy_wh", n), meter))
        if "transactionInfo" in body and body["transactionInfo"].get("chargingState"):
            state = body["transactionInfo"]["chargingState"]
            t.append((_cch("charging_state", n), float(CHARGING_STATES.index(state))))
        t.append((_cch("transaction_active", n), 1.0 if starting else 0.0))
        conn = self.model.connectors[n - 1]
        if starting:
            conn.start_seq = msg.seq
        else:
            t.append((_cch("session_energy_wh", n), meter - conn.meter_start))
            msg.needs = (conn.start_seq,)

    def record(self, truth: GroundTruth, msg: Message, delivered: bool) -> None:
        """Ground truth of every numeric channel of a message."""
        if not delivered:
            self._dropped_seqs.add(msg.seq)
        start_lost = any(s in self._dropped_seqs for s in msg.needs)
        for channel, value in msg.truth:
            lost = not delivered or (channel.startswith("session_energy_wh") and start_lost)
            truth.record(self.spec.id, channel, value, msg.ts_ns, seq=msg.seq, dropped=lost)


# -- the simulator -------------------------------------------------------------------------------


@dataclass(order=True)
class _Due:
    t_ns: int
    order: int
    topic: str = field(compare=False)
    payload: bytes = field(compare=False)


class FieldSim:
    """Runs field devices against an MQTT broker through their emulated links."""

    def __init__(
        self,
        broker_host: str,
        broker_port: int,
        devices: list[FieldDeviceSpec],
        truth: GroundTruth,
        clock: SimClock | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_ca: Path | None = None,
        start_hour: float = 10.0,
        qos: int = 1,
    ) -> None:
        """Prepare devices; nothing connects until :meth:`start`."""
        ids = [d.id for d in devices]
        if len(ids) != len(set(ids)):
            msg = f"duplicate field device ids in {ids}"
            raise ValueError(msg)
        self.host, self.port = broker_host, broker_port
        self.truth = truth
        self.clock = clock or SimClock()
        self.qos = qos
        self.devices = {d.id: FieldDevice(d, start_hour) for d in devices}
        self._username, self._password, self._tls_ca = username, password, tls_ca
        self._client: mqtt.Client | None = None
        self._heap: list[_Due] = []
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._scheduler: asyncio.Task[None] | None = None
        self._connected: asyncio.Event | None = None
        self.published = 0
        self.acked = 0
        self._running = asyncio.Event()
        self._running.set()

    @property
    def id_tags(self) -> set[str]:
        """Every raw idTag any charger used."""
        return set().union(*(d.id_tags for d in self.devices.values()))

    async def start(self) -> None:
        """Connect to the broker and start every device's ticker."""
        loop = asyncio.get_running_loop()
        self._connected = asyncio.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"tpo-fieldsim-{uuid.uuid4().hex[:8]}"
        )
        if self._username is not None:
            client.username_pw_set(self._username, self._password)
        if self._tls_ca is not None:
            client.tls_set(ca_certs=str(self._tls_ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        connected = self._connected

        def on_connect(
            _c: mqtt.Client,
            _u: object,
            _f: mqtt.ConnectFlags,
            rc: ReasonCode,
            _p: Properties | None,
        ) -> None:
            if not rc.is_failure:
                loop.call_soon_threadsafe(connected.set)

        def on_publish(
            _c: mqtt.Client, _u: object, _mid: int, _rc: ReasonCode, _p: Properties | None
        ) -> None:
            self.acked += 1  # paho's thread; an int increment is atomic under the GIL

        client.on_connect = on_connect
        client.on_publish = on_publish
        self._client = client
        client.connect_async(self.host, self.port)
        client.loop_start()
        async with asyncio.timeout(10):
            await connected.wait()
        self._scheduler = asyncio.create_task(self._schedule(), name="fieldsim.scheduler")
        for dev in self.devices.values():
            self._tasks.append(asyncio.create_task(self._run(dev), name=f"fieldsim[{dev.spec.id}]"))

    def pause(self) -> None:
        """Stop producing messages (what is already scheduled still goes out)."""
        self._running.clear()

    def resume(self) -> None:
        """Produce messages again."""
        self._running.set()

    async def _run(self, dev: FieldDevice) -> None:
        period = dev.spec.interval_s / self.clock.speed
        next_t = time.monotonic()
        while dev.spec.count is None or dev.ticks < dev.spec.count:
            if not self._running.is_set():
                await self._running.wait()
                next_t = time.monotonic()  # no catch-up burst after a pause
            self.send(dev, dev.tick())
            next_t += period
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    def send(self, dev: FieldDevice, messages: list[Message]) -> None:
        """Pass messages through the device's link; schedule the delivered ones."""
        for msg in messages:
            delivered, t_deliver = dev.link.transit(len(msg.payload), msg.ts_ns)
            dev.record(self.truth, msg, delivered)
            dev.sent += 1
            if not delivered:
                dev.dropped += 1
                continue
            heapq.heappush(self._heap, _Due(t_deliver, next(self._order), msg.topic, msg.payload))
            self._wake.set()

    async def _schedule(self) -> None:
        """Publish each delivered message at its delivery time, in delivery order."""
        while True:
            if not self._heap:
                self._wake.clear()
                await self._wake.wait()
                continue
            wait_s = (self._heap[0].t_ns - time.time_ns()) / _NS
            if wait_s > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._wake.wait()
                continue
            due = heapq.heappop(self._heap)
            self._publish(due.topic, due.payload)

    def _publish(self, topic: str, payload: bytes) -> None:
        assert self._client is not None
        self._client.publish(topic, payload, qos=self.qos)
        self.published += 1

    async def wait_done(self, timeout_s: float = 30.0) -> None:
        """Wait until every counted device finished and everything scheduled went out."""
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*self._tasks)
            while self._heap:
                await asyncio.sleep(0.005)
            await self._flush()

    async def _flush(self) -> None:
        """Wait until the broker acknowledged every publish (PUBACK at QoS 1)."""
        while self._client is not None and self.acked < self.published:
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        """Stop tickers, publish what is already scheduled, disconnect."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while self._heap:
                    await asyncio.sleep(0.005)
                await self._flush()
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)

    # -- fault injection ---------------------------------------------------------------------

    def malformed(
        self, device: str, kind: str, *, oversized_bytes: int = 70_000
    ) -> tuple[str, bytes]:
        """(topic, payload) of a malformed message of ``kind`` for a device (not published)."""
        dev = self.devices[device]
        spec = dev.spec
        if kind not in MALFORMED_KINDS:
            msg = f"unknown malformed kind {kind!r} (known: {MALFORMED_KINDS})"
            raise ValueError(msg)
        stamp = iso(time.time_ns())
        seq = (dev.seq - 1) % spec.seq_modulus
        if spec.kind == "bench":
            body = dev.last_body.get("telemetry") or dev.model.tick(0.0)[0][1]
            base: dict[str, Any] = {"ts": stamp, "seq": seq, **body}
            topic = f"field/bench/{spec.id}/telemetry"
            field_, other = "pv_w", f"field/charger/{spec.id}/meter"
        else:
            tag = "RAWTAG" + uuid.uuid4().hex[:10].upper()
            dev.id_tags.add(tag)
            base = {
                "ts": stamp,
                "seq": seq,
                "event": "start",
                "connectorId": 1,
                "transactionId": 999_999,
                "idTag": tag,
                "meterStart": 1000.0,
            }
            topic = f"field/charger/{spec.id}/transaction"
            field_, other = "meterStart", f"field/bench/{spec.id}/telemetry"
        raw = orjson.dumps(base)
        variants: dict[str, tuple[str, bytes]] = {
            "not_json": (topic, raw[: len(raw) - 8]),
            "wrong_types": (topic, orjson.dumps({**base, field_: {"value": "sunny"}})),
            "nan": (topic, orjson.dumps({**base, field_: 0.125}).replace(b"0.125", b"NaN")),
            "oversized": (topic, orjson.dumps({**base, "pad": "x" * oversized_bytes})),
            "unknown_device": (topic.replace(f"/{spec.id}/", f"/{spec.id}-ghost/"), raw),
            "missing_field": (topic, orjson.dumps({k: v for k, v in base.items() if k != field_})),
            "wrong_topic": (other, raw),
        }
        return variants[kind]

    def inject_malformed(self, device: str, kind: str, **kwargs: Any) -> tuple[str, bytes]:
        """Publish a malformed message now (no link, no seq, no truth); returns it."""
        topic, payload = self.malformed(device, kind, **kwargs)
        self._publish(topic, payload)
        return topic, payload
