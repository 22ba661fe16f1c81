"""The packed and entropy-coded offload encodings (edgecloud.offload), edge to cloud.

Unit level: every encoding round-trips within its quantization error and its lossless layer is
exact, packed sizes and the bit layout are as documented, bad payloads are refused naming the
sample, OIP BYTES tensors survive the codec. Runner level: radio energy is the bytes actually
sent x 8 x radio_bit. Server level: a real cloud server on 127.0.0.1 serving a seeded bundle
re-encoded as uint4+zstd (cloud.onnx re-exported behind its decoder) answers what the edge
encodes exactly as the in-process decoder does, and refuses a corrupt payload.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from edgecloud import offload
from edgecloud.bundle import Bundle, CloudSpec
from edgecloud.cim.energy import EnergyTable
from edgecloud.cloud.server import build_cloud_server
from edgecloud.cloud.sessions import load_cloud_model
from edgecloud.config import CloudConfig, load_settings
from edgecloud.edge.runner import EdgeRunner
from edgecloud.evaluate.plan import Candidate, write_bundle
from edgecloud.exits import ExitPolicy
from edgecloud.protocol import codec, pb, pb_grpc
from edgecloud.protocol.errors import InvalidArgument

TIMEOUT = 10.0
SHAPE = [3, 3, 3]  # 27 elements: odd, so the packed encodings pad their last byte


def spec_of(encoding: str, features: np.ndarray | None = None, shape: list[int] | None = None) -> CloudSpec:
    base = CloudSpec(input_shape=shape or SHAPE)
    return offload.with_encoding(base, encoding, features)  # type: ignore[arg-type]


def signed_features(n: int = 64, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


# ---- names, sizes, layout ---------------------------------------------------------------------
def test_encoding_names_wire_types_and_sizes():
    x = signed_features(5)
    expected = {  # encoding: (wire datatype, bytes of one sample's stream before the lossless layer)
        "fp32": ("FP32", 108), "fp16": ("FP16", 54), "uint8": ("UINT8", 27),
        "uint4": ("BYTES", 14), "uint2": ("BYTES", 7),
    }
    assert set(offload.ENCODINGS) == set(expected) | {f"{e}+zstd" for e in expected}
    for encoding in offload.ENCODINGS:
        base = encoding.split("+")[0]
        spec = spec_of(encoding, x)
        datatype = "BYTES" if "+" in encoding else expected[base][0]
        assert offload.wire_datatype(spec) == datatype
        assert offload.stream_bytes(spec) == expected[base][1]
        wire = offload.encode(x, spec)
        sent = offload.wire_bytes(wire, spec)
        assert sent.shape == (5,) and sent.dtype == np.int64
        if datatype == "BYTES":
            assert wire.dtype == object and wire.shape == (5,)
            assert sent.tolist() == [len(p) for p in wire]
        else:
            assert wire.shape == (5, *SHAPE)
        if offload.fixed_length(spec):  # packed: exactly ceil(27 * bits / 8) bytes per sample
            assert sent.tolist() == [expected[base][1]] * 5 == [offload.bytes_per_sample(spec)] * 5
    assert offload.ONNX_INPUT_TYPES["uint4+zstd"] == offload.ONNX_INPUT_TYPES["uint8"] == "tensor(uint8)"
    assert offload.ONNX_INPUT_TYPES["fp16+zstd"] == "tensor(float16)"


def test_bit_layout_first_element_in_the_lowest_bits():
    q = np.array([[1, 2, 3]], np.uint8)
    np.testing.assert_array_equal(offload.pack_bits(q, 4), [[0x21, 0x03]])
    np.testing.assert_array_equal(offload.pack_bits(q, 2), [[0b00111001]])
    rng = np.random.default_rng(0)
    for bits in (2, 4):
        levels = rng.integers(0, 1 << bits, (4, 27), dtype=np.uint8)
        np.testing.assert_array_equal(offload.unpack_bits(offload.pack_bits(levels, bits), bits, 27), levels)


@pytest.mark.parametrize("encoding", list(offload.ENCODINGS))
def test_round_trip_within_the_quantization_error(encoding):
    x = signed_features()
    spec = spec_of(encoding, x)
    wire = offload.encode(x, spec)
    levels = offload.unpack(wire, spec)
    assert levels.dtype == offload.level_dtype(spec) and levels.shape == x.shape
    y = offload.decode(wire, spec)
    assert y.dtype == np.float32 and y.shape == x.shape
    base = offload.base_of(spec)
    # the lossless layer gives the base's levels back exactly
    np.testing.assert_array_equal(levels, offload.quantize(x, spec))
    np.testing.assert_array_equal(y, offload.decode(offload.encode(x, spec_of(base, x)), spec_of(base, x)))
    if base == "fp32":
        np.testing.assert_array_equal(y, x)
    elif base == "fp16":
        np.testing.assert_allclose(y, x, rtol=2.0 ** -11)
    else:
        bits = offload.uint_bits(spec)
        assert spec.zero_point <= (1 << bits) - 1
        lo, hi = offload.uint8_range(spec)
        inside = (x >= lo) & (x <= hi)
        assert inside.mean() > 0.95  # (the zero point rounds: the range moves by up to scale/2)
        assert np.abs(y - x)[inside].max() <= spec.scale / 2 + 1e-6 * max(abs(lo), abs(hi))
        assert int(levels.max()) <= (1 << bits) - 1


def test_zstd_shrinks_redundant_streams_and_payloads_vary_in_length():
    x = np.maximum(signed_features(32), 0.0)  # ReLU-like features: many exact zeros
    x[::2] = 0.0                               # and half the samples all zero
    spec = spec_of("uint8+zstd", x, shape=SHAPE)
    sent = offload.wire_bytes(offload.encode(x, spec), spec)
    assert sent[::2].max() < sent[1::2].min()  # an all-zero sample compresses to a few bytes
    assert sent.mean() < offload.stream_bytes(spec) + 16


def test_unpack_refuses_bad_payloads_naming_the_sample():
    x = signed_features(3)
    spec = spec_of("uint4+zstd", x)
    wire = offload.encode(x, spec)
    bad = wire.copy()
    bad[1] = wire[1][:-3]
    with pytest.raises(ValueError, match="sample 1"):
        offload.unpack(bad, spec)
    other = spec_of("uint8+zstd", x)  # a frame of another size
    bad[1] = offload.encode(x, other)[1]
    with pytest.raises(ValueError, match="sample 1"):
        offload.unpack(bad, spec)
    packed = spec_of("uint2", x)
    short = offload.encode(x, packed)
    short[2] = short[2][:-1]
    with pytest.raises(ValueError, match="sample 2"):
        offload.unpack(short, packed)
    with pytest.raises(ValueError, match="must be object"):
        offload.unpack(np.zeros((3, *SHAPE), np.uint8), spec)
    with pytest.raises(ValueError, match="zero_point must lie in 0..15"):
        CloudSpec(input_shape=SHAPE, encoding="uint4", zero_point=16)


def test_codec_carries_bytes_tensors():
    payloads = np.array([b"", b"\x00\x01", b"abc" * 100], dtype=object)
    request = codec.encode_request("m", {"FEATURES": payloads})
    assert request.inputs[0].datatype == "BYTES" and list(request.inputs[0].shape) == [3]
    assert request.raw_input_contents[0][:4] == (0).to_bytes(4, "little")
    got = codec.decode_inputs(request)["FEATURES"]
    assert got.dtype == object and got.tolist() == payloads.tolist()
    truncated = pb.ModelInferRequest()
    truncated.CopyFrom(request)
    truncated.raw_input_contents[0] = request.raw_input_contents[0][:-1]
    with pytest.raises(InvalidArgument, match="'FEATURES'"):
        codec.decode_inputs(truncated)
    response = codec.encode_response("m", {"OUT": payloads})
    assert codec.decode_response(response)["OUT"].tolist() == payloads.tolist()


# ---- a real bundle, re-encoded ------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny`` (fp32) and ``tiny_u4z``: the same weights, uint4+zstd calibrated on the edge's
    features of seeded uniform inputs, written as the plan writes a bundle."""
    root = tmp_path_factory.mktemp("u4z_repo")
    shutil.copytree(tiny_repo / "tiny", root / "tiny")
    bundle = Bundle(root / "tiny")
    model = bundle.build_model()
    calib = torch.rand(128, *bundle.manifest.input.shape, generator=torch.Generator().manual_seed(5))
    spec = offload.with_encoding(bundle.manifest.cloud, "uint4+zstd", offload.offload_features(model, calib))
    write_bundle(bundle, Candidate("features/uint4+zstd", "features", spec), root / "tiny_u4z")
    return root


def pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def test_written_bundle_has_the_encoding_and_a_matching_cloud_onnx(repo):
    bundle = Bundle(repo / "tiny_u4z")
    assert bundle.name == "tiny_u4z" and bundle.manifest.cloud.encoding == "uint4+zstd"
    model = load_cloud_model(bundle, CloudConfig(intra_op_threads=1, allow_spinning=False))
    assert model.datatype == "BYTES" and model.wire_shape == []
    assert model.session.get_inputs()[0].type == "tensor(uint8)"
    card = (repo / "tiny_u4z" / "README.md").read_text()
    assert "uint4+zstd as an OIP BYTES tensor" in card


def test_radio_energy_is_the_bytes_actually_sent(repo):
    radio_bit = EnergyTable.load().per_event("radio_bit")
    runner = EdgeRunner(Bundle(repo / "tiny_u4z"), "digital", ExitPolicy("entropy", [0.0]))  # all offloaded
    edge = runner.run(pixels(12, seed=1))
    rows = edge.offload_index
    assert rows.size == 12
    wire = runner.encode_offload(edge.offload)
    sent = runner.wire_bytes(wire)
    assert sent.tolist() == [len(p) for p in wire] and len(set(sent.tolist())) > 1  # variable length
    probs = np.full((12, 10), 0.1, np.float32)
    done = runner.complete(edge, probs, True, sent_bytes=sent)
    np.testing.assert_array_equal(done.energy["radio"][rows], sent * 8.0 * radio_bit)
    total = runner.complete(edge, probs, True, sent_bytes=int(sent.sum()))  # one total, spread evenly
    assert total.energy["radio"].sum() == pytest.approx(sent.sum() * 8 * radio_bit, rel=1e-12)
    with pytest.raises(ValueError, match="variable-length"):
        runner.complete(edge, probs, True)
    assert runner.complete(edge, None, False).energy["radio"].sum() == 0.0
    with pytest.raises(ValueError, match="sent_bytes has 3 rows"):
        runner.complete(edge, probs, True, sent_bytes=sent[:3])
    # a fixed-length encoding without sent_bytes: its fixed bytes, as before
    fixed = EdgeRunner(Bundle(repo / "tiny"), "digital", ExitPolicy("entropy", [0.0]))
    e2 = fixed.run(pixels(4, seed=2))
    plain = fixed.complete(e2, np.full((4, 10), 0.1, np.float32), True)
    np.testing.assert_array_equal(plain.energy["radio"], 8 * 7 * 7 * 4 * 8.0 * radio_bit)
    np.testing.assert_array_equal(fixed.wire_bytes(fixed.encode_offload(e2.offload)), [8 * 7 * 7 * 4] * 4)


@pytest.fixture(scope="module")
def cloud_stub(repo: Path):
    server = build_cloud_server(load_settings(None, {"cloud": {
        "repository": str(repo), "intra_op_threads": 1, "allow_spinning": False,
        "server": {"shutdown_grace_s": 0.5}, "batching": {"max_queue_delay_ms": 1.0},
    }})).start()
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)
    server.stop(0.5)


def test_cloud_server_decodes_what_the_edge_encodes(repo, cloud_stub):
    meta = cloud_stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny_u4z"), timeout=TIMEOUT)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("FEATURES", "BYTES", [-1])]
    bundle = Bundle(repo / "tiny_u4z")
    runner = EdgeRunner(bundle, "digital", ExitPolicy("entropy", [0.0]))
    features = runner.run(pixels(9, seed=3)).offload
    wire = runner.encode_offload(features)
    response = cloud_stub.ModelInfer(codec.encode_request("tiny_u4z", {"FEATURES": wire}), timeout=TIMEOUT)
    served = codec.decode_response(response)["LOGITS"]
    # the in-process decoder: numpy unpack + dequantize, then the torch cloud part
    cloud = bundle.build_model().cloud_module().eval()
    with torch.no_grad():
        expected = cloud(torch.from_numpy(offload.decode(wire, bundle.manifest.cloud))).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-4)
    # and what the fp32 bundle answers on the float features, mostly the same classes
    fp = cloud_stub.ModelInfer(codec.encode_request("tiny", {"FEATURES": features}), timeout=TIMEOUT)
    assert (codec.decode_response(fp)["LOGITS"].argmax(1) == served.argmax(1)).mean() >= 0.5
    bad = wire.copy()
    bad[4] = b"not zstd"
    with pytest.raises(grpc.RpcError) as info:
        cloud_stub.ModelInfer(codec.encode_request("tiny_u4z", {"FEATURES": bad}), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sample 4" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # the float features are not what it takes
        cloud_stub.ModelInfer(codec.encode_request("tiny_u4z", {"FEATURES": features}), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "takes BYTES" in info.value.details()


def test_edge_daemon_sends_bytes_payloads_the_cloud_answers(repo):
    """Through both real servers: the edge daemon encodes uint4+zstd, sends a BYTES tensor, the
    cloud unpacks it; answers equal the in-process decode of the same payloads."""
    from edgecloud.edge.server import build_edge_server

    null = open("/dev/null", "w")  # noqa: SIM115 - the edge's start-up line
    cloud = build_cloud_server(load_settings(None, {"cloud": {
        "repository": str(repo), "intra_op_threads": 1, "allow_spinning": False,
        "server": {"shutdown_grace_s": 0.5}, "batching": {"max_queue_delay_ms": 1.0},
    }})).start()
    edge = build_edge_server(load_settings(None, {"edge": {
        "repository": str(repo), "server": {"shutdown_grace_s": 0.5},
        "batching": {"max_queue_delay_ms": 1.0, "max_request_batch": 64},
        "cloud": {"address": cloud.address, "timeout_s": 5.0},
    }}), out=null).start()
    try:
        x = pixels(16, seed=4)
        with grpc.insecure_channel(edge.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = codec.encode_request("tiny_u4z", {"INPUT": x}, parameters={"exit_threshold": 0.0})
            response = stub.ModelInfer(request, timeout=TIMEOUT)
        params = codec.read_parameters(response.parameters)
        out = codec.decode_response(response)
        assert params["cloud_samples"] == 16 and params["degraded"] is False
        bundle = Bundle(repo / "tiny_u4z")
        runner = EdgeRunner(bundle, "digital", ExitPolicy("entropy", [0.0]))
        wire = runner.encode_offload(runner.run(x).offload)
        cloud_part = bundle.build_model().cloud_module().eval()
        with torch.no_grad():
            logits = cloud_part(torch.from_numpy(offload.decode(wire, bundle.manifest.cloud))).numpy()
        np.testing.assert_array_equal(out["class_index"], logits.argmax(axis=1))
        # the daemon's radio energy: the payload bytes it sent x 8 x radio_bit
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{edge.metrics_port}/metrics", timeout=TIMEOUT).read()
        radio = sum(s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples
                    if s.name == "edgecloud_energy_joules_total" and s.labels.get("component") == "radio"
                    and s.labels.get("model") == "tiny_u4z")
        sent = int(runner.wire_bytes(wire).sum())
        assert radio == pytest.approx(sent * 8 * EnergyTable.load().per_event("radio_bit"), rel=1e-9)
    finally:
        edge.stop(0.5)
        cloud.stop(0.5)
        null.close()
