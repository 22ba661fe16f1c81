"""The edge daemon's Open Inference Protocol servicer.

ModelInfer: validate -> micro-batch the edge part across concurrent requests -> offload the
undecided samples through the cloud client -> answer. Every failure on the cloud side turns
into a degraded local answer (the best edge exit, marked), never into an error: once a
request passed validation and found room in the queue it is always answered.

Outputs (raw contents, per sample): ``probabilities`` FP32 [N, C], ``class_index`` INT32 [N],
``exit_index`` INT32 [N] (edge exits 0.., cloud = number of edge exits), ``confidence`` FP32
[N] (max probability), ``energy_joules`` FP64 [N]. Response parameters: ``degraded`` (bool),
``degraded_samples``, ``cloud_samples``, ``edge_samples`` (int64; they sum to N; edge_samples
counts samples an edge exit answered by policy), ``cloud_latency_ms``, ``edge_compute_ms``
(double), ``backend`` (string) and, when degraded, ``degraded_reason`` (string).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np

from edgecloud import __version__
from edgecloud.batching import DynamicBatcher
from edgecloud.config import BatchingConfig
from edgecloud.edge.cloud_client import CloudClient, CloudUnavailable
from edgecloud.edge.runner import EdgeResult, EdgeRunner, SampleResults
from edgecloud.exits import ExitPolicy
from edgecloud.metrics import Metrics
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
UNKNOWN_MODEL_LABEL = "unknown"  # metric label for names we do not serve (keeps labels bounded)


def threshold_gauge_value(kind: str, threshold: float | None) -> float:
    """Gauge value of a threshold; an ungated exit shows the value that lets everything out."""
    if threshold is not None:
        return float(threshold)
    return math.inf if kind == "entropy" else 0.0


class EdgeModel:
    """One served bundle: its runner and the micro-batcher in front of it."""

    def __init__(self, runner: EdgeRunner, batching: BatchingConfig, metrics: Metrics) -> None:
        self.runner = runner
        self.name = runner.name
        self.max_request_batch = batching.max_request_batch
        self.batcher = DynamicBatcher(
            runner.run_rows,
            solo_fn=runner.run_checked,  # a request alone in its batch: no rows round trip
            max_batch_size=batching.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_ms / 1000.0,
            max_queue_size=batching.max_queue_size,
            name=runner.name,
            metrics=metrics,
        )
        self._metrics = metrics
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}

    def metric(self, metric: str, *labels: str) -> Any:
        """``metrics.<metric>.labels(model, *labels)``, cached: prometheus_client's labels()
        validates and locks on every call, several times per request otherwise."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = getattr(self._metrics, metric).labels(self.name, *labels)
            self._children[key] = child
        return child


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
    ) -> None:
        self.metrics = metrics
        self.cloud = cloud
        self.backend_name = backend_name
        self.models: dict[str, EdgeModel] = {
            name: EdgeModel(runner, batching, metrics) for name, runner in runners.items()
        }
        self._closing = False
        for model in self.models.values():
            self.publish_thresholds(model.runner)

    # ---- life cycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Drain the edge batchers, then the cloud link (called by GrpcServer after stop)."""
        self._closing = True
        for model in self.models.values():
            model.batcher.close(timeout=10.0)
        if self.cloud is not None:
            self.cloud.close()

    def publish_thresholds(self, runner: EdgeRunner) -> None:
        """Copy a model's current thresholds into the edgecloud_exit_threshold gauge."""
        for index, value in enumerate(runner.thresholds()):
            self.metrics.exit_threshold.labels(model=runner.name, exit=runner.exit_label(index)).set(
                threshold_gauge_value(runner.policy.kind, value)
            )

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
            x, exit0 = self._validate(model, request)
            response = self._infer(model, request, x, exit0, context, start)
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

    def _validate(self, model: EdgeModel, request: pb.ModelInferRequest) -> tuple[np.ndarray, float | None]:
        """The input batch (FP32 or UINT8, shape [N, *sample]) and the per-request exit-0
        threshold; raises InvalidArgument naming the first problem found."""
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
        exit0 = self._threshold_parameter(runner, request)
        return x, exit0

    @staticmethod
    def _threshold_parameter(runner: EdgeRunner, request: pb.ModelInferRequest) -> float | None:
        if THRESHOLD_PARAMETER not in request.parameters:
            return None
        param = request.parameters[THRESHOLD_PARAMETER]
        kind = param.WhichOneof("parameter_choice")
        if kind not in ("double_param", "int64_param", "uint64_param"):
            raise InvalidArgument(
                f"parameter {THRESHOLD_PARAMETER!r} must be a number (double), got {kind or 'nothing'}"
            )
        value = float(getattr(param, kind))
        try:
            ExitPolicy(kind=runner.policy.kind, thresholds=[value])  # validates the value
        except ValueError as exc:
            raise InvalidArgument(f"parameter {THRESHOLD_PARAMETER!r}: {exc}") from exc
        return value

    def _edge(self, model: EdgeModel, x: np.ndarray, exit0: float | None) -> tuple[EdgeResult, float]:
        """Edge part of one request; returns the result and its queue time."""
        if exit0 is not None:  # a private policy: run alone, not in a shared batch
            return model.runner.run(x, exit0_threshold=exit0), 0.0
        # ResourceExhausted when full: explicit overload. inline: an idle batcher runs this
        # request in this handler thread (no hand-off to the worker and back); a busy one
        # queues it, so concurrent requests still share batches.
        future = model.batcher.submit(x, inline=True)
        out = future.result()  # an EdgeResult when the batch was this request alone, else rows
        edge = out if isinstance(out, EdgeResult) else model.runner.from_rows(out)
        return edge, future.queue_s

    def _infer(
        self,
        model: EdgeModel,
        request: pb.ModelInferRequest,
        x: np.ndarray,
        exit0: float | None,
        context: grpc.ServicerContext,
        start: float,
    ) -> pb.ModelInferResponse:
        name = model.name
        runner = model.runner
        edge, queue_s = self._edge(model, x, exit0)
        model.metric("latency", "queue").observe(queue_s)
        model.metric("latency", "edge_compute").observe(edge.compute_s)

        cloud_probs: np.ndarray | None = None
        transmitted = False
        cloud_latency_ms = 0.0
        reason = ""
        if edge.offload_index.size:
            if self.cloud is None:
                reason = "NO_CLOUD"
            else:
                try:
                    wire = runner.encode_offload(edge.offload)  # what the radio carries
                    reply = self.cloud.infer(name, wire, context.time_remaining())
                    cloud_probs, transmitted = reply.probs, True
                    cloud_latency_ms = reply.latency_s * 1000.0
                    model.metric("latency", "cloud_round_trip").observe(reply.latency_s)
                except CloudUnavailable as exc:
                    reason, transmitted = exc.code, exc.transmitted
                    log.debug("cloud unavailable for %s: %s", name, exc)
        results = runner.complete(edge, cloud_probs, transmitted)
        self._count(model, results)

        n_degraded = int(results.degraded.sum())
        n_cloud = int(results.cloud.sum())
        parameters: dict[str, Any] = {
            "degraded": n_degraded > 0,
            "degraded_samples": n_degraded,
            "cloud_samples": n_cloud,
            "edge_samples": int(results.exit_index.shape[0]) - n_degraded - n_cloud,
            "cloud_latency_ms": float(cloud_latency_ms),
            "edge_compute_ms": float(edge.compute_s * 1000.0),
            "backend": self.backend_name,
        }
        if n_degraded:
            parameters["degraded_reason"] = reason
        outputs = {
            "probabilities": results.probabilities,
            "class_index": results.class_index,
            "exit_index": results.exit_index,
            "confidence": results.confidence,
            "energy_joules": results.energy_joules,
        }
        return codec.encode_response(
            name, outputs, request_id=request.id, model_version=runner.manifest.version,
            parameters=parameters, requested=[o.name for o in request.outputs],
        )

    @staticmethod
    def _count(model: EdgeModel, results: SampleResults) -> None:
        runner = model.runner
        exits = results.exit_index
        if exits.size and int(exits.min()) >= 0:
            counts = np.bincount(exits, minlength=runner.cloud_exit + 1)
            pairs = [(int(i), int(counts[i])) for i in np.flatnonzero(counts)]
        else:  # not expected after complete(); counted as before, under the exit's label
            values, counts = np.unique(exits, return_counts=True)
            pairs = list(zip(values.tolist(), counts.tolist()))
        for exit_index, count in pairs:
            model.metric("samples", runner.exit_label(exit_index)).inc(count)
        degraded = int(results.degraded.sum())
        if degraded:
            model.metric("degraded_samples").inc(degraded)
        for component, joules in results.energy.items():
            total = float(joules.sum())
            if total > 0:
                model.metric("energy", component).inc(total)
