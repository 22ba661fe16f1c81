"""The cloud server end to end: real gRPC on 127.0.0.1:0, real ONNX Runtime, real scrapes.

The repository holds both kinds of cloud part: ``tiny`` (tail of a split network, input =
features; from the shared ``tiny_repo`` fixture) and ``rawnet`` (a whole model, input = the
raw sample; a hand-built ONNX graph).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families

from edgecloud.bundle import Bundle, Manifest
from edgecloud.cli import main as cli_main
from edgecloud.cloud.server import build_cloud_server
from edgecloud.cloud.sessions import softmax
from edgecloud.config import load_settings
from edgecloud.protocol import SERVICE_NAME, pb, pb_grpc
from edgecloud.protocol.codec import decode_response, encode_request, read_parameters

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 10.0
MAC_FP32_J = 4.6e-12  # energy_table.yaml mac_fp32


def build_raw_bundle(root: Path, name: str = "rawnet", seed: int = 0) -> Path:
    """A whole-model cloud part: INPUT [N,1,4,4] -> Flatten -> Gemm -> LOGITS [N,3]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["INPUT"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "B"], ["LOGITS"]),
        ],
        "rawnet",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("LOGITS", TensorProto.FLOAT, ["N", 3])],
        initializer=[helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.ravel()),
                     helper.make_tensor("B", TensorProto.FLOAT, b.shape, b)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    folder = root / name
    folder.mkdir(parents=True)
    onnx.save(model, folder / "cloud.onnx")
    manifest = {
        "name": name, "family": "hand_built_onnx",
        "input": {"name": "INPUT", "shape": [1, 4, 4]},
        "classes": ["a", "b", "c"],
        "exits": [{"name": "edge", "threshold": None}],
        "cloud": {"offload": "raw", "input_name": "INPUT", "input_shape": [1, 4, 4],
                  "macs": 48},
        "training": {"command": "tests/test_cloud.py build_raw_bundle", "seed": seed},
    }
    Manifest.model_validate(manifest)
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return folder


@pytest.fixture(scope="module")
def cloud_repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cloud_repo")
    shutil.copytree(tiny_repo / "tiny", root / "tiny")
    build_raw_bundle(root)
    return root


def settings_for(repo: Path, **batching):
    overrides = {"cloud": {"repository": str(repo), "intra_op_threads": 1,
                           "batching": {"max_queue_delay_ms": 1.0, **batching}}}
    return load_settings(None, overrides)


@pytest.fixture(scope="module")
def cloud(cloud_repo: Path):
    server = build_cloud_server(settings_for(cloud_repo, max_request_batch=16)).start()
    yield server
    server.stop(1.0)


@pytest.fixture(scope="module")
def stub(cloud):
    channel = grpc.insecure_channel(cloud.address)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def spec(repo: Path, name: str):
    return Bundle(repo / name).manifest.cloud


def sample(repo: Path, name: str, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random([n, *spec(repo, name).input_shape]).astype(np.float32)


def reference(repo: Path, name: str, x: np.ndarray) -> np.ndarray:
    """Logits straight from onnxruntime, no server in between."""
    session = ort.InferenceSession(str(repo / name / "cloud.onnx"),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {spec(repo, name).input_name: x})[0]


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT).read()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


# ---- inference --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "rawnet"])
def test_round_trip_equals_onnxruntime(cloud_repo, stub, name):
    x = sample(cloud_repo, name, 3)
    request = encode_request(name, {spec(cloud_repo, name).input_name: x}, request_id=f"req-{name}")
    response = stub.ModelInfer(request, timeout=TIMEOUT)
    out = decode_response(response)
    expected = reference(cloud_repo, name, x)
    np.testing.assert_allclose(out["LOGITS"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"], softmax(expected), rtol=1e-5, atol=1e-6)
    assert out["LOGITS"].dtype == np.float32 and out["LOGITS"].shape == expected.shape
    assert response.id == f"req-{name}"
    assert len(response.raw_output_contents) == 2
    assert all(not o.HasField("contents") for o in response.outputs)
    params = read_parameters(response.parameters)
    assert isinstance(params["cloud_compute_ms"], float) and params["cloud_compute_ms"] > 0
    assert response.parameters["cloud_compute_ms"].WhichOneof("parameter_choice") == "double_param"


def test_requested_output_subset_and_typed_contents(cloud_repo, stub):
    x = sample(cloud_repo, "rawnet", 2)
    request = pb.ModelInferRequest(model_name="rawnet")
    tensor = request.inputs.add(name="INPUT", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())  # typed, not raw
    request.outputs.add(name="probabilities")
    response = stub.ModelInfer(request, timeout=TIMEOUT)
    assert [o.name for o in response.outputs] == ["probabilities"]
    np.testing.assert_allclose(decode_response(response)["probabilities"],
                               softmax(reference(cloud_repo, "rawnet", x)), rtol=1e-5, atol=1e-6)


def _good(repo: Path) -> pb.ModelInferRequest:
    return encode_request("rawnet", {"INPUT": sample(repo, "rawnet", 2)})


def _with_raw(mutate):
    def build(repo: Path) -> pb.ModelInferRequest:
        request = _good(repo)
        mutate(request)
        return request
    return build


def _nan(repo: Path) -> pb.ModelInferRequest:
    x = sample(repo, "rawnet", 2)
    x[1, 0, 2, 3] = np.nan
    return encode_request("rawnet", {"INPUT": x})


def _inf(repo: Path) -> pb.ModelInferRequest:
    x = sample(repo, "rawnet", 1)
    x[0, 0, 0, 0] = np.inf
    return encode_request("rawnet", {"INPUT": x})


BAD_REQUESTS = {
    "unknown model": (_with_raw(lambda r: setattr(r, "model_name", "nope")),
                      grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    "unknown version": (_with_raw(lambda r: setattr(r, "model_version", "7")),
                        grpc.StatusCode.NOT_FOUND, "no version '7'"),
    "wrong input name": (_with_raw(lambda r: setattr(r.inputs[0], "name", "FEATURES")),
                         grpc.StatusCode.INVALID_ARGUMENT, "expects input 'INPUT'"),
    "extra input": (lambda repo: encode_request("rawnet", {
        "INPUT": sample(repo, "rawnet", 1), "MORE": np.zeros((1, 2), np.float32)}),
        grpc.StatusCode.INVALID_ARGUMENT, "no input(s) ['MORE']"),
    "no inputs": (lambda repo: pb.ModelInferRequest(model_name="rawnet"),
                  grpc.StatusCode.INVALID_ARGUMENT, "expects input 'INPUT'"),
    "wrong datatype": (lambda repo: encode_request("rawnet", {
        "INPUT": sample(repo, "rawnet", 1).astype(np.float64)}),
        grpc.StatusCode.INVALID_ARGUMENT, "datatype 'FP64'"),
    "wrong sample shape": (lambda repo: encode_request("rawnet", {
        "INPUT": np.zeros((2, 1, 4, 5), np.float32)}),
        grpc.StatusCode.INVALID_ARGUMENT, "takes [N, 1, 4, 4]"),
    "missing batch dim": (lambda repo: encode_request("rawnet", {
        "INPUT": np.zeros((1, 4, 4), np.float32)}),
        grpc.StatusCode.INVALID_ARGUMENT, "has shape [1, 4, 4]"),
    "byte count": (_with_raw(lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12)),
                   grpc.StatusCode.INVALID_ARGUMENT, "needs 128 bytes"),
    "NaN": (_nan, grpc.StatusCode.INVALID_ARGUMENT, "NaN/Inf"),
    "Inf": (_inf, grpc.StatusCode.INVALID_ARGUMENT, "NaN/Inf"),
    "batch too large": (lambda repo: encode_request("rawnet", {
        "INPUT": sample(repo, "rawnet", 17)}),
        grpc.StatusCode.INVALID_ARGUMENT, "exceeds max_request_batch=16"),
    "empty batch": (lambda repo: encode_request("rawnet", {
        "INPUT": np.zeros((0, 1, 4, 4), np.float32)}),
        grpc.StatusCode.INVALID_ARGUMENT, "batch size must be >= 1"),
    "unknown output": (_with_raw(lambda r: r.outputs.add(name="EMBEDDING")),
                       grpc.StatusCode.INVALID_ARGUMENT, "no output(s) ['EMBEDDING']"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_its_status_and_server_keeps_serving(cloud_repo, stub, case):
    build, code, message = BAD_REQUESTS[case]
    got, details = code_of(lambda: stub.ModelInfer(build(cloud_repo), timeout=TIMEOUT))
    assert got == code, details
    assert message in details
    assert stub.ModelInfer(_good(cloud_repo), timeout=TIMEOUT).outputs[0].name == "LOGITS"


# ---- health and metadata ------------------------------------------------------------------
def test_health_and_metadata(cloud, stub):
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=TIMEOUT).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=TIMEOUT).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=TIMEOUT).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=TIMEOUT)
    assert meta.name == "edgecloud-cloud"
    assert list(meta.extensions) == ["model_repository", "parameters"]
    mm = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=TIMEOUT)
    assert mm.platform == "onnxruntime_onnx" and list(mm.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in mm.inputs] == [
        ("FEATURES", "FP32", [-1, 8, 7, 7])]
    assert [(t.name, list(t.shape)) for t in mm.outputs] == [
        ("LOGITS", [-1, 10]), ("probabilities", [-1, 10])]
    code, _ = code_of(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"),
                                                 timeout=TIMEOUT))
    assert code == grpc.StatusCode.NOT_FOUND
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=TIMEOUT)
    assert [(m.name, m.version, m.state) for m in index.models] == [
        ("rawnet", "1", "READY"), ("tiny", "1", "READY")]
    with grpc.insecure_channel(cloud.address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---- overload, deadlines, metrics ---------------------------------------------------------
def test_queue_overflow_is_resource_exhausted_and_nothing_accepted_is_lost(cloud_repo):
    # A long batching delay keeps the first request queued while the second arrives.
    server = build_cloud_server(settings_for(
        cloud_repo, max_queue_size=4, max_batch_size=64, max_queue_delay_ms=600.0)).start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            x = sample(cloud_repo, "rawnet", 3)
            first = stub.ModelInfer.future(encode_request("rawnet", {"INPUT": x}), timeout=TIMEOUT)
            batcher = server.servicer.batchers["rawnet"]
            deadline = time.monotonic() + TIMEOUT
            while batcher.depth < 3 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert batcher.depth == 3
            code, details = code_of(lambda: stub.ModelInfer(
                encode_request("rawnet", {"INPUT": sample(cloud_repo, "rawnet", 2)}),
                timeout=TIMEOUT))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_size=4" in details
            out = decode_response(first.result())
            np.testing.assert_allclose(out["LOGITS"], reference(cloud_repo, "rawnet", x),
                                       rtol=1e-5, atol=1e-5)
            # A client deadline shorter than the batching delay: DEADLINE_EXCEEDED.
            code, _ = code_of(lambda: stub.ModelInfer(_good(cloud_repo), timeout=0.1))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        counts = scrape(server.metrics_port)
        assert counts[("edgecloud_requests_total",
                       frozenset({"model": "rawnet", "status": "RESOURCE_EXHAUSTED"}.items()))] == 1
    finally:
        server.stop(1.0)


def test_idle_server_computes_in_the_rpc_thread_and_batches_under_load(cloud_repo):
    server = build_cloud_server(settings_for(cloud_repo, max_queue_delay_ms=0.0)).start()
    batcher = server.servicer.batchers["rawnet"]
    real_fn = batcher.fn
    threads: list[str] = []
    sizes: list[int] = []
    entered, hold = threading.Event(), threading.Event()
    hold.set()

    def spy(x):
        threads.append(threading.current_thread().name)
        sizes.append(int(x.shape[0]))
        entered.set()
        hold.wait(TIMEOUT)
        return real_fn(x)

    batcher.fn = spy
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            x = sample(cloud_repo, "rawnet", 2)
            out = decode_response(stub.ModelInfer(encode_request("rawnet", {"INPUT": x}), timeout=TIMEOUT))
            np.testing.assert_allclose(out["LOGITS"], reference(cloud_repo, "rawnet", x), rtol=1e-5, atol=1e-5)
            assert threads[0].startswith("cloud-grpc")  # idle: no hand-off to the batch worker

            # Busy: requests arriving while a batch computes queue and share the next batch.
            hold.clear()
            entered.clear()
            xs = [sample(cloud_repo, "rawnet", n, seed=s) for n, s in ((1, 2), (2, 3), (2, 4))]
            futures = [stub.ModelInfer.future(encode_request("rawnet", {"INPUT": xs[0]}), timeout=TIMEOUT)]
            assert entered.wait(TIMEOUT)
            futures += [stub.ModelInfer.future(encode_request("rawnet", {"INPUT": v}), timeout=TIMEOUT)
                        for v in xs[1:]]
            deadline = time.monotonic() + TIMEOUT
            while batcher.depth < 4 and time.monotonic() < deadline:
                time.sleep(0.002)
            assert batcher.depth == 4
            hold.set()
            for future, v in zip(futures, xs):
                got = decode_response(future.result())["LOGITS"]
                np.testing.assert_allclose(got, reference(cloud_repo, "rawnet", v), rtol=1e-5, atol=1e-5)
        assert sizes == [2, 1, 4]
        assert threads[2].startswith("batcher-")
    finally:
        hold.set()
        server.stop(1.0)


def test_scraped_metrics_match_traffic(cloud_repo):
    server = build_cloud_server(settings_for(cloud_repo)).start()
    sizes = {"tiny": [1, 4, 2], "rawnet": [3]}
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            for name, batches in sizes.items():
                for i, n in enumerate(batches):
                    x = sample(cloud_repo, name, n, seed=i)
                    stub.ModelInfer(encode_request(name, {spec(cloud_repo, name).input_name: x}),
                                    timeout=TIMEOUT)
            for _ in range(2):
                code_of(lambda: stub.ModelInfer(_nan(cloud_repo), timeout=TIMEOUT))
            code_of(lambda: stub.ModelInfer(encode_request("ghost", {"X": np.zeros((1, 1))}),
                                            timeout=TIMEOUT))
        m = scrape(server.metrics_port)

        def get(name: str, **labels: str) -> float:
            return m.get((name, frozenset(labels.items())), 0.0)

        for name, batches in sizes.items():
            macs = spec(cloud_repo, name).macs
            assert get("edgecloud_requests_total", model=name, status="OK") == len(batches)
            assert get("edgecloud_samples_total", model=name, exit="cloud") == sum(batches)
            assert math.isclose(get("edgecloud_energy_joules_total", model=name, component="cloud"),
                                macs * sum(batches) * MAC_FP32_J, rel_tol=1e-9)
            assert get("edgecloud_request_duration_seconds_count", model=name,
                       stage="total") == len(batches)
            assert get("edgecloud_request_duration_seconds_count", model=name,
                       stage="cloud_compute") == len(batches)
            assert get("edgecloud_batch_size_sum", model=name) == sum(batches)
            assert get("edgecloud_queue_depth", model=name) == 0
        assert get("edgecloud_requests_total", model="rawnet", status="INVALID_ARGUMENT") == 2
        assert get("edgecloud_requests_total", model="_unknown", status="NOT_FOUND") == 1
    finally:
        server.stop(1.0)


# ---- the command line -------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECLOUD_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_rejects_bad_config_with_one_line(capsys, tmp_path, cloud_repo):
    assert cli_main(["cloud", "serve", "--repository", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not exist" in err
    assert cli_main(["cloud", "serve", "--repository", str(cloud_repo),
                     "--max-batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "max_batch_size" in err
    assert cli_main(["cloud", "serve", "--repository", str(cloud_repo), "--model", "ghost"]) == 2
    assert "no bundle 'ghost'" in capsys.readouterr().err
    assert cli_main(["cloud", "serve", "--tls-cert", str(tmp_path / "c.pem"),
                     "--tls-key", str(tmp_path / "k.pem")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sigterm_drains_in_flight_then_exits_zero(cloud_repo, tmp_path):
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecloud.cli", "cloud", "serve", "--repository", str(cloud_repo),
         "--model", "rawnet", "--port", "0", "--metrics-port", "0", "--ready-file", str(ready),
         "--max-queue-delay-ms", "2500", "--intra-op-threads", "1", "--no-allow-spinning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid
        line = proc.stdout.readline().strip()
        assert re.fullmatch(
            rf"edgecloud cloud listening grpc=127\.0\.0\.1:{info['grpc_port']} "
            rf"metrics=http://127\.0\.0\.1:{info['metrics_port']}/metrics tls=off auth=off", line)
        address = f"127.0.0.1:{info['grpc_port']}"
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            x = sample(cloud_repo, "rawnet", 2)
            in_flight = stub.ModelInfer.future(encode_request("rawnet", {"INPUT": x}),
                                               timeout=TIMEOUT)
            while scrape(info["metrics_port"]).get(
                    ("edgecloud_queue_depth", frozenset({"model": "rawnet"}.items()))) != 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            status = health_pb2.HealthCheckResponse.SERVING
            while status == health_pb2.HealthCheckResponse.SERVING:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status
                time.sleep(0.01)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not in_flight.done()  # still queued when shutdown began
            out = decode_response(in_flight.result())
            np.testing.assert_allclose(out["LOGITS"], reference(cloud_repo, "rawnet", x),
                                       rtol=1e-5, atol=1e-5)
        assert proc.wait(timeout=30) == 0
        assert not ready.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- an unmodified third-party OIP client ---------------------------------------------------
TRITON_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as g
    from tritonclient.utils import InferenceServerException

    url, model, input_name, shape, out_path = sys.argv[1:]
    shape = json.loads(shape)
    c = g.InferenceServerClient(url=url)
    res = {"live": c.is_server_live(), "ready": c.is_server_ready(),
           "model_ready": c.is_model_ready(model),
           "server": c.get_server_metadata(as_json=True),
           "model": c.get_model_metadata(model, as_json=True),
           "index": c.get_model_repository_index(as_json=True)}
    x = np.random.default_rng(5).random([2] + shape).astype(np.float32)
    inp = g.InferInput(input_name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    r = c.infer(model, [inp], request_id="triton-1",
                outputs=[g.InferRequestedOutput("LOGITS"), g.InferRequestedOutput("probabilities")])
    np.savez(out_path, x=x, logits=r.as_numpy("LOGITS"), probs=r.as_numpy("probabilities"))
    res["id"] = r.get_response().id
    try:
        c.infer("ghost", [inp])
    except InferenceServerException as e:
        res["ghost"] = e.status()
    print(json.dumps(res))
""")


def test_tritonclient_in_a_subprocess(cloud, cloud_repo, tmp_path):
    out = tmp_path / "triton.npz"
    shape = spec(cloud_repo, "tiny").input_shape
    done = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, cloud.address, "tiny", "FEATURES",
         json.dumps(shape), str(out)],
        capture_output=True, text=True, timeout=120, env=_env(),
    )
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert res["live"] and res["ready"] and res["model_ready"]
    assert res["server"]["name"] == "edgecloud-cloud"
    assert res["model"]["platform"] == "onnxruntime_onnx"
    assert [int(d) for d in res["model"]["inputs"][0]["shape"]] == [-1, *shape]
    assert {m["name"] for m in res["index"]["models"]} == {"tiny", "rawnet"}
    assert all(m["state"] == "READY" for m in res["index"]["models"])
    assert res["id"] == "triton-1"
    assert res["ghost"] == "StatusCode.NOT_FOUND"
    data = np.load(out)
    expected = reference(cloud_repo, "tiny", data["x"])
    np.testing.assert_allclose(data["logits"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data["probs"], softmax(expected), rtol=1e-5, atol=1e-6)
