"""Write bundles' cloud parts as a Triton Inference Server model repository.

Why: the cloud tier speaks the Open Inference Protocol, so NVIDIA Triton (or KServe running
Triton) can stand in for ``edgecloud cloud serve``; an edge daemon then offloads to Triton
unchanged. Each bundle with a cloud part becomes::

    <out>/<name>/config.pbtxt      platform onnxruntime_onnx, max_batch_size, dynamic batching
    <out>/<name>/<version>/model.onnx

Tensor names, datatypes and dims are read from the ONNX graph itself (what Triton checks the
config against), and cross-checked with the manifest's ``cloud:`` section (what the edge sends).
With an offload ``encoding`` of uint8 or fp16, ``cloud.onnx`` already holds the decoder, so the
input is the wire datatype and the edge's requests need no change.

Triton model names are directory names: a name with ``/`` cannot be served, so it is refused.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from edgecloud.bundle import Bundle, ModelRepository

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"

# ONNX TensorProto element type -> Triton model-config DataType (model_config.proto).
_TRITON_TYPES = {
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.STRING: "TYPE_STRING",
}


@dataclass(frozen=True)
class TensorConfig:
    """One input or output as Triton sees it: dims exclude the batch axis (-1 = variable)."""

    name: str
    data_type: str
    dims: list[int]


@dataclass
class TritonModel:
    """What was written for one bundle."""

    bundle: str
    name: str
    version: int
    path: Path
    inputs: list[TensorConfig] = field(default_factory=list)
    outputs: list[TensorConfig] = field(default_factory=list)


def check_triton_name(name: str) -> str:
    """``name`` if Triton can serve it (a directory name), else ValueError saying why."""
    if not name or name != name.strip():
        raise ValueError(f"Triton model name {name!r} is empty or has leading/trailing spaces")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(
            f"Triton model name {name!r} is not a plain directory name (no '/'); give another "
            "with --name BUNDLE=NAME"
        )
    return name


def _tensors(values: list[onnx.ValueInfoProto], what: str, path: Path) -> list[TensorConfig]:
    out: list[TensorConfig] = []
    for value in values:
        ttype = value.type.tensor_type
        data_type = _TRITON_TYPES.get(ttype.elem_type)
        if data_type is None:
            raise ValueError(f"{path}: {what} {value.name!r} has ONNX element type "
                             f"{onnx.TensorProto.DataType.Name(ttype.elem_type)}, which Triton lacks")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
        if not dims or ttype.shape.dim[0].HasField("dim_value"):
            raise ValueError(f"{path}: {what} {value.name!r} has no dynamic batch axis "
                             f"(shape {dims}); Triton batching needs one")
        out.append(TensorConfig(value.name, data_type, dims[1:]))
    return out


def onnx_io(path: Path) -> tuple[list[TensorConfig], list[TensorConfig]]:
    """The graph's real inputs (initializers excluded) and outputs, batch axis stripped."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    inputs = [v for v in graph.input if v.name not in weights]
    return _tensors(inputs, "input", path), _tensors(list(graph.output), "output", path)


def _dims(dims: list[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def render_config(model: TritonModel, max_batch_size: int, max_queue_delay_us: int,
                  instances: int, comment: str = "") -> str:
    """config.pbtxt text (protobuf text format of Triton's ModelConfig)."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [
        f'name: "{model.name}"',
        'platform: "onnxruntime_onnx"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        f"version_policy: {{ specific: {{ versions: [ {model.version} ] }} }}",
    ]
    for key, tensors in (("input", model.inputs), ("output", model.outputs)):
        lines.append(f"{key} [")
        body = [
            f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: {_dims(t.dims)}\n  }}'
            for t in tensors
        ]
        lines.append(",\n".join(body))
        lines.append("]")
    lines += [
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        f"instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]",
    ]
    return "\n".join(lines) + "\n"


def _check_against_manifest(bundle: Bundle, inputs: list[TensorConfig],
                            outputs: list[TensorConfig]) -> None:
    spec = bundle.manifest.cloud
    by_name = {t.name: t for t in inputs}
    got = by_name.get(spec.input_name)
    if got is None or len(inputs) != 1:
        raise ValueError(f"bundle {bundle.name!r}: cloud.onnx inputs {sorted(by_name)} are not "
                         f"the manifest's one input {spec.input_name!r}")
    if got.dims != list(spec.input_shape):
        raise ValueError(f"bundle {bundle.name!r}: cloud.onnx input {got.name!r} has dims "
                         f"{got.dims}, the manifest says {spec.input_shape}")
    if spec.output_name not in {t.name for t in outputs}:
        raise ValueError(f"bundle {bundle.name!r}: cloud.onnx has no output {spec.output_name!r} "
                         f"(has {[t.name for t in outputs]})")


def export_triton(
    out: Path,
    *,
    repository: Path | None = None,
    models: list[str] | None = None,
    names: dict[str, str] | None = None,
    max_batch_size: int = 128,
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    overwrite: bool = False,
) -> list[TritonModel]:
    """Write a Triton model repository under ``out`` for the bundles' cloud parts.

    ``models``: bundle names (default: every bundle with a cloud part); ``names``: bundle ->
    Triton model name (default: the manifest's cloud model name, which the edge calls).
    Edge-only bundles named explicitly are an error; in the default set they are skipped.
    An existing model folder is an error unless ``overwrite``.
    """
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1 (the cloud parts have a batch axis)")
    if max_queue_delay_us < 0 or instances < 1:
        raise ValueError("max_queue_delay_us must be >= 0 and instances >= 1")
    repo = ModelRepository(repository)
    chosen = list(models) if models else repo.names(with_cloud=True)
    names = dict(names or {})
    unknown = sorted(set(names) - set(chosen))
    if unknown:
        raise ValueError(f"--name given for bundle(s) {unknown} that are not exported")
    plans: list[tuple[Bundle, TritonModel]] = []
    for bundle_name in chosen:
        bundle = repo.get(bundle_name)
        if bundle.manifest.edge_only:
            raise ValueError(f"bundle {bundle_name!r} is edge-only (cloud.offload none): "
                             "it has no cloud part to export")
        if not bundle.cloud_onnx.is_file():
            raise FileNotFoundError(f"bundle {bundle_name!r}: {bundle.cloud_onnx} is missing")
        name = check_triton_name(names.get(bundle_name, bundle.manifest.cloud_model_name))
        version = int(bundle.manifest.version) if bundle.manifest.version.isdigit() else 1
        if version < 1:
            version = 1
        inputs, outputs = onnx_io(bundle.cloud_onnx)
        _check_against_manifest(bundle, inputs, outputs)
        plans.append((bundle, TritonModel(bundle_name, name, version, Path(out) / name,
                                          inputs, outputs)))
    taken = [m.name for _, m in plans]
    if len(set(taken)) != len(taken):
        raise ValueError(f"two bundles would share a Triton model name: {taken}")
    for _, model in plans:
        if model.path.exists() and not overwrite:
            raise ValueError(f"{model.path} exists; pass --overwrite to replace it")
    for bundle, model in plans:
        if model.path.exists():
            shutil.rmtree(model.path)
        (model.path / str(model.version)).mkdir(parents=True)
        shutil.copyfile(bundle.cloud_onnx, model.path / str(model.version) / MODEL_FILE)
        spec = bundle.manifest.cloud
        comment = (f"Written by `edgecloud export triton` from bundle {bundle.name} "
                   f"(version {bundle.manifest.version}).\n"
                   f"Offload encoding {spec.encoding}: the edge sends {spec.input_name} as "
                   f"{model.inputs[0].data_type}; the decoder is inside the model.")
        text = render_config(model, max_batch_size, max_queue_delay_us, instances, comment)
        (model.path / CONFIG_FILE).write_text(text)
    return [model for _, model in plans]
