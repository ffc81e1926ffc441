"""docker-compose.yml checked without Docker: mounts, commands, variables, ports, secrets.

Docker cannot run on the development machines, so the file is validated against
what the repo and ``tpo-edge secrets init`` / ``dashboards build`` produce.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from edge.cli import app
from edge.config import SiteConfig, load_site
from edge.secrets import init_secrets
from tests.deploy.helpers import REPO, container_file_map_names

COMPOSE = REPO / "docker-compose.yml"
SITE = REPO / "deploy" / "site.yaml"
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?([^}]*)\}")
DEFAULTED = {"TPO_SITE_FILE"}
"""Variables with a default: paths, never secrets."""
TPO_EDGE_SERVICES = ("agent", "ingest", "sim")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


@pytest.fixture(scope="module")
def site() -> SiteConfig:
    return load_site(SITE)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory, site: SiteConfig) -> dict[str, Any]:
    """``secrets init`` (with the simulator account) and ``dashboards build``."""
    root = tmp_path_factory.mktemp("stack")
    result = init_secrets(site, root / "secrets", root / ".env", sim=True)
    grafana = root / "deploy" / "grafana"
    out = subprocess.run(
        [sys.executable, "-m", "edge", "dashboards", "build", "--out", str(grafana)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return {"root": root, "result": result, "grafana": grafana}


def _host_path(source: str, generated: dict[str, Any]) -> Path | None:
    """Where a bind mount's host side comes from; None when it is a named volume."""
    source = VAR.sub(lambda m: m.group(3) if m.group(2) == ":-" else m.group(0), source)
    assert "${" not in source, f"mount {source} needs a variable without default"
    if not source.startswith(("./", "/")):
        return None
    rel = Path(source).relative_to(".")
    if rel.parts[0] == "secrets":
        return Path(generated["root"]) / rel
    if rel.parts[:2] == ("deploy", "grafana") and len(rel.parts) > 2:
        return Path(generated["grafana"]).joinpath(*rel.parts[2:])
    return REPO / rel


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        # The host side may hold ${VAR:-default}, whose ':' is not a separator.
        if parts[0].startswith("${"):
            parts = [":".join(parts[:2]), *parts[2:]]
        out.append((parts[0], parts[1]))
    return out


def test_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"mosquitto", "influxdb", "grafana", "agent", "ingest", "sim"}
    assert services["sim"]["profiles"] == ["sim"]
    assert all("profiles" not in s for n, s in services.items() if n != "sim")
    assert services["mosquitto"]["image"] == "eclipse-mosquitto:2"
    assert services["influxdb"]["image"] == "influxdb:2.7"
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"


def test_every_mounted_path_exists(compose: dict[str, Any], generated: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for source, _target in _mounts(service):
            path = _host_path(source, generated)
            if path is not None:
                assert path.exists(), f"{name}: {source} -> {path} missing"
                if name in TPO_EDGE_SERVICES:
                    assert path.name not in {"ca.key", "server.key", "passwd"}, (name, source)


def test_grafana_provisioning_points_at_the_mounted_dashboards(
    compose: dict[str, Any], generated: dict[str, Any]
) -> None:
    mounts = dict(_mounts(compose["services"]["grafana"]))
    dash_target = mounts["./deploy/grafana/dashboards"]
    providers = list((Path(generated["grafana"]) / "provisioning" / "dashboards").glob("*.y*ml"))
    assert providers, "no dashboard provider written"
    built = Path(generated["grafana"]) / "dashboards"
    json_dirs = {p.parent.relative_to(built) for p in built.rglob("*.json")}
    assert json_dirs, "no dashboards built"
    paths = [
        entry["options"]["path"]
        for provider in providers
        for entry in yaml.safe_load(provider.read_text())["providers"]
    ]
    # Every directory of dashboards, as mounted, is what some provider reads.
    for rel in json_dirs:
        mounted = str(Path(dash_target) / rel)
        assert any(mounted == p or (mounted.startswith(p + "/")) for p in paths), (mounted, paths)


def test_grafana_provisioning_variables_are_set(
    compose: dict[str, Any], generated: dict[str, Any]
) -> None:
    env = compose["services"]["grafana"]["environment"]
    provisioning = Path(generated["grafana"]) / "provisioning"
    used = set()
    for path in provisioning.rglob("*.y*ml"):
        text = "\n".join(
            ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")
        )
        used |= set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    assert used, "the datasource should read its settings from the environment"
    assert used <= set(env), used - set(env)


def _parse_cli(args: list[str]) -> dict[str, Any]:
    """Parse like the ``tpo-edge`` entry point would, without running anything."""
    command: Any = typer.main.get_command(app)
    rest = list(args)
    while hasattr(command, "commands"):
        assert rest, f"{args}: a sub-command is missing"
        assert rest[0] in command.commands, f"{args}: no command {rest[0]!r}"
        command, rest = command.commands[rest[0]], rest[1:]
    params: dict[str, Any] = command.make_context(command.name, rest).params
    return params


def test_every_service_command_parses(compose: dict[str, Any]) -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["tpo-edge"]' in dockerfile
    for name in TPO_EDGE_SERVICES:
        service = compose["services"][name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        params = _parse_cli([str(a) for a in service["command"]])
        assert params, name
    with pytest.raises(Exception, match="bogus"):
        _parse_cli(["agent", "-c", "/x", "--bogus"])


def test_agent_and_ingest_run_the_mounted_site(compose: dict[str, Any]) -> None:
    for name in ("agent", "ingest"):
        service = compose["services"][name]
        params = _parse_cli(service["command"])
        mounts = {target: source for source, target in _mounts(service)}
        assert str(params["config"]) in mounts, name
        assert mounts[str(params["config"])].endswith(":-./deploy/site.yaml}")


def test_variables_come_from_the_generated_env(
    compose: dict[str, Any], generated: dict[str, Any]
) -> None:
    text = COMPOSE.read_text()
    used = {m.group(1): m.group(2) for m in VAR.finditer(text)}
    env = generated["result"].env
    for var, op in used.items():
        if var in DEFAULTED:
            assert op == ":-", var
            continue
        assert op == ":?", f"${{{var}}} must fail loudly when missing"
        assert var in env, f"{var} is not written by `tpo-edge secrets init`"


def test_no_literal_secrets(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|SECRET", key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", str(value)), (name, key)
    text = COMPOSE.read_text()
    assert not re.search(r"-P\s+[^\s\"$]", text), "a literal password on a command line"


def test_services_get_the_variables_the_site_names(
    compose: dict[str, Any], site: SiteConfig, generated: dict[str, Any]
) -> None:
    env_of = {n: set((s.get("environment") or {}).keys()) for n, s in compose["services"].items()}
    assert site.broker.password_env in env_of["agent"]
    assert site.secret_env in env_of["agent"]
    assert site.ingest.password_env in env_of["ingest"]
    ingest_broker = site.ingest.broker(site.broker)  # what edge/ingest.py connects with
    assert (ingest_broker.username, ingest_broker.password_env) == (
        "ingest-1",
        site.ingest.password_env,
    )
    assert site.database.token_env in env_of["ingest"]
    env = generated["result"].env
    for var in (site.broker.password_env, site.ingest.password_env, site.database.token_env):
        assert var in env


def test_site_accounts_exist_and_endpoints_match(
    compose: dict[str, Any], site: SiteConfig, generated: dict[str, Any]
) -> None:
    layout = generated["result"].layout
    users = {line.split(":", 1)[0] for line in layout.passwd.read_text().splitlines()}
    assert site.broker.username in users
    assert site.ingest.username in users
    sim_args = compose["services"]["sim"]["command"]
    assert sim_args[sim_args.index("--username") + 1] in users
    assert site.broker.host == "mosquitto"
    assert f"{site.broker.port}:{site.broker.port}" in compose["services"]["mosquitto"]["ports"]
    assert site.database.url == "http://influxdb:8086"
    assert site.broker.tls is not None
    for name in ("agent", "ingest"):
        targets = {t for _s, t in _mounts(compose["services"][name])}
        assert str(site.broker.tls.ca_file) in targets, name
    for source in site.sources:
        if source.type == "mqtt":
            assert source.broker.username in users
            assert source.broker.tls is not None
            assert source.broker.tls.ca_file is not None
            assert source.broker.host == "mosquitto"
            for dev in source.devices:
                assert dev.id in users


def test_sim_serves_what_the_site_reads(compose: dict[str, Any], site: SiteConfig) -> None:
    from sim.campus import load_scenario

    params = _parse_cli(compose["services"]["sim"]["command"])
    mounts = {t: s for s, t in _mounts(compose["services"]["sim"])}
    scenario = load_scenario(REPO / mounts[str(params["scenario"])])
    served = {d.name: d.unit_id for d in scenario.modbus}
    machines = {m.name for m in scenario.opcua.machines}
    for source in site.sources:
        if source.type == "modbus":
            assert (source.host, source.port) == ("sim", params["modbus_port"])
            assert served[source.device] == source.unit_id
        elif source.type == "opcua":
            assert source.endpoint == f"opc.tcp://sim:{params['opcua_port']}/tpo/sim/"
            assert source.device in machines
        else:
            assert {d.id for d in source.devices} == {d.id for d in scenario.field}


def test_deploy_site_reads_the_example_sites_devices(site: SiteConfig) -> None:
    example = load_site(REPO / "edge" / "sites" / "tpo-barleben.yaml")
    ours = {(s.type, s.device): s for s in site.sources}
    assert set(ours) == {(s.type, s.device) for s in example.sources}
    for s in example.sources:
        mine = ours[(s.type, s.device)]
        assert mine.area == s.area
        assert mine.channel_specs() == s.channel_specs()


def test_mosquitto_conf_uses_what_secrets_init_writes(
    compose: dict[str, Any], generated: dict[str, Any]
) -> None:
    conf = (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    words = dict(line.split(None, 1) for line in conf.splitlines() if line and line[0] != "#")
    assert words["allow_anonymous"] == "false"
    assert words["listener"] == "8883"
    assert "port" not in words, "no plain listener"
    service = compose["services"]["mosquitto"]
    mounts = {t: s for s, t in _mounts(service)}
    assert mounts["/mosquitto/config/mosquitto.conf"] == "./deploy/mosquitto/mosquitto.conf"
    script = service["command"][-1]
    referenced = [v for v in words.values() if v.startswith("/mosquitto/secrets/")]
    assert len(referenced) == 5
    for path in referenced:
        name = path.removeprefix("/mosquitto/secrets/")
        assert name in container_file_map_names()
        # Installed by the start command from a mounted file that secrets init produced.
        source = next(t for t in mounts if t.endswith("/" + name) and t in script)
        host = _host_path(mounts[source], generated)
        assert host is not None
        assert host.exists(), host
    assert "/mosquitto/secrets" in service["tmpfs"]


def test_influx_init_script_gets_its_variables(compose: dict[str, Any]) -> None:
    service = compose["services"]["influxdb"]
    script = (REPO / "deploy" / "influxdb" / "10-tpo-v1-compat.sh").read_text()
    needed = set(re.findall(r"\$\{([A-Z0-9_]+)", script))
    provided = set(service["environment"]) | {"DOCKER_INFLUXDB_INIT_BUCKET_ID"}
    assert needed <= provided, needed - provided
    assert "influx v1 dbrp create" in script
    assert "influx v1 auth create" in script
    assert ("./deploy/influxdb", "/docker-entrypoint-initdb.d") in _mounts(service)
    assert (REPO / "deploy" / "influxdb" / "10-tpo-v1-compat.sh").stat().st_mode & 0o111


def test_image_copies_no_secrets() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert dockerfile.splitlines()[2] == "FROM python:3.11-slim"
    copies = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY")]
    sources = [s for c in copies for s in c]
    assert "." not in sources
    for s in sources:
        assert (REPO / s).exists(), s
        assert not s.startswith(("secrets", ".env"))


def test_healthcheck_script() -> None:
    script = REPO / "deploy" / "healthcheck.py"

    def check(*args: str) -> int:
        return subprocess.run([sys.executable, str(script), *args], check=False).returncode

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert check("--listening", str(port)) == 0
        assert check("--connected", str(port)) == 1
        with socket.create_connection(("127.0.0.1", port)):
            assert check("--connected", str(port)) == 0
    assert check("--listening", str(port)) == 1
    assert check("--bogus") == 2
