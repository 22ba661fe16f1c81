"""The edge daemon's Open Inference Protocol servicer: a thin protocol adapter.

ModelInfer: validate and decode the request (tensors and parameters) -> the data plane
(:class:`edgecloud.edge.dataplane.EdgeDataPlane`: micro-batching, offloads, shadow sampling,
online exit control) -> encode the response. Every failure on the cloud side turns into a
degraded local answer (the best edge exit, marked), never into an error: once a request passed
validation and found room in the queue it is always answered.

Outputs (raw contents, per sample): ``probabilities`` FP32 [N, C], ``class_index`` INT32 [N],
``exit_index`` INT32 [N] (edge exits 0.., cloud = number of edge exits), ``confidence`` FP32
[N] (max probability), ``energy_joules`` FP64 [N]. Response parameters: ``degraded`` (bool),
``degraded_samples``, ``cloud_samples``, ``edge_samples`` (int64; they sum to N; edge_samples
counts samples an edge exit answered by policy), ``offload_bytes`` (int64: bytes this request's
offloaded samples put on the wire; shadow sends are not included), ``cloud_latency_ms``,
``edge_compute_ms`` (double), ``backend`` (string) and, when degraded, ``degraded_reason``
(string: a gRPC code, ``CIRCUIT_OPEN``, ``NO_CLOUD``, or ``DEADLINE`` when the request's
``deadline_ms`` left no time for a cloud round trip).

Request parameters: ``exit_threshold`` (number: exit 0's threshold for this request),
``tolerated_disagreement`` (number in [0, 1], controlled models only: this request's threshold
of the controlled exit is the controller's ``threshold_for(1 - value)``), ``deadline_ms``
(number > 0: answer within this many ms of arrival; see the data plane).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

import grpc
import numpy as np

from edgecloud import __version__
from edgecloud.config import BatchingConfig
from edgecloud.edge.cloud_client import CloudClient
from edgecloud.edge.dataplane import (
    ControlSpec,
    ControllerFactory,
    EdgeDataPlane,
    EdgeModel,
    RequestLimits,
    threshold_gauge_value,  # noqa: F401 - re-exported (it lived here before the data plane)
)
from edgecloud.edge.runner import EdgeRunner
from edgecloud.exits import ExitPolicy
from edgecloud.serving.metrics import Metrics
from edgecloud.protocol import codec, pb, pb_grpc
from edgecloud.protocol.errors import InferenceError, InvalidArgument, NotFound

log = logging.getLogger(__name__)

SERVER_NAME = "edgecloud-edge"
OUTPUTS: dict[str, str] = {  # name -> datatype, in response order
    "probabilities": "FP32",
    "class_index": "INT32",
    "exit_index": "INT32",
    "confidence": "FP32",
    "energy_joules": "FP64",
}
ACCEPTED_DATATYPES = ("FP32", "UINT8")
THRESHOLD_PARAMETER = "exit_threshold"
TOLERATED_DISAGREEMENT_PARAMETER = "tolerated_disagreement"
DEADLINE_PARAMETER = "deadline_ms"
NUMBER_KINDS = ("double_param", "int64_param", "uint64_param")
UNKNOWN_MODEL_LABEL = "unknown"  # metric label for names we do not serve (keeps labels bounded)


class EdgeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """OIP servicer of the edge daemon (see module docstring)."""

    def __init__(
        self,
        runners: Mapping[str, EdgeRunner],
        *,
        metrics: Metrics,
        batching: BatchingConfig,
        cloud: CloudClient | None = None,
        backend_name: str = "digital",
        control: Mapping[str, ControlSpec] | None = None,
        controller_factory: ControllerFactory | None = None,
        shadow_queue_size: int | None = None,
    ) -> None:
        extra = {} if shadow_queue_size is None else {"shadow_queue_size": shadow_queue_size}
        self.dataplane = EdgeDataPlane(
            runners, metrics=metrics, batching=batching, cloud=cloud, control=control,
            controller_factory=controller_factory, **extra,
        )
        self.metrics = metrics
        self.cloud = cloud
        self.backend_name = backend_name
        self.models: dict[str, EdgeModel] = self.dataplane.models
        self._closing = False

    # ---- life cycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Drain the data plane (called by GrpcServer after stop)."""
        self._closing = True
        self.dataplane.close()

    def publish_thresholds(self, runner: EdgeRunner) -> None:
        """Copy a model's current thresholds into the edgecloud_exit_threshold gauge."""
        self.dataplane.publish_thresholds(runner)

    # ---- health and metadata -------------------------------------------------------------
    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self._closing and bool(self.models))

    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        model = self.models.get(request.name)
        ready = (
            model is not None and not self._closing
            and request.version in ("", model.runner.manifest.version)
        )
        return pb.ModelReadyResponse(ready=ready)

    def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=["parameters", "model_repository"]
        )

    def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext) -> pb.ModelMetadataResponse:
        try:
            model = self._model(request.name, request.version)
        except InferenceError as exc:
            context.abort(exc.code, exc.message)
        runner = model.runner
        spec = runner.manifest.input
        response = pb.ModelMetadataResponse(
            name=model.name, versions=[runner.manifest.version], platform="edgecloud_edge"
        )
        response.inputs.add(name=spec.name, datatype=spec.datatype, shape=[-1, *spec.shape])
        for name, datatype in OUTPUTS.items():
            shape = [-1, runner.num_classes] if name == "probabilities" else [-1]
            response.outputs.add(name=name, datatype=datatype, shape=shape)
        return response

    def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.ServicerContext) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for name in sorted(self.models):
            response.models.add(
                name=name, version=self.models[name].runner.manifest.version, state="READY"
            )
        return response

    # ---- inference -----------------------------------------------------------------------
    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        start = time.perf_counter()
        label = request.model_name if request.model_name in self.models else UNKNOWN_MODEL_LABEL
        try:
            model = self._model(request.model_name, request.model_version)
            x, limits = self._validate(model, request)
            response = self._infer(model, request, x, limits, context, start)
        except InferenceError as exc:
            self.metrics.requests.labels(model=label, status=exc.code.name).inc()
            context.abort(exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug: answer INTERNAL, keep serving
            log.exception("ModelInfer failed for model %r", request.model_name)
            self.metrics.requests.labels(model=label, status="INTERNAL").inc()
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        model.metric("requests", "OK").inc()
        model.metric("latency", "total").observe(time.perf_counter() - start)
        return response

    def _model(self, name: str, version: str) -> EdgeModel:
        model = self.models.get(name)
        if model is None:
            raise NotFound(
                f"model {name!r} is not served here; available: {', '.join(sorted(self.models)) or 'none'}"
            )
        if version not in ("", model.runner.manifest.version):
            raise NotFound(
                f"model {name!r} has no version {version!r}; served: {model.runner.manifest.version!r}"
            )
        return model

    def _validate(self, model: EdgeModel, request: pb.ModelInferRequest) -> tuple[np.ndarray, RequestLimits]:
        """The input batch (FP32 or UINT8, shape [N, *sample]) and the per-request limits from
        the request parameters; raises InvalidArgument naming the first problem found."""
        runner = model.runner
        spec = runner.manifest.input
        names = [t.name for t in request.inputs]
        if spec.name not in names:
            raise InvalidArgument(
                f"model {model.name!r} needs input {spec.name!r}; the request has "
                f"{names if names else 'no inputs'}"
            )
        extra = [n for n in names if n != spec.name]
        if extra:
            raise InvalidArgument(
                f"model {model.name!r} has one input {spec.name!r}; unexpected input(s) {extra}"
            )
        tensor = request.inputs[names.index(spec.name)]
        if tensor.datatype not in ACCEPTED_DATATYPES:
            raise InvalidArgument(
                f"input {spec.name!r}: datatype {tensor.datatype!r} not accepted; send FP32 "
                f"pixels in [0, 1] or UINT8 pixels 0..255"
            )
        shape = [int(d) for d in tensor.shape]
        expected = [*spec.shape]
        if len(shape) != len(expected) + 1 or shape[1:] != expected:
            raise InvalidArgument(
                f"input {spec.name!r}: shape {shape} does not match [N, {', '.join(map(str, expected))}]"
            )
        n = shape[0]
        if n < 1:
            raise InvalidArgument(f"input {spec.name!r}: batch size must be >= 1, got {n}")
        if n > model.max_request_batch:
            raise InvalidArgument(
                f"input {spec.name!r}: batch of {n} samples exceeds max_request_batch="
                f"{model.max_request_batch}; split the request"
            )
        for out in request.outputs:
            if out.name not in OUTPUTS:
                raise InvalidArgument(
                    f"requested output {out.name!r} does not exist; outputs: {', '.join(OUTPUTS)}"
                )
        x = codec.decode_inputs(request)[spec.name]  # byte counts, raw/typed mixing
        if x.dtype == np.float32:
            lo, hi = float(x.min()), float(x.max())  # NaN propagates; +-inf is out of range
            if not (lo >= 0.0 and hi <= 1.0):  # the checks below only on this rare path
                if not np.isfinite(x).all():
                    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
                    raise InvalidArgument(f"input {spec.name!r}: {bad} value(s) are NaN or infinite")
                raise InvalidArgument(
                    f"input {spec.name!r}: FP32 pixels must lie in [0, 1] (normalisation happens "
                    f"inside the model); got values in [{lo:g}, {hi:g}]"
                )
        return x, self._limits(model, request)

    def _limits(self, model: EdgeModel, request: pb.ModelInferRequest) -> RequestLimits:
        exit0 = self._threshold_parameter(model.runner, request)
        tolerated = self._number_parameter(request, TOLERATED_DISAGREEMENT_PARAMETER)
        if tolerated is not None:
            if not 0.0 <= tolerated <= 1.0:
                raise InvalidArgument(
                    f"parameter {TOLERATED_DISAGREEMENT_PARAMETER!r} must lie in [0, 1] (a share "
                    f"of answers), got {tolerated:g}"
                )
            controlled = self.dataplane.controlled_exit(model.name)
            if controlled is None:
                raise InvalidArgument(
                    f"parameter {TOLERATED_DISAGREEMENT_PARAMETER!r}: model {model.name!r} has no "
                    f"controller (configure edge.control.{model.name} or --target-agreement); use "
                    f"{THRESHOLD_PARAMETER!r} instead"
                )
            if exit0 is not None and controlled == 0:
                raise InvalidArgument(
                    f"parameters {THRESHOLD_PARAMETER!r} and {TOLERATED_DISAGREEMENT_PARAMETER!r} "
                    "both set exit 0's threshold; give one of them"
                )
        deadline_ms = self._number_parameter(request, DEADLINE_PARAMETER)
        if deadline_ms is not None and not (math.isfinite(deadline_ms) and deadline_ms > 0):
            raise InvalidArgument(
                f"parameter {DEADLINE_PARAMETER!r} must be a number of milliseconds > 0, got "
                f"{deadline_ms:g}"
            )
        return RequestLimits(
            exit0=exit0, tolerated_disagreement=tolerated,
            deadline_s=None if deadline_ms is None else deadline_ms / 1000.0,
        )

    @staticmethod
    def _number_parameter(request: pb.ModelInferRequest, name: str) -> float | None:
        if name not in request.parameters:
            return None
        param = request.parameters[name]
        kind = param.WhichOneof("parameter_choice")
        if kind not in NUMBER_KINDS:
            raise InvalidArgument(
                f"parameter {name!r} must be a number (double), got {kind or 'nothing'}"
            )
        value = float(getattr(param, kind))
        if math.isnan(value):
            raise InvalidArgument(f"parameter {name!r} must be a number, got NaN")
        return value

    @classmethod
    def _threshold_parameter(cls, runner: EdgeRunner, request: pb.ModelInferRequest) -> float | None:
        value = cls._number_parameter(request, THRESHOLD_PARAMETER)
        if value is None:
            return None
        try:
            ExitPolicy(kind=runner.policy.kind, thresholds=[value])  # validates the value
        except ValueError as exc:
            raise InvalidArgument(f"parameter {THRESHOLD_PARAMETER!r}: {exc}") from exc
        return value

    def _infer(
        self,
        model: EdgeModel,
        request: pb.ModelInferRequest,
        x: np.ndarray,
        limits: RequestLimits,
        context: grpc.ServicerContext,
        start: float,
    ) -> pb.ModelInferResponse:
        outcome = self.dataplane.infer(model, x, limits, time_remaining=context.time_remaining(),
                                       start=start)
        results = outcome.results
        parameters = dict(outcome.parameters)
        parameters["backend"] = self.backend_name
        outputs = {
            "probabilities": results.probabilities,
            "class_index": results.class_index,
            "exit_index": results.exit_index,
            "confidence": results.confidence,
            "energy_joules": results.energy_joules,
        }
        return codec.encode_response(
            model.name, outputs, request_id=request.id, model_version=model.runner.manifest.version,
            parameters=parameters, requested=[o.name for o in request.outputs],
        )
