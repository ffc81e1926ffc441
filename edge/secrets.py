"""``tpo-edge secrets init``: the CA, broker certificate, broker accounts, ACL and ``.env``.

Everything written here is git-ignored (``secrets/``, ``.env``) and private
(directories 0700, files 0600 except the public certificates). Secrets are
never printed or logged: output names paths and account names only.

Broker accounts, one per principal, so one leaked password never lets a device
speak for another:

- the agent (``broker.username`` of the site, else its agent id): publishes
  ``tpo/v1/<site>/#``, subscribes ``field/#``, reads its own delivery confirmations
  ``tpo/v1/<site>/_agent/<agent id>/stored`` (no other agent's) and the ingest workers'
  status ``tpo/v1/<site>/_ingest/+/status``;
- each ingest worker (``ingest-1`` ...): subscribes ``tpo/v1/<site>/#``, also
  through the shared subscription ``$share/<group>/tpo/v1/<site>/#``; publishes only
  delivery confirmations ``tpo/v1/<site>/_agent/+/stored`` and its own status
  ``tpo/v1/<site>/_ingest/+/status`` (see :mod:`edge.confirm`);
- each field device of the site's MQTT sources: a bench publishes only
  ``field/bench/<id>/#``, a charger only ``field/charger/<id>/#``;
- ``healthcheck``: reads ``$SYS/broker/uptime`` (the container health check);
- ``fieldsim`` (only with ``--sim``): the simulator, which publishes for every
  simulated device and so may publish ``field/#``; leave it out on a campus
  with real devices.

Re-running keeps every existing password, key and certificate (new devices get
new accounts) unless ``--force``; the password file and ACL are always
rewritten from the site file.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from edge.errors import ConfigError

if TYPE_CHECKING:
    from edge.config import SiteConfig

Role = Literal["agent", "ingest", "bench", "charger", "health", "sim"]

PBKDF2_ITERATIONS = 101
"""mosquitto 2.0's default for its ``$7$`` (PBKDF2-SHA512) password hashes."""
SALT_BYTES = 12
HASH_BYTES = 64

SERVER_NAMES = ("mosquitto", "localhost", "127.0.0.1")
"""Names in the broker certificate: the compose service, and loopback for health checks."""

HEALTH_ACCOUNT = "healthcheck"
SIM_ACCOUNT = "fieldsim"
DEFAULT_AGENT_PASSWORD_ENV = "TPO_AGENT_MQTT_PASSWORD"  # noqa: S105 - a variable's name
DEFAULT_INGEST_PASSWORD_ENV = "TPO_INGEST_MQTT_PASSWORD"  # noqa: S105 - a variable's name
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PRIVATE_DIR = 0o700
_PRIVATE_FILE = 0o600
_PUBLIC_FILE = 0o644


@dataclass(frozen=True, slots=True)
class Account:
    """One broker account: its name, role, ACL lines and the ``.env`` variable of its password."""

    name: str
    role: Role
    acl: tuple[str, ...]
    env: str | None = None
    """Variable in ``.env`` holding the password (None: only in ``secrets/mqtt/credentials``)."""


@dataclass(frozen=True, slots=True)
class SecretsLayout:
    """Where ``secrets init`` writes; relative names are what docker-compose.yml mounts."""

    root: Path
    env_file: Path

    @property
    def tls(self) -> Path:
        """Certificates and keys."""
        return self.root / "tls"

    @property
    def mosquitto(self) -> Path:
        """Broker password file and ACL."""
        return self.root / "mosquitto"

    @property
    def credentials(self) -> Path:
        """One file per broker account holding its password (for provisioning devices)."""
        return self.root / "mqtt" / "credentials"

    @property
    def ca_cert(self) -> Path:
        """The CA certificate every client trusts."""
        return self.tls / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The CA key (issue further certificates with it; never leaves the server)."""
        return self.tls / "ca.key"

    @property
    def server_cert(self) -> Path:
        """The broker's certificate (with the CA appended: full chain)."""
        return self.tls / "server.pem"

    @property
    def server_key(self) -> Path:
        """The broker's key."""
        return self.tls / "server.key"

    @property
    def passwd(self) -> Path:
        """Mosquitto ``password_file``."""
        return self.mosquitto / "passwd"

    @property
    def acl(self) -> Path:
        """Mosquitto ``acl_file``."""
        return self.mosquitto / "acl"


@dataclass
class InitResult:
    """What ``init`` did: paths written, accounts, and which secrets were new."""

    layout: SecretsLayout
    accounts: list[Account]
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """The full ``.env`` contents (secret: never print the values)."""


# -- mosquitto files ---------------------------------------------------------------------


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A mosquitto 2.0 password hash: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>``.

    Written here rather than with ``mosquitto_passwd -b``, which would put the
    password on a command line (visible to every local user in the process list).
    """
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS, HASH_BYTES)
    b64 = base64.b64encode
    return f"$7${PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Check a password against a ``$7$`` hash (as mosquitto does)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    salt, expected = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(expected))
    return secrets.compare_digest(digest, expected)


def password_file_text(passwords: dict[str, str]) -> str:
    """The mosquitto password file for ``{account: password}``."""
    return "".join(f"{name}:{hash_password(pw)}\n" for name, pw in passwords.items())


def acl_text(accounts: list[Account], site: str) -> str:
    """The mosquitto ACL: every account's lines; nothing for anonymous clients."""
    lines = [
        f"# mosquitto ACL of site {site}, written by `tpo-edge secrets init` (do not edit:",
        "# re-run it after changing the site file). Anonymous clients get nothing.",
    ]
    for account in accounts:
        lines += ["", f"# {account.role}", f"user {account.name}", *account.acl]
    return "\n".join(lines) + "\n"


# -- accounts from the site file ---------------------------------------------------------


def _env_var(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def site_accounts(site: SiteConfig, *, ingest_workers: int = 1, sim: bool = False) -> list[Account]:
    """Every broker account the site needs, with its ACL lines."""
    from drivers.mqtt.config import MqttFieldSource  # noqa: PLC0415

    prefix = f"tpo/v1/{site.site}"
    group = site.ingest.share_group or "ingest"
    agent_name = site.broker.username or site.agent.id
    accounts = [
        Account(
            agent_name,
            "agent",
            (
                f"topic write {prefix}/#",
                "topic read field/#",
                f"topic read {prefix}/_agent/{site.agent.id}/stored",
                f"topic read {prefix}/_ingest/+/status",
            ),
            site.broker.password_env or DEFAULT_AGENT_PASSWORD_ENV,
        )
    ]
    ingest_acl = (
        f"topic read {prefix}/#",
        f"topic read $share/{group}/{prefix}/#",
        f"topic write {prefix}/_agent/+/stored",
        f"topic write {prefix}/_ingest/+/status",
    )
    first_ingest = site.ingest.username or "ingest-1"
    first_env = site.ingest.password_env or DEFAULT_INGEST_PASSWORD_ENV
    accounts.append(Account(first_ingest, "ingest", ingest_acl, first_env))
    accounts += [
        Account(f"ingest-{n}", "ingest", ingest_acl, f"TPO_INGEST_{n}_MQTT_PASSWORD")
        for n in range(2, ingest_workers + 1)
    ]
    for source in site.sources:
        if not isinstance(source, MqttFieldSource):
            continue
        if source.broker.username and source.broker.username != agent_name:
            accounts.append(
                Account(
                    source.broker.username,
                    "agent",
                    ("topic read field/#",),
                    source.broker.password_env or _env_var(source.broker.username) + "_PASSWORD",
                )
            )
        accounts += [
            Account(dev.id, dev.kind, (f"topic write field/{dev.kind}/{dev.id}/#",))
            for dev in source.devices
        ]
    accounts.append(
        Account(
            HEALTH_ACCOUNT, "health", ("topic read $SYS/broker/uptime",), "TPO_HEALTH_MQTT_PASSWORD"
        )
    )
    if sim:
        accounts.append(
            Account(SIM_ACCOUNT, "sim", ("topic write field/#",), "TPO_SIM_MQTT_PASSWORD")
        )
    _check_unique(accounts)
    return accounts


def _check_unique(accounts: list[Account]) -> None:
    by_name: dict[str, Account] = {}
    for account in accounts:
        other = by_name.get(account.name)
        if other is not None and other != account:
            raise ConfigError(
                "broker accounts",
                [(account.name, None, f"account name used by a {other.role} and a {account.role}")],
            )
        by_name[account.name] = account
        if account.env is not None and not _ENV_NAME.match(account.env):
            raise ConfigError("broker accounts", [(account.name, None, f"bad env {account.env}")])
    accounts[:] = list(by_name.values())


# -- certificates ------------------------------------------------------------------------


def _write(path: Path, data: bytes | str, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=_PRIVATE_DIR)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, raw)
    finally:
        os.close(fd)
    tmp.chmod(mode)
    tmp.replace(path)


def make_ca(common_name: str, days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed CA: (certificate PEM, key PEM)."""
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def make_server_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, names: tuple[str, ...], days: int = 825
) -> tuple[bytes, bytes]:
    """A TLS server certificate signed by the CA with ``names`` as SANs: (cert PEM, key PEM)."""
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("secrets", [("tls.ca.key", None, "expected an EC key")])
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def server_cert_names(cert_pem: bytes) -> set[str]:
    """The SAN entries (DNS names and IPs as text) of a certificate."""
    from cryptography import x509  # noqa: PLC0415

    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return set(san.get_values_for_type(x509.DNSName)) | ips


# -- .env --------------------------------------------------------------------------------


def read_env(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of an env file (comments and blanks skipped)."""
    if not path.exists():
        return {}
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def new_secret() -> str:
    """A random secret safe in URLs, env files, YAML and shells (256 bits)."""
    return secrets.token_urlsafe(32)


def _env_values(site: SiteConfig, accounts: list[Account], old: dict[str, str]) -> dict[str, str]:
    """Every variable docker-compose.yml needs; secrets kept from ``old`` when present."""
    db = site.database

    def secret(key: str) -> str:
        return old.get(key) or new_secret()

    env: dict[str, str] = {
        "TPO_SITE": site.site,
        "TPO_AGENT_MQTT_USER": accounts[0].name,
        "TPO_INGEST_MQTT_USER": next(a.name for a in accounts if a.role == "ingest"),
    }
    env.update({a.env: secret(a.env) for a in accounts if a.env is not None})
    env["TPO_SIM_MQTT_PASSWORD"] = secret("TPO_SIM_MQTT_PASSWORD")
    env[site.secret_env] = secret(site.secret_env)
    env["INFLUX_ORG"] = db.org or site.site
    env["INFLUX_BUCKET"] = db.bucket or db.database
    env["INFLUX_DB"] = db.database
    env["INFLUX_ADMIN_USER"] = old.get("INFLUX_ADMIN_USER", "tpo-admin")
    env["INFLUX_ADMIN_PASSWORD"] = secret("INFLUX_ADMIN_PASSWORD")
    token_env = db.token_env or "INFLUX_ADMIN_TOKEN"
    env[token_env] = secret(token_env)
    env["INFLUX_ADMIN_TOKEN"] = env[token_env]
    env["INFLUX_READ_USER"] = old.get("INFLUX_READ_USER", "grafana")
    env["INFLUX_READ_PASSWORD"] = secret("INFLUX_READ_PASSWORD")
    env["GRAFANA_ADMIN_USER"] = old.get("GRAFANA_ADMIN_USER", "tpo-admin")
    env["GRAFANA_ADMIN_PASSWORD"] = secret("GRAFANA_ADMIN_PASSWORD")
    return env


def env_text(env: dict[str, str]) -> str:
    """The ``.env`` file."""
    head = [
        "# Written by `tpo-edge secrets init`. Private (mode 0600): never commit, never paste.",
        "# docker compose reads it; re-running init keeps these values unless --force.",
    ]
    return "\n".join([*head, *(f"{k}={v}" for k, v in env.items())]) + "\n"


# -- init --------------------------------------------------------------------------------


def init_secrets(
    site: SiteConfig,
    root: Path,
    env_file: Path,
    *,
    force: bool = False,
    ingest_workers: int = 1,
    sim: bool = False,
    extra_names: tuple[str, ...] = (),
) -> InitResult:
    """Write CA, broker certificate, accounts, password file, ACL and ``.env``."""
    layout = SecretsLayout(root, env_file)
    accounts = site_accounts(site, ingest_workers=ingest_workers, sim=sim)
    result = InitResult(layout, accounts)
    root.mkdir(parents=True, exist_ok=True, mode=_PRIVATE_DIR)
    root.chmod(_PRIVATE_DIR)

    def put(path: Path, data: bytes | str, mode: int) -> None:
        _write(path, data, mode)
        result.written.append(path)

    # The CA and the server certificate: kept unless forced or the names changed.
    names = tuple(dict.fromkeys((*SERVER_NAMES, *extra_names)))
    if force or not (layout.ca_cert.exists() and layout.ca_key.exists()):
        ca_pem, ca_key = make_ca(f"tpo-edge {site.site} CA")
        put(layout.ca_cert, ca_pem, _PUBLIC_FILE)
        put(layout.ca_key, ca_key, _PRIVATE_FILE)
        fresh_ca = True
    else:
        ca_pem, ca_key = layout.ca_cert.read_bytes(), layout.ca_key.read_bytes()
        result.kept += [layout.ca_cert, layout.ca_key]
        fresh_ca = False
    have_server = layout.server_cert.exists() and layout.server_key.exists()
    if (
        fresh_ca
        or not have_server
        or not set(names) <= server_cert_names(layout.server_cert.read_bytes())
    ):
        cert, key = make_server_cert(ca_pem, ca_key, names)
        put(layout.server_cert, cert + ca_pem, _PUBLIC_FILE)
        put(layout.server_key, key, _PRIVATE_FILE)
    else:
        result.kept += [layout.server_cert, layout.server_key]

    # Passwords: one per account, kept across runs unless forced.
    old_env = {} if force else read_env(env_file)
    passwords: dict[str, str] = {}
    for account in accounts:
        cred = layout.credentials / account.name
        known = None if force else _read_secret(cred)
        if known is None and account.env is not None:
            known = old_env.get(account.env)
        passwords[account.name] = known or new_secret()
        if known is None or not cred.exists():
            put(cred, passwords[account.name] + "\n", _PRIVATE_FILE)
        else:
            result.kept.append(cred)
    env = _env_values(site, accounts, old_env)
    env.update({a.env: passwords[a.name] for a in accounts if a.env is not None})
    put(layout.passwd, password_file_text(passwords), _PRIVATE_FILE)
    put(layout.acl, acl_text(accounts, site.site), _PRIVATE_FILE)
    put(env_file, env_text(env), _PRIVATE_FILE)
    result.env = env
    return result


def _read_secret(path: Path) -> str | None:
    if not path.exists():
        return None
    value = path.read_text().strip()
    return value or None


# -- CLI ---------------------------------------------------------------------------------

cli = typer.Typer(help="Generate and manage the stack's secrets (all git-ignored).")


@cli.command("init")
def init_command(
    site_file: Annotated[
        Path, typer.Option("--site", help="Site file: agent id and field devices.")
    ] = Path("deploy/site.yaml"),
    directory: Annotated[Path, typer.Option("--dir", help="Secrets directory.")] = Path("secrets"),
    env_file: Annotated[Path, typer.Option("--env-file", help="Env file for compose.")] = Path(
        ".env"
    ),
    force: Annotated[bool, typer.Option("--force", help="Regenerate everything.")] = False,
    ingest_workers: Annotated[int, typer.Option(min=1, help="Ingest worker accounts.")] = 1,
    sim: Annotated[
        bool, typer.Option("--sim", help="Add the simulator account (may publish field/#).")
    ] = False,
    san: Annotated[
        list[str] | None,
        typer.Option("--san", help="Extra broker certificate name (the server's DNS name)."),
    ] = None,
) -> None:
    """Generate the CA, broker certificate, broker accounts, ACL and .env (prints no secret)."""
    from edge.config import load_site  # noqa: PLC0415

    site = load_site(site_file)
    result = init_secrets(
        site,
        directory,
        env_file,
        force=force,
        ingest_workers=ingest_workers,
        sim=sim,
        extra_names=tuple(san or ()),
    )
    for path in result.written:
        typer.echo(f"wrote {path}")
    for path in result.kept:
        typer.echo(f"kept  {path}")
    for account in result.accounts:
        typer.echo(f"account {account.name} ({account.role})")
