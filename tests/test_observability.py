"""The dashboard and the alerting rules work on what edgecloud really exports.

Real servers and a real Prometheus, no mocks: two cloud replicas and an edge daemon (the tiny
bundle) on 127.0.0.1 serve a trickle of requests while ``prometheus`` scrapes the three
``/metrics`` endpoints every second and evaluates deploy/prometheus/alerts.yml. Then every
expression of every dashboard panel (Grafana variables substituted) and every rule expression is
run through Prometheus's HTTP API: each must parse and evaluate, and those whose series must exist
after healthy traffic (exit rate, latency, bytes offloaded, energy, ...) must return data.
``promtool`` checks the rules and config, and ``promtool test rules`` proves the alerts fire on
synthetic series (deploy/prometheus/alerts_test.yml). Skipped when prometheus/promtool are not
installed (Debian/Ubuntu: ``apt-get install prometheus``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from edgecloud.config import load_settings
from edgecloud.serving.metrics import Metrics
from edgecloud.protocol import codec, pb, pb_grpc

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "edgecloud.json"
PROM_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
PROMETHEUS = shutil.which("prometheus") or next((p for p in ["/usr/bin/prometheus"] if os.access(p, os.X_OK)), None)
PROMTOOL = shutil.which("promtool") or next((p for p in ["/usr/bin/promtool"] if os.access(p, os.X_OK)), None)
NULL = open(os.devnull, "w")  # noqa: SIM115 - start-up lines of in-process servers
WAIT_S = 45.0  # upper bound of every wait for Prometheus (scrapes every 1 s); not a timing assertion

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)")

# Grafana's built-in interval variables, as a Grafana with a 1-5 s scrape interval would set them.
GRAFANA_BUILTINS = {"__rate_interval": "30s", "__interval": "15s", "__range": "5m", "__range_s": "300"}
# Families that exist once healthy traffic went through edge and cloud (no failure, no refusal).
AFTER_TRAFFIC = {
    "edgecloud_requests_total", "edgecloud_samples_total", "edgecloud_energy_joules_total",
    "edgecloud_request_duration_seconds_bucket", "edgecloud_offload_bytes_total",
    "edgecloud_batch_size_sum", "edgecloud_batch_size_count", "edgecloud_queue_depth",
    "edgecloud_circuit_breaker_open", "edgecloud_exit_threshold", "up",
}
# Selectors that only match after something went wrong.
ONLY_ON_TROUBLE = re.compile(r'RESOURCE_EXHAUSTED|ALERTS')


# ---- what edgecloud exports ----------------------------------------------------------------
def exported() -> dict[str, set[str]]:
    """Every sample name edgecloud can export -> its label names (from edgecloud.serving.metrics itself).

    Read from the collectors' definitions (prometheus_client keeps name, type and label names
    on them), not from a scrape: a labelled family has no sample until it is first used."""
    metrics = Metrics("edge")
    out: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        name, kind, labels = collector._name, collector._type, set(collector._labelnames)
        suffixes = {"counter": ["_total", "_created"], "gauge": [""], "info": ["_info"],
                    "histogram": ["_bucket", "_sum", "_count", "_created"]}[kind]
        for suffix in suffixes:
            out[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


TARGET_LABELS = {"instance", "job", "role"}  # set by Prometheus and deploy/prometheus/prometheus.yml


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of every panel, rows included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in walk(dashboard["panels"]) for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    """Grafana's variables replaced as Grafana would with every option of a variable selected."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = dict(GRAFANA_BUILTINS)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            values[var["name"]] = var["allValue"]

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown Grafana variable ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def families(expr: str) -> set[str]:
    """Metric names an expression selects (edgecloud_*, up, ALERTS; not recording-rule names)."""
    names = set(re.findall(r"\b(edgecloud_[a-z_]+|up|ALERTS)\b\s*(?=[{\[)\s])", expr))
    return names


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names in its {...} selector) for every selector of ``expr``."""
    return [(name, set(re.findall(r"(\w+)\s*[=!~]+\s*\"", body)))
            for name, body in re.findall(r"\b(edgecloud_[a-z_]+)\{([^}]*)\}", expr)]


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
            for label in group.split(",") if label.strip()}


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_only_exported_metric_names_and_labels(source: str) -> None:
    """A typo in a family or label name would evaluate fine and show nothing forever."""
    known = exported()
    all_labels = set().union(*known.values()) | TARGET_LABELS | {"alertname", "alertstate"}
    exprs = ([e for _, e in dashboard_targets()] if source == "dashboard"
             else [r["expr"] for r in rules()])
    assert exprs
    for expr in exprs:
        for name in families(expr) - {"up", "ALERTS"}:
            assert name in known, f"{name} is not exported by edgecloud (edgecloud/serving/metrics.py): {expr}"
        for name, labels in selector_labels(expr):
            unknown = labels - known[name] - TARGET_LABELS
            assert not unknown, f"{name} has no label {unknown}: {expr}"
        assert grouping_labels(expr) <= all_labels, f"unknown label in by/on: {expr}"


def test_rules_have_for_severity_and_summary() -> None:
    alerts = [r for r in rules() if "alert" in r]
    names = {r["alert"] for r in alerts}
    for wanted in ("EdgecloudCloudUnreachable", "EdgecloudCircuitBreakerOpen", "EdgecloudExitRateDrift",
                   "EdgecloudQueueSaturated", "EdgecloudEnergyPerInferenceOverBudget"):
        assert wanted in names
    for rule in alerts:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


# ---- promtool ------------------------------------------------------------------------------
def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_check_rules_and_config() -> None:
    proc = promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout
    proc = promtool("check", "config", str(PROM_DIR / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_every_alert_fires_in_promtool_unit_tests() -> None:
    """alerts_test.yml fires each alert on synthetic series (and keeps healthy neighbours quiet)."""
    proc = promtool("test", "rules", str(PROM_DIR / "alerts_test.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tested for case in test.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    assert fired == {r["alert"] for r in rules() if "alert" in r}


# ---- the live stack ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Live:
    url: str
    edge: Any
    clouds: list[Any]
    log: Path

    def get(self, path: str, **params: str) -> dict[str, Any]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as reply:
            return json.loads(reply.read())

    def query(self, expr: str) -> dict[str, Any]:
        """``/api/v1/query``; an expression Prometheus rejects comes back as status error."""
        data = urllib.parse.urlencode({"query": expr}).encode()
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query", data=data, timeout=10) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry the error as JSON
            return json.loads(exc.read())

    def wait(self, what: str, ready: Any) -> Any:
        """Poll ``ready()`` until it returns something truthy (Prometheus scrapes every second)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            got = ready()
            if got:
                return got
            time.sleep(0.25)
        tail = self.log.read_text()[-3000:] if self.log.exists() else ""
        pytest.fail(f"Prometheus: {what} not reached within {WAIT_S:.0f} s\n{tail}")


def cloud_settings(repo: Path):
    return load_settings(None, {"cloud": {
        "repository": str(repo), "intra_op_threads": 1, "allow_spinning": False,
        "server": {"shutdown_grace_s": 0.5}, "batching": {"max_queue_delay_ms": 1.0},
    }})


def edge_settings(repo: Path, cloud_address: str):
    return load_settings(None, {"edge": {
        "repository": str(repo), "server": {"shutdown_grace_s": 0.5},
        "batching": {"max_queue_delay_ms": 1.0},
        "cloud": {"address": cloud_address, "timeout_s": 2.0},
    }})


def send_to_cloud(address: str, model: str = "tiny") -> None:
    """One request straight to a cloud replica, shaped by its own model metadata."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=10)
        spec = meta.inputs[0]
        shape = [2 if d < 0 else int(d) for d in spec.shape]
        dtype = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8}[spec.datatype]
        x = np.random.default_rng(1).random(shape).astype(dtype)
        stub.ModelInfer(codec.encode_request(model, {spec.name: x}), timeout=10)


@pytest.fixture(scope="module")
def live(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    from edgecloud.cloud.server import build_cloud_server
    from edgecloud.edge.server import build_edge_server

    tmp = tmp_path_factory.mktemp("prometheus")
    clouds = [build_cloud_server(cloud_settings(tiny_repo)) for _ in range(2)]
    for cloud in clouds:
        cloud.start()
    edge = build_edge_server(edge_settings(tiny_repo, clouds[0].address), out=NULL).start()
    stop = threading.Event()

    def traffic() -> None:
        """A trickle through the edge (about half offloaded) so every rate has data."""
        rng = np.random.default_rng(0)
        with grpc.insecure_channel(edge.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                x = rng.random((8, 1, 28, 28), dtype=np.float32)
                try:
                    stub.ModelInfer(codec.encode_request("tiny", {"INPUT": x}), timeout=10)
                except grpc.RpcError:
                    if stop.is_set():  # the servers are going away at teardown
                        return
                    raise
                stop.wait(0.1)

    sender = threading.Thread(target=traffic, name="observability-traffic", daemon=True)
    proc = None
    try:
        send_to_cloud(clouds[1].address)  # the second replica has series too (queue depth per replica)
        # Every series exists before the first scrape: 32 noise samples, about half offloaded.
        with grpc.insecure_channel(edge.address) as channel:
            x = np.random.default_rng(1).random((32, 1, 28, 28), dtype=np.float32)
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                codec.encode_request("tiny", {"INPUT": x}), timeout=30)
            assert codec.read_parameters(reply.parameters)["cloud_samples"] > 0
        sender.start()
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": "edgecloud-edge", "static_configs": [
                    {"targets": [f"127.0.0.1:{edge.metrics_port}"], "labels": {"role": "edge"}}]},
                {"job_name": "edgecloud-cloud", "static_configs": [
                    {"targets": [f"127.0.0.1:{c.metrics_port}" for c in clouds], "labels": {"role": "cloud"}}]},
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = tmp / "prometheus.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
            )
        live = Live(f"http://127.0.0.1:{port}", edge, clouds, log)

        def up() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                targets = live.get("/api/v1/targets")["data"]["activeTargets"]
            except OSError:
                return False
            return len(targets) == 3 and all(t["health"] == "up" for t in targets)

        live.wait("all 3 targets up", up)
        # rate() needs two scrapes of every target (each target has its own scrape phase)
        live.wait("3 scrapes of every target", lambda: live.query(
            'count(count_over_time(up[30s]) >= 3) == 3')["data"]["result"])
        yield live
    finally:
        stop.set()
        if sender.is_alive():
            sender.join(timeout=15)
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        edge.stop(0.5)
        for cloud in clouds:
            cloud.stop(0.5)


def must_have_data(expr: str) -> bool:
    return families(expr) <= AFTER_TRAFFIC and not ONLY_ON_TROUBLE.search(expr)


@needs_prometheus
def test_every_dashboard_expression_evaluates(live: Live) -> None:
    problems, checked_data = [], 0
    for title, expr in dashboard_targets():
        promql = substitute(expr)
        reply = live.query(promql)
        if reply["status"] != "success":
            problems.append(f"{title}: {reply.get('errorType')}: {reply.get('error')}\n  {promql}")
        elif must_have_data(expr):
            checked_data += 1
            if not reply["data"]["result"]:
                problems.append(f"{title}: no data after traffic\n  {promql}")
    assert not problems, "\n".join(problems)
    assert checked_data >= 15  # exits, energy, latency, offload bytes, queues, breaker, ...


@needs_prometheus
def test_dashboard_shows_the_traffic_it_saw(live: Live) -> None:
    """Spot checks of values: shares sum to 1, both exits seen, one queue series per replica."""
    panels: dict[str, list[str]] = {}
    for title, expr in dashboard_targets():
        panels.setdefault(title, []).append(substitute(expr))

    def result(title: str, index: int = 0) -> list[dict[str, Any]]:
        return live.query(panels[title][index])["data"]["result"]

    shares = {r["metric"]["exit"]: float(r["value"][1])
              for r in result("Exit rate: share of samples answered at each exit")}
    assert set(shares) == {"edge", "cloud"}  # the tiny bundle's seeded threshold splits noise
    assert abs(sum(shares.values()) - 1.0) < 1e-6
    replicas = {r["metric"]["instance"] for r in result("Cloud queue depth per replica")}
    assert replicas == {f"127.0.0.1:{c.metrics_port}" for c in live.clouds}
    stages = {r["metric"]["stage"] for r in result("Edge latency by stage (p50 / p95 / p99)", 2)}
    assert {"queue", "edge_compute", "cloud_round_trip", "total"} <= stages
    components = {r["metric"]["component"] for r in result("Power by component (edge view: compute, radio, cloud)")}
    assert {"digital", "radio", "cloud"} <= components
    (breaker,) = result("Circuit breaker")
    assert float(breaker["value"][1]) == 0.0  # closed: the cloud answers


@needs_prometheus
def test_every_rule_expression_evaluates(live: Live) -> None:
    problems = []
    for rule in rules():
        name = rule.get("alert") or rule["record"]
        reply = live.query(rule["expr"])
        if reply["status"] != "success":
            problems.append(f"{name}: {reply.get('errorType')}: {reply.get('error')}")
        elif name.startswith("edgecloud:edge_exit_share:ratio") and not reply["data"]["result"]:
            problems.append(f"{name}: no data after traffic")
    assert not problems, "\n".join(problems)


@needs_prometheus
def test_prometheus_evaluates_every_rule_without_error(live: Live) -> None:
    """The rules as loaded from alerts.yml by Prometheus itself: every one evaluated, health ok."""
    def evaluated() -> list[dict[str, Any]] | None:
        loaded = [r for g in live.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
        done = [r for r in loaded if not r.get("lastEvaluation", "").startswith("0001-")]
        return loaded if len(done) == len(rules()) else None

    loaded = live.wait("every rule evaluated once", evaluated)
    assert {r["name"] for r in loaded} == {r.get("alert") or r["record"] for r in rules()}
    bad = [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
    assert not bad
    # healthy traffic: none of the cloud/breaker/queue alerts is pending or firing
    active = {a["labels"]["alertname"] for r in loaded if r["type"] == "alerting" for a in r.get("alerts", [])}
    assert not active & {"EdgecloudCloudReplicaDown", "EdgecloudCloudDown", "EdgecloudCloudUnreachable",
                         "EdgecloudCircuitBreakerOpen", "EdgecloudQueueSaturated"}


# ---- the health command the image and compose file use ------------------------------------
def health(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecloud", "health", *args],
                          capture_output=True, text=True, timeout=60)


@needs_prometheus
def test_health_command_against_the_live_servers(live: Live, tmp_path: Path) -> None:
    proc = health("--address", live.edge.address)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{live.edge.address} SERVING", proc.stderr
    cloud = live.clouds[1]
    config = tmp_path / "cloud.yaml"  # as in a container: wildcard host, fixed port
    config.write_text(yaml.safe_dump({"cloud": {"server": {"host": "0.0.0.0", "port": cloud.port}}}))
    proc = health("--config", str(config))
    assert proc.returncode == 0 and proc.stdout.strip() == f"127.0.0.1:{cloud.port} SERVING", proc.stderr
    proc = health("--address", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr
