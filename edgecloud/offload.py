"""Offload encodings: how a bundle's cloud input travels from the edge to the cloud.

The radio costs energy per bit (``radio_bit`` in the energy table), so an FP32 feature map can
cost more to send than the raw uint8 image it came from. Split-computing systems (DDNN, SPINN)
therefore compress the transferred tensor; the manifest's ``cloud.encoding`` says how. An
encoding is a *base* (how each element becomes a level) optionally followed by a *lossless*
layer (how the per-sample stream of levels is entropy coded):

* ``fp32`` — the features as they are (4 bytes per element; the default).
* ``fp16`` — IEEE half precision (2 bytes); values beyond ±65504 are clipped, not made infinite.
* ``uintK`` for K = 8, 4, 2 — affine quantization to ``L = 2**K - 1`` levels:
  ``q = clip(round_half_even(x / scale) + zero_point, 0, L)`` and ``x ≈ (q - zero_point) * scale``
  (float32 arithmetic, as ONNX Runtime does it). ``scale``/``zero_point`` are calibrated by
  :func:`calibrate` on the validation split's offloaded features: the range spans the
  ``100 - p``-th to ``p``-th percentile, always containing 0. ``uint4``/``uint2`` are bit-packed
  on the wire: 2 (4) elements per byte, element ``j`` of a byte in bits ``K*j .. K*j+K-1``
  (the first element in the lowest bits), each sample's stream padded with zero bits to whole
  bytes, so one sample takes ``ceil(elements * K / 8)`` bytes.
* ``BASE+zstd`` (e.g. ``uint8+zstd``, ``uint4+zstd``) — the base's per-sample byte stream
  (little-endian floats, uint8 levels or the packed bits) compressed by Zstandard (Huffman + FSE
  entropy coding after LZ matching; one frame per sample, level :data:`ZSTD_LEVEL`, content size
  in the frame header, no checksum: gRPC/TCP already check the bytes). Lossless: the cloud gets
  exactly the base's levels back. The ``zstandard`` package (the maintained binding of the
  reference C library, a project dependency) does it; the cloud refuses a frame that would
  decompress to anything but one sample's stream.

What travels, over OIP:

* ``fp32``, ``fp16``, ``uint8``: a tensor ``[N, *cloud.input_shape]`` of FP32/FP16/UINT8, as
  before: fixed length, ``N * elements * itemsize`` bytes.
* every other encoding (packed or entropy coded): a ``BYTES`` tensor of shape ``[N]``, one
  element per sample holding that sample's payload (:func:`wire_datatype` is ``"BYTES"``; in
  numpy an object array of ``bytes``). On the wire each element is OIP's 4-byte little-endian
  length followed by the payload (:mod:`edgecloud.protocol.codec`). Entropy-coded payloads
  differ in length from sample to sample, and one element per sample keeps every sample's
  payload separable, so the cloud's batcher can concatenate requests and a bad payload fails
  only its own request.

Radio energy is counted from the payload bytes actually sent (:func:`wire_bytes`, per sample:
``len(payload)`` for BYTES, ``elements * itemsize`` for a tensor); OIP framing (the 4-byte
length of a BYTES element, protobuf and gRPC headers) is not counted, for any encoding.

Where the decoding happens (one design for all): ``cloud.onnx`` takes the *level tensor* of the
encoding's base — float32 for fp32, float16 for fp16, uint8 levels for every ``uintK`` — and
decodes it itself (:class:`CloudInputDecoder`: Cast, Sub, Mul in the graph, with the manifest's
scale and zero point). For fp32/fp16/uint8 the level tensor is the wire tensor, so nothing runs
outside the graph (as before). For BYTES encodings the cloud first turns the payloads into the
level tensor in numpy (:func:`unpack`: zstd decompression, then bit unpacking), before its ONNX
session; that step is lossless and has no parameters, so ``cloud.onnx`` depends only on the base
and its scale/zero point (``uint8`` and ``uint8+zstd`` share one cloud.onnx). Edge and cloud
therefore share exactly one definition of each encoding — this module: :func:`encode` on the
edge, :func:`unpack` + the exported decoder (or :func:`decode`, the same arithmetic in numpy) on
the cloud.

torch is imported lazily (the cloud server only needs the numpy half); ``CloudInputDecoder`` is
built on first access.
"""

from __future__ import annotations

import copy
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from edgecloud.bundle import CloudSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

Encoding = Literal[
    "fp32", "fp16", "uint8", "uint4", "uint2",
    "fp32+zstd", "fp16+zstd", "uint8+zstd", "uint4+zstd", "uint2+zstd",
]
ENCODINGS: tuple[str, ...] = get_args(Encoding)
BASES: tuple[str, ...] = ("fp32", "fp16", "uint8", "uint4", "uint2")
LOSSLESS: tuple[str, ...] = ("zstd",)
UINT_BITS: dict[str, int] = {"uint8": 8, "uint4": 4, "uint2": 2}

TENSOR_DATATYPES: dict[str, str] = {"fp32": "FP32", "fp16": "FP16", "uint8": "UINT8"}
BYTES = "BYTES"
LEVEL_DTYPES: dict[str, np.dtype] = {  # what cloud.onnx takes, per base
    "fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16),
    "uint8": np.dtype(np.uint8), "uint4": np.dtype(np.uint8), "uint2": np.dtype(np.uint8),
}
OBJECT = np.dtype(object)
WIRE_DATATYPES: dict[str, str] = {e: TENSOR_DATATYPES.get(e, BYTES) for e in ENCODINGS}
WIRE_DTYPES: dict[str, np.dtype] = {
    e: (LEVEL_DTYPES[e] if e in TENSOR_DATATYPES else OBJECT) for e in ENCODINGS
}
_ONNX_TYPES = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)",
               np.dtype(np.uint8): "tensor(uint8)"}
ONNX_INPUT_TYPES: dict[str, str] = {  # onnxruntime's NodeArg.type of the cloud.onnx input
    e: _ONNX_TYPES[LEVEL_DTYPES[e.split("+")[0]]] for e in ENCODINGS
}
FLOAT_DATATYPES = ("FP32", "FP16")  # the wire types that can carry NaN/Inf
FP16_MAX = float(np.finfo(np.float16).max)
UINT8_LEVELS = 255
DEFAULT_PERCENTILE = 99.99
ZSTD_LEVEL = 9  # smaller frames than the default 3 on feature maps, ~0.5 ms per 8 KB sample
ONNX_OPSET = 17  # as edgecloud.export


# ---- the parts of an encoding name --------------------------------------------------------
def _name(spec_or_encoding: CloudSpec | str) -> str:
    name = spec_or_encoding if isinstance(spec_or_encoding, str) else spec_or_encoding.encoding
    if name not in ENCODINGS:
        raise ValueError(f"unknown offload encoding {name!r}; known: {', '.join(ENCODINGS)}")
    return name


def base_of(spec_or_encoding: CloudSpec | str) -> str:
    """The element encoding: ``fp32``, ``fp16``, ``uint8``, ``uint4`` or ``uint2``."""
    return _name(spec_or_encoding).split("+")[0]


def lossless_of(spec_or_encoding: CloudSpec | str) -> str | None:
    """The lossless layer after the base (``zstd``), or None."""
    parts = _name(spec_or_encoding).split("+")
    return parts[1] if len(parts) > 1 else None


def uint_bits(spec_or_encoding: CloudSpec | str) -> int | None:
    """Bits per element of an affine (``uintK``) base; None for fp32/fp16."""
    return UINT_BITS.get(base_of(spec_or_encoding))


def levels(spec_or_encoding: CloudSpec | str) -> int:
    """The largest level of a ``uintK`` base (``2**K - 1``); ValueError for float bases."""
    bits = uint_bits(spec_or_encoding)
    if bits is None:
        raise ValueError(f"{_name(spec_or_encoding)} is not an affine (uintK) encoding")
    return (1 << bits) - 1


def is_bytes(spec_or_encoding: CloudSpec | str) -> bool:
    """True when the wire is a BYTES tensor, one payload per sample (packed or entropy coded)."""
    return WIRE_DATATYPES[_name(spec_or_encoding)] == BYTES


def fixed_length(spec_or_encoding: CloudSpec | str) -> bool:
    """True when every sample's payload has the same size (no lossless layer)."""
    return lossless_of(spec_or_encoding) is None


# ---- what travels ------------------------------------------------------------------------
def wire_datatype(spec: CloudSpec) -> str:
    """The OIP datatype of the offloaded tensor: ``FP32``, ``FP16``, ``UINT8`` or ``BYTES``."""
    return WIRE_DATATYPES[_name(spec)]


def wire_dtype(spec: CloudSpec) -> np.dtype:
    """The numpy dtype of the offloaded tensor (``object`` for BYTES: one ``bytes`` per sample)."""
    return WIRE_DTYPES[_name(spec)]


def wire_shape(spec: CloudSpec) -> list[int]:
    """One sample's shape on the wire: ``cloud.input_shape``, or ``[]`` for BYTES (one element)."""
    return [] if is_bytes(spec) else list(spec.input_shape)


def level_dtype(spec: CloudSpec) -> np.dtype:
    """The dtype of the tensor ``cloud.onnx`` takes (the base's levels)."""
    return LEVEL_DTYPES[base_of(spec)]


def onnx_input_type(spec: CloudSpec) -> str:
    """The input type ``cloud.onnx`` must declare for this encoding (as onnxruntime prints it)."""
    return ONNX_INPUT_TYPES[_name(spec)]


def elements(spec: CloudSpec) -> int:
    return int(np.prod(spec.input_shape, dtype=np.int64))


def stream_bytes(spec: CloudSpec) -> int:
    """Bytes of one sample's stream before the lossless layer (the packed size for uint4/uint2)."""
    n = elements(spec)
    bits = uint_bits(spec)
    if bits is not None and bits < 8:
        return -(-n * bits // 8)
    return n * LEVEL_DTYPES[base_of(spec)].itemsize


def bytes_per_sample(spec: CloudSpec) -> int:
    """Bytes one offloaded sample takes on the wire (what the radio pays for) for a
    fixed-length encoding; for an entropy-coded one, the size of the stream it compresses (an
    upper bound up to the frame header — count what was sent with :func:`wire_bytes`)."""
    return stream_bytes(spec)


def wire_bytes(wire: np.ndarray, spec: CloudSpec | None = None) -> np.ndarray:
    """Payload bytes of every row of an encoded batch ([N] int64): ``len(payload)`` of each
    BYTES element, else the row's ``elements * itemsize``."""
    wire = np.asarray(wire)
    if wire.dtype == OBJECT:
        return np.fromiter((len(p) for p in wire.reshape(-1)), dtype=np.int64, count=wire.size)
    n = int(wire.shape[0]) if wire.ndim else 1
    per_row = int(wire.nbytes // n) if n else 0
    return np.full(n, per_row, dtype=np.int64)


def uint8_range(spec: CloudSpec) -> tuple[float, float]:
    """The float interval an affine encoding represents: ``[(0 - zp) * s, (L - zp) * s]``."""
    top = levels(spec) if uint_bits(spec) is not None else UINT8_LEVELS
    return (-spec.zero_point * spec.scale, (top - spec.zero_point) * spec.scale)


value_range = uint8_range


# ---- bit packing -------------------------------------------------------------------------
def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 levels ``[N, ...]`` (each < 2**bits) -> ``[N, ceil(elements * bits / 8)]`` uint8,
    element ``j`` of each byte in bits ``bits*j ..`` (first element lowest)."""
    n = q.shape[0]
    flat = np.ascontiguousarray(q, dtype=np.uint8).reshape(n, -1)
    per = 8 // bits
    pad = (-flat.shape[1]) % per
    if pad:
        flat = np.concatenate([flat, np.zeros((n, pad), np.uint8)], axis=1)
    groups = flat.reshape(n, -1, per)
    out = np.zeros(groups.shape[:2], dtype=np.uint8)
    for j in range(per):
        out |= groups[:, :, j] << np.uint8(bits * j)
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``[N, nbytes]`` -> ``[N, count]`` uint8 levels."""
    n = packed.shape[0]
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    out = np.empty((n, packed.shape[1], per), dtype=np.uint8)
    for j in range(per):
        out[:, :, j] = (packed >> np.uint8(bits * j)) & mask
    return out.reshape(n, -1)[:, :count]


# ---- the lossless layer (zstd) -----------------------------------------------------------
_ZSTD = threading.local()  # zstandard (de)compressors are not thread-safe: one per thread


def _zstd() -> tuple[Any, Any]:
    pair = getattr(_ZSTD, "pair", None)
    if pair is None:
        try:
            import zstandard
        except ImportError as exc:  # pragma: no cover - a project dependency
            raise RuntimeError("the +zstd offload encodings need the 'zstandard' package "
                               "(pip install zstandard)") from exc
        pair = (zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False, write_content_size=True,
                                         write_dict_id=False),
                zstandard.ZstdDecompressor())
        _ZSTD.pair = pair
    return pair


def _compress(stream: bytes) -> bytes:
    return _zstd()[0].compress(stream)


def _decompress(payload: bytes, size: int, row: int) -> bytes:
    import zstandard

    try:
        params = zstandard.get_frame_parameters(payload)
        if params.content_size != size:
            raise ValueError(f"frame holds {params.content_size} bytes, one sample is {size}")
        out = _zstd()[1].decompress(payload, max_output_size=size)
    except (zstandard.ZstdError, ValueError) as exc:
        raise ValueError(f"sample {row}: not a zstd frame of one sample's stream ({exc})") from exc
    if len(out) != size:
        raise ValueError(f"sample {row}: zstd frame decompressed to {len(out)} bytes, expected {size}")
    return out


# ---- numpy encode / decode ---------------------------------------------------------------
def quantize(features: np.ndarray, spec: CloudSpec) -> np.ndarray:
    """Float features -> the base's level tensor (the dtype cloud.onnx takes), same shape."""
    x = np.asarray(features, dtype=np.float32)
    base = base_of(spec)
    if base == "fp32":
        return np.ascontiguousarray(x)
    if base == "fp16":
        return np.ascontiguousarray(np.clip(x, -FP16_MAX, FP16_MAX).astype(np.float16))
    # float64 keeps x / scale exact enough that ties round half to even as specified
    q = np.rint(x.astype(np.float64) / spec.scale) + spec.zero_point
    np.clip(q, 0, levels(spec), out=q)
    return np.ascontiguousarray(q.astype(np.uint8))


def encode(features: np.ndarray, spec: CloudSpec) -> np.ndarray:
    """Float features ``[N, *input_shape]`` -> the wire tensor: the level tensor for
    fp32/fp16/uint8, else an object array ``[N]`` of per-sample ``bytes`` payloads."""
    q = quantize(features, spec)
    if not is_bytes(spec):
        return q
    n = q.shape[0]
    bits = uint_bits(spec)
    rows = pack_bits(q, bits) if bits is not None and bits < 8 else q.reshape(n, -1)
    rows = np.ascontiguousarray(rows)
    if rows.dtype.byteorder == ">":  # pragma: no cover - big-endian hosts
        rows = rows.astype(rows.dtype.newbyteorder("<"))
    lossless = lossless_of(spec)
    out = np.empty(n, dtype=object)
    for i in range(n):
        stream = rows[i].tobytes()
        out[i] = _compress(stream) if lossless == "zstd" else stream
    return out


def unpack(wire: np.ndarray, spec: CloudSpec) -> np.ndarray:
    """The wire tensor -> the base's level tensor ``[N, *input_shape]`` (what cloud.onnx takes).
    The identity (after a dtype check) for fp32/fp16/uint8; for BYTES encodings: per sample,
    zstd decompression and bit unpacking. ValueError naming the sample for a bad payload."""
    want = wire_dtype(spec)
    wire = np.asarray(wire)
    if wire.dtype != want:
        raise ValueError(f"{spec.encoding} offload must be {want}, got {wire.dtype}")
    if not is_bytes(spec):
        return wire
    if wire.ndim != 1:
        raise ValueError(f"{spec.encoding} offload is one payload per sample, shape [N]; got {list(wire.shape)}")
    n, size, count = wire.shape[0], stream_bytes(spec), elements(spec)
    lossless = lossless_of(spec)
    buf = bytearray(n * size)
    for i, payload in enumerate(wire):
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise ValueError(f"sample {i}: payload is {type(payload).__name__}, not bytes")
        stream = _decompress(bytes(payload), size, i) if lossless == "zstd" else payload
        if len(stream) != size:
            raise ValueError(f"sample {i}: {len(stream)} bytes, a {spec.encoding} sample is {size} bytes")
        buf[i * size:(i + 1) * size] = stream
    dtype = level_dtype(spec).newbyteorder("<") if level_dtype(spec).itemsize > 1 else level_dtype(spec)
    rows = np.frombuffer(bytes(buf), dtype=dtype).reshape(n, -1)
    bits = uint_bits(spec)
    if bits is not None and bits < 8:
        rows = unpack_bits(rows, bits, count)
    return np.ascontiguousarray(rows.astype(level_dtype(spec), copy=False)).reshape(n, *spec.input_shape)


def dequantize(q: np.ndarray, spec: CloudSpec) -> np.ndarray:
    """The level tensor -> float32 features, with the same float32 arithmetic as
    :class:`CloudInputDecoder` (so numpy and the exported ONNX agree)."""
    if uint_bits(spec) is None:
        return q.astype(np.float32)
    return (q.astype(np.float32) - np.float32(spec.zero_point)) * np.float32(spec.scale)


def decode(wire: np.ndarray, spec: CloudSpec) -> np.ndarray:
    """The wire tensor -> float32 features (:func:`unpack` then :func:`dequantize`)."""
    return dequantize(unpack(wire, spec), spec)


def _as_numpy(features: Any) -> np.ndarray:
    if hasattr(features, "detach"):  # a torch tensor, without importing torch here
        features = features.detach().float().cpu().numpy()
    return np.asarray(features, dtype=np.float32)


def calibrate(features: Any, percentile: float = DEFAULT_PERCENTILE, bits: int = 8) -> tuple[float, int]:
    """``(scale, zero_point)`` of a ``bits``-bit affine encoding covering ``[low, high]`` = the
    ``100 - percentile`` and ``percentile`` percentiles of ``features`` (torch or numpy).

    The range always contains 0 (so zero is exact: ReLU outputs stay exact zeros), which makes
    ``zero_point`` 0 for non-negative features. Clipping the extreme tail (percentile < 100)
    spends the ``2**bits`` levels on the values that occur. ``scale`` is rounded to float32, the
    precision both the edge encoder and the cloud's decoder use.
    """
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must lie in (50, 100], got {percentile}")
    if bits not in (2, 4, 8):
        raise ValueError(f"affine offload encodings have 8, 4 or 2 bits, got {bits}")
    top = (1 << bits) - 1
    x = _as_numpy(features).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError(f"cannot calibrate uint{bits} offload on no (finite) features")
    low = min(float(np.percentile(x, 100.0 - percentile)), 0.0)
    high = max(float(np.percentile(x, percentile)), 0.0)
    span = high - low
    if span <= 0.0:  # all zeros: any scale represents them exactly
        return 1.0, 0
    scale = float(np.float32(span / top))
    zero_point = int(np.clip(np.rint(-low / scale), 0, top))
    return scale, zero_point


def calibrate_uint8(features: Any, percentile: float = DEFAULT_PERCENTILE) -> tuple[float, int]:
    """:func:`calibrate` with 8 bits (the uint8 encoding)."""
    return calibrate(features, percentile, 8)


def with_encoding(spec: CloudSpec, encoding: Encoding, features: Any = None,
                  percentile: float = DEFAULT_PERCENTILE) -> CloudSpec:
    """A copy of ``spec`` with ``encoding``; an affine (uintK) base needs calibration ``features``."""
    encoding = _name(encoding)  # type: ignore[assignment]
    update: dict[str, Any] = {"encoding": encoding, "scale": 1.0, "zero_point": 0}
    bits = uint_bits(encoding)
    if bits is not None:
        if features is None:
            raise ValueError(f"{encoding} offload needs calibration features (the edge's offloads)")
        update["scale"], update["zero_point"] = calibrate(features, percentile, bits)
    return CloudSpec.model_validate({**spec.model_dump(), **update})


def describe(spec: CloudSpec) -> str:
    """One line for a model card: what one offloaded sample costs on the wire."""
    n = elements(spec)
    size = stream_bytes(spec)
    dtype = wire_datatype(spec)
    if dtype == BYTES:
        line = f"{spec.encoding} as an OIP BYTES tensor, one payload per sample: "
        line += (f"{size:,} bytes ({base_of(spec)}, bit-packed)" if fixed_length(spec)
                 else f"at most ~{size:,} bytes before zstd (entropy coded: the radio pays the bytes sent)")
    else:
        line = f"{size:,} bytes as {dtype}"
    if uint_bits(spec) is not None:
        lo, hi = uint8_range(spec)
        line += (f" (affine {base_of(spec)}: x ≈ (q − {spec.zero_point}) × {spec.scale:.6g}, float range "
                 f"[{lo:.6g}, {hi:.6g}])")
    if base_of(spec) != "fp32":
        line += f"; FP32 would be {n * 4:,} bytes"
    return line + "."


# ---- the cloud side in torch (export) -----------------------------------------------------
def _decoder_class() -> type:
    from torch import nn

    class CloudInputDecoder(nn.Module):
        """``cloud_module`` behind the offload decoder: forward takes the LEVEL tensor (uint8
        levels of any uintK base, float16 or float32), turns it into float32 features and runs
        the cloud part, so the exported ONNX accepts it directly (Cast, Sub, Mul in the graph).
        For BYTES encodings the cloud unpacks the payloads into this tensor first
        (:func:`edgecloud.offload.unpack`)."""

        def __init__(self, cloud_module: nn.Module, spec: CloudSpec) -> None:
            super().__init__()
            self.cloud = cloud_module
            self.encoding = spec.encoding
            self.affine = uint_bits(spec) is not None
            self.scale = float(spec.scale)
            self.zero_point = int(spec.zero_point)

        def forward(self, wire: torch.Tensor) -> torch.Tensor:
            x = wire.float()
            if self.affine:
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
    """A seeded random batch of LEVEL tensors, what cloud.onnx takes (for tracing and checking
    an export)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (batch, *spec.input_shape)
    if uint_bits(spec) is not None:
        return torch.randint(0, levels(spec) + 1, shape, generator=g, dtype=torch.uint8)
    x = torch.randn(shape, generator=g)
    return x.half() if base_of(spec) == "fp16" else x


def export_wire_onnx(cloud_module: nn.Module, path: str | Path, spec: CloudSpec, *,
                     opset: int = ONNX_OPSET) -> None:
    """Export ``cloud_module`` behind its decoder: input ``spec.input_name`` of the level
    datatype (:func:`level_dtype`; the wire datatype for fp32/fp16/uint8) with a dynamic batch dimension, output ``spec.output_name``, weights embedded."""
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
    ``atol`` (relative to the logit scale) or if the ONNX input type is not the level type."""
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
    what :func:`calibrate` should see."""
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
    "BYTES", "ENCODINGS", "CloudInputDecoder", "FLOAT_DATATYPES", "base_of", "bytes_per_sample",
    "calibrate", "calibrate_uint8", "decode", "dequantize", "describe", "encode", "export_wire_onnx",
    "fixed_length", "is_bytes", "level_dtype", "levels", "lossless_of", "offload_features",
    "onnx_input_type", "pack_bits", "quantize", "uint8_range", "uint_bits", "unpack", "unpack_bits",
    "verify_wire_onnx", "wire_bytes", "wire_datatype", "wire_dtype", "wire_example", "wire_shape",
    "with_encoding",
]
