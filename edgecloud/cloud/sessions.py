"""One ONNX Runtime session per bundle's ``cloud.onnx``.

To the cloud a bundle's cloud part is just an ONNX model with one input
(``manifest.cloud.input_name``, shape ``[N] + cloud.input_shape``) and logits out. The input
is the offload's level tensor (``cloud.encoding``'s base: FP32, FP16, or UINT8 levels for every
uintK, see :mod:`edgecloud.offload`), decoded to float inside the ONNX graph. For fp32, fp16 and
uint8 that is the wire tensor itself; the packed and entropy-coded encodings arrive as a BYTES
tensor (one payload per sample) that :meth:`CloudModel.run` (or the servicer, per request)
unpacks in numpy first (:func:`edgecloud.offload.unpack`). It may be the tail of a split network (input: intermediate
features) or a whole model (input: the raw sample); both load the same way. The session's
threading comes from :class:`CloudConfig`: ``intra_op_threads`` and
``session.intra_op.allow_spinning`` (spinning starves other processes on a 2-core machine, so
it can be turned off).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgecloud import offload
from edgecloud.bundle import Bundle, CloudSpec, ModelRepository, cloud_name_for
from edgecloud.config import CloudConfig

PROBABILITIES = "probabilities"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True).astype(np.float32)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def session_options(config: CloudConfig) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    if config.intra_op_threads:
        opts.intra_op_num_threads = int(config.intra_op_threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning",
                                  "1" if config.allow_spinning else "0")
    return opts


@dataclass
class CloudModel:
    """A loaded cloud part and the tensor contract it is served under."""

    name: str                      # served name (cloud.model_names, else manifest.cloud_model_name)
    version: str
    bundle: Bundle
    session: ort.InferenceSession
    input_name: str                # OIP input name == ONNX input name
    input_shape: list[int]         # one sample
    output_name: str               # OIP name of the logits output
    onnx_output: str               # ONNX output that holds the logits
    num_classes: int
    macs: int                      # per sample, for energy accounting
    max_batch_size: int | None = None  # set when the ONNX batch dimension is fixed at 1
    offload: str = "features"
    outputs: list[str] = field(default_factory=list)

    @property
    def spec(self) -> CloudSpec:
        return self.bundle.manifest.cloud

    @property
    def datatype(self) -> str:
        """The OIP datatype of the input on the wire (FP32, FP16, UINT8 or BYTES)."""
        return offload.wire_datatype(self.spec)

    @property
    def wire_shape(self) -> list[int]:
        """One sample's shape on the wire: ``input_shape``, or ``[]`` for BYTES (one payload)."""
        return offload.wire_shape(self.spec)

    def levels(self, batch: np.ndarray) -> np.ndarray:
        """What the ONNX session takes, from the wire tensor (BYTES payloads are unpacked),
        from the level tensor itself, or from float features (quantized exactly as the edge
        encodes them: the lossless layer gives the same levels back). ValueError if none fits."""
        spec = self.spec
        batch = np.asarray(batch)
        if batch.dtype == offload.wire_dtype(spec):
            return offload.unpack(batch, spec)
        shape = [*batch.shape[1:]]
        if batch.dtype == offload.level_dtype(spec) and shape == list(self.input_shape):
            bits = offload.uint_bits(spec)
            if bits is not None and bits < 8 and batch.size and int(batch.max()) > offload.levels(spec):
                raise ValueError(f"model {self.name!r}: {spec.encoding} levels lie in 0..{offload.levels(spec)}, "
                                 f"got {int(batch.max())}")
            return batch
        if batch.dtype.kind == "f":
            return offload.quantize(batch, spec)
        raise ValueError(
            f"model {self.name!r} takes {self.datatype} (or float features to encode), got {batch.dtype}"
        )

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Logits and softmax probabilities, FP32 [N, C].

        ``batch`` is the wire tensor, or the level tensor it unpacks to. Float features (from an
        in-process caller such as the evaluator) are encoded first, exactly as the edge would
        send them.
        """
        batch = np.ascontiguousarray(self.levels(batch))
        (logits,) = self.session.run([self.onnx_output], {self.input_name: batch})
        logits = np.asarray(logits, dtype=np.float32).reshape(batch.shape[0], -1)
        return {self.output_name: logits, PROBABILITIES: softmax(logits)}


def _static(dim: object) -> int | None:
    return dim if isinstance(dim, int) else None


def served_name(bundle: Bundle, config: CloudConfig) -> str:
    """The name ``bundle``'s cloud part is served under: ``cloud.model_names`` (--serve-as),
    else the manifest's (see :func:`edgecloud.bundle.cloud_name_for`)."""
    m = bundle.manifest
    return cloud_name_for(m, config.model_names,
                          f"serve it under another name with cloud.model_names.{m.name} (--serve-as {m.name}=NAME)")


def load_cloud_model(bundle: Bundle, config: CloudConfig) -> CloudModel:
    """Open ``bundle``'s cloud.onnx and check it against the manifest (clear errors)."""
    m = bundle.manifest
    if m.edge_only:
        raise ValueError(f"bundle {m.name!r} is edge-only (cloud.offload 'none'): it has no cloud part to serve")
    name = served_name(bundle, config)
    path: Path = bundle.cloud_onnx
    if not path.is_file():
        raise FileNotFoundError(f"bundle {m.name!r}: no {path.name} in {bundle.path}")
    try:
        session = ort.InferenceSession(
            str(path), sess_options=session_options(config), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ValueError(f"bundle {m.name!r}: cannot load {path}: {exc}") from exc
    inputs = {i.name: i for i in session.get_inputs()}
    spec = m.cloud
    if spec.input_name not in inputs or len(inputs) != 1:
        raise ValueError(
            f"bundle {m.name!r}: manifest cloud.input_name={spec.input_name!r} but {path.name} "
            f"has inputs {sorted(inputs)} (exactly one expected)"
        )
    onnx_in = inputs[spec.input_name]
    if onnx_in.type != offload.onnx_input_type(spec):
        raise ValueError(
            f"bundle {m.name!r}: {path.name} input {spec.input_name!r} is {onnx_in.type}, but "
            f"the manifest's cloud.encoding={spec.encoding!r} sends {offload.wire_datatype(spec)} "
            f"and needs {offload.onnx_input_type(spec)} (export the cloud part behind "
            "edgecloud.offload.CloudInputDecoder)"
        )
    dims = list(onnx_in.shape)
    if len(dims) != 1 + len(spec.input_shape):
        raise ValueError(
            f"bundle {m.name!r}: {path.name} input rank {len(dims)} does not match "
            f"[N] + cloud.input_shape {spec.input_shape}"
        )
    for got, want in zip(dims[1:], spec.input_shape):
        if _static(got) is not None and got != want:
            raise ValueError(
                f"bundle {m.name!r}: {path.name} input shape {dims} does not match "
                f"cloud.input_shape {spec.input_shape}"
            )
    max_batch = None
    batch_dim = _static(dims[0])
    if batch_dim is not None:
        if batch_dim != 1:
            raise ValueError(
                f"bundle {m.name!r}: {path.name} has a fixed batch dimension {batch_dim}; "
                "export it with a dynamic batch axis"
            )
        max_batch = 1
    outputs = [o.name for o in session.get_outputs()]
    onnx_output = spec.output_name if spec.output_name in outputs else outputs[0]
    model = CloudModel(
        name=name, version=m.version, bundle=bundle, session=session,
        input_name=spec.input_name, input_shape=list(spec.input_shape),
        output_name=spec.output_name, onnx_output=onnx_output, num_classes=len(m.classes),
        macs=int(spec.macs), max_batch_size=max_batch, offload=spec.offload, outputs=outputs,
    )
    # Warm up (first run allocates the arena) and check the class count on the way.
    probe = model.run(np.zeros([1, *spec.input_shape], dtype=offload.level_dtype(spec)))[spec.output_name]
    if probe.shape[1] != model.num_classes:
        raise ValueError(
            f"bundle {m.name!r}: {path.name} gives {probe.shape[1]} logits but the manifest "
            f"lists {model.num_classes} classes"
        )
    return model


def load_cloud_models(config: CloudConfig) -> dict[str, CloudModel]:
    """Every requested bundle (all in the repository that have a cloud part if ``config.models``
    is empty; edge-only bundles are skipped), by served name."""
    repo = ModelRepository(config.repository)
    names = config.models or repo.names(with_cloud=True)
    if not names:
        raise ValueError(f"model repository {repo.root} holds no bundles")
    unknown = sorted(set(config.model_names) - set(names))
    if unknown:
        raise ValueError(f"cloud.model_names (--serve-as) names bundle(s) {unknown} that are not "
                         f"served; served: {', '.join(names)}")
    models: dict[str, CloudModel] = {}
    for name in names:
        model = load_cloud_model(repo.get(name), config)
        if model.name in models:
            raise ValueError(f"two bundles serve the cloud model name {model.name!r}")
        models[model.name] = model
    return models
