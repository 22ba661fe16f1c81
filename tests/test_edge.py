"""The edge daemon end to end: real edge and cloud servers on 127.0.0.1, the tiny bundle.

Covers outputs and parameters, thresholds (admin RPC, per-request parameter, SIGHUP), bad
inputs, cloud failures (killed mid-load, unreachable from the start), metrics scraped over
HTTP, energy, auth, the CLI, and tritonclient compatibility (in a subprocess: its protos
clash with ours in one process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from edgecloud import cli
from edgecloud.cloud.server import build_cloud_server
from edgecloud.config import load_settings
from edgecloud.edge.server import build_edge_server, reload_thresholds
from edgecloud.protocol import admin_pb2, admin_pb2_grpc, codec, pb, pb_grpc

TIMEOUT = 10.0
REPO_ROOT = Path(__file__).resolve().parents[1]
FEATURE_BYTES = 8 * 7 * 7 * 4  # tiny's cloud input [8, 7, 7] float32
NULL = open(os.devnull, "w")  # noqa: SIM115 - start-up lines of in-process servers


# ---- helpers --------------------------------------------------------------------------------
def cloud_settings(repo: Path):
    return load_settings(None, {"cloud": {
        "repository": str(repo), "intra_op_threads": 1, "allow_spinning": False,
        "server": {"shutdown_grace_s": 0.5},
        "batching": {"max_queue_delay_ms": 1.0},
    }})


def edge_settings(repo: Path, cloud_address: str | None, *, token: str | None = None, **edge):
    tree = {
        "repository": str(repo),
        "server": {"shutdown_grace_s": 0.5, "token": token},
        "batching": {"max_queue_delay_ms": 2.0, "max_request_batch": 32},
        "cloud": {"address": cloud_address, "timeout_s": 2.0, "breaker_failures": 3, "breaker_reset_s": 30.0,
                  "initial_backoff_s": 0.01, "max_backoff_s": 0.05},
    }
    for key, value in edge.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return load_settings(None, {"edge": tree})


def start_edge(repo: Path, cloud_address: str | None, **kw):
    return build_edge_server(edge_settings(repo, cloud_address, **kw), out=NULL).start()


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def infer(stub, x: np.ndarray, *, outputs=None, parameters=None, request_id: str = "", metadata=None):
    request = codec.encode_request("tiny", {"INPUT": x}, request_id=request_id,
                                   parameters=parameters, outputs=outputs)
    response = stub.ModelInfer(request, timeout=TIMEOUT, metadata=metadata)
    return codec.decode_response(response), codec.read_parameters(response.parameters), response


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT).read()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def total(values: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and want <= ls)


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def set_threshold(admin, value: float | None, model: str = "tiny", exit_index: int = 0, metadata=None):
    request = admin_pb2.SetThresholdRequest(model=model, exit_index=exit_index)
    if value is None:
        request.clear = True
    else:
        request.value = value
    return admin.SetThreshold(request, timeout=TIMEOUT, metadata=metadata)


# ---- shared servers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cloud(tiny_repo: Path):
    server = build_cloud_server(cloud_settings(tiny_repo))
    server.start()
    yield server
    server.stop(0.5)


@pytest.fixture(scope="module")
def edge(tiny_repo: Path, cloud):
    server = start_edge(tiny_repo, cloud.address)
    yield server
    server.stop(0.5)


@pytest.fixture(scope="module")
def channel(edge):
    ch = grpc.insecure_channel(edge.address)
    yield ch
    ch.close()


@pytest.fixture()
def stub(channel):
    return pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture()
def admin(channel, tiny_repo):
    """The admin stub; the manifest threshold is restored after each test."""
    stub = admin_pb2_grpc.EdgeAdminStub(channel)
    from edgecloud.bundle import ModelRepository

    original = ModelRepository(tiny_repo).get("tiny").manifest.exits[0].threshold
    yield stub
    set_threshold(stub, original)


# ---- inference ------------------------------------------------------------------------------
def test_outputs_parameters_and_energy(stub, admin):
    outputs, params, response = infer(stub, pixels(16), request_id="req-42")
    assert response.id == "req-42" and response.model_name == "tiny"
    assert [o.name for o in response.outputs] == [
        "probabilities", "class_index", "exit_index", "confidence", "energy_joules"]
    assert not response.outputs[0].HasField("contents")  # raw contents only
    probs = outputs["probabilities"]
    assert probs.shape == (16, 10) and probs.dtype == np.float32
    for name, dtype in (("class_index", np.int32), ("exit_index", np.int32),
                        ("confidence", np.float32), ("energy_joules", np.float64)):
        assert outputs[name].shape == (16,) and outputs[name].dtype == dtype
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(outputs["class_index"], probs.argmax(axis=1))
    np.testing.assert_allclose(outputs["confidence"], probs.max(axis=1))
    exits = outputs["exit_index"]
    assert set(exits.tolist()) == {0, 1}  # the seeded threshold splits uniform noise
    assert params["cloud_samples"] == int((exits == 1).sum())
    assert params["edge_samples"] == int((exits == 0).sum())
    assert params["degraded"] is False and params["degraded_samples"] == 0
    assert params["backend"] == "digital"
    assert params["cloud_latency_ms"] > 0 and params["edge_compute_ms"] > 0
    energy = outputs["energy_joules"]
    assert (energy > 0).all()
    assert energy[exits == 1].min() > energy[exits == 0].max()  # radio + cloud compute on top


def test_requested_outputs_and_uint8_input(stub):
    x = pixels(6, seed=5)
    u8 = np.rint(x * 255).astype(np.uint8)
    only, _, response = infer(stub, u8, outputs=["exit_index", "confidence"])
    assert [o.name for o in response.outputs] == ["exit_index", "confidence"]
    assert set(only) == {"exit_index", "confidence"}
    as_fp, _, _ = infer(stub, u8.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(only["exit_index"], as_fp["exit_index"])
    np.testing.assert_allclose(only["confidence"], as_fp["confidence"], atol=1e-5)


def test_admin_threshold_changes_exit_shares_at_run_time(stub, admin):
    x = pixels(24, seed=7)
    before, _, _ = infer(stub, x)
    assert 0 < (before["exit_index"] == 1).sum() < 24
    reply = set_threshold(admin, 0.0)  # entropy < 0 never: everything goes to the cloud
    assert reply.model.exits[0].threshold == 0.0
    all_cloud, params, _ = infer(stub, x)
    assert (all_cloud["exit_index"] == 1).all() and params["cloud_samples"] == 24
    set_threshold(admin, 1e9)  # everything exits at the edge
    all_edge, params, _ = infer(stub, x)
    assert (all_edge["exit_index"] == 0).all() and params["edge_samples"] == 24
    assert params["cloud_latency_ms"] == 0.0
    got = admin.GetThresholds(admin_pb2.GetThresholdsRequest(model="tiny"), timeout=TIMEOUT)
    (model,) = got.models
    assert model.policy == "entropy" and model.exits[0].exit_name == "edge"
    assert model.exits[0].threshold == 1e9
    set_threshold(admin, None)  # cleared gate: the exit answers everything
    cleared, _, _ = infer(stub, x)
    assert (cleared["exit_index"] == 0).all()
    got = admin.GetThresholds(admin_pb2.GetThresholdsRequest(), timeout=TIMEOUT)
    assert not got.models[0].exits[0].HasField("threshold")


def test_per_request_threshold_parameter_applies_to_that_request_only(stub, admin):
    x = pixels(8, seed=9)
    set_threshold(admin, 1e9)
    forced, params, _ = infer(stub, x, parameters={"exit_threshold": 0.0})
    assert (forced["exit_index"] == 1).all() and params["cloud_samples"] == 8
    after, _, _ = infer(stub, x)
    assert (after["exit_index"] == 0).all()


def test_admin_errors(admin):
    codes = [
        code_of(lambda: set_threshold(admin, 0.5, model="nope")),
        code_of(lambda: set_threshold(admin, 0.5, exit_index=3)),
        code_of(lambda: set_threshold(admin, -1.0)),
        code_of(lambda: admin.SetThreshold(admin_pb2.SetThresholdRequest(model="tiny"), timeout=TIMEOUT)),
        code_of(lambda: admin.GetThresholds(admin_pb2.GetThresholdsRequest(model="nope"), timeout=TIMEOUT)),
    ]
    assert [c for c, _ in codes] == [
        grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    ]
    assert "exits 0..0" in codes[1][1] and ">= 0" in codes[2][1]


# ---- bad input ------------------------------------------------------------------------------
def _req(x, name="INPUT", model="tiny", **kw) -> pb.ModelInferRequest:
    return codec.encode_request(model, {name: x}, **kw)


def _raw_mutated(mutate):
    def build():
        request = _req(pixels(2))
        mutate(request)
        return request
    return build


def _nan():
    x = pixels(2)
    x[1, 0, 3, 3] = np.nan
    return _req(x)


BAD = {
    "unknown model": (lambda: _req(pixels(1), model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    "unknown version": (lambda: pb.ModelInferRequest(model_name="tiny", model_version="9"),
                        grpc.StatusCode.NOT_FOUND, "version"),
    "missing input": (lambda: pb.ModelInferRequest(model_name="tiny"),
                      grpc.StatusCode.INVALID_ARGUMENT, "needs input 'INPUT'"),
    "wrong input name": (lambda: _req(pixels(1), name="IMAGE"),
                         grpc.StatusCode.INVALID_ARGUMENT, "IMAGE"),
    "extra input": (lambda: codec.encode_request("tiny", {"INPUT": pixels(1), "MORE": pixels(1)}),
                    grpc.StatusCode.INVALID_ARGUMENT, "MORE"),
    "datatype": (lambda: _req(pixels(1).astype(np.float64)), grpc.StatusCode.INVALID_ARGUMENT, "FP64"),
    "sample shape": (lambda: _req(np.zeros((2, 1, 28, 27), np.float32)),
                     grpc.StatusCode.INVALID_ARGUMENT, "[2, 1, 28, 27]"),
    "byte count": (_raw_mutated(lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 100)),
                   grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
    "nan": (_nan, grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    "inf": (lambda: _req(np.full((1, 1, 28, 28), np.inf, np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT, "infinite"),
    "range": (lambda: _req(pixels(1) * 255), grpc.StatusCode.INVALID_ARGUMENT, "[0, 1]"),
    "batch too large": (lambda: _req(pixels(33)), grpc.StatusCode.INVALID_ARGUMENT,
                        "max_request_batch=32"),
    "empty batch": (lambda: _req(np.zeros((0, 1, 28, 28), np.float32)),
                    grpc.StatusCode.INVALID_ARGUMENT, ">= 1"),
    "unknown output": (lambda: _req(pixels(1), outputs=["logits"]),
                       grpc.StatusCode.INVALID_ARGUMENT, "logits"),
    "threshold type": (lambda: _req(pixels(1), parameters={"exit_threshold": "low"}),
                       grpc.StatusCode.INVALID_ARGUMENT, "exit_threshold"),
    "threshold value": (lambda: _req(pixels(1), parameters={"exit_threshold": -2.0}),
                        grpc.StatusCode.INVALID_ARGUMENT, "exit_threshold"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_its_status_and_the_daemon_keeps_serving(stub, case):
    build, code, needle = BAD[case]
    got, details = code_of(lambda: stub.ModelInfer(build(), timeout=TIMEOUT))
    assert got == code, details
    assert needle in details
    outputs, _, _ = infer(stub, pixels(2))
    assert outputs["exit_index"].shape == (2,)


def test_health_metadata_and_index(stub, edge):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=TIMEOUT).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=TIMEOUT).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=TIMEOUT).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=TIMEOUT)
    assert meta.name == "edgecloud-edge" and "parameters" in meta.extensions
    model = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=TIMEOUT)
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("INPUT", "FP32", [-1, 1, 28, 28])]
    assert [(t.name, t.datatype) for t in model.outputs] == [
        ("probabilities", "FP32"), ("class_index", "INT32"), ("exit_index", "INT32"),
        ("confidence", "FP32"), ("energy_joules", "FP64")]
    assert code_of(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="x"), timeout=TIMEOUT))[0] \
        == grpc.StatusCode.NOT_FOUND
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=TIMEOUT)
    assert [(m.name, m.state) for m in index.models] == [("tiny", "READY")]
    with grpc.insecure_channel(edge.address) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="edgecloud.admin.v1.EdgeAdmin"), timeout=TIMEOUT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


# ---- metrics --------------------------------------------------------------------------------
def test_scraped_metrics_equal_the_traffic(tiny_repo, cloud):
    server = start_edge(tiny_repo, cloud.address, batching={"max_queue_delay_ms": 50.0})
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            sizes = [1, 3, 4, 8, 2, 5]
            results: list = [None] * len(sizes)
            barrier = threading.Barrier(len(sizes))

            def send(i: int) -> None:
                barrier.wait()
                results[i] = infer(stub, pixels(sizes[i], seed=i))

            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(sizes))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
            code_of(lambda: stub.ModelInfer(_req(pixels(1) * 9), timeout=TIMEOUT))
            code_of(lambda: stub.ModelInfer(_req(pixels(1), model="nope"), timeout=TIMEOUT))
        values = scrape(server.metrics_port)
    finally:
        server.stop(0.5)
    n_samples = sum(sizes)
    exits = Counter()
    energy = 0.0
    cloud_samples = 0
    for outputs, params, _ in results:
        exits.update(outputs["exit_index"].tolist())
        energy += float(outputs["energy_joules"].sum())
        cloud_samples += params["cloud_samples"]
    assert total(values, "edgecloud_requests_total", model="tiny", status="OK") == len(sizes)
    assert total(values, "edgecloud_requests_total", model="tiny", status="INVALID_ARGUMENT") == 1
    assert total(values, "edgecloud_requests_total", model="unknown", status="NOT_FOUND") == 1
    assert total(values, "edgecloud_samples_total", model="tiny") == n_samples
    assert total(values, "edgecloud_samples_total", model="tiny", exit="edge") == exits[0]
    assert total(values, "edgecloud_samples_total", model="tiny", exit="cloud") == exits[1]
    assert total(values, "edgecloud_degraded_samples_total") == 0
    assert total(values, "edgecloud_energy_joules_total", model="tiny") == pytest.approx(energy, rel=1e-9)
    for component in ("digital", "radio", "cloud"):
        assert total(values, "edgecloud_energy_joules_total", component=component) > 0
    assert total(values, "edgecloud_offload_bytes_total", model="tiny") == cloud_samples * FEATURE_BYTES
    assert total(values, "edgecloud_request_duration_seconds_count", stage="total") == len(sizes)
    assert total(values, "edgecloud_request_duration_seconds_count", stage="queue") == len(sizes)
    assert total(values, "edgecloud_request_duration_seconds_count", stage="cloud_round_trip") >= 1
    # micro-batching: one edge batch served several concurrent requests
    assert total(values, "edgecloud_batch_size_sum", model="tiny") == n_samples
    assert total(values, "edgecloud_batch_size_count", model="tiny") < len(sizes)
    assert total(values, "edgecloud_circuit_breaker_open") == 0
    threshold = total(values, "edgecloud_exit_threshold", model="tiny", exit="edge")
    assert threshold > 0


def test_full_queue_is_resource_exhausted_and_the_queued_request_is_answered(tiny_repo):
    edge = start_edge(tiny_repo, None, batching={"max_batch_size": 64, "max_queue_size": 6,
                                                 "max_queue_delay_ms": 400.0})
    first: list = []
    try:
        with grpc.insecure_channel(edge.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            waiting = threading.Thread(target=lambda: first.append(infer(stub, pixels(4))))
            waiting.start()
            time.sleep(0.15)  # the first request sits in the queue, waiting for the batch to fill
            code, details = code_of(lambda: infer(stub, pixels(4, seed=1)))
            waiting.join(TIMEOUT)
        values = scrape(edge.metrics_port)
    finally:
        edge.stop(0.5)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_size=6" in details
    assert len(first) == 1 and first[0][0]["exit_index"].shape == (4,)
    assert total(values, "edgecloud_requests_total", status="RESOURCE_EXHAUSTED") == 1
    assert total(values, "edgecloud_requests_total", status="OK") == 1


# ---- cloud failures -------------------------------------------------------------------------
def test_cloud_killed_during_load_every_request_answered(tiny_repo):
    cloud = build_cloud_server(cloud_settings(tiny_repo))
    cloud.start()
    edge = start_edge(tiny_repo, cloud.address,
                      cloud={"breaker_failures": 2, "max_attempts": 2})
    answers: list = []
    errors: list = []
    lock = threading.Lock()
    enough = threading.Event()
    killed = threading.Event()
    per_worker, workers = 10, 4
    try:
        with grpc.insecure_channel(edge.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)

            def worker(w: int) -> None:
                for i in range(per_worker):
                    try:
                        got = infer(stub, pixels(4, seed=100 * w + i))
                    except grpc.RpcError as exc:  # must never happen
                        with lock:
                            errors.append(exc)
                        continue
                    with lock:
                        answers.append(got)
                        if len(answers) >= 8:
                            enough.set()
                    if enough.is_set():  # hold the load until the cloud is gone
                        assert killed.wait(TIMEOUT)

            threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
            for t in threads:
                t.start()
            assert enough.wait(TIMEOUT)
            cloud.stop(0)  # the cloud dies mid-load
            killed.set()
            for t in threads:
                t.join(3 * TIMEOUT)
        values = scrape(edge.metrics_port)
    finally:
        edge.stop(0.5)
        cloud.stop(0)
    assert not errors
    assert len(answers) == per_worker * workers
    degraded = [p for _, p, _ in answers if p["degraded"]]
    assert degraded, "no request was degraded after the cloud died"
    assert any(p["cloud_samples"] for _, p, _ in answers), "nothing reached the cloud before it died"
    for outputs, params, _ in answers:
        assert params["degraded_samples"] + params["cloud_samples"] + params["edge_samples"] == 4
        assert (params["degraded_samples"] > 0) == params["degraded"]
        if params["degraded"]:
            assert params["degraded_reason"]
        n_cloud = int((outputs["exit_index"] == 1).sum())
        assert n_cloud == params["cloud_samples"]
    degraded_samples = sum(p["degraded_samples"] for _, p, _ in answers)
    assert total(values, "edgecloud_degraded_samples_total", model="tiny") == degraded_samples
    assert total(values, "edgecloud_requests_total", model="tiny", status="OK") == per_worker * workers
    assert total(values, "edgecloud_samples_total", model="tiny") == 4 * per_worker * workers
    assert total(values, "edgecloud_circuit_breaker_open") == 1.0
    assert total(values, "edgecloud_cloud_failures_total", model="tiny", code="CIRCUIT_OPEN") >= 1


def test_cloud_unreachable_from_the_start_gives_degraded_answers(tiny_repo, cloud):
    dead = build_cloud_server(cloud_settings(tiny_repo))
    dead.start()
    address = dead.address
    dead.stop(0)  # a port nobody listens on any more
    edge = start_edge(tiny_repo, address, cloud={"breaker_failures": 2})
    try:
        with grpc.insecure_channel(edge.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            reasons = []
            for i in range(4):
                outputs, params, _ = infer(stub, pixels(8, seed=i))
                assert params["degraded"] and params["cloud_samples"] == 0
                assert params["degraded_samples"] == 8 - params["edge_samples"] > 0
                assert (outputs["exit_index"] == 0).all()  # the best (only) edge exit
                assert (outputs["energy_joules"] > 0).all()
                reasons.append(params["degraded_reason"])
        values = scrape(edge.metrics_port)
    finally:
        edge.stop(0.5)
    assert reasons[:2] == ["UNAVAILABLE", "UNAVAILABLE"] and reasons[2:] == [CIRCUIT] * 2
    assert total(values, "edgecloud_circuit_breaker_open") == 1.0
    assert total(values, "edgecloud_cloud_failures_total", code="UNAVAILABLE") == 2
    assert total(values, "edgecloud_offload_bytes_total") == 0
    assert total(values, "edgecloud_energy_joules_total", component="radio") == 0


CIRCUIT = "CIRCUIT_OPEN"


def test_edge_only_daemon_answers_without_a_cloud(tiny_repo):
    edge = start_edge(tiny_repo, None)
    try:
        with grpc.insecure_channel(edge.address) as ch:
            outputs, params, _ = infer(pb_grpc.GRPCInferenceServiceStub(ch), pixels(8))
    finally:
        edge.stop(0.5)
    assert (outputs["exit_index"] == 0).all()
    assert params["degraded_reason"] == "NO_CLOUD" and params["cloud_samples"] == 0


# ---- auth, config reload, CLI ---------------------------------------------------------------
def test_token_protects_inference_and_admin(tiny_repo, cloud):
    edge = start_edge(tiny_repo, cloud.address, token="edge-secret")
    auth = [("authorization", "Bearer edge-secret")]
    try:
        with grpc.insecure_channel(edge.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            admin = admin_pb2_grpc.EdgeAdminStub(ch)
            assert code_of(lambda: infer(stub, pixels(1)))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda: set_threshold(admin, 1.0))[0] == grpc.StatusCode.UNAUTHENTICATED
            outputs, _, _ = infer(stub, pixels(2), metadata=auth)
            assert outputs["exit_index"].shape == (2,)
            assert set_threshold(admin, 1.0, metadata=auth).model.exits[0].threshold == 1.0
    finally:
        edge.stop(0.5)


def test_reload_thresholds_from_config_file(tiny_repo, tmp_path):
    config = tmp_path / "edge.yaml"
    config.write_text(yaml.safe_dump({"edge": {"thresholds": {"tiny": [1e9]}}}))
    overrides = {"edge": {"repository": str(tiny_repo)}}
    server = build_edge_server(load_settings(config, overrides), out=NULL,
                               threshold_pins={})
    runner = server.servicer.models["tiny"].runner
    assert runner.thresholds() == [1e9]
    config.write_text(yaml.safe_dump({"edge": {"thresholds": {"tiny": [0.25]}}}))
    reload_thresholds(server, config, overrides)
    assert runner.thresholds() == [0.25]
    config.write_text(yaml.safe_dump({"edge": {"thresholds": {"tiny": [-3.0]}}}))
    with pytest.raises(ValueError):
        reload_thresholds(server, config, overrides)
    assert runner.thresholds() == [0.25]  # a bad file changes nothing
    config.write_text(yaml.safe_dump({"edge": {"thresholds": {"tiny": [0.3]}}}))
    reload_thresholds(server, config, overrides, {"tiny": {0: 0.5}})  # pins win over the file
    assert runner.thresholds() == [0.5]
    server.servicer.close()


def test_cli_rejects_bad_flags_with_one_line(capsys, tiny_repo):
    code = cli.main(["edge", "serve", "--repository", str(tiny_repo), "--threshold", "tiny=0.5"])
    assert code == 2
    assert "MODEL:EXIT=VALUE" in capsys.readouterr().err
    code = cli.main(["edge", "serve", "--repository", str(tiny_repo), "--model", "ghost"])
    assert code == 2
    assert "ghost" in capsys.readouterr().err


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _read_until(proc: subprocess.Popen, prefix: str, limit: int = 50) -> str:
    for _ in range(limit):
        line = proc.stdout.readline()
        if line.startswith(prefix) or not line:
            return line
    return ""


def test_cli_serve_sighup_admin_commands_and_sigterm(tiny_repo, tmp_path, capsys):
    config = tmp_path / "edge.yaml"
    config.write_text(yaml.safe_dump({"edge": {"thresholds": {"tiny": [1e9]}}}))
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecloud", "edge", "serve", "--config", str(config),
         "--repository", str(tiny_repo), "--model", "tiny", "--port", "0", "--metrics-port", "0",
         "--ready-file", str(ready), "--max-queue-delay-ms", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "edge daemon did not start"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        address = f"127.0.0.1:{info['grpc_port']}"
        assert _read_until(proc, f"edgecloud edge listening grpc={address} metrics=")
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            outputs, _, _ = infer(stub, pixels(6))
            assert (outputs["exit_index"] == 0).all()  # threshold 1e9 from the file
            config.write_text(yaml.safe_dump({"edge": {"thresholds": {"tiny": [0.0]}}}))
            proc.send_signal(signal.SIGHUP)
            assert _read_until(proc, "edgecloud edge: thresholds reloaded")
            _, params, _ = infer(stub, pixels(6))
            assert params["degraded_samples"] == 6  # all need the cloud; none configured
            assert cli.main(["edge", "set-threshold", "--address", address, "--model", "tiny",
                             "--exit", "0", "--value", "1e9", "--json"]) == 0
            shown = json.loads(capsys.readouterr().out)
            assert shown[0]["exits"][0]["threshold"] == 1e9
            _, params, _ = infer(stub, pixels(6))
            assert params["edge_samples"] == 6
            assert cli.main(["edge", "thresholds", "--address", address]) == 0
            assert "tiny (entropy): 0:edge=1e+09" in capsys.readouterr().out
            assert cli.main(["edge", "set-threshold", "--address", address, "--model", "tiny",
                             "--exit", "4", "--value", "1"]) == 2
            assert "INVALID_ARGUMENT" in capsys.readouterr().err
            config.write_text(yaml.safe_dump({"edge": {"thresholds": {"tiny": [-1.0]}}}))
            proc.send_signal(signal.SIGHUP)  # a bad file: reported, nothing changes
            assert ">= 0" in _read_until(proc, "edgecloud edge: SIGHUP reload failed")
            _, params, _ = infer(stub, pixels(6))
            assert params["edge_samples"] == 6
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not ready.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tritonclient_reads_edge_answers_in_a_subprocess(edge, tmp_path):
    script = tmp_path / "triton_check.py"
    script.write_text(textwrap.dedent(f"""
        import json, numpy as np
        import tritonclient.grpc as grpcclient
        c = grpcclient.InferenceServerClient(url="{edge.address}")
        assert c.is_server_live() and c.is_model_ready("tiny")
        x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
        inp = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        r = c.infer("tiny", [inp], request_id="t1", parameters={{"exit_threshold": 0.0}})
        params = {{k: v.WhichOneof("parameter_choice") for k, v in r.get_response().parameters.items()}}
        print(json.dumps({{"probs": list(r.as_numpy("probabilities").shape),
                           "exits": r.as_numpy("exit_index").tolist(),
                           "energy": r.as_numpy("energy_joules").dtype.str,
                           "id": r.get_response().id, "params": params}}))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, env=_env())
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["probs"] == [5, 10] and got["exits"] == [1] * 5 and got["id"] == "t1"
    assert got["energy"] == "<f8"
    assert got["params"]["degraded"] == "bool_param"
    assert got["params"]["cloud_samples"] == "int64_param"
    assert got["params"]["cloud_latency_ms"] == "double_param"
    assert got["params"]["backend"] == "string_param"


def test_serve_flags_become_settings(tiny_repo, tmp_path):
    from edgecloud.commands.edge import overrides_from_args, parse_threshold_pins

    for name in ("ca.pem", "c.pem", "c.key"):
        (tmp_path / name).write_text("x")
    parser = cli.build_parser()
    args = parser.parse_args([
        "edge", "serve", "--repository", str(tiny_repo), "--model", "tiny", "--cloud", "10.0.0.2:8001",
        "--cloud-timeout", "0.25", "--cloud-token", "ct", "--cloud-ca", str(tmp_path / "ca.pem"),
        "--cloud-cert", str(tmp_path / "c.pem"), "--cloud-key", str(tmp_path / "c.key"),
        "--backend", "digital", "--backend-option", "adc_bits=6", "--backend-option", "noise=false",
        "--seed", "7", "--max-batch-size", "16", "--max-queue-delay-ms", "3", "--max-queue-size", "99",
        "--threshold", "tiny:0=0.4", "--threshold", "other:1=none", "--token", "t",
    ])
    settings = load_settings(None, overrides_from_args(args))
    edge = settings.edge
    assert edge.models == ["tiny"] and edge.cloud.address == "10.0.0.2:8001"
    assert edge.cloud.timeout_s == 0.25 and edge.cloud.token == "ct" and edge.cloud.tls
    assert edge.cloud.client_cert == tmp_path / "c.pem" and edge.cloud.ca == tmp_path / "ca.pem"
    assert edge.backend.options == {"adc_bits": 6, "noise": False} and edge.backend.seed == 7
    assert (edge.batching.max_batch_size, edge.batching.max_queue_delay_ms,
            edge.batching.max_queue_size) == (16, 3.0, 99)
    assert edge.server.token == "t"
    assert parse_threshold_pins(args.threshold) == {"tiny": {0: 0.4}, "other": {1: None}}


# ---- process-wide compute settings ---------------------------------------------------------
def test_compute_settings_set_torch_threads_and_the_allocator_as_configured(monkeypatch):
    import torch

    from edgecloud.config import EdgeConfig
    from edgecloud.edge import server as edge_server

    calls: list[object] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    monkeypatch.setattr(edge_server, "keep_freed_memory", lambda: calls.append("malloc") or True)
    edge_server.apply_compute_settings(EdgeConfig(torch_threads=3))
    assert calls == [("threads", 3), "malloc"]
    calls.clear()
    edge_server.apply_compute_settings(EdgeConfig(torch_threads=0, keep_freed_memory=False))
    assert calls == []


def test_keep_freed_memory_sets_glibc_options_and_is_a_no_op_without_glibc(monkeypatch):
    from edgecloud.edge import server as edge_server

    seen: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:  # stands in for libc's (argtypes are set on it)
        seen.append((param, value))
        return 1

    monkeypatch.setattr(edge_server.ctypes, "CDLL", lambda _name: SimpleNamespace(mallopt=mallopt))
    assert edge_server.keep_freed_memory() is True
    assert seen == list(edge_server._MALLOPT_SETTINGS)  # trim threshold, top pad, mmap threshold

    def no_libc(_name):
        raise OSError("no libc here")

    monkeypatch.setattr(edge_server.ctypes, "CDLL", no_libc)
    assert edge_server.keep_freed_memory() is False
