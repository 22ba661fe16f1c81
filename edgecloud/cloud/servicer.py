"""The cloud's Open Inference Protocol servicer: validation, dynamic batching, ORT, metrics.

Every ModelInfer is validated before it reaches a queue (so one bad request never fails a
batch), then goes through one :class:`DynamicBatcher` per model. Each model serves one input
of its offload's wire datatype (the manifest's ``cloud.encoding``, see :mod:`edgecloud.offload`):
``[N] + input_shape`` of FP32, FP16 or UINT8, or for the bit-packed and entropy-coded encodings
a BYTES tensor ``[N]``, one payload per sample, unpacked here (per request, so a bad payload is
that request's INVALID_ARGUMENT) into the level tensor the ONNX session takes; and two FP32
outputs ``[N, C]``: the logits
(manifest ``cloud.output_name``, usually ``LOGITS``) and their softmax ``probabilities``.
Replies use ``raw_output_contents`` only (what tritonclient's ``as_numpy`` reads).
"""

from __future__ import annotations

import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
import numpy as np

from edgecloud import __version__, offload
from edgecloud.serving.batching import DynamicBatcher
from edgecloud.cim.energy import EnergyTable
from edgecloud.cloud.sessions import PROBABILITIES, CloudModel
from edgecloud.config import BatchingConfig
from edgecloud.serving.metrics import Metrics
from edgecloud.protocol import pb, pb_grpc
from edgecloud.protocol.codec import decode_inputs, encode_response
from edgecloud.protocol.errors import (
    DeadlineExceeded,
    InferenceError,
    InvalidArgument,
    NotFound,
    Unavailable,
)

SERVER_NAME = "edgecloud-cloud"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["model_repository", "parameters"]
UNKNOWN_MODEL_LABEL = "_unknown"  # metrics label for names we do not serve (bounded cardinality)
_NO_DEADLINE_S = 1e6


class CloudServicer(pb_grpc.GRPCInferenceServiceServicer):
    """OIP servicer over a dict of loaded :class:`CloudModel` (served name -> model)."""

    def __init__(
        self,
        models: dict[str, CloudModel],
        batching: BatchingConfig,
        metrics: Metrics,
        energy_table: EnergyTable | None = None,
    ) -> None:
        self.models = models
        self.batching = batching
        self.metrics = metrics
        table = energy_table or EnergyTable.load()
        self.joules_per_mac = table.per_event("mac_fp32")
        self._closing = False
        self.batchers: dict[str, DynamicBatcher] = {}
        for name, model in models.items():
            max_batch = batching.max_batch_size
            if model.max_batch_size is not None:
                max_batch = min(max_batch, model.max_batch_size)
            self.batchers[name] = DynamicBatcher(
                model.run,
                max_batch_size=max_batch,
                max_queue_delay_s=batching.max_queue_delay_ms / 1000.0,
                max_queue_size=batching.max_queue_size,
                name=name,
                metrics=metrics,
            )

    def close(self) -> None:
        """Drain every batcher (called by GrpcServer after the gRPC server stopped)."""
        self._closing = True
        for batcher in self.batchers.values():
            batcher.close()

    # ---- health and metadata -----------------------------------------------------------
    def _model(self, name: str, version: str = "") -> CloudModel:
        model = self.models.get(name)
        if model is None and "/" in name:  # say why no OIP server could have it
            raise InvalidArgument(
                f"model name {name!r} contains '/': OIP model names cannot (Triton and KServe "
                "use them as directory names and URL path segments); served: "
                f"{', '.join(sorted(self.models)) or 'none'}"
            )
        if model is None:
            raise NotFound(
                f"unknown model {name!r}; served: {', '.join(sorted(self.models)) or 'none'}"
            )
        if version and version != model.version:
            raise NotFound(f"model {name!r} has no version {version!r}; available: [{model.version!r}]")
        return model

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=bool(self.models) and not self._closing)

    def ModelReady(self, request, context):
        try:
            self._model(request.name, request.version)
        except InferenceError:  # unknown name or version, or a name no server can have
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self._closing)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    def ModelMetadata(self, request, context):
        try:
            model = self._model(request.name, request.version)
        except InferenceError as err:
            context.abort(err.code, err.message)
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform=PLATFORM,
            inputs=[tm(name=model.input_name, datatype=model.datatype, shape=[-1, *model.wire_shape])],
            outputs=[
                tm(name=model.output_name, datatype="FP32", shape=[-1, model.num_classes]),
                tm(name=PROBABILITIES, datatype="FP32", shape=[-1, model.num_classes]),
            ],
        )

    def RepositoryIndex(self, request, context):
        entries = [
            pb.RepositoryIndexResponse.ModelIndex(name=m.name, version=m.version, state="READY")
            for m in sorted(self.models.values(), key=lambda m: m.name)
        ]
        return pb.RepositoryIndexResponse(models=entries)

    # ---- inference ---------------------------------------------------------------------
    def _validate(self, model: CloudModel, request: pb.ModelInferRequest) -> np.ndarray:
        """The request's input as a wire-datatype [N, *input_shape] array, or InvalidArgument."""
        names = [t.name for t in request.inputs]
        if model.input_name not in names:
            raise InvalidArgument(
                f"model {model.name!r} expects input {model.input_name!r}; request has {names}"
            )
        extra = [n for n in names if n != model.input_name]
        if extra:
            raise InvalidArgument(
                f"model {model.name!r} has no input(s) {extra}; it takes only {model.input_name!r}"
            )
        tensor = request.inputs[names.index(model.input_name)]
        if tensor.datatype != model.datatype:
            raise InvalidArgument(
                f"input {model.input_name!r} has datatype {tensor.datatype!r}; model "
                f"{model.name!r} takes {model.datatype} (cloud.encoding={model.spec.encoding!r})"
            )
        shape = [int(d) for d in tensor.shape]
        wire_shape = model.wire_shape
        if len(shape) != 1 + len(wire_shape) or shape[1:] != wire_shape:
            raise InvalidArgument(
                f"input {model.input_name!r} has shape {shape}; model {model.name!r} takes "
                + (f"[N, {', '.join(map(str, wire_shape))}]" if wire_shape else
                   f"[N] (one {model.spec.encoding} payload per sample)")
            )
        if shape[0] < 1:
            raise InvalidArgument(f"input {model.input_name!r}: batch size must be >= 1, got {shape[0]}")
        if shape[0] > self.batching.max_request_batch:
            raise InvalidArgument(
                f"input {model.input_name!r}: batch of {shape[0]} exceeds max_request_batch="
                f"{self.batching.max_request_batch}"
            )
        array = decode_inputs(request)[model.input_name]  # checks byte count vs shape
        if array.dtype == object:  # BYTES payloads -> the level tensor the session takes
            try:
                array = offload.unpack(array, model.spec)
            except ValueError as exc:
                raise InvalidArgument(f"input {model.input_name!r} ({model.spec.encoding}): {exc}") from None
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise InvalidArgument(f"input {model.input_name!r} holds {bad} NaN/Inf value(s)")
        return array

    def ModelInfer(self, request, context):
        t0 = time.perf_counter()
        label = request.model_name if request.model_name in self.models else UNKNOWN_MODEL_LABEL
        try:
            response, n = self._infer(request, context, t0)
        except InferenceError as err:
            self.metrics.requests.labels(model=label, status=err.code.name).inc()
            context.abort(err.code, err.message)
        except Exception as exc:  # a bug or an ORT failure: INTERNAL, still counted
            self.metrics.requests.labels(model=label, status="INTERNAL").inc()
            context.abort(grpc.StatusCode.INTERNAL, f"cloud inference failed: {exc}")
        self.metrics.child("requests", label, "OK").inc()
        self.metrics.child("samples", label, "cloud").inc(n)
        self.metrics.child("latency", label, "total").observe(time.perf_counter() - t0)
        return response

    def _infer(self, request, context, t0: float) -> tuple[pb.ModelInferResponse, int]:
        if self._closing:
            raise Unavailable("cloud server is shutting down")
        model = self._model(request.model_name, request.model_version)
        array = self._validate(model, request)
        requested = [o.name for o in request.outputs]
        known = [model.output_name, PROBABILITIES]
        unknown = [name for name in requested if name not in known]
        if unknown:
            raise InvalidArgument(
                f"model {model.name!r} has no output(s) {unknown}; outputs: {known}"
            )
        # May raise ResourceExhausted. inline: an idle batcher runs ORT in this handler thread
        # (no hand-off to the worker and back); a busy one queues the request, so concurrent
        # requests still share batches.
        future = self.batchers[model.name].submit(array, inline=True)
        if not future.done():  # queued behind a running batch
            context.add_callback(future.cancel)  # client gone / deadline: drop it if still queued
            remaining = context.time_remaining()
            timeout = None if remaining is None or remaining > _NO_DEADLINE_S else max(0.0, remaining)
            try:
                future.result(timeout=timeout)
            except FutureTimeout:
                future.cancel()
                raise DeadlineExceeded(f"deadline exceeded while model {model.name!r} was queued/computing")
            except CancelledError:
                raise DeadlineExceeded("request cancelled before it was computed") from None
        outputs = future.result()  # raises what the batch raised
        n = int(array.shape[0])
        self.metrics.child("latency", model.name, "queue").observe(future.queue_s)
        self.metrics.child("latency", model.name, "cloud_compute").observe(future.compute_s)
        self.metrics.child("energy", model.name, "cloud").inc(model.macs * n * self.joules_per_mac)
        response = encode_response(
            model.name,
            outputs,
            request_id=request.id,
            model_version=model.version,
            requested=requested or None,
            parameters={
                "cloud_compute_ms": future.compute_s * 1000.0,
                "cloud_queue_ms": future.queue_s * 1000.0,
                "cloud_batch_size": int(future.batch_size),
            },
        )
        return response, n
