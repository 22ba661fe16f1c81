"""``edgecloud export triton``: a Triton model repository that Triton's own config schema accepts,
whose tensors match the ONNX graphs, and whose models ONNX Runtime runs like the bundles' own.

No Triton server here: the config is parsed with Triton's ModelConfig protobuf (shipped by
tritonclient) in strict text format, which rejects unknown fields and bad enum values.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from edgecloud.bundle import ModelRepository
from edgecloud.cli import build_parser, main
from edgecloud.commands.export import run, run_triton
from edgecloud.export_triton import export_triton



def _model_config_pb2() -> ModuleType:
    """Triton's ModelConfig protobuf module, loaded from tritonclient's file by itself.

    Why not ``import tritonclient.grpc.model_config_pb2``: the package's ``__init__`` also
    registers Triton's grpc_service.proto, whose ``inference.*`` messages clash with edgecloud's
    own OIP protos in protobuf's default pool. model_config.proto alone does not clash.
    """
    tritonclient = pytest.importorskip("tritonclient", reason="tritonclient[grpc] (test extra) ships "
                                       "Triton's model_config.proto")
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None, f"no {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mc = _model_config_pb2()

BUNDLES = ["fmnist-hybrid", "cifar10-resnet20"]  # features offload and raw offload
ONNX_TO_NUMPY = {onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.FLOAT16: np.float16,
                 onnx.TensorProto.FLOAT: np.float32}


def parse_config(path: Path) -> "mc.ModelConfig":
    config = mc.ModelConfig()
    text_format.Parse(path.read_text(), config)  # strict: unknown fields raise ParseError
    return config


@pytest.fixture(scope="module")
def triton_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton")
    export_triton(out, models=BUNDLES, max_batch_size=64, max_queue_delay_us=500)
    return out


@pytest.mark.parametrize("bundle_name", BUNDLES)
def test_config_matches_onnx_graph(triton_repo: Path, bundle_name: str) -> None:
    bundle = ModelRepository().get(bundle_name)
    name = bundle.manifest.cloud_model_name
    config = parse_config(triton_repo / name / "config.pbtxt")
    assert config.name == name == (triton_repo / name).name
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == 64
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(config.version_policy.specific.versions) == [1]
    assert (triton_repo / name / "1" / "model.onnx").read_bytes() == bundle.cloud_onnx.read_bytes()

    graph = onnx.load(str(bundle.cloud_onnx)).graph
    weights = {i.name for i in graph.initializer}
    for declared, values in ((config.input, [v for v in graph.input if v.name not in weights]),
                             (config.output, list(graph.output))):
        assert [t.name for t in declared] == [v.name for v in values]
        for tensor, value in zip(declared, values):
            ttype = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
            assert not ttype.shape.dim[0].HasField("dim_value"), "batch axis must be dynamic"
            assert list(tensor.dims) == dims[1:]
            onnx_type = onnx.TensorProto.DataType.Name(ttype.elem_type)
            triton_type = mc.DataType.Name(tensor.data_type)
            assert triton_type == {"FLOAT": "TYPE_FP32", "UINT8": "TYPE_UINT8",
                                   "FLOAT16": "TYPE_FP16"}[onnx_type]
    # ... and with what the edge sends (the manifest's cloud section)
    spec = bundle.manifest.cloud
    assert config.input[0].name == spec.input_name
    assert list(config.input[0].dims) == spec.input_shape
    assert spec.output_name in [t.name for t in config.output]
    assert list(config.output[0].dims) == [len(bundle.manifest.classes)]


@pytest.mark.parametrize("bundle_name", BUNDLES)
def test_onnxruntime_runs_exported_model_like_bundle(triton_repo: Path, bundle_name: str) -> None:
    bundle = ModelRepository().get(bundle_name)
    exported = triton_repo / bundle.manifest.cloud_model_name / "1" / "model.onnx"
    config = parse_config(exported.parent.parent / "config.pbtxt")
    ours = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    theirs = ort.InferenceSession(str(bundle.cloud_onnx), providers=["CPUExecutionProvider"])
    inp = ours.get_inputs()[0]
    elem = onnx.load(str(exported)).graph.input[0].type.tensor_type.elem_type
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 255, size=(3, *config.input[0].dims)).astype(ONNX_TO_NUMPY[elem])
    (logits,) = ours.run([config.output[0].name], {inp.name: batch})
    assert logits.shape == (3, *config.output[0].dims)
    np.testing.assert_array_equal(logits, theirs.run([config.output[0].name], {inp.name: batch})[0])


def test_cli_names_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "repo"
    argv = ["export", "triton", "--out", str(out), "--model", "fmnist-hybrid",
            "--name", "fmnist-hybrid=fmnist", "--max-batch-size", "32"]
    assert main(argv) == 0
    config = parse_config(out / "fmnist" / "config.pbtxt")
    assert config.name == "fmnist" and config.max_batch_size == 32
    assert (out / "fmnist" / "1" / "model.onnx").is_file()
    # Exists already: refused without --overwrite, replaced with it.
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    # A name with '/' is no Triton directory name; an edge-only bundle has no cloud part.
    assert main(["export", "triton", "--out", str(out), "--model", "fmnist-hybrid",
                 "--name", "fmnist-hybrid=a/b"]) == 2
    assert "'/'" in capsys.readouterr().err
    assert main(["export", "triton", "--out", str(out), "--model", "fmnist-lenet5-4bit"]) == 2
    assert "edge-only" in capsys.readouterr().err


def test_export_checkpoint_form_still_parses() -> None:
    """The triton sub-action must not take over ``export CHECKPOINT``."""
    args = build_parser().parse_args(["export", "runs/x", "--out", "bundle"])
    assert args.func is run and args.checkpoint == Path("runs/x")
    args = build_parser().parse_args(["export", "triton", "--out", "repo"])
    assert args.func is run_triton and args.out == Path("repo")
