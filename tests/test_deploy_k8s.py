"""The Kubernetes manifests (deploy/k8s): every overlay renders, validates and means what we say.

No cluster: ``kubectl kustomize`` renders offline; core kinds are checked with
``kubernetes-validate --strict`` against Kubernetes 1.33's schemas; KEDA and KServe objects with
``jsonschema`` against the CRDs' own OpenAPI schemas (tests/data/crds, made strict the way the
API server's strict field validation is: unknown fields are errors). Then behaviour: headless
cloud Service, non-root read-only containers, gRPC health probes, configs that the real
``load_settings`` accepts and that point the edge at the cloud Service, a KEDA query on metrics
edgecloud exports, TLS and token from Secrets in prod, and the KServe runtime's arguments parsed
by the real CLI. The prod TLS probe script runs against a real TLS server.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import grpc
import jsonschema
import kubernetes_validate
import onnxruntime as ort
import pytest
import yaml

from certs import make_pki
from edgecloud.bundle import ModelRepository
from edgecloud.cli import build_parser
from edgecloud.config import ServerConfig, TLSConfig, load_settings
from edgecloud.serving.grpc_server import GrpcServer
from edgecloud.serving.metrics import Metrics
from edgecloud.protocol import SERVICE_NAME, pb, pb_grpc

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
CRDS = Path(__file__).parent / "data" / "crds"
OVERLAYS = ["base", "overlays/dev", "overlays/prod", "overlays/kserve"]
K8S_VERSION = "1.33"
UID = 10001  # docker/Dockerfile: useradd --uid 10001
PROBE_SCRIPT = K8S / "overlays" / "prod" / "grpc_health_probe.py"
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.v1alpha1.yaml",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"):
        "serving.kserve.io_clusterservingruntimes.v1alpha1.yaml",
    ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_inferenceservices.v1beta1.yaml",
}
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not on PATH: the overlays are rendered with `kubectl kustomize`"
)


# ---- rendering and lookup ------------------------------------------------------------------
@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run([KUBECTL, "kustomize", str(K8S / overlay)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def render(overlay: str) -> list[dict[str, Any]]:
    """The rendered objects (a deep copy: tests may change them)."""
    return copy.deepcopy(list(_render(overlay)))


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workloads(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(object, pod spec) of every workload that runs containers, KServe runtimes included."""
    for d in docs:
        if d["kind"] in WORKLOADS:
            yield d, d["spec"]["template"]["spec"]
        elif d["kind"] == "ClusterServingRuntime":
            yield d, d["spec"]


def component(docs: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Deployment/DaemonSet of one component ('cloud' or 'edge') and its only container."""
    (obj,) = [d for d in docs if d["kind"] in WORKLOADS
              and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == name]
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    return obj, container


def port_of(container: dict[str, Any], *names: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] in names]
    return port


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def config_of(docs: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The YAML config the container is started with (--config PATH), read from its ConfigMap."""
    args = container["args"]
    path = args[args.index("--config") + 1]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    cm = one(docs, "ConfigMap", volume["configMap"]["name"])
    return yaml.safe_load(cm["data"][mount["subPath"]])


def secret_file(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) that the file ``path`` in the container comes from; fails otherwise."""
    p = PurePosixPath(path)
    for m in container["volumeMounts"]:
        if p.parent == PurePosixPath(m["mountPath"]) and "subPath" not in m:
            (volume,) = [v for v in pod["volumes"] if v["name"] == m["name"]]
            secret = volume.get("secret")
            assert secret, f"{path} is mounted from {volume}, not from a Secret"
            keys = [i["path"] for i in secret.get("items", [])] or ["tls.crt", "tls.key", "ca.crt"]
            assert p.name in keys, f"{path}: {p.name} is not a key mounted from {secret['secretName']}"
            return secret["secretName"], p.name
    raise AssertionError(f"{path} is not under any volume mount of {container['name']}")


# ---- schema validation ---------------------------------------------------------------------
def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected (as `kubectl apply --validate=strict` does),
    except where the CRD itself preserves unknown fields."""
    if isinstance(schema, dict):
        out = {k: strict(v) if k not in ("properties", "patternProperties") else
               {name: strict(sub) for name, sub in v.items()} for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    # The files are YAML: a '#' header naming the source, then a JSON body (read as JSON: fast).
    text = (CRDS / CRD_SCHEMAS[(api_version, kind)]).read_text()
    doc = json.loads("".join(line for line in text.splitlines(keepends=True) if not line.startswith("#")))
    assert (doc["apiVersion"], doc["kind"]) == (api_version, kind)
    return jsonschema.Draft7Validator(strict(doc["openAPIV3Schema"]))


def validate(doc: dict[str, Any]) -> None:
    """Raise if ``doc`` is invalid: CRD kinds by their schema, core kinds by kubernetes-validate."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        crd_validator(*key).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(overlay: str) -> None:
    docs = render(overlay)
    assert docs
    errors = []
    for doc in docs:
        try:
            validate(doc)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{doc['kind']} {doc['apiVersion']}: no schema (add its CRD to tests/data/crds)")
    assert not errors, "\n".join(errors)


def test_validation_catches_broken_manifests() -> None:
    """The validators bite: a misspelt field or a wrong type anywhere fails."""
    dev, prod, kserve = render("overlays/dev"), render("overlays/prod"), render("overlays/kserve")
    cloud, container = component(dev, "cloud")
    container["readinessProbe"]["grpc"]["serviceName"] = "x"  # the field is 'service'
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(cloud)
    svc = one(dev, "Service", "edgecloud-cloud")
    svc["spec"]["ports"][0]["port"] = "grpc"  # must be a number
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(svc)
    so = one(prod, "ScaledObject")
    so["spec"]["minReplicas"] = so["spec"].pop("minReplicaCount")  # HPA's name, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        validate(so)
    so = one(prod, "ScaledObject")
    del so["spec"]["triggers"][0]["type"]
    with pytest.raises(jsonschema.ValidationError):
        validate(so)
    csr = one(kserve, "ClusterServingRuntime")
    del csr["spec"]["containers"][0]["name"]
    with pytest.raises(jsonschema.ValidationError):
        validate(csr)
    isvc = one(kserve, "InferenceService")
    isvc["spec"]["predictor"]["model"]["ports"][0]["containerPort"] = "h2c"
    with pytest.raises(jsonschema.ValidationError):
        validate(isvc)


# ---- behaviour -----------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", ["base", "overlays/dev", "overlays/prod"])
def test_cloud_service_is_headless_and_selects_cloud_pods(overlay: str) -> None:
    docs = render(overlay)
    svc = one(docs, "Service", "edgecloud-cloud")
    assert svc["spec"]["clusterIP"] == "None"  # DNS returns every pod: client-side round_robin
    cloud, container = component(docs, "cloud")
    labels = cloud["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc"]["port"] == port_of(container, "grpc") and ports["grpc"]["targetPort"] == "grpc"
    pdb = one(docs, "PodDisruptionBudget", "edgecloud-cloud")
    assert pdb["apiVersion"] == "policy/v1" and matches(pdb["spec"]["selector"], labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_run_non_root_read_only(overlay: str) -> None:
    docs = render(overlay)
    seen = 0
    for obj, pod in workloads(docs):
        podsec = pod.get("securityContext", {})
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        if obj["kind"] != "ClusterServingRuntime":
            assert pod.get("automountServiceAccountToken") is False
        for c in pod["containers"]:
            sec = {**podsec, **c.get("securityContext", {})}
            where = f"{overlay} {obj['kind']}/{obj['metadata']['name']} {c['name']}"
            assert sec.get("runAsNonRoot") is True and sec.get("runAsUser") == UID, where
            assert sec.get("readOnlyRootFilesystem") is True, where
            assert sec.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in sec.get("capabilities", {}).get("drop", []), where
            assert sec.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]], where
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"]), where
            seen += 1
    assert seen >= (1 if overlay == "overlays/kserve" else 2)


def _probe_commands(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_grpc_health_checks(overlay: str) -> None:
    """Native gRPC probes on the gRPC port; where that port is TLS-only (prod cloud), an exec
    probe that makes the same grpc.health.v1 Check over TLS."""
    docs = render(overlay)
    for obj, pod in workloads(docs):
        for c in pod["containers"]:
            port = port_of(c, "grpc", "h2c")
            probes = _probe_commands(c)
            if all("grpc" in p for p in probes.values()):
                assert {p["grpc"]["port"] for p in probes.values()} == {port}
                assert probes["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
                assert probes["livenessProbe"]["grpc"].get("service", "") == ""
                assert probes["startupProbe"]["failureThreshold"] * probes["startupProbe"]["periodSeconds"] >= 120
                continue
            assert overlay == "overlays/prod" and c["name"] == "cloud", f"{c['name']}: non-gRPC probes"
            for kind, p in probes.items():
                cmd = p["exec"]["command"]
                assert cmd[:2] == ["python", "/etc/edgecloud/probe/grpc_health_probe.py"]
                opts = dict(zip(cmd[2::2], cmd[3::2]))
                assert int(opts["--port"]) == port
                assert opts.get("--service", "") == (SERVICE_NAME if kind == "readinessProbe" else "")
                assert secret_file(pod, c, opts["--ca"]) == ("edgecloud-cloud-tls", "ca.crt")
                host = config_of(docs, *_pod_and(docs, "edge"))["edge"]["cloud"]["address"]
                assert opts["--server-name"] == host.removeprefix("dns:///").rsplit(":", 1)[0]
            # the script the probe runs is this repository's, mounted from a ConfigMap
            (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/edgecloud/probe"]
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            cm = one(docs, "ConfigMap", volume["configMap"]["name"])
            assert cm["data"]["grpc_health_probe.py"] == PROBE_SCRIPT.read_text()


def _pod_and(docs: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    obj, container = component(docs, name)
    return obj["spec"]["template"]["spec"], container


def _load(config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
          pod: dict[str, Any], container: dict[str, Any]) -> tuple[Any, dict[str, tuple[str, str]]]:
    """Settings from the real loader, with the container's environment; files that come from
    Secrets are checked to come from Secrets (returned: setting -> (Secret, key)), then stood in
    for by local files."""
    for env in container.get("env", []):
        if "valueFrom" in env:
            ref = env["valueFrom"]["secretKeyRef"]
            monkeypatch.setenv(env["name"], f"secret:{ref['name']}/{ref['key']}")
        else:
            monkeypatch.setenv(env["name"], env["value"])
    role = next(iter(config))
    tls_paths = []
    server_tls = config[role]["server"].get("tls", {})
    for key in ("cert", "key", "client_ca"):
        if server_tls.get(key):
            tls_paths.append((server_tls, key))
    for key in ("ca", "client_cert", "client_key"):
        if config[role].get("cloud", {}).get(key):
            tls_paths.append((config[role]["cloud"], key))
    sources = {}
    for section, key in tls_paths:
        sources[key] = secret_file(pod, container, section[key])
        stand_in = tmp_path / f"{role}-{key}.pem"
        stand_in.write_text("stand-in")
        section[key] = str(stand_in)
    path = tmp_path / f"{role}.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_settings(path), sources


@pytest.mark.parametrize("overlay", ["base", "overlays/dev", "overlays/prod"])
def test_configs_load_and_edge_points_at_cloud_service(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(overlay)
    cloud_pod, cloud_c = _pod_and(docs, "cloud")
    edge_pod, edge_c = _pod_and(docs, "edge")
    for c, role in ((cloud_c, "cloud"), (edge_c, "edge")):
        args = build_parser().parse_args(c["args"])  # the real CLI takes the container's args
        assert args.command == role and args.config.startswith("/etc/edgecloud/")
    settings, cloud_files = _load(config_of(docs, cloud_pod, cloud_c), tmp_path, monkeypatch, cloud_pod, cloud_c)
    cloud = settings.cloud
    settings, edge_files = _load(config_of(docs, edge_pod, edge_c), tmp_path, monkeypatch, edge_pod, edge_c)
    edge = settings.edge
    assert (cloud.server.port, cloud.server.metrics_port) == (port_of(cloud_c, "grpc"), port_of(cloud_c, "metrics"))
    assert (edge.server.port, edge.server.metrics_port) == (port_of(edge_c, "grpc"), port_of(edge_c, "metrics"))
    assert cloud.server.host == edge.server.host == "0.0.0.0"
    assert 0 < cloud.server.max_connection_age_s  # edges re-resolve the headless Service
    assert set(edge.models) <= set(cloud.models)  # every offload has a cloud model to go to
    for obj, c in ((component(docs, "cloud")[0], cloud_c), (component(docs, "edge")[0], edge_c)):
        note = obj["spec"]["template"]["metadata"]["annotations"]
        assert int(note["prometheus.io/port"]) == port_of(c, "metrics")
        assert obj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > (
            cloud.server.shutdown_grace_s if c is cloud_c else edge.server.shutdown_grace_s)

    m = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", edge.cloud.address)
    assert m, f"edge cloud.address {edge.cloud.address!r} is not the cloud Service's DNS name"
    svc = one(docs, "Service", m.group(1))
    assert svc["metadata"]["namespace"] == m.group(2) == component(docs, "cloud")[0]["metadata"]["namespace"]
    assert svc["spec"]["clusterIP"] == "None"
    (sport,) = [p for p in svc["spec"]["ports"] if p["port"] == int(m.group(3))]
    assert port_of(cloud_c, sport["targetPort"]) == cloud.server.port

    secured = overlay == "overlays/prod"
    assert cloud.server.tls.enabled is secured and edge.cloud.tls is secured
    assert (cloud.server.token is not None) is secured and (edge.cloud.token is not None) is secured
    if secured:  # one token, from one Secret, on both ends
        assert cloud.server.token == edge.cloud.token == "secret:edgecloud-token/token"
        assert cloud_files == {"cert": ("edgecloud-cloud-tls", "tls.crt"), "key": ("edgecloud-cloud-tls", "tls.key")}
        assert edge_files == {"ca": ("edgecloud-cloud-tls", "ca.crt")}
    else:
        assert cloud_files == edge_files == {}


def test_dev_and_prod_sizes() -> None:
    dev, prod = render("overlays/dev"), render("overlays/prod")
    assert component(dev, "cloud")[0]["spec"]["replicas"] == 1
    assert not find(dev, "ScaledObject")
    assert not any("secret" in v for _, pod in workloads(dev) for v in pod.get("volumes", []))
    assert not any("valueFrom" in e for _, pod in workloads(dev) for c in pod["containers"] for e in c.get("env", []))
    replicas = component(prod, "cloud")[0]["spec"]["replicas"]
    assert replicas >= 3
    pdb = one(prod, "PodDisruptionBudget", "edgecloud-cloud")
    assert "maxUnavailable" not in pdb["spec"] and 1 <= pdb["spec"]["minAvailable"] < replicas
    so = one(prod, "ScaledObject")
    assert so["spec"]["minReplicaCount"] == replicas <= so["spec"]["maxReplicaCount"]
    # Secrets referenced by prod: exactly the two the docs tell operators to create.
    names = {v["secret"]["secretName"] for _, pod in workloads(prod) for v in pod.get("volumes", []) if "secret" in v}
    names |= {e["valueFrom"]["secretKeyRef"]["name"] for _, pod in workloads(prod) for c in pod["containers"]
              for e in c.get("env", []) if "valueFrom" in e}
    assert names == {"edgecloud-cloud-tls", "edgecloud-token"}
    # The edge gets only the CA of the cloud's Secret, never its private key.
    edge_pod, _ = _pod_and(prod, "edge")
    (ca,) = [v for v in edge_pod["volumes"] if "secret" in v]
    assert ca["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


def exported_metrics() -> dict[str, set[str]]:
    """Series name -> label names, for every family edgecloud/serving/metrics.py defines."""
    out: dict[str, set[str]] = {}
    m = Metrics("cloud")
    for family in m.registry.collect():
        metric = getattr(m, next(k for k, v in vars(m).items() if getattr(v, "_name", None) == family.name))
        labels = set(getattr(metric, "_labelnames", ()))
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                    "gauge": [""], "info": ["_info"]}[family.type]
        for s in suffixes:
            out[family.name + s] = labels | ({"le"} if s == "_bucket" else set())
    return out


def test_scaledobject_scales_cloud_on_exported_metrics() -> None:
    docs = render("overlays/prod")
    so = one(docs, "ScaledObject")
    cloud, _ = component(docs, "cloud")
    target = so["spec"]["scaleTargetRef"]
    assert (target.get("apiVersion"), target.get("kind"), target["name"]) == (
        "apps/v1", cloud["kind"], cloud["metadata"]["name"])
    assert so["metadata"]["namespace"] == cloud["metadata"]["namespace"]
    known = exported_metrics()
    assert "edgecloud_queue_depth" in known  # the family the queue trigger is about
    used = set()
    for trigger in so["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert meta["serverAddress"].startswith("http") and float(meta["threshold"]) > 0
        query = meta["query"]
        series = re.findall(r"\b(edgecloud_[a-z0-9_]+)\s*\{([^}]*)\}", query)
        assert series, f"query uses no edgecloud metric: {query}"
        for name, matchers in series:
            assert name in known, f"{name} is not a metric edgecloud exports ({sorted(known)})"
            labels = dict(re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', matchers))
            # namespace/pod come from Prometheus' Kubernetes service discovery
            assert labels.pop("namespace") == cloud["metadata"]["namespace"]
            assert re.fullmatch(labels.pop("pod"), cloud["metadata"]["name"] + "-7d9c5b8f4-x2x9z")
            assert set(labels) <= known[name], f"{name} has no label(s) {set(labels) - known[name]}"
            used.add(name)
    assert {"edgecloud_queue_depth", "edgecloud_request_duration_seconds_bucket"} <= used


@pytest.mark.parametrize("overlay", ["base", "overlays/dev", "overlays/prod"])
def test_network_policies_allow_only_grpc_from_edge_and_metrics_from_prometheus(overlay: str) -> None:
    docs = render(overlay)
    cloud, cloud_c = component(docs, "cloud")
    edge, edge_c = component(docs, "edge")
    cloud_labels = cloud["spec"]["template"]["metadata"]["labels"]
    edge_labels = edge["spec"]["template"]["metadata"]["labels"]
    (pol,) = [p for p in find(docs, "NetworkPolicy") if matches(p["spec"]["podSelector"], cloud_labels)]
    assert set(pol["spec"]["policyTypes"]) == {"Ingress", "Egress"} and pol["spec"]["egress"] == []
    allowed = {}
    for rule in pol["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without 'from' admits everyone"
        (port,) = rule["ports"]
        allowed[port["port"]] = rule["from"]
    assert set(allowed) == {port_of(cloud_c, "grpc"), port_of(cloud_c, "metrics")}
    (src,) = allowed[port_of(cloud_c, "grpc")]
    assert set(src) == {"podSelector"} and matches(src["podSelector"], edge_labels)
    (src,) = allowed[port_of(cloud_c, "metrics")]
    assert src["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    (epol,) = [p for p in find(docs, "NetworkPolicy") if matches(p["spec"]["podSelector"], edge_labels)]
    to_cloud = [r for r in epol["spec"]["egress"] if any(matches(t.get("podSelector", {}), cloud_labels)
                                                        and "namespaceSelector" not in t for t in r["to"])]
    assert [p["port"] for r in to_cloud for p in r["ports"]] == [port_of(cloud_c, "grpc")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespaces_and_references(overlay: str) -> None:
    docs = render(overlay)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for d in docs:
        if d["kind"] in ("Namespace", "ClusterServingRuntime"):
            assert "namespace" not in d["metadata"], f"{d['kind']} is cluster-scoped"
        else:
            assert d["metadata"]["namespace"] == "edgecloud", f"{d['kind']}/{d['metadata']['name']}"
    for _, pod in workloads(docs):  # generated (hashed) ConfigMap names are wired through
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names


# ---- KServe --------------------------------------------------------------------------------
def test_kserve_runtime_and_inferenceservice(tmp_path: Path) -> None:
    docs = render("overlays/kserve")
    assert not find(docs, "Service", "edgecloud-cloud") and not find(docs, "Deployment", "edgecloud-cloud")
    csr = one(docs, "ClusterServingRuntime")
    isvc = one(docs, "InferenceService")
    spec = csr["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container"
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "grpc-v2" and model["runtime"] == csr["metadata"]["name"]
    assert any(f["name"] == model["modelFormat"]["name"] and f.get("version") == model["modelFormat"]["version"]
               for f in spec["supportedModelFormats"])
    (port,) = model["ports"]
    assert port["name"] == "h2c" and port == {"name": "h2c", "containerPort": port_of(c, "h2c"), "protocol": "TCP"}

    # The image's entrypoint is `edgecloud`: the runtime's args are a real `cloud serve` line.
    from edgecloud.commands.cloud import overrides_from_args

    args = build_parser().parse_args(c["args"])
    assert (args.command, args.cloud_command) == ("cloud", "serve")
    over = overrides_from_args(args)["cloud"]
    assert over["server"]["port"] == port["containerPort"] and over["server"]["host"] == "0.0.0.0"
    assert int(spec["annotations"]["prometheus.kserve.io/port"]) == over["server"]["metrics_port"]
    # KServe puts the storageUri's bundle folder at /mnt/models: repository /mnt, bundle "models".
    assert Path(over["repository"]) / over["models"][0] == Path("/mnt/models")
    mnt = tmp_path / "mnt"
    bundle_name = model["storageUri"].rstrip("/").rsplit("/", 1)[-1]
    src = ModelRepository().get(bundle_name)
    (mnt / "models").mkdir(parents=True)
    for f in ("manifest.yaml", "cloud.onnx"):  # what a bundle's cloud needs
        shutil.copy(src.path / f, mnt / "models" / f)
    loaded = ModelRepository(mnt).get(over["models"][0])
    ort.InferenceSession(str(loaded.cloud_onnx), providers=["CPUExecutionProvider"])

    # The edge calls the predictor Service KServe creates (<isvc>-predictor, port 80 -> h2c).
    edge_pod, edge_c = _pod_and(docs, "edge")
    edge = yaml.safe_load(one(docs, "ConfigMap", edge_pod["volumes"][0]["configMap"]["name"])["data"]["edge.yaml"])
    assert edge["edge"]["cloud"]["address"] == (
        f"dns:///{isvc['metadata']['name']}-predictor.{isvc['metadata']['namespace']}.svc.cluster.local:80")
    assert loaded.manifest.cloud_model_name in edge["edge"]["models"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Standard")
    (pol,) = [p for p in find(docs, "NetworkPolicy") if "serving.kserve.io/inferenceservice"
              in p["spec"]["podSelector"].get("matchLabels", {})]
    assert pol["spec"]["podSelector"]["matchLabels"]["serving.kserve.io/inferenceservice"] == isvc["metadata"]["name"]


# ---- the prod TLS probe, for real ----------------------------------------------------------
class _LiveOnly(pb_grpc.GRPCInferenceServiceServicer):
    def ServerLive(self, request, context):  # noqa: N802 (gRPC method name)
        return pb.ServerLiveResponse(live=True)


def test_tls_probe_script_against_real_server(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0,
                          tls=TLSConfig(enabled=True, cert=pki.server_cert, key=pki.server_key))
    server = GrpcServer("cloud", config, _LiveOnly(), metrics=Metrics("cloud"),
                        out=open("/dev/null", "w")).start()

    def probe(ca: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        # a generous deadline: this machine may be busy (the manifests keep the 2 s default)
        return subprocess.run([sys.executable, str(PROBE_SCRIPT), "--port", str(server.port), "--ca", str(ca),
                               "--server-name", "localhost", "--timeout-s", "30", *extra],
                              capture_output=True, text=True, timeout=90)

    try:
        ok = probe(pki.ca)
        assert ok.returncode == 0, ok.stderr
        ok = probe(pki.ca, "--service", SERVICE_NAME)
        assert ok.returncode == 0, ok.stderr
        bad = probe(pki.ca, "--service", "no.such.Service")
        assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
        assert probe(pki.other_ca).returncode == 1  # a server the CA did not sign is not healthy
        # plaintext (what the kubelet's native gRPC probe speaks) cannot talk to this port
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            with pytest.raises(grpc.RpcError):
                pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=2)
    finally:
        server.stop()
