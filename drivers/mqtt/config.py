"""Config of the MQTT field-device source (smart benches, EV chargers) and its channel table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drivers.base import ChannelSpec, SourceConfig

DEVICE_ID = r"^[A-Za-z0-9_.\-]+$"

CHARGER_STATUS_CODES: tuple[str, ...] = (
    "Available",
    "Preparing",
    "Charging",
    "SuspendedEVSE",
    "SuspendedEV",
    "Finishing",
    "Reserved",
    "Unavailable",
    "Faulted",
    "Occupied",
)
"""Unified connector status table: OCPP 1.6 names, then 2.0.1's Occupied (the others are shared)."""

CHARGING_STATE_CODES: tuple[str, ...] = (
    "Idle",
    "EVConnected",
    "Charging",
    "SuspendedEV",
    "SuspendedEVSE",
)
"""OCPP 2.0.1 ChargingStateEnumType (sent in status and TransactionEvent messages)."""


@dataclass(frozen=True, slots=True)
class Channel:
    """One channel of a field device kind: name, unit and optional code table."""

    name: str
    unit: str = ""
    codes: tuple[str, ...] | None = None


BENCH_CHANNELS: tuple[Channel, ...] = (
    Channel("pv_w", "W"),
    Channel("pv_wh_total", "Wh"),
    Channel("batt_v", "V"),
    Channel("batt_soc_pct", "%"),
    Channel("protect_mode", ""),
    Channel("usb_active", ""),
    Channel("qi_active", ""),
    Channel("sessions_today", ""),
    Channel("occupancy", ""),
    Channel("temp_c", "degC"),
    Channel("rh_pct", "%"),
    Channel("pm2_5", "ug/m3"),
    Channel("noise_dba", "dBA"),
    Channel("rssi_dbm", "dBm"),
)
"""Bench telemetry channels, named as the JSON fields of ``field/bench/<id>/telemetry``."""

CHARGER_CHANNELS: tuple[Channel, ...] = (
    Channel("status", "", CHARGER_STATUS_CODES),
    Channel("charging_state", "", CHARGING_STATE_CODES),
    Channel("energy_wh", "Wh"),
    Channel("power_w", "W"),
    Channel("power_offered_w", "W"),
    Channel("current_l1", "A"),
    Channel("current_l2", "A"),
    Channel("current_l3", "A"),
    Channel("voltage", "V"),
    Channel("frequency_hz", "Hz"),
    Channel("temperature_c", "degC"),
    Channel("soc", "%"),
    Channel("transaction_active", ""),
    Channel("session_energy_wh", "Wh"),
)
"""Per-connector charger channels; connector n >= 2 adds the suffix ``_c<n>``."""


def connector_channel(name: str, connector: int) -> str:
    """Channel name of a connector: connector 1 is unsuffixed, others get ``_c<n>``."""
    return name if connector == 1 else f"{name}_c{connector}"


class TlsFiles(BaseModel):
    """TLS files for the broker connection (paths, never key material inline)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> TlsFiles:
        if (self.cert_file is None) != (self.key_file is None):
            msg = "tls.cert_file and tls.key_file must be given together"
            raise ValueError(msg)
        return self


class BrokerConfig(BaseModel):
    """Where the field devices publish."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    tls: TlsFiles | None = None
    username: str | None = None
    password_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name of the environment variable holding the password (never the password itself)."""
    client_id: str | None = None
    """Fixed client id; with ``clean_session: false`` the broker queues QoS 1 while we are away."""
    clean_session: bool = True
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    connect_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _session(self) -> BrokerConfig:
        if not self.clean_session and not self.client_id:
            msg = "clean_session: false needs a fixed client_id"
            raise ValueError(msg)
        return self


class FieldDevice(BaseModel):
    """One field device the source accepts; messages from any other id are dead-lettered."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, pattern=DEVICE_ID)
    kind: Literal["bench", "charger"]
    connectors: int = Field(default=1, ge=1, le=8)
    """Charger connectors (EVSEs); ignored for benches."""


class MqttFieldSource(SourceConfig):
    """Field devices publishing JSON over MQTT; ``device`` is the group name (e.g. ``street``).

    For this source a :class:`ChannelSpec`'s ``device`` is the field device id
    (``bench-01``), so the series table key is (area, field device id, channel).
    """

    type: Literal["mqtt"] = "mqtt"
    broker: BrokerConfig = BrokerConfig()
    topics: tuple[str, ...] = ("field/bench/+/telemetry", "field/charger/+/#")
    qos: Literal[0, 1, 2] = 1
    devices: tuple[FieldDevice, ...] = Field(min_length=1)
    seq_modulus: int = Field(default=65536, ge=2)
    """Sequence numbers run 0 .. seq_modulus-1 and then wrap."""
    max_payload_bytes: int = Field(default=65536, ge=64)
    queue_size: int = Field(default=10000, ge=1)
    """Messages held between the paho thread and the parser; a full queue drops and counts."""
    max_batch: int = Field(default=2048, ge=1)
    """Messages parsed into one SampleBatch at most."""
    linger_s: float = Field(default=0.002, ge=0.0, le=1.0)
    """After the first message of a burst, wait this long so the batch fills (adds latency)."""

    @field_validator("topics")
    @classmethod
    def _topics(cls, topics: tuple[str, ...]) -> tuple[str, ...]:
        if not topics:
            msg = "at least one topic filter is needed"
            raise ValueError(msg)
        for t in topics:
            if not t or "#" in t[:-1]:
                msg = f"invalid topic filter {t!r}: '#' only as the last level"
                raise ValueError(msg)
        return topics

    @field_validator("devices")
    @classmethod
    def _unique(cls, devices: tuple[FieldDevice, ...]) -> tuple[FieldDevice, ...]:
        seen: set[str] = set()
        for d in devices:
            if d.id in seen:
                msg = f"duplicate device id {d.id!r}"
                raise ValueError(msg)
            seen.add(d.id)
        return devices

    def channel_specs(self) -> list[ChannelSpec]:
        """One spec per (field device id, channel)."""
        specs: list[ChannelSpec] = []
        for dev in self.devices:
            if dev.kind == "bench":
                specs += [
                    ChannelSpec(device=dev.id, channel=c.name, unit=c.unit) for c in BENCH_CHANNELS
                ]
                continue
            for n in range(1, dev.connectors + 1):
                specs += [
                    ChannelSpec(
                        device=dev.id,
                        channel=connector_channel(c.name, n),
                        unit=c.unit,
                        codes=c.codes,
                    )
                    for c in CHARGER_CHANNELS
                ]
        return specs
