"""The site file: one YAML per site describing the agent, its sources, broker, database and KPIs.

Loaded with :func:`load_site`; every error names its YAML path and line
(:mod:`edge.yamlpath`). Secrets never live in the file: fields ending in
``_env`` name the environment variable that holds them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drivers.base import SeriesKey, SeriesTable
from drivers.modbus.config import ModbusSource
from drivers.mqtt.config import MqttFieldSource
from drivers.opcua.config import OpcUaSource
from edge.errors import ConfigError
from edge.yamlpath import load_model

NAME = r"^[A-Za-z0-9_.\-]+$"
"""Names that appear in topics and tags: no '/', '+', '#', spaces or commas."""


class Model(BaseModel):
    """Base of every config model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(Model):
    """TLS towards the broker; paths to PEM files (kept outside the repo)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            msg = "cert_file and key_file go together (client certificate authentication)"
            raise ValueError(msg)
        return self


class BrokerConfig(Model):
    """The MQTT backbone broker."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password_env: str | None = None
    """Name of the environment variable holding the password."""
    tls: TlsConfig | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    qos: Literal[0, 1] = 1
    protocol: Literal["5", "3.1.1"] = "5"
    """MQTT version; 3.1.1 only for brokers without MQTT 5 (no shared subscriptions then)."""

    def password(self) -> str | None:
        """The password from the environment, or None."""
        return env_secret(self.password_env, "broker.password_env")


class AgentConfig(Model):
    """One edge agent (one per hall or cell)."""

    id: str = Field(pattern=NAME)
    batch_max_samples: int = Field(default=5000, ge=1, le=100_000)
    """A device's batch is published when it holds this many samples..."""
    batch_max_age_s: float = Field(default=0.04, gt=0, le=60)
    """...or when its oldest sample is this old. Latency against messages: every sample
    waits up to this long at the agent, and a device sends up to 1/age messages a second
    (each costs the broker and ingest a fixed amount). The default keeps the platform's
    p99 under 100 ms together with ``database.flush_interval_s`` (see bench/RESULTS.md,
    "End to end"); a slow device's poll is its own batch anyway. Raise it (0.1-1 s) for
    many fast streaming devices when a second of latency is fine."""
    outbox_max_bytes: int = Field(default=64 * 2**20, ge=2**16)
    """Bound of the outbox of messages not yet acknowledged (``delivery: broker``) or not
    yet confirmed stored (``delivery: stored``)."""
    outbox_full: Literal["drop_oldest", "stop_reading"] = "drop_oldest"
    """What happens when the outbox is full; either way it is counted and raised as an alarm."""
    outbox_dir: Path | None = None
    """Directory of the durable outbox (SQLite, WAL; ``outbox-<id>.sqlite``); None keeps the
    outbox in memory (tests, the demo): then a crash loses what was not acknowledged."""
    outbox_sync: Literal["full", "normal"] = "full"
    """``full``: every put is fsynced, surviving power loss; ``normal``: fsync at checkpoints
    only, surviving SIGKILL but maybe not power loss (see edge/durable.py)."""
    metrics_interval_s: float = Field(default=5.0, gt=0)
    delivery: Literal["stored", "broker"] = "stored"
    """When a message leaves the outbox. ``stored``: it stays after the broker's PUBACK
    (still counted against ``outbox_max_bytes``) until ingest confirms it is in the database
    or ingest's spool, and is published again after a reconnect, when an ingest worker comes
    online, or when unconfirmed for ``confirm_timeout_s``; so a broker killed before its next
    autosave loses nothing. ``broker``: the PUBACK ends it (a killed broker loses what it
    acknowledged and had not delivered yet)."""
    confirm_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """``delivery: stored``: a message unconfirmed this long after its PUBACK is published
    again (last resort; reconnects and ingest coming online republish at once). The wait
    doubles with every republish of the same message, up to ``confirm_timeout_max_s``, so an
    ingest outage does not flood the broker."""
    confirm_timeout_max_s: float = Field(default=300.0, gt=0, le=86400)
    """Cap of the doubling republish timeout."""

    @model_validator(mode="after")
    def _timeouts(self) -> Self:
        if self.confirm_timeout_max_s < self.confirm_timeout_s:
            msg = "confirm_timeout_max_s must be >= confirm_timeout_s"
            raise ValueError(msg)
        return self


class DatabaseConfig(Model):
    """Where ingest writes: InfluxDB (v1 or v2 API) or a local SQLite store."""

    kind: Literal["influxdb_v1", "influxdb_v2", "sqlite"] = "influxdb_v1"
    url: str = "http://127.0.0.1:8086"
    database: str = Field(default="tpo", pattern=NAME)
    """v1 database (or the v1-compatibility mapping of a v2 bucket)."""
    username: str | None = None
    password_env: str | None = None
    org: str | None = None
    bucket: str | None = None
    token_env: str | None = None
    path: Path = Path("tpo-edge.sqlite")
    """File of the SQLite store."""
    batch_points: int = Field(default=5000, ge=1, le=100_000)
    """Ingest writes a batch as soon as it holds this many points..."""
    flush_interval_s: float = Field(default=0.02, gt=0, le=60)
    """...or when it has been collecting this long. Under load batches fill up first
    (``batch_points`` amortises the write); at low rates this bounds the wait, and sets
    how many (small) writes a second the database takes: 1/interval per worker. Raise it
    (0.5-1 s) for a database that struggles with many small writes when latency matters
    less; the default keeps the platform's p99 under 100 ms (with ``batch_max_age_s``)."""
    writes_in_flight: int = Field(default=2, ge=1, le=16)
    """Batches ingest writes at once, while it collects the next; messages are still
    acknowledged in order, each only after its own batch (and every earlier one) is stored."""
    gzip: bool = True

    @model_validator(mode="after")
    def _v2_needs(self) -> Self:
        if self.kind == "influxdb_v2" and not (self.org and self.bucket and self.token_env):
            msg = "influxdb_v2 needs org, bucket and token_env"
            raise ValueError(msg)
        return self


class IngestConfig(Model):
    """The ingest service that moves backbone messages into the database."""

    client_id: str = Field(default="tpo-ingest", pattern=NAME)
    share_group: str | None = Field(default=None, pattern=NAME)
    """MQTT 5 shared-subscription group for several workers (``$share/<group>/...``)."""
    username: str | None = None
    """Broker account of the ingest workers (default: the agent's ``broker.username``)."""
    password_env: str | None = None
    """Environment variable with that account's password (default: ``broker.password_env``)."""
    spool_dir: Path | None = None
    """Directory of ingest's own disk queue (SQLite, WAL; ``<client_id>.spool`` per worker)
    for database outages; None leaves the broker holding unacknowledged messages instead."""
    spool_max_bytes: int = Field(default=1024 * 2**20, ge=2**16)
    """Bound of the spool (compressed line protocol)."""
    spool_full: Literal["backpressure", "drop_oldest"] = "backpressure"
    """When the spool is full: stop acknowledging (the broker holds the messages), or drop
    the oldest spooled batches (counted as ``spool_dropped_points``)."""
    spool_after_s: float = Field(default=5.0, gt=0, le=300)
    """How long a batch may wait for the database before it goes to the spool."""
    drain_batch_points: int = Field(default=50_000, ge=1, le=1_000_000)
    """Points per database write while draining the spool."""
    confirm_interval_s: float = Field(default=0.2, ge=0, le=10)
    """Delivery confirmations (``tpo.stored/1``) of batches stored within this interval go to
    an agent as one message (0: one per write batch). Each received message costs the agent
    a few hundred microseconds of CPU here; at the default flush interval that is up to 50 a
    second, 5 with the default (bench/RESULTS.md, "Delivery confirmation"). The agent holds
    its messages this much longer."""

    def broker(self, base: BrokerConfig) -> BrokerConfig:
        """The backbone broker config with the ingest account swapped in, when one is set."""
        if self.username is None:
            return base
        return base.model_copy(
            update={"username": self.username, "password_env": self.password_env}
        )


class KpiConfig(Model):
    """Windows and thresholds of the KPI core."""

    enabled: bool = True
    windows_s: tuple[float, ...] = (10.0,)
    allowed_lateness_s: float = Field(default=2.0, ge=0)
    deadlines_ms: tuple[float, ...] = (10.0, 50.0)
    survival_time_ms: Annotated[float, Field(ge=0)] | Literal["auto"] = 0.0
    """Survival time ST (3GPP TS 22.104): how long the application goes on without an expected
    message; ``auto`` = one transfer interval, i.e. one missed message tolerated."""
    transfer_interval_ms: (
        Annotated[float, Field(ge=0)] | dict[str, Annotated[float, Field(ge=0)]] | Literal["auto"]
    ) = "auto"
    """Transfer interval TI of cyclic devices, against which availability is computed: one
    value (0: event-driven, no TI), per device name (devices not listed: auto), or ``auto``:
    estimated per device from its traffic (``pipelines.link.estimate_transfer_interval``)."""
    ideal_cycle_s: float | dict[str, float] | None = None
    """Ideal cycle time for OEE performance: one value, or per device name (machines without
    one use 30 s)."""

    @field_validator("ideal_cycle_s")
    @classmethod
    def _positive_cycles(
        cls, value: float | dict[str, float] | None
    ) -> float | dict[str, float] | None:
        cycles = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if any(c <= 0 for c in cycles):
            msg = "ideal cycle times must be > 0 s"
            raise ValueError(msg)
        return value


Source = Annotated[ModbusSource | OpcUaSource | MqttFieldSource, Field(discriminator="type")]


class SiteConfig(Model):
    """A whole site file."""

    site: str = Field(pattern=NAME)
    secret_env: str = "TPO_SITE_SECRET"  # noqa: S105 - the variable's name, not a secret
    """Environment variable with the site secret that keys idTag pseudonyms."""
    agent: AgentConfig
    broker: BrokerConfig = BrokerConfig()
    database: DatabaseConfig = DatabaseConfig()
    ingest: IngestConfig = IngestConfig()
    kpi: KpiConfig = KpiConfig()
    sources: tuple[Source, ...]

    @field_validator("sources", mode="after")
    @classmethod
    def _some_sources(cls, sources: tuple[Source, ...]) -> tuple[Source, ...]:
        # Checked here, not with min_length: pydantic would also report a too-short
        # tuple whenever one entry fails, burying the real error.
        if not sources:
            msg = "a site needs at least one source"
            raise ValueError(msg)
        return sources

    @model_validator(mode="after")
    def _unique_series(self) -> Self:
        seen: dict[tuple[str, str, str], int] = {}
        for i, source in enumerate(self.sources):
            for spec in source.channel_specs():
                ident = (source.area, spec.device, spec.channel)
                if ident in seen and seen[ident] != i:
                    msg = (
                        f"device {spec.device!r} channel {spec.channel!r} in area "
                        f"{source.area!r} is also produced by sources[{seen[ident]}]"
                    )
                    raise ValueError(msg)
                seen[ident] = i
        return self

    def series_table(self) -> SeriesTable:
        """The series table of this site: every channel of every source, in file order."""
        table = SeriesTable()
        for source in self.sources:
            for spec in source.channel_specs():
                table.add(
                    SeriesKey(
                        site=self.site,
                        area=source.area,
                        device=spec.device,
                        channel=spec.channel,
                        unit=spec.unit,
                        kind=source.type,
                        codes=spec.codes,
                    )
                )
        return table

    def secret(self) -> bytes:
        """The site secret from the environment (empty when unset)."""
        return os.environ.get(self.secret_env, "").encode()


def env_secret(var: str | None, where: str) -> str | None:
    """The value of the environment variable ``var`` (None when no variable is configured).

    ``where`` is the YAML path that names the variable, for the error when it is unset.
    """
    if var is None:
        return None
    value = os.environ.get(var)
    if value is None:
        raise ConfigError("environment", [(where, None, f"environment variable {var} is not set")])
    return value


def load_site(path: Path) -> SiteConfig:
    """Load and validate a site file; raises ConfigError with every problem found."""
    return load_model(SiteConfig, path)
