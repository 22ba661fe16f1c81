"""A replicated cloud tier: real cloud replicas and edge daemons on 127.0.0.1, no mocks.

The main test runs 3 cloud replicas as separate processes and 2 edge daemons (the tiny
bundle, every sample sent to the cloud), drives both edges concurrently, SIGKILLs one replica
and SIGTERMs another mid-run, and checks that every request is answered, none degraded while a
replica lives, and that the load was spread (each replica's own Prometheus counters). The
others check the pieces: address parsing and targets, connection age on the server, TLS over
several replicas, the configurable cloud model name, and the CLI flags.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgecloud import cli
from edgecloud.cloud.server import build_cloud_server
from edgecloud.config import ConfigError, ServerConfig, load_settings, parse_cloud_addresses
from edgecloud.edge.cloud_client import (
    CloudClient,
    CloudModel,
    channel_options,
    cloud_target,
    service_config,
)
from edgecloud.edge.server import build_edge_server
from edgecloud.serving.grpc_server import connection_age_options
from edgecloud.serving.metrics import Metrics
from edgecloud.procs import ServerProcess, start_server
from edgecloud.protocol import codec, pb, pb_grpc

TIMEOUT = 30.0
REPO_ROOT = Path(__file__).resolve().parents[1]
NULL = open(os.devnull, "w")  # noqa: SIM115 - start-up lines of in-process servers
BATCH = 4


# ---- helpers --------------------------------------------------------------------------------
def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(url, timeout=TIMEOUT).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(values: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and want <= ls)


def cloud_samples(replica: ServerProcess) -> float:
    """Samples this replica computed, from its own /metrics."""
    return total(scrape(replica.metrics_url), "edgecloud_samples_total", model="tiny", exit="cloud")


def pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def infer(stub, x: np.ndarray, model: str = "tiny") -> tuple[dict, dict]:
    response = stub.ModelInfer(codec.encode_request(model, {"INPUT": x}), timeout=TIMEOUT)
    return codec.decode_response(response), codec.read_parameters(response.parameters)


def env() -> dict[str, str]:
    return {"PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def start_replicas(args: list[str], dirs: list[Path]) -> list[ServerProcess]:
    """``edgecloud cloud serve`` processes, started side by side (imports dominate start-up);
    if one fails, the others are stopped before the error is raised."""
    with ThreadPoolExecutor(len(dirs)) as pool:
        futures = [pool.submit(start_server, "cloud", args, d, env=env()) for d in dirs]
    started = [f.result() for f in futures if f.exception() is None]
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        for server in started:
            server.stop(10.0)
        raise failed[0]
    return started


def cloud_settings(repo: Path, **cloud):
    tree = {"repository": str(repo), "intra_op_threads": 1, "allow_spinning": False,
            "server": {"shutdown_grace_s": 0.5}, "batching": {"max_queue_delay_ms": 1.0}}
    for key, value in cloud.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return load_settings(None, {"cloud": tree})


def edge_settings(repo: Path, address, **link):
    cloud = {"address": address, "timeout_s": 5.0, "breaker_failures": 2, "breaker_reset_s": 30.0,
             "initial_backoff_s": 0.01, "max_backoff_s": 0.05, **link}
    return load_settings(None, {"edge": {
        "repository": str(repo), "server": {"shutdown_grace_s": 0.5},
        "batching": {"max_queue_delay_ms": 1.0}, "thresholds": {"tiny": [0.0]},  # all to the cloud
        "cloud": cloud,
    }})


# ---- 3 replicas, 2 edges, one replica killed and one drained under load --------------------
def test_replicas_share_the_load_and_survive_a_kill_and_a_drain(tiny_repo, tmp_path):
    cloud_args = ["--repository", str(tiny_repo), "--model", "tiny", "--intra-op-threads", "1",
                  "--no-allow-spinning", "--max-queue-delay-ms", "1", "--shutdown-grace-s", "4"]
    dirs = [tmp_path / f"cloud{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    replicas: list[ServerProcess] = []
    edges: list = []
    try:
        replicas = start_replicas(cloud_args, dirs)
        addresses = [r.address for r in replicas]
        # Two edge daemons (in this process: they start in a fraction of a second): one lists
        # the replicas, the other takes a comma list. Their breakers open after 2 failed calls:
        # they must stay closed while a replica lives. Every sample goes to the cloud.
        edges = [build_edge_server(edge_settings(tiny_repo, address, timeout_s=10.0), out=NULL).start()
                 for address in (addresses, ",".join(addresses))]

        answers: list[tuple[float, dict, dict]] = []
        errors: list[grpc.RpcError] = []
        lock = threading.Lock()
        stop = threading.Event()
        count_changed = threading.Condition(lock)

        def worker(edge, w: int) -> None:
            with grpc.insecure_channel(edge.address) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        outputs, params = infer(stub, pixels(BATCH, seed=1000 * w + i))
                    except grpc.RpcError as exc:  # must never happen
                        with lock:
                            errors.append(exc)
                        continue
                    with count_changed:
                        answers.append((time.monotonic(), outputs, params))
                        count_changed.notify_all()

        def wait_for_answers(n: int) -> None:
            """Until ``n`` more answers arrived (bounded: a stuck load fails the test)."""
            with count_changed:
                target = len(answers) + n
                assert count_changed.wait_for(lambda: len(answers) >= target or errors, 3 * TIMEOUT)
                assert not errors, errors[0]

        threads = [threading.Thread(target=worker, args=(edges[w % 2], w), daemon=True)
                   for w in range(6)]
        for t in threads:
            t.start()
        try:
            wait_for_answers(20)  # every edge has connected to every replica
            warm = [cloud_samples(r) for r in replicas]
            wait_for_answers(60)
            before = [cloud_samples(r) - w for r, w in zip(replicas, warm)]
            # SIGKILL: no drain, in-flight calls on it are cut (retried on the others).
            replicas[0].proc.send_signal(signal.SIGKILL)
            replicas[0].proc.wait(TIMEOUT)
            wait_for_answers(40)
            # SIGTERM: it answers what it has, stops accepting (GOAWAY), exits 0.
            replicas[1].proc.send_signal(signal.SIGTERM)
            wait_for_answers(20)
            assert replicas[1].proc.wait(TIMEOUT) == 0
            only = cloud_samples(replicas[2])
            t_only = time.monotonic()
            wait_for_answers(40)  # only replica 2 is left
        finally:
            stop.set()
            for t in threads:
                t.join(TIMEOUT)
        after = cloud_samples(replicas[2])
        edge_metrics = [scrape(f"http://127.0.0.1:{e.metrics_port}/metrics") for e in edges]

        # Every request answered, every sample by the cloud (no degraded answer: one replica
        # lived throughout), and the edges' own counters agree.
        assert not errors
        assert len(answers) >= 180
        for _, outputs, params in answers:
            assert params["degraded"] is False, params
            assert params["cloud_samples"] == BATCH
            assert (outputs["exit_index"] == 1).all()
        for values in edge_metrics:
            assert total(values, "edgecloud_degraded_samples_total") == 0
            assert total(values, "edgecloud_circuit_breaker_open") == 0.0
            assert total(values, "edgecloud_cloud_failures_total", code="CIRCUIT_OPEN") == 0
        served = sum(total(v, "edgecloud_samples_total", model="tiny", exit="cloud") for v in edge_metrics)
        assert served == BATCH * len(answers)

        # The load was spread: before the failures every replica computed a fair share.
        assert sum(before) >= BATCH * (60 - 6)  # minus calls in flight when `warm` was read
        for share in before:
            assert share >= 0.1 * sum(before), before
        # After both failures replica 2 computed every answer that came back (an answer that
        # arrived after its counter was read may have been computed before: 6 workers).
        late = sum(1 for t, _, _ in answers if t > t_only)
        assert late >= 40 and after - only >= BATCH * (late - 6)
        assert replicas[0].proc.returncode == -signal.SIGKILL

        # With the last replica gone too, answers degrade (and the breaker opens).
        replicas[2].proc.send_signal(signal.SIGKILL)
        replicas[2].proc.wait(TIMEOUT)
        with grpc.insecure_channel(edges[0].address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            reasons = []
            for i in range(4):
                outputs, params = infer(stub, pixels(BATCH, seed=9000 + i))
                assert params["degraded"] and params["degraded_samples"] == BATCH
                assert (outputs["exit_index"] == 0).all()
                reasons.append(params["degraded_reason"])
        assert reasons[-1] == "CIRCUIT_OPEN", reasons
    finally:
        for edge in edges:
            edge.stop(0.5)
        for replica in replicas:
            replica.stop(10.0)


# ---- the pieces --------------------------------------------------------------------------------
def test_cloud_addresses_accept_one_a_list_a_comma_list_and_a_target():
    assert parse_cloud_addresses(None) == []
    assert parse_cloud_addresses("a:1") == ["a:1"]
    assert parse_cloud_addresses(" a:1, b:2 ") == ["a:1", "b:2"]
    assert parse_cloud_addresses(["a:1", "b:2,c:3", "[::1]:4"]) == ["a:1", "b:2", "c:3", "[::1]:4"]
    assert parse_cloud_addresses("dns:///cloud.ns.svc:8001") == ["dns:///cloud.ns.svc:8001"]
    assert parse_cloud_addresses("ipv4:10.0.0.1:1,10.0.0.2:1") == ["ipv4:10.0.0.1:1,10.0.0.2:1"]
    old = load_settings(None, {"edge": {"cloud": {"address": "cloud:8101"}}}).edge.cloud
    assert old.address == "cloud:8101" and old.addresses == ["cloud:8101"]  # old configs stay valid
    listed = load_settings(None, {"edge": {"cloud": {"address": ["a:1", "b:2"]}}}).edge.cloud
    assert listed.addresses == ["a:1", "b:2"]
    for bad, words in (("cloud", "not host:port"), ("a:1,,b:2", "empty address"),
                       ("a:1,a:1", "listed twice"), ("a:70000", "not host:port"),
                       ("dns:///x:1,a:2", "resolves to every replica"),
                       ("::1:80", "in brackets")):
        with pytest.raises(ConfigError, match=r"edge\.cloud\.address") as info:
            load_settings(None, {"edge": {"cloud": {"address": bad}}})
        assert words in str(info.value)
    with pytest.raises(ConfigError, match="server_name_override"):
        load_settings(None, {"edge": {"cloud": {"address": "a:1,b:1", "tls": True}}})


def test_targets_and_service_config():
    assert cloud_target("cloud:8101") == ("cloud:8101", None)  # gRPC resolves it (all records)
    assert cloud_target("dns:///cloud:8101") == ("dns:///cloud:8101", None)
    # Several entries: one address-list target; hostnames resolved here, repeats dropped.
    assert cloud_target("127.0.0.1:1,127.0.0.1:2") == ("ipv4:127.0.0.1:1,127.0.0.1:2", "127.0.0.1:1")
    assert cloud_target(["localhost:1", "127.0.0.1:1", "127.0.0.1:2"]) == (
        "ipv4:127.0.0.1:1,127.0.0.1:2", "localhost:1")
    assert cloud_target("[::1]:1,[::1]:2") == ("ipv6:[::1]:1,[::1]:2", "[::1]:1")
    with pytest.raises(ValueError, match="resolves"):
        cloud_target("nowhere.invalid:1,nowhere-else.invalid:2")
    link = load_settings(None, {"edge": {"cloud": {"address": "a:1"}}}).edge.cloud
    config = service_config(link)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert "healthCheckConfig" not in config  # off by default (see CloudLinkConfig.health_check)
    checked = service_config(link.model_copy(update={"health_check": True}))
    assert checked["healthCheckConfig"] == {"serviceName": ""}
    options = dict(channel_options(link, 64 << 20, "localhost:1"))
    assert options["grpc.per_rpc_retry_buffer_size"] == 64 << 20  # big offloads stay retryable
    assert options["grpc.default_authority"] == "localhost:1"
    assert connection_age_options(ServerConfig()) == [
        ("grpc.max_connection_age_ms", 300_000), ("grpc.max_connection_age_grace_ms", 30_000)]
    assert connection_age_options(ServerConfig(max_connection_age_s=0)) == []


def test_calls_keep_succeeding_across_connection_age_goaways(tiny_repo):
    """Servers close connections every 0.2 s: the link reconnects, and no call fails."""
    servers = [build_cloud_server(cloud_settings(
        tiny_repo, server={"max_connection_age_s": 0.2, "max_connection_age_grace_s": 1.0}))
        for _ in range(2)]
    for s in servers:
        s.start()
    link = edge_settings(tiny_repo, [s.address for s in servers], breaker_failures=1).edge.cloud
    client = CloudClient(link, Metrics("edge"))
    client.add_model(CloudModel(name="tiny", cloud_name="tiny", input_name="FEATURES",
                                output_name="LOGITS", num_classes=10))
    try:
        x = np.zeros((2, 8, 7, 7), np.float32)
        end = time.monotonic() + 1.5
        calls = 0
        while time.monotonic() < end or calls < 20:
            assert client.infer("tiny", x).probs.shape == (2, 10)
            calls += 1
        served = [total(scrape(f"http://127.0.0.1:{s.metrics_port}/metrics"),
                        "edgecloud_samples_total", exit="cloud") for s in servers]
        assert sum(served) == 2 * calls and min(served) > 0  # both replicas, round-robin
    finally:
        client.close()
        for s in servers:
            s.stop(0.5)


def test_tls_link_to_several_replicas_checks_the_first_hosts_name(tiny_repo, tmp_path):
    from certs import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = {"enabled": True, "cert": str(pki.server_cert), "key": str(pki.server_key)}
    servers = [build_cloud_server(cloud_settings(tiny_repo, server={"tls": tls})) for _ in range(2)]
    for s in servers:
        s.start()
    # Both replicas answer to the name "localhost" in their certificate: no override needed.
    address = ",".join(f"localhost:{s.port}" for s in servers)
    link = edge_settings(tiny_repo, address, tls=True, ca=str(pki.ca)).edge.cloud
    client = CloudClient(link, Metrics("edge"))
    client.add_model(CloudModel(name="tiny", cloud_name="tiny", input_name="FEATURES",
                                output_name="LOGITS", num_classes=10))
    try:
        for _ in range(6):
            assert client.infer("tiny", np.zeros((1, 8, 7, 7), np.float32)).probs.shape == (1, 10)
        served = [total(scrape(f"http://127.0.0.1:{s.metrics_port}/metrics"),
                        "edgecloud_samples_total", exit="cloud") for s in servers]
        assert min(served) > 0
    finally:
        client.close()
        for s in servers:
            s.stop(0.5)


def test_cloud_model_name_is_configurable_on_both_sides(tiny_repo):
    cloud = build_cloud_server(cloud_settings(tiny_repo, model_names={"tiny": "tiny-fp32"}))
    cloud.start()
    edge = build_edge_server(edge_settings(tiny_repo, cloud.address,
                                           model_names={"tiny": "tiny-fp32"}), out=NULL).start()
    try:
        with grpc.insecure_channel(cloud.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=TIMEOUT)
            assert [m.name for m in index.models] == ["tiny-fp32"]
            request = codec.encode_request("tiny/fp32", {"FEATURES": np.zeros((1, 8, 7, 7), np.float32)})
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "contains '/'" in info.value.details() and "tiny-fp32" in info.value.details()
            ready = stub.ModelReady(pb.ModelReadyRequest(name="tiny/fp32"), timeout=TIMEOUT)
            assert ready.ready is False
        with grpc.insecure_channel(edge.address) as ch:
            outputs, params = infer(pb_grpc.GRPCInferenceServiceStub(ch), pixels(3, seed=1))
        assert params["degraded"] is False and params["cloud_samples"] == 3
        values = scrape(f"http://127.0.0.1:{cloud.metrics_port}/metrics")
        assert total(values, "edgecloud_samples_total", model="tiny-fp32") == 3
    finally:
        edge.stop(0.5)
        cloud.stop(0.5)
    for tree in ({"edge": {"cloud": {"model_names": {"tiny": "tiny/fp32"}}}},
                 {"cloud": {"model_names": {"tiny": "a/b"}}}):
        with pytest.raises(ConfigError, match="contains '/'"):
            load_settings(None, tree)
    with pytest.raises(ValueError, match="ghost"):
        build_cloud_server(cloud_settings(tiny_repo, model_names={"ghost": "g"}))
    with pytest.raises(ValueError, match="ghost"):
        build_edge_server(load_settings(None, {"edge": {
            "repository": str(tiny_repo), "cloud": {"model_names": {"ghost": "g"}}}}), out=NULL)


def test_cli_flags_for_replicas_connection_age_and_model_names(tiny_repo, capsys):
    from edgecloud.commands import cloud as cloud_cmd
    from edgecloud.commands import edge as edge_cmd

    parser = cli.build_parser()
    args = parser.parse_args([
        "edge", "serve", "--cloud", "10.0.0.1:8001", "--cloud", "10.0.0.2:8001,10.0.0.3:8001",
        "--cloud-model-name", "tiny=tiny-fp32", "--cloud-health-check",
        "--max-connection-age-s", "60", "--max-connection-age-grace-s", "5",
    ])
    edge = load_settings(None, edge_cmd.overrides_from_args(args)).edge
    assert edge.cloud.addresses == ["10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"]
    assert edge.cloud.model_names == {"tiny": "tiny-fp32"} and edge.cloud.health_check is True
    assert (edge.server.max_connection_age_s, edge.server.max_connection_age_grace_s) == (60, 5)
    args = parser.parse_args(["cloud", "serve", "--serve-as", "tiny=tiny-fp32",
                              "--max-connection-age-s", "0"])
    cloud = load_settings(None, cloud_cmd.overrides_from_args(args)).cloud
    assert cloud.model_names == {"tiny": "tiny-fp32"} and cloud.server.max_connection_age_s == 0
    for argv, words in (
        (["edge", "serve", "--cloud", "cloud"], "--cloud: 'cloud' is not host:port"),
        (["edge", "serve", "--cloud", "dns:///c:1", "--cloud", "b:2"], "--cloud: 'dns:///c:1'"),
        (["edge", "serve", "--cloud-model-name", "tiny=a/b"], "--cloud-model-name 'tiny=a/b'"),
        (["edge", "serve", "--cloud-model-name", "tiny"], "expected BUNDLE=NAME"),
        (["cloud", "serve", "--serve-as", "tiny=a/b"], "--serve-as 'tiny=a/b'"),
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err, err
