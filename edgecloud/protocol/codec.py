"""numpy <-> Open Inference Protocol tensors.

Inputs may come as raw bytes (``raw_input_contents``, what tritonclient sends) or as typed
contents; outputs always go out as raw bytes, because tritonclient's ``as_numpy`` reads only
``raw_output_contents``. Every mismatch raises :class:`InvalidArgument` naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from edgecloud.protocol import pb
from edgecloud.protocol.errors import InvalidArgument

# OIP datatype string -> numpy dtype (little-endian), and the typed-contents field that carries it.
DATATYPES: dict[str, tuple[np.dtype, str | None]] = {
    "BOOL": (np.dtype(np.bool_), "bool_contents"),
    "UINT8": (np.dtype("<u1"), "uint_contents"),
    "UINT16": (np.dtype("<u2"), "uint_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"),
    "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "INT8": (np.dtype("<i1"), "int_contents"),
    "INT16": (np.dtype("<i2"), "int_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "FP16": (np.dtype("<f2"), None),
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
}

# BYTES: variable-length elements (numpy object arrays of ``bytes``). In raw contents every
# element is its 4-byte little-endian length followed by its bytes (as Triton and tritonclient
# serialise it); typed contents use ``bytes_contents``.
BYTES = "BYTES"
_OBJECT = np.dtype(object)

_NUMPY_TO_OIP = {dt.str if dt.kind != "b" else "|b1": name for name, (dt, _) in DATATYPES.items()}


# The same map keyed by dtype object (little-endian / byte-order-free dtypes): one dict lookup
# on the per-request path instead of building a byte-swapped dtype.
_DTYPE_TO_OIP = {dt: name for name, (dt, _) in DATATYPES.items()}


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype string for a numpy array (an object array: ``BYTES``)."""
    if array.dtype == _OBJECT:
        return BYTES
    name = _DTYPE_TO_OIP.get(array.dtype)
    if name is not None:
        return name
    key = array.dtype.newbyteorder("<").str if array.dtype.kind != "b" else "|b1"
    try:
        return _NUMPY_TO_OIP[key]
    except KeyError as exc:
        raise InvalidArgument(f"unsupported numpy dtype {array.dtype}") from exc


def dtype_of(datatype: str) -> np.dtype:
    try:
        return DATATYPES[datatype][0]
    except KeyError as exc:
        raise InvalidArgument(
            f"unsupported datatype {datatype!r}; supported: {', '.join(DATATYPES)}"
        ) from exc


def serialize_bytes(array: np.ndarray) -> bytes:
    """A BYTES tensor's raw contents: per element (C order) a 4-byte little-endian length, then
    the bytes (``bytes``/``bytearray``; ``str`` as UTF-8)."""
    parts: list[bytes] = []
    for item in np.asarray(array, dtype=object).reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(len(data).to_bytes(4, "little"))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(name: str, blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """The object array of ``shape`` held by a BYTES tensor's raw contents; InvalidArgument
    naming the tensor if the lengths do not add up to exactly ``prod(shape)`` elements."""
    count = math.prod(shape)
    out = np.empty(count, dtype=object)
    view = memoryview(blob)
    pos = 0
    for i in range(count):
        if pos + 4 > len(view):
            raise InvalidArgument(f"input {name!r}: BYTES raw data ends after {i} of {count} elements")
        size = int.from_bytes(view[pos:pos + 4], "little")
        pos += 4
        if pos + size > len(view):
            raise InvalidArgument(f"input {name!r}: BYTES element {i} claims {size} bytes, "
                                  f"{len(view) - pos} left")
        out[i] = bytes(view[pos:pos + size])
        pos += size
    if pos != len(view):
        raise InvalidArgument(f"input {name!r}: {len(view) - pos} bytes of raw data after the "
                              f"{count} BYTES elements of shape {list(shape)}")
    return out.reshape(shape)


def _check_shape(name: str, shape: Iterable[int]) -> tuple[int, ...]:
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"input {name!r}: shape {list(dims)} has a negative dimension")
    return dims


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """All input tensors of a request, by name, as numpy arrays of the declared shape."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries but the request declares "
            f"{len(request.inputs)} inputs; they must match one to one"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            raise InvalidArgument(f"input {name!r} appears twice")
        shape = _check_shape(name, tensor.shape)
        count = math.prod(shape)  # 1 for a scalar shape ()
        if tensor.datatype == BYTES:
            if raw:
                if tensor.HasField("contents"):
                    raise InvalidArgument(
                        f"input {name!r}: typed contents and raw_input_contents cannot be mixed"
                    )
                arrays[name] = deserialize_bytes(name, raw[index], shape)
            else:
                values = tensor.contents.bytes_contents
                if len(values) != count:
                    raise InvalidArgument(
                        f"input {name!r}: {len(values)} typed values, but shape {list(shape)} "
                        f"holds {count} elements"
                    )
                array = np.empty(count, dtype=object)
                array[:] = [bytes(v) for v in values]
                arrays[name] = array.reshape(shape)
            continue
        dtype = dtype_of(tensor.datatype)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"input {name!r}: typed contents and raw_input_contents cannot be mixed"
                )
            blob = raw[index]
            expected = count * dtype.itemsize
            if len(blob) != expected:
                raise InvalidArgument(
                    f"input {name!r}: {len(blob)} bytes of raw data, but shape {list(shape)} "
                    f"of {tensor.datatype} needs {expected} bytes"
                )
            array = np.frombuffer(blob, dtype=dtype).reshape(shape)
        else:
            field = DATATYPES[tensor.datatype][1]
            if field is None:
                raise InvalidArgument(
                    f"input {name!r}: {tensor.datatype} can only be sent as raw_input_contents"
                )
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise InvalidArgument(
                    f"input {name!r}: {len(values)} typed values, but shape {list(shape)} "
                    f"holds {count} elements"
                )
            array = np.asarray(values, dtype=dtype).reshape(shape)
        arrays[name] = array
    return arrays


def set_parameter(target: Any, key: str, value: Any) -> None:
    """Write one value into a protobuf ``map<string, InferParameter>``."""
    param = target[key]
    if isinstance(value, bool | np.bool_):
        param.bool_param = bool(value)
    elif isinstance(value, int | np.integer):
        param.int64_param = int(value)
    elif isinstance(value, float | np.floating):
        param.double_param = float(value)
    else:
        param.string_param = str(value)


def read_parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A plain dict from a protobuf parameters map."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, kind) if kind else None
    return out


def encode_response(
    model_name: str,
    outputs: Mapping[str, np.ndarray],
    *,
    request_id: str = "",
    model_version: str = "1",
    parameters: Mapping[str, Any] | None = None,
    requested: Iterable[str] | None = None,
) -> pb.ModelInferResponse:
    """A response with every (requested) output as raw little-endian bytes."""
    names = list(outputs)
    if requested:
        wanted = list(requested)
        unknown = [n for n in wanted if n not in outputs]
        if unknown:
            raise InvalidArgument(
                f"requested output(s) {unknown} not produced by model {model_name!r}; "
                f"available: {names}"
            )
        names = wanted
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    for name in names:
        array = np.ascontiguousarray(outputs[name])
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        response.outputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
        response.raw_output_contents.append(_raw(array))
    for key, value in (parameters or {}).items():
        set_parameter(response.parameters, key, value)
    return response


def _raw(array: np.ndarray) -> bytes:
    return serialize_bytes(array) if array.dtype == _OBJECT else array.tobytes()


def encode_request(
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    *,
    request_id: str = "",
    parameters: Mapping[str, Any] | None = None,
    outputs: Iterable[str] | None = None,
) -> pb.ModelInferRequest:
    """A request with raw input contents (the fast path)."""
    request = pb.ModelInferRequest(model_name=model_name, id=request_id)
    for name, array in inputs.items():
        array = np.ascontiguousarray(array)
        request.inputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
        request.raw_input_contents.append(_raw(array))
    for name in outputs or ():
        request.outputs.add(name=name)
    for key, value in (parameters or {}).items():
        set_parameter(request.parameters, key, value)
    return request


def decode_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Output tensors of a response (raw or typed) as numpy arrays."""
    out: dict[str, np.ndarray] = {}
    raw = response.raw_output_contents
    for index, tensor in enumerate(response.outputs):
        shape = tuple(tensor.shape)
        if tensor.datatype == BYTES:
            out[tensor.name] = (deserialize_bytes(tensor.name, raw[index], shape) if raw else
                                np.array([bytes(v) for v in tensor.contents.bytes_contents],
                                         dtype=object).reshape(shape))
            continue
        dtype = dtype_of(tensor.datatype)
        if raw:
            out[tensor.name] = np.frombuffer(raw[index], dtype=dtype).reshape(shape)
        else:
            field = DATATYPES[tensor.datatype][1]
            out[tensor.name] = np.asarray(getattr(tensor.contents, field), dtype=dtype).reshape(shape)
    return out
