"""Offload encodings: how a bundle's cloud input travels from the edge to the cloud.

The radio costs energy per bit (``radio_bit`` in the energy table), so an FP32 feature map can
cost more to send than the raw uint8 image it came from. Split-computing systems (DDNN, SPINN)
therefore compress the transferred tensor; the manifest's ``cloud.encoding`` says how:

* ``fp32`` — the features as they are (4 bytes per element; the default).
* ``fp16`` — IEEE half precision (2 bytes); values beyond ±65504 are clipped, not made infinite.
* ``uint8`` — affine quantization (1 byte): ``q = clip(round_half_even(x / scale) + zero_point,
  0, 255)`` and ``x ≈ (q - zero_point) * scale`` (float32 arithmetic, as ONNX Runtime does it).

The tensor on the wire has the encoding's OIP datatype (:func:`wire_datatype`), and the cloud
part takes it directly: :class:`CloudInputDecoder` wraps the cloud module so that the exported
``cloud.onnx`` decodes its own input. Edge and cloud therefore share exactly one definition of
the encoding — this module — and the cloud never sees float features it did not decode itself.

torch is imported lazily (the cloud server only needs the numpy half); ``CloudInputDecoder`` is
built on first access.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edgecloud.bundle import CloudSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

Encoding = Literal["fp32", "fp16", "uint8"]

WIRE_DATATYPES: dict[str, str] = {"fp32": "FP32", "fp16": "FP16", "uint8": "UINT8"}
WIRE_DTYPES: dict[str, np.dtype] = {
    "fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "uint8": np.dtype(np.uint8),
}
ONNX_INPUT_TYPES: dict[str, str] = {  # onnxruntime's NodeArg.type of the cloud.onnx input
    "fp32": "tensor(float)", "fp16": "tensor(float16)", "uint8": "tensor(uint8)",
}
FLOAT_DATATYPES = ("FP32", "FP16")  # the wire types that can carry NaN/Inf
FP16_MAX = float(np.finfo(np.float16).max)
UINT8_LEVELS = 255
DEFAULT_PERCENTILE = 99.99
ONNX_OPSET = 17  # as edgecloud.export


# ---- what travels ------------------------------------------------------------------------
def wire_datatype(spec: CloudSpec) -> str:
    """The OIP datatype of the offloaded tensor: ``FP32``, ``FP16`` or ``UINT8``."""
    return WIRE_DATATYPES[spec.encoding]


def wire_dtype(spec: CloudSpec) -> np.dtype:
    """The numpy dtype of the offloaded tensor."""
    return WIRE_DTYPES[spec.encoding]


def onnx_input_type(spec: CloudSpec) -> str:
    """The input type ``cloud.onnx`` must declare for this encoding (as onnxruntime prints it)."""
    return ONNX_INPUT_TYPES[spec.encoding]


def bytes_per_sample(spec: CloudSpec) -> int:
    """Bytes one offloaded sample takes on the wire (what the radio pays for)."""
    return int(np.prod(spec.input_shape, dtype=np.int64)) * wire_dtype(spec).itemsize


def uint8_range(spec: CloudSpec) -> tuple[float, float]:
    """The float interval a uint8 encoding represents: ``[(0 - zp) * s, (255 - zp) * s]``."""
    return (-spec.zero_point * spec.scale, (UINT8_LEVELS - spec.zero_point) * spec.scale)


# ---- numpy encode / decode ---------------------------------------------------------------
def encode(features: np.ndarray, spec: CloudSpec) -> np.ndarray:
    """Float features -> the wire tensor (contiguous, the encoding's dtype)."""
    x = np.asarray(features, dtype=np.float32)
    if spec.encoding == "fp32":
        return np.ascontiguousarray(x)
    if spec.encoding == "fp16":
        return np.ascontiguousarray(np.clip(x, -FP16_MAX, FP16_MAX).astype(np.float16))
    # float64 keeps x / scale exact enough that ties round half to even as specified
    q = np.rint(x.astype(np.float64) / spec.scale) + spec.zero_point
    np.clip(q, 0, UINT8_LEVELS, out=q)
    return np.ascontiguousarray(q.astype(np.uint8))


def decode(wire: np.ndarray, spec: CloudSpec) -> np.ndarray:
    """The wire tensor -> float32 features, with the same float32 arithmetic as
    :class:`CloudInputDecoder` (so numpy and the exported ONNX agree)."""
    want = wire_dtype(spec)
    if wire.dtype != want:
        raise ValueError(f"{spec.encoding} offload must be {want}, got {wire.dtype}")
    if spec.encoding != "uint8":
        return wire.astype(np.float32)
    return (wire.astype(np.float32) - np.float32(spec.zero_point)) * np.float32(spec.scale)


def _as_numpy(features: Any) -> np.ndarray:
    if hasattr(features, "detach"):  # a torch tensor, without importing torch here
        features = features.detach().float().cpu().numpy()
    return np.asarray(features, dtype=np.float32)


def calibrate_uint8(features: Any, percentile: float = DEFAULT_PERCENTILE) -> tuple[float, int]:
    """``(scale, zero_point)`` covering ``[low, high]`` = the ``100 - percentile`` and
    ``percentile`` percentiles of ``features`` (torch tensor or numpy array).

    The range always contains 0 (so zero is exact: ReLU outputs stay exact zeros), which makes
    ``zero_point`` 0 for non-negative features. Clipping the extreme tail (percentile < 100)
    spends the 256 levels on the values that occur. ``scale`` is rounded to float32, the
    precision both the edge encoder and the cloud's decoder use.
    """
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must lie in (50, 100], got {percentile}")
    x = _as_numpy(features).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("cannot calibrate uint8 offload on no (finite) features")
    low = min(float(np.percentile(x, 100.0 - percentile)), 0.0)
    high = max(float(np.percentile(x, percentile)), 0.0)
    span = high - low
    if span <= 0.0:  # all zeros: any scale represents them exactly
        return 1.0, 0
    scale = float(np.float32(span / UINT8_LEVELS))
    zero_point = int(np.clip(np.rint(-low / scale), 0, UINT8_LEVELS))
    return scale, zero_point


def with_encoding(spec: CloudSpec, encoding: Encoding, features: Any = None,
                  percentile: float = DEFAULT_PERCENTILE) -> CloudSpec:
    """A copy of ``spec`` with ``encoding``; uint8 needs calibration ``features``."""
    update: dict[str, Any] = {"encoding": encoding, "scale": 1.0, "zero_point": 0}
    if encoding == "uint8":
        if features is None:
            raise ValueError("uint8 offload needs calibration features (the edge's offloads)")
        update["scale"], update["zero_point"] = calibrate_uint8(features, percentile)
    return CloudSpec.model_validate({**spec.model_dump(), **update})


# ---- the cloud side in torch (export) -----------------------------------------------------
def _decoder_class() -> type:
    from torch import nn

    class CloudInputDecoder(nn.Module):
        """``cloud_module`` behind the offload decoder: forward takes the WIRE tensor (uint8,
        float16 or float32), turns it into float32 features and runs the cloud part, so the
        exported ONNX accepts the wire datatype directly (Cast, Sub, Mul in the graph)."""

        def __init__(self, cloud_module: nn.Module, spec: CloudSpec) -> None:
            super().__init__()
            self.cloud = cloud_module
            self.encoding = spec.encoding
            self.scale = float(spec.scale)
            self.zero_point = int(spec.zero_point)

        def forward(self, wire: torch.Tensor) -> torch.Tensor:
            x = wire.float()
            if self.encoding == "uint8":
                x = (x - float(self.zero_point)) * self.scale
            return self.cloud(x)

    return CloudInputDecoder


_LAZY: dict[str, type] = {}


def __getattr__(name: str) -> Any:  # PEP 562: build the nn.Module subclass on first use
    if name == "CloudInputDecoder":
        if name not in _LAZY:
            _LAZY[name] = _decoder_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def wire_example(spec: CloudSpec, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded random batch of wire tensors (for tracing and checking an export)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (batch, *spec.input_shape)
    if spec.encoding == "uint8":
        return torch.randint(0, UINT8_LEVELS + 1, shape, generator=g, dtype=torch.uint8)
    x = torch.randn(shape, generator=g)
    return x.half() if spec.encoding == "fp16" else x


def export_wire_onnx(cloud_module: nn.Module, path: str | Path, spec: CloudSpec, *,
                     opset: int = ONNX_OPSET) -> None:
    """Export ``cloud_module`` behind its decoder: input ``spec.input_name`` of the wire
    datatype with a dynamic batch dimension, output ``spec.output_name``, weights embedded."""
    import torch

    decoder = __getattr__("CloudInputDecoder")
    module = copy.deepcopy(cloud_module).float().eval().to(memory_format=torch.contiguous_format)
    wrapped = decoder(module, spec).eval()
    names = (spec.input_name, spec.output_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            wrapped, (wire_example(spec),), str(path),
            input_names=[names[0]], output_names=[names[1]],
            dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}},
            opset_version=opset, dynamo=False,
        )


def verify_wire_onnx(cloud_module: nn.Module, path: str | Path, spec: CloudSpec,
                     atol: float = 1e-4, batch: int = 3) -> float:
    """Max |ORT - torch| of the exported decoder+cloud on a random wire batch; raises if above
    ``atol`` (relative to the logit scale) or if the ONNX input type is not the wire type."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (onnx_in,) = session.get_inputs()
    if onnx_in.type != onnx_input_type(spec):
        raise RuntimeError(f"{path}: input is {onnx_in.type}, {spec.encoding} needs {onnx_input_type(spec)}")
    wire = wire_example(spec, batch=batch, seed=1)
    wrapped = __getattr__("CloudInputDecoder")(copy.deepcopy(cloud_module).float().eval(), spec).eval()
    with torch.no_grad():
        expected = wrapped(wire).numpy()
    got = session.run([spec.output_name], {spec.input_name: wire.numpy()})[0]
    err = float(np.abs(got - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    if err > atol * scale:
        raise RuntimeError(f"ONNX export of the {spec.encoding} cloud part differs from torch by {err:.3g}")
    return err


def offload_features(model: Any, x: torch.Tensor) -> torch.Tensor:
    """The cloud input a split model produces for every sample of ``x`` (no exit taken):
    what ``calibrate_uint8`` should see."""
    import torch

    from edgecloud.exits import ExitPolicy

    never = ExitPolicy("entropy", [0.0] * len(model.exit_names))  # entropy < 0 never holds
    training = model.training
    try:
        with torch.inference_mode():
            decision = model.eval().route(x, never)
    finally:
        model.train(training)
    return decision.offload.float()


__all__ = [
    "CloudInputDecoder", "FLOAT_DATATYPES", "bytes_per_sample", "calibrate_uint8", "decode",
    "encode", "export_wire_onnx", "offload_features", "onnx_input_type", "uint8_range",
    "verify_wire_onnx", "wire_datatype", "wire_dtype", "wire_example", "with_encoding",
]
