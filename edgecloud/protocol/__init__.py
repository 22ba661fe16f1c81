"""Open Inference Protocol: generated stubs, tensor codec and status mapping."""

from edgecloud.protocol import inference_pb2 as pb
from edgecloud.protocol import inference_pb2_grpc as pb_grpc

SERVICE_NAME = "inference.GRPCInferenceService"

__all__ = ["pb", "pb_grpc", "SERVICE_NAME"]
