"""A site with field devices, and the shipped mosquitto.conf made runnable on loopback."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edge.config import SiteConfig
from edge.secrets import SecretsLayout

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
CONTAINER_SECRETS = "/mosquitto/secrets/"


def field_site(**overrides: Any) -> SiteConfig:
    """Agent ``it-edge`` on site ``tpo`` with two benches and a two-connector charger."""
    doc: dict[str, Any] = {
        "site": "tpo",
        "agent": {"id": "it-edge"},
        "sources": [
            {
                "type": "mqtt",
                "area": "street",
                "device": "street",
                "devices": [
                    {"id": "bench-01", "kind": "bench"},
                    {"id": "bench-02", "kind": "bench"},
                    {"id": "charger-01", "kind": "charger", "connectors": 2},
                ],
            }
        ],
        **overrides,
    }
    return SiteConfig.model_validate(doc)


def container_file_map_names() -> tuple[str, ...]:
    """Names the compose start command installs into /mosquitto/secrets."""
    return ("passwd", "acl", "ca.pem", "server.pem", "server.key")


def container_file_map(layout: SecretsLayout) -> dict[str, Path]:
    """/mosquitto/secrets/<name> (what the compose start command installs) -> generated file."""
    return {
        "passwd": layout.passwd,
        "acl": layout.acl,
        "ca.pem": layout.ca_cert,
        "server.pem": layout.server_cert,
        "server.key": layout.server_key,
    }


def install_like_compose(layout: SecretsLayout) -> Path:
    """Copy the broker's files into a private dir, as the compose start command does.

    Like ``install -o mosquitto -m 0600`` in the container: when we are root, mosquitto
    drops to its own user before reading the password file, so the copies must be its own.
    """
    target = Path(tempfile.mkdtemp(prefix="tpo-mosquitto-"))
    owner = _mosquitto_ids() if os.geteuid() == 0 else None
    for name, src in container_file_map(layout).items():
        dst = target / name
        shutil.copyfile(src, dst)
        dst.chmod(0o600)
        if owner:
            os.chown(dst, *owner)
    (target / "data").mkdir()
    if owner:
        os.chown(target, *owner)
        os.chown(target / "data", *owner)
    return target


def _mosquitto_ids() -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam("mosquitto")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def loopback_conf(secrets_dir: Path, port: int) -> str:
    """The shipped mosquitto.conf with installed files, a loopback port and a temp data dir."""
    files = {name: secrets_dir / name for name in container_file_map_names()}
    workdir = secrets_dir / "data"
    out = []
    for raw in SHIPPED_CONF.read_text().splitlines():
        words = raw.split()
        line = raw
        if words and words[0] == "listener":
            line = f"listener {port} 127.0.0.1"
        elif words and words[0] == "persistence_location":
            line = f"persistence_location {workdir}/"
        elif len(words) == 2 and words[1].startswith(CONTAINER_SECRETS):
            line = f"{words[0]} {files[words[1].removeprefix(CONTAINER_SECRETS)]}"
        out.append(line)
    return "\n".join(out) + "\n"
