"""Configuration of the OPC UA driver: one source = one server endpoint = one device."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drivers.base import ChannelSpec, SourceConfig

_SEGMENT = re.compile(r"^(?:(?P<prefix>[A-Za-z0-9_\-]+):)?(?P<name>[^/]+)$")


def parse_browse_path(path: str) -> list[tuple[str | None, str]]:
    """Split ``"ma:Machines/sim:Mill-1/Monitoring"`` into (prefix or None, name) segments.

    A prefix is a namespace alias from the source's ``namespaces`` or a numeric
    namespace index; a segment without prefix stays in the namespace of the one before.
    """
    segments: list[tuple[str | None, str]] = []
    for raw in path.strip("/").split("/"):
        m = _SEGMENT.match(raw)
        if m is None or not m.group("name"):
            raise ValueError(f"bad browse path segment {raw!r} in {path!r}")
        segments.append((m.group("prefix"), m.group("name")))
    if segments[0][0] is None:
        raise ValueError(f"first segment of {path!r} needs a namespace prefix (alias: or index:)")
    return segments


class OpcUaNode(BaseModel):
    """One variable read from the server, addressed by browse path or NodeId."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    browse_path: str | None = None
    """Relative to Objects, e.g. ``ma:Machines/sim:Mill-1/mt:Monitoring/mt:Spindle/mt:ActSpeed``."""
    node_id: str | None = None
    """A NodeId string (``ns=2;s=Mill-1.Speed``); ``nsu=<uri>;...`` is resolved at connect."""
    unit: str = ""
    codes: tuple[str, ...] | None = None
    mode: Literal["subscribe", "poll"] = "subscribe"
    sampling_interval_ms: float = Field(default=100.0, ge=0.0)
    queue_size: int = Field(default=10, ge=1, le=10_000)
    deadband_abs: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _one_address(self) -> Self:
        if (self.browse_path is None) == (self.node_id is None):
            raise ValueError(f"node {self.channel!r}: give exactly one of browse_path or node_id")
        if self.browse_path is not None:
            parse_browse_path(self.browse_path)
        return self


class OpcUaSource(SourceConfig):
    """One OPC UA server endpoint and the nodes read from it."""

    type: Literal["opcua"] = "opcua"
    endpoint: str = Field(pattern=r"^opc\.tcp://[^/\s]+(:\d+)?(/.*)?$")
    timestamp: Literal["source", "server"] = "source"
    """Which OPC UA timestamp becomes ``ts_source``."""
    namespaces: dict[str, str] = Field(default_factory=dict)
    """Alias -> namespace URI used as browse path prefixes (indexes are not stable, URIs are)."""
    publishing_interval_ms: float = Field(default=100.0, gt=0.0)
    poll_interval_s: float = Field(default=1.0, gt=0.0)
    timeout_s: float = Field(default=5.0, gt=0.0)
    max_nodes_per_read: int = Field(default=100, ge=1)
    """Fallback when the server does not publish OperationLimits/MaxNodesPerRead."""
    security_policy: Literal["auto", "None", "Basic256Sha256"] = "auto"
    """``auto``: Basic256Sha256 when the server offers it (the only policy used so far)."""
    security_mode: Literal["auto", "None", "Sign", "SignAndEncrypt"] = "auto"
    """``auto``: the strongest the server offers (SignAndEncrypt > Sign > None), never None when
    the server offers a secure endpoint; ``None`` (with policy ``None`` or ``auto``) opts out."""
    client_cert_dir: Path | None = None
    """Where the client certificate and key persist (made on first start; not in the repo)."""
    trust_dir: Path | None = None
    """Trusted server certificates (DER or PEM, self-signed or their CA)."""
    trust_on_first_use: bool = False
    """Store the first server certificate seen into ``trust_dir`` instead of rejecting it."""
    username: str | None = None
    password_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name of the environment variable holding the password (never the password itself)."""
    watchdog_s: float = Field(default=10.0, gt=0.0)
    """Reconnect when a subscription delivers neither data nor keepalive for this long."""
    reconnect_min_s: float = Field(default=0.5, gt=0.0)
    reconnect_max_s: float = Field(default=30.0, gt=0.0)
    queue_batches: int = Field(default=10_000, ge=1)
    """Bound of the notification queue (one entry per data change)."""
    nodes: tuple[OpcUaNode, ...] = Field(min_length=1)

    @field_validator("namespaces")
    @classmethod
    def _aliases(cls, v: dict[str, str]) -> dict[str, str]:
        for alias in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", alias) or alias.isdigit():
                raise ValueError(f"namespace alias {alias!r} must be a name, not a number")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        where = f"opcua source {self.device!r}"
        explicit = {self.security_policy, self.security_mode} - {"auto"}
        if "None" in explicit and len(explicit) > 1:
            raise ValueError(
                f"{where}: security_policy {self.security_policy!r} and security_mode "
                f"{self.security_mode!r} must both be None or both be set"
            )
        if self.security_mode in {"Sign", "SignAndEncrypt"} and (
            self.client_cert_dir is None or self.trust_dir is None
        ):
            raise ValueError(f"{where}: security needs client_cert_dir and trust_dir")
        if self.trust_on_first_use and self.trust_dir is None:
            raise ValueError(f"{where}: trust_on_first_use needs trust_dir")
        if (self.username is None) != (self.password_env is None):
            raise ValueError(f"{where}: username and password_env go together")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(f"{where}: reconnect_max_s < reconnect_min_s")
        self._check_nodes(where)
        return self

    def _check_nodes(self, where: str) -> None:
        seen: set[str] = set()
        for node in self.nodes:
            if node.channel in seen:
                raise ValueError(f"{where}: duplicate channel {node.channel!r}")
            seen.add(node.channel)
            if node.browse_path is not None:
                for prefix, _ in parse_browse_path(node.browse_path):
                    if (
                        prefix is not None
                        and not prefix.isdigit()
                        and prefix not in self.namespaces
                    ):
                        raise ValueError(
                            f"{where}: node {node.channel!r}: namespace alias {prefix!r} "
                            f"is not in namespaces {sorted(self.namespaces)}"
                        )

    @property
    def security_auto(self) -> bool:
        """Whether the mode is chosen at connect from the endpoints the server offers."""
        return self.security_mode == "auto" and self.security_policy != "None"

    @property
    def security_off(self) -> bool:
        """Whether security was switched off explicitly (``None`` on either field)."""
        return "None" in {self.security_policy, self.security_mode}

    def channel_specs(self) -> list[ChannelSpec]:
        """One channel per configured node."""
        return [
            ChannelSpec(device=self.device, channel=n.channel, unit=n.unit, codes=n.codes)
            for n in self.nodes
        ]
