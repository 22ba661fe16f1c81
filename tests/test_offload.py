"""Offload encodings (edgecloud.offload) end to end.

Unit level: the uint8/fp16 encode-decode contract, calibration, the manifest fields, and the
exported ``CloudInputDecoder`` ONNX (wire datatype in, dynamic batch) against torch. Server
level: a repository with the fp32 ``tiny`` bundle and ``tiny_u8`` (the same weights, cloud part
re-exported behind a calibrated uint8 decoder), served by a real cloud server and edge daemon
on 127.0.0.1: classes agree with the in-process float path, the edge sends exactly the encoded
bytes, and the offload-bytes metric and radio energy count 1 byte per feature element.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from edgecloud import offload
from edgecloud.bundle import Bundle, CloudSpec, Manifest
from edgecloud.cim.energy import EnergyTable
from edgecloud.cloud.server import build_cloud_server
from edgecloud.cloud.sessions import load_cloud_model, softmax
from edgecloud.config import CloudConfig, load_settings
from edgecloud.edge.runner import EdgeRunner
from edgecloud.edge.server import build_edge_server
from edgecloud.exits import ExitPolicy
from edgecloud.protocol import codec, pb, pb_grpc

TIMEOUT = 10.0
NULL = open(os.devnull, "w")  # noqa: SIM115 - start-up lines of in-process servers
SMALL_SHAPE = [2, 3, 3]


def spec_of(encoding: str = "uint8", scale: float = 0.05, zero_point: int = 0,
            shape: list[int] | None = None) -> CloudSpec:
    return CloudSpec(input_shape=shape or SMALL_SHAPE, encoding=encoding, scale=scale,
                     zero_point=zero_point)


# ---- the encoding itself --------------------------------------------------------------------
def test_wire_datatype_and_bytes_per_sample():
    for encoding, datatype, itemsize in (("fp32", "FP32", 4), ("fp16", "FP16", 2), ("uint8", "UINT8", 1)):
        spec = spec_of(encoding, shape=[8, 7, 7])
        assert offload.wire_datatype(spec) == datatype
        assert offload.bytes_per_sample(spec) == 8 * 7 * 7 * itemsize
        assert offload.encode(np.ones((3, 8, 7, 7), np.float32), spec).dtype == offload.wire_dtype(spec)


@pytest.mark.parametrize("signed", [False, True])
def test_uint8_round_trip_error_is_at_most_half_a_step_inside_the_range(signed):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, *SMALL_SHAPE)).astype(np.float32)
    if not signed:
        x = np.maximum(x, 0.0)  # ReLU features
    scale, zero_point = offload.calibrate_uint8(x, percentile=99.0)
    assert (zero_point == 0) == (not signed)
    spec = spec_of(scale=scale, zero_point=zero_point)
    q = offload.encode(x, spec)
    assert q.dtype == np.uint8 and q.shape == x.shape
    y = offload.decode(q, spec)
    assert y.dtype == np.float32
    lo, hi = offload.uint8_range(spec)
    inside = (x >= lo) & (x <= hi)
    assert 0.97 < inside.mean() < 1.0  # the 99th percentile clips a little of the tail
    err = np.abs(y - x)
    # <= scale/2, up to float32 rounding of the decoded value
    assert err[inside].max() <= scale / 2 + 1e-6 * max(abs(lo), abs(hi))
    # outside: clipped to the ends of the range, never wrapped around
    np.testing.assert_array_equal(q[x > hi], 255)
    np.testing.assert_array_equal(q[x < lo], 0)
    if not signed:
        assert (y[x == 0] == 0).all()  # zero is exact


def test_uint8_rounds_half_to_even_and_clips():
    spec = spec_of(scale=0.5, zero_point=10)  # x / scale = 0.5, 1.5, 2.5 are exact ties
    x = np.array([0.25, 0.75, 1.25, -0.25, -5.0, -6.0, 200.0, np.float32(122.5)], np.float32)
    np.testing.assert_array_equal(offload.encode(x, spec), [10, 12, 12, 10, 0, 0, 255, 255])
    np.testing.assert_array_equal(offload.decode(np.array([0, 10, 255], np.uint8), spec), [-5.0, 0.0, 122.5])
    with pytest.raises(ValueError, match="uint8 offload must be uint8"):
        offload.decode(np.zeros(3, np.float32), spec)


def test_fp16_encoding_clips_to_finite_and_rounds_to_nearest():
    spec = spec_of("fp16")
    x = np.array([1e6, -1e6, 1.0 / 3.0, 0.0], np.float32)
    wire = offload.encode(x, spec)
    assert wire.dtype == np.float16 and np.isfinite(wire).all()
    np.testing.assert_array_equal(offload.decode(wire, spec), np.float16([65504, -65504, 1 / 3, 0]).astype(np.float32))


def test_calibration_accepts_torch_and_handles_degenerate_input():
    x = torch.rand(32, 4, generator=torch.Generator().manual_seed(0)) * 6.0
    scale, zero_point = offload.calibrate_uint8(x, percentile=100.0)
    assert zero_point == 0
    assert scale == pytest.approx(float(x.max()) / 255, rel=1e-6)
    assert scale == float(np.float32(scale))  # the precision the ONNX decoder holds it in
    assert offload.calibrate_uint8(np.zeros(10, np.float32)) == (1.0, 0)
    scale, zero_point = offload.calibrate_uint8(np.array([-1.0, 3.0], np.float32), percentile=100.0)
    assert scale == pytest.approx(4.0 / 255, rel=1e-6) and zero_point == round(1.0 / scale)
    with pytest.raises(ValueError, match="percentile"):
        offload.calibrate_uint8(x, percentile=40.0)
    with pytest.raises(ValueError, match="no \\(finite\\) features"):
        offload.calibrate_uint8(np.array([np.nan], np.float32))


def test_manifest_defaults_to_fp32_and_validates_quantization():
    spec = CloudSpec(input_shape=[8, 7, 7])  # an existing manifest: no encoding fields
    assert (spec.encoding, spec.scale, spec.zero_point) == ("fp32", 1.0, 0)
    with pytest.raises(ValueError, match="cloud.scale"):
        CloudSpec(input_shape=[1], encoding="uint8", scale=0.0)
    with pytest.raises(ValueError, match="cloud.zero_point"):
        CloudSpec(input_shape=[1], encoding="uint8", scale=0.1, zero_point=256)
    with pytest.raises(ValueError):
        CloudSpec(input_shape=[1], encoding="int4")
    with pytest.raises(ValueError, match="calibration features"):
        offload.with_encoding(spec, "uint8")


# ---- the cloud side: an ONNX that takes the wire tensor ----------------------------------------
def small_cloud() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 3)).eval()


def small_bundle(root: Path, name: str, encoding: str, onnx_encoding: str | None = None) -> Bundle:
    """A cloud-only bundle whose manifest says ``encoding`` and whose cloud.onnx takes the
    wire type of ``onnx_encoding`` (default: the same)."""
    spec = spec_of(encoding, scale=0.02, zero_point=100)
    folder = root / name
    folder.mkdir(parents=True)
    offload.export_wire_onnx(small_cloud(), folder / "cloud.onnx",
                             spec.model_copy(update={"encoding": onnx_encoding or encoding}))
    manifest = {
        "name": name, "family": "hand_built_onnx", "input": {"shape": SMALL_SHAPE},
        "classes": ["a", "b", "c"], "exits": [{"name": "edge"}],
        "cloud": spec.model_dump(mode="json"),
    }
    Manifest.model_validate(manifest)
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return Bundle(folder)


@pytest.mark.parametrize("encoding", ["uint8", "fp16", "fp32"])
def test_decoder_export_takes_the_wire_type_with_a_dynamic_batch(tmp_path, encoding):
    spec = spec_of(encoding, scale=0.02, zero_point=100)
    path = tmp_path / "cloud.onnx"
    offload.export_wire_onnx(small_cloud(), path, spec)
    assert offload.verify_wire_onnx(small_cloud(), path, spec) < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_in,) = session.get_inputs()
    assert onnx_in.type == offload.onnx_input_type(spec)
    assert not isinstance(onnx_in.shape[0], int)  # dynamic batch
    features = np.random.default_rng(1).standard_normal((5, *SMALL_SHAPE)).astype(np.float32)
    for n in (1, 5):
        wire = offload.encode(features[:n], spec)
        (got,) = session.run(None, {spec.input_name: wire})
        with torch.no_grad():  # the numpy decoder and the ONNX one agree
            expected = small_cloud()(torch.from_numpy(offload.decode(wire, spec))).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_cloud_load_checks_the_onnx_input_type_against_the_encoding(tmp_path):
    config = CloudConfig(intra_op_threads=1, allow_spinning=False)
    with pytest.raises(ValueError, match=r"cloud.encoding='uint8' sends UINT8 and needs tensor\(uint8\)"):
        load_cloud_model(small_bundle(tmp_path, "u8_manifest_fp32_onnx", "uint8", "fp32"), config)
    with pytest.raises(ValueError, match=r"is tensor\(uint8\).*cloud.encoding='fp32'"):
        load_cloud_model(small_bundle(tmp_path, "fp32_manifest_u8_onnx", "fp32", "uint8"), config)
    model = load_cloud_model(small_bundle(tmp_path, "half", "fp16"), config)
    assert model.datatype == "FP16"
    features = np.random.default_rng(2).standard_normal((4, *SMALL_SHAPE)).astype(np.float32)
    from_wire = model.run(offload.encode(features, model.spec))[model.output_name]
    from_float = model.run(features)[model.output_name]  # the evaluator's path: encoded first
    np.testing.assert_array_equal(from_wire, from_float)
    with pytest.raises(ValueError, match="takes FP16"):
        model.run(np.zeros((1, *SMALL_SHAPE), np.int32))


# ---- end to end: a uint8 bundle behind real servers --------------------------------------------
def make_uint8_bundle(src: Path, dst: Path, name: str = "tiny_u8", seed: int = 0) -> Path:
    """Copy a split-network bundle and re-export its cloud part behind a uint8 decoder,
    calibrated on the edge's offloads of seeded uniform-noise inputs."""
    shutil.copytree(src, dst)
    bundle = Bundle(dst)
    model = bundle.build_model()
    calib = torch.rand(256, *bundle.manifest.input.shape, generator=torch.Generator().manual_seed(seed))
    spec = offload.with_encoding(bundle.manifest.cloud, "uint8", offload.offload_features(model, calib))
    offload.export_wire_onnx(model.cloud_module(), dst / "cloud.onnx", spec)
    offload.verify_wire_onnx(model.cloud_module(), dst / "cloud.onnx", spec)
    manifest = bundle.manifest.model_copy(update={"name": name, "cloud": spec})
    (dst / "manifest.yaml").write_text(yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False))
    return dst


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("offload_repo")
    shutil.copytree(tiny_repo / "tiny", root / "tiny")
    make_uint8_bundle(tiny_repo / "tiny", root / "tiny_u8")
    return root


@pytest.fixture(scope="module")
def servers(repo: Path):
    cloud = build_cloud_server(load_settings(None, {"cloud": {
        "repository": str(repo), "intra_op_threads": 1, "allow_spinning": False,
        "server": {"shutdown_grace_s": 0.5}, "batching": {"max_queue_delay_ms": 1.0},
    }})).start()
    edge = build_edge_server(load_settings(None, {"edge": {
        "repository": str(repo), "server": {"shutdown_grace_s": 0.5},
        "batching": {"max_queue_delay_ms": 1.0, "max_request_batch": 64},
        "cloud": {"address": cloud.address, "timeout_s": 5.0},
    }}), out=NULL).start()
    yield cloud, edge
    edge.stop(0.5)
    cloud.stop(0.5)


@pytest.fixture(scope="module")
def cloud_stub(servers):
    with grpc.insecure_channel(servers[0].address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def edge_stub(servers):
    with grpc.insecure_channel(servers[1].address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def infer(stub, model: str, x: np.ndarray, **parameters):
    request = codec.encode_request(model, {"INPUT": x}, parameters=parameters or None)
    response = stub.ModelInfer(request, timeout=TIMEOUT)
    return codec.decode_response(response), codec.read_parameters(response.parameters)


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT).read()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def total(values: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and set(labels.items()) <= ls)


def test_cloud_serves_the_wire_datatype_and_rejects_others(cloud_stub):
    stub = cloud_stub
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny_u8"), timeout=TIMEOUT)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("FEATURES", "UINT8", [-1, 8, 7, 7])]
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=TIMEOUT)
    assert meta.inputs[0].datatype == "FP32"
    floats = np.zeros((2, 8, 7, 7), np.float32)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(codec.encode_request("tiny_u8", {"FEATURES": floats}), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "datatype 'FP32'" in info.value.details() and "takes UINT8" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # and the fp32 bundle still takes only FP32
        stub.ModelInfer(codec.encode_request("tiny", {"FEATURES": floats.astype(np.uint8)}), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "takes FP32" in info.value.details()
    q = np.full((2, 8, 7, 7), 255, np.uint8)  # the extreme code is a valid input, not "Inf"
    response = stub.ModelInfer(codec.encode_request("tiny_u8", {"FEATURES": q}), timeout=TIMEOUT)
    assert codec.decode_response(response)["LOGITS"].shape == (2, 10)


def test_uint8_offload_end_to_end(repo, servers, edge_stub):
    edge, stub = servers[1], edge_stub
    n = 48
    x = pixels(n, seed=11)
    # everything to the cloud (entropy < 0 never holds), on both bundles
    u8, params_u8 = infer(stub, "tiny_u8", x, exit_threshold=0.0)
    fp, params_fp = infer(stub, "tiny", x, exit_threshold=0.0)
    assert params_u8["cloud_samples"] == params_fp["cloud_samples"] == n
    assert params_u8["degraded"] is False and params_fp["degraded"] is False

    # the in-process float path: edge runner -> fp32 cloud.onnx
    config = CloudConfig(intra_op_threads=1, allow_spinning=False)
    runner = EdgeRunner(Bundle(repo / "tiny"), "digital", ExitPolicy("entropy", [0.0]))
    features = runner.run(x).offload
    float_logits = load_cloud_model(Bundle(repo / "tiny"), config).run(features)["LOGITS"]
    np.testing.assert_array_equal(fp["class_index"], float_logits.argmax(axis=1))  # fp32 unchanged
    agree = float((u8["class_index"] == float_logits.argmax(axis=1)).mean())
    assert agree >= 0.95, agree

    # and the edge sent exactly encode(features): the served answer is the in-process uint8 one
    u8_runner = EdgeRunner(Bundle(repo / "tiny_u8"), "digital", ExitPolicy("entropy", [0.0]))
    wire = u8_runner.encode_offload(u8_runner.run(x).offload)
    assert wire.dtype == np.uint8
    u8_logits = load_cloud_model(Bundle(repo / "tiny_u8"), config).run(wire)["LOGITS"]
    np.testing.assert_allclose(u8["probabilities"], softmax(u8_logits), atol=1e-6)

    # a second request with the manifest threshold: only part of it is offloaded
    _, partial = infer(stub, "tiny_u8", pixels(32, seed=12))
    assert 0 < partial["cloud_samples"] < 32
    offloaded = n + partial["cloud_samples"]

    elements = 8 * 7 * 7
    values = scrape(edge.metrics_port)
    assert total(values, "edgecloud_offload_bytes_total", model="tiny_u8") == offloaded * elements
    assert total(values, "edgecloud_offload_bytes_total", model="tiny") == n * elements * 4
    radio_bit = EnergyTable.load().per_event("radio_bit")
    assert total(values, "edgecloud_energy_joules_total", model="tiny_u8", component="radio") == pytest.approx(
        offloaded * elements * 8 * radio_bit, rel=1e-9)
    assert total(values, "edgecloud_energy_joules_total", model="tiny", component="radio") == pytest.approx(
        n * elements * 4 * 8 * radio_bit, rel=1e-9)
