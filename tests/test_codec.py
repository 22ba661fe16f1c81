"""The OIP tensor codec: raw and typed inputs, errors that name the problem, raw outputs."""

import numpy as np
import pytest

from edgecloud.protocol import codec, pb
from edgecloud.protocol.errors import InvalidArgument


def test_raw_round_trip_preserves_values_and_dtype():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    request = codec.encode_request("m", {"INPUT": x})
    decoded = codec.decode_inputs(request)["INPUT"]
    assert decoded.dtype == np.float32 and decoded.shape == (2, 3, 4)
    np.testing.assert_array_equal(decoded, x)


def test_typed_contents_are_accepted():
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="INPUT", datatype="FP32", shape=[2, 2])
    tensor.contents.fp32_contents.extend([1, 2, 3, 4])
    np.testing.assert_array_equal(codec.decode_inputs(request)["INPUT"], [[1, 2], [3, 4]])


def test_byte_count_mismatch_names_the_tensor():
    request = codec.encode_request("m", {"INPUT": np.zeros((2, 3), np.float32)})
    request.inputs[0].shape[:] = [2, 4]
    with pytest.raises(InvalidArgument, match="INPUT.*24 bytes.*32 bytes"):
        codec.decode_inputs(request)


def test_typed_count_mismatch_and_mixed_contents_are_rejected():
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="A", datatype="INT32", shape=[3])
    tensor.contents.int_contents.extend([1, 2])
    with pytest.raises(InvalidArgument, match="2 typed values"):
        codec.decode_inputs(request)
    request.raw_input_contents.append(np.zeros(3, np.int32).tobytes())
    with pytest.raises(InvalidArgument, match="cannot be mixed"):
        codec.decode_inputs(request)


def test_unknown_datatype_and_negative_shape():
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="A", datatype="FP128", shape=[1])
    request.raw_input_contents.append(b"\0" * 16)
    with pytest.raises(InvalidArgument, match="unsupported datatype 'FP128'"):
        codec.decode_inputs(request)
    request = codec.encode_request("m", {"A": np.zeros(2, np.float32)})
    request.inputs[0].shape[:] = [-2]
    with pytest.raises(InvalidArgument, match="negative"):
        codec.decode_inputs(request)


def test_response_is_raw_only_with_typed_parameters():
    outputs = {"p": np.ones((2, 3), np.float32), "e": np.array([0, 1], np.int32), "j": np.array([1e-6, 2e-6])}
    response = codec.encode_response("m", outputs, request_id="r1",
                                     parameters={"degraded": True, "n": 3, "ms": 1.5, "b": "digital"})
    assert response.id == "r1"
    assert len(response.raw_output_contents) == 3
    assert all(not o.HasField("contents") for o in response.outputs)
    assert [o.datatype for o in response.outputs] == ["FP32", "INT32", "FP64"]
    assert response.parameters["degraded"].WhichOneof("parameter_choice") == "bool_param"
    assert response.parameters["n"].WhichOneof("parameter_choice") == "int64_param"
    assert response.parameters["ms"].WhichOneof("parameter_choice") == "double_param"
    decoded = codec.decode_response(response)
    np.testing.assert_array_equal(decoded["e"], [0, 1])
    assert codec.read_parameters(response.parameters) == {"degraded": True, "n": 3, "ms": 1.5, "b": "digital"}


def test_requested_outputs_filter_and_unknown_output():
    outputs = {"a": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)}
    response = codec.encode_response("m", outputs, requested=["b"])
    assert [o.name for o in response.outputs] == ["b"]
    with pytest.raises(InvalidArgument, match="'zz'"):
        codec.encode_response("m", outputs, requested=["zz"])
