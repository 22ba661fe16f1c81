"""deploy/docker-compose.yaml and docker/Dockerfile agree with the files they use.

Docker is not needed (nor run): the compose file is read as YAML and every file it mounts, every
port it publishes or that another service dials, every health check and every ``depends_on`` is
checked against the configs in deploy/ (read with edgecloud's own ``load_settings``), the
Prometheus scrape config and the Grafana provisioning files. A renamed file or a port changed
in one place only fails here instead of in someone's ``docker compose up``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from edgecloud import cli
from edgecloud.commands.health import resolve_address
from edgecloud.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> repository path of the service's bind mounts (``./x:/y[:ro]``)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            out[target] = (DEPLOY / source).resolve()
    return out


def host_file(service: dict[str, Any], container_path: str) -> Path:
    """The repository file a container path of ``service`` is mounted from."""
    path = PurePosixPath(container_path)
    for target, source in mounts(service).items():
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return source / path.relative_to(target)
    raise AssertionError(f"{container_path} is not mounted from the repository")


def flag(argv: list[str], name: str) -> str:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def role_of(service: dict[str, Any]) -> str | None:
    command = service.get("command") or []
    return command[0] if service.get("image") == "edgecloud" and command else None


def by_role(services: dict[str, dict[str, Any]], role: str) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if role_of(s) == role}


def server_of(service: dict[str, Any]):
    """The ServerConfig the service's container starts with (its --config file, loaded for real)."""
    role = role_of(service)
    return getattr(load_settings(host_file(service, flag(service["command"], "--config"))), role).server


def published(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port of the service's ``ports``."""
    out = {}
    for entry in service.get("ports", []):  # "HOST:CONTAINER", "IP:HOST:CONTAINER", "PORT[/proto]"
        parts = str(entry).split("/")[0].split(":")
        out[int(parts[-1])] = int(parts[-2] if len(parts) > 1 else parts[-1])
    return out


# ---- the stack -----------------------------------------------------------------------------
def test_services_two_cloud_replicas_an_edge_prometheus_grafana(services) -> None:
    assert len(by_role(services, "cloud")) == 2
    assert list(by_role(services, "edge")) == ["edge"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_every_mounted_file_exists(services) -> None:
    for name, service in services.items():
        for target, source in mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"
            assert ROOT in source.parents, f"{name}: {source} is outside the repository"


def test_depends_on_waits_for_health(services) -> None:
    """Every dependency waits for a health check the dependency really has."""
    assert set(services["edge"]["depends_on"]) == set(by_role(services, "cloud"))
    for name, service in services.items():
        for dep, how in (service.get("depends_on") or {}).items():
            assert how == {"condition": "service_healthy"}, f"{name} -> {dep}: {how}"
            assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name


# ---- ports: configs, edge -> cloud, Prometheus targets -------------------------------------
def test_edgecloud_services_run_with_their_mounted_config(services) -> None:
    for name, service in services.items():
        if role_of(service) is None:
            continue
        assert service["command"][1] == "serve", name
        config = host_file(service, flag(service["command"], "--config"))
        assert config.name == f"{role_of(service)}.yaml", name
        server = server_of(service)
        assert server.host == "0.0.0.0", f"{name}: must listen beyond the container's loopback"
        assert server.port and server.metrics_port, f"{name}: fixed ports needed for the other services"
        exposed = {int(p) for p in service.get("expose", [])} | set(published(service))
        assert {server.port, server.metrics_port} <= exposed, name


def test_edge_dials_every_cloud_replica_on_its_grpc_port(services) -> None:
    (edge,) = by_role(services, "edge").values()
    edge_cfg = load_settings(host_file(edge, flag(edge["command"], "--config"))).edge
    wanted = [f"{name}:{server_of(s).port}" for name, s in by_role(services, "cloud").items()]
    dialed = getattr(edge_cfg.cloud, "addresses", None)  # the config's own parsing, where it has one
    if dialed is None:
        dialed = [a.strip() for a in edge_cfg.cloud.address.split(",")]
    assert list(dialed) == wanted
    assert published(edge) == {edge_cfg.server.port: edge_cfg.server.port}


def test_prometheus_scrapes_every_metrics_port_and_loads_the_rules(services) -> None:
    prom = services["prometheus"]
    config_path = host_file(prom, flag(prom["command"], "--config.file"))
    config = yaml.safe_load(config_path.read_text())
    for rule_file in config["rule_files"]:
        assert (config_path.parent / rule_file).is_file(), rule_file
    assert "alerts.yml" in config["rule_files"]
    targets: dict[str, list[str]] = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            targets.setdefault(static["labels"]["role"], []).extend(static["targets"])
    for role in ("edge", "cloud"):
        want = [f"{name}:{server_of(s).metrics_port}" for name, s in by_role(services, role).items()]
        assert targets[role] == want, role
    assert 9090 in published(prom)


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard(services) -> None:
    grafana = services["grafana"]
    (source,) = yaml.safe_load(host_file(grafana, "/etc/grafana/provisioning/datasources/prometheus.yml")
                               .read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == f"http://prometheus:{next(iter(published(services['prometheus'])))}"
    provisioning = host_file(grafana, "/etc/grafana/provisioning/dashboards")
    (provider,) = [p for f in provisioning.glob("*.yml") for p in yaml.safe_load(f.read_text())["providers"]]
    dashboards = host_file(grafana, provider["options"]["path"])
    assert (dashboards / "edgecloud.json").is_file()
    home = host_file(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    dashboard = json.loads(home.read_text())
    assert dashboard["uid"] == "edgecloud"
    (ds_var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["query"] == source["type"]


# ---- health checks: the command exists and probes the port the server binds ---------------
def test_edgecloud_health_checks_probe_the_configured_grpc_port(services) -> None:
    parser = cli.build_parser()
    for name, service in services.items():
        if role_of(service) is None:
            continue
        argv = service["healthcheck"]["test"][1:]
        assert argv[:2] == ["edgecloud", "health"], name
        args = parser.parse_args(argv[1:])
        config = host_file(service, args.config)
        assert args.config == flag(service["command"], "--config"), f"{name}: probes another config"
        assert resolve_address(args.address, str(config), args.role) == f"127.0.0.1:{server_of(service).port}"


def _dockerfile_runtime() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile's last stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    last = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines[last:]]


def test_dockerfile_healthcheck_matches_its_default_command_and_ports() -> None:
    runtime = _dockerfile_runtime()
    (check,) = [args for ins, args in runtime if ins == "HEALTHCHECK"]
    (cmd,) = [json.loads(args) for ins, args in runtime if ins == "CMD"]
    probe = json.loads(check[check.index("CMD") + 3:].strip())
    assert probe[:2] == ["edgecloud", "health"]
    args = cli.build_parser().parse_args(probe[1:])
    assert args.config == flag(cmd, "--config")  # the server the image starts by default
    assert ("USER", "edgecloud") in runtime
    exposed = {int(p) for ins, args in runtime if ins == "EXPOSE" for p in args.split()}
    for name in ("edge", "cloud"):
        server = getattr(load_settings(DEPLOY / f"{name}.yaml"), name).server
        assert {server.port, server.metrics_port} <= exposed, name
