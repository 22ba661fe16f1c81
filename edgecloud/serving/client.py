"""A small Open Inference Protocol client for edgecloud's own commands (infer, bench, demo).

Any OIP client works against edgecloud servers (tritonclient included); this one exists so the
CLI needs nothing beyond the project's own stubs, and so it reads edgecloud's extra outputs
and response parameters conveniently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edgecloud.protocol import codec, pb, pb_grpc


@dataclass
class InferResult:
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    latency_s: float
    id: str = ""

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


@dataclass
class InferenceClient:
    """One channel to an edge daemon or a cloud server."""

    address: str
    token: str | None = None
    tls: bool = False
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name_override: str | None = None
    _channel: grpc.Channel | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        from edgecloud.serving.security import create_channel

        self._channel = create_channel(
            self.address, tls=self.tls, ca=self.ca, client_cert=self.client_cert,
            client_key=self.client_key, token=self.token,
            server_name_override=self.server_name_override,
        )
        self.stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the server answers ServerReady, or raise TimeoutError."""
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if self.stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready:
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"server at {self.address} not ready after {timeout_s:.0f} s ({last})")

    def models(self) -> list[str]:
        index = self.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5.0)
        return [m.name for m in index.models]

    def metadata(self, model: str) -> pb.ModelMetadataResponse:
        return self.stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=5.0)

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        *,
        request_id: str = "",
        parameters: dict[str, Any] | None = None,
        timeout_s: float | None = 30.0,
    ) -> InferResult:
        request = codec.encode_request(model, inputs, request_id=request_id, parameters=parameters)
        start = time.perf_counter()
        response = self.stub.ModelInfer(request, timeout=timeout_s)
        latency = time.perf_counter() - start
        return InferResult(
            outputs=codec.decode_response(response),
            parameters=codec.read_parameters(response.parameters),
            latency_s=latency,
            id=response.id,
        )
