"""``tpo-edge secrets init``: files, modes, accounts, ACL, idempotence, and no secret printed."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge.cli import app
from edge.errors import ConfigError
from edge.secrets import (
    hash_password,
    init_secrets,
    read_env,
    server_cert_names,
    site_accounts,
    verify_password,
)
from edge.services import find_binary
from tests.conftest import require_binary
from tests.deploy.helpers import REPO, field_site


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    ours = hash_password("s3cret", salt=b"0123456789ab")
    assert ours.startswith("$7$101$")
    assert verify_password("s3cret", ours)
    assert not verify_password("s3cret!", ours)
    binary = require_binary("mosquitto_passwd", "mosquitto")
    pw = tmp_path / "pw"
    subprocess.run([binary, "-b", "-c", str(pw), "alice", "s3cret"], check=True)
    theirs = pw.read_text().strip().split(":", 1)[1]
    assert verify_password("s3cret", theirs)
    assert theirs.split("$")[:3] == ours.split("$")[:3]  # same scheme and iteration count


def test_accounts_and_acl(tmp_path: Path) -> None:
    result = init_secrets(field_site(), tmp_path / "s", tmp_path / ".env", ingest_workers=2)
    names = {a.name: a.role for a in result.accounts}
    assert names == {
        "it-edge": "agent",
        "ingest-1": "ingest",
        "ingest-2": "ingest",
        "bench-01": "bench",
        "bench-02": "bench",
        "charger-01": "charger",
        "healthcheck": "health",
    }
    acl = result.layout.acl.read_text()
    blocks = {
        b.splitlines()[0]: [x for x in b.splitlines()[1:] if x.startswith("topic")]
        for b in acl.split("\nuser ")[1:]
    }
    assert blocks["bench-01"] == ["topic write field/bench/bench-01/#"]
    assert blocks["charger-01"] == ["topic write field/charger/charger-01/#"]
    assert blocks["it-edge"] == [
        "topic write tpo/v1/tpo/#",
        "topic read field/#",
        "topic read tpo/v1/tpo/_agent/it-edge/stored",  # its own confirmations only
        "topic read tpo/v1/tpo/_ingest/+/status",
    ]
    assert blocks["ingest-1"] == [
        "topic read tpo/v1/tpo/#",
        "topic read $share/ingest/tpo/v1/tpo/#",
        "topic write tpo/v1/tpo/_agent/+/stored",  # delivery confirmations, nothing else
        "topic write tpo/v1/tpo/_ingest/+/status",
    ]
    # Nothing before the first `user` line: anonymous clients get no topic at all.
    assert all(line.startswith("#") or not line for line in acl.split("\nuser ")[0].splitlines())
    users = [line.split(":", 1)[0] for line in result.layout.passwd.read_text().splitlines()]
    assert sorted(users) == sorted(names)


def test_sim_account_only_on_request(tmp_path: Path) -> None:
    assert "fieldsim" not in {a.name for a in site_accounts(field_site())}
    accounts = {a.name: a for a in site_accounts(field_site(), sim=True)}
    assert accounts["fieldsim"].acl == ("topic write field/#",)


def test_files_are_private(tmp_path: Path) -> None:
    result = init_secrets(field_site(), tmp_path / "s", tmp_path / ".env")
    layout = result.layout
    assert _mode(layout.root) == 0o700
    for private in (layout.env_file, layout.passwd, layout.acl, layout.ca_key, layout.server_key):
        assert _mode(private) == 0o600, private
    for cred in layout.credentials.iterdir():
        assert _mode(cred) == 0o600, cred
    assert _mode(layout.ca_cert) == 0o644


def test_rerun_keeps_secrets_force_replaces_them(tmp_path: Path) -> None:
    first = init_secrets(field_site(), tmp_path / "s", tmp_path / ".env")
    ca = first.layout.ca_cert.read_bytes()
    again = init_secrets(field_site(), tmp_path / "s", tmp_path / ".env")
    assert again.env == first.env
    assert again.layout.ca_cert.read_bytes() == ca
    forced = init_secrets(field_site(), tmp_path / "s", tmp_path / ".env", force=True)
    assert forced.layout.ca_cert.read_bytes() != ca
    assert forced.env["TPO_AGENT_MQTT_PASSWORD"] != first.env["TPO_AGENT_MQTT_PASSWORD"]
    assert read_env(tmp_path / ".env") == forced.env


def test_env_and_credentials_agree(tmp_path: Path) -> None:
    result = init_secrets(field_site(), tmp_path / "s", tmp_path / ".env")
    cred = result.layout.credentials
    assert result.env["TPO_AGENT_MQTT_PASSWORD"] == (cred / "it-edge").read_text().strip()
    assert result.env["TPO_INGEST_MQTT_PASSWORD"] == (cred / "ingest-1").read_text().strip()
    hashes = dict(
        line.split(":", 1) for line in result.layout.passwd.read_text().splitlines() if line
    )
    for account in result.accounts:
        assert verify_password((cred / account.name).read_text().strip(), hashes[account.name])
    secrets = [v for k, v in result.env.items() if k.endswith(("PASSWORD", "TOKEN", "SECRET"))]
    assert len(set(secrets)) == len(secrets)  # all distinct
    assert all(len(s) >= 40 for s in secrets)


def test_certificate_names(tmp_path: Path) -> None:
    result = init_secrets(
        field_site(), tmp_path / "s", tmp_path / ".env", extra_names=("edge.tpo.example",)
    )
    names = server_cert_names(result.layout.server_cert.read_bytes())
    assert {"mosquitto", "localhost", "127.0.0.1", "edge.tpo.example"} <= names


def test_clashing_account_names_are_an_error(tmp_path: Path) -> None:
    site = field_site(agent={"id": "bench-01"})
    with pytest.raises(ConfigError, match="bench-01"):
        init_secrets(site, tmp_path / "s", tmp_path / ".env")


def test_cli_prints_paths_and_accounts_never_secrets(tmp_path: Path) -> None:
    site_file = tmp_path / "site.yaml"
    site_file.write_text(field_site().model_dump_json())
    env_file = tmp_path / ".env"
    args = ["secrets", "init", "--site", str(site_file), "--dir", str(tmp_path / "s")]
    out = CliRunner().invoke(app, [*args, "--env-file", str(env_file), "--sim"])
    assert out.exit_code == 0, out.output
    assert "account bench-01 (bench)" in out.output
    assert "account fieldsim (sim)" in out.output
    assert str(env_file) in out.output
    env = read_env(env_file)
    leaked = [k for k, v in env.items() if len(v) >= 20 and v in out.output]
    assert not leaked
    for key in (tmp_path / "s" / "tls").iterdir():
        if key.suffix == ".key":
            assert key.read_text().splitlines()[1] not in out.output


def test_generated_files_are_git_ignored() -> None:
    git = find_binary("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [".env", "secrets/tls/ca.key", "secrets/mosquitto/passwd", "secrets/mqtt/credentials/x"]
    out = subprocess.run(
        [git, "check-ignore", *paths], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert sorted(out.stdout.split()) == sorted(paths)
