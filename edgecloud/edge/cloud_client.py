"""The edge->cloud link: one channel, retries, deadlines, a circuit breaker, batched offloads.

Why each part:

* retries on UNAVAILABLE only, in the channel's service config (gRPC retries transparently
  with backoff; other codes are final). Deadlines are per call — a ``timeout`` inside the
  service config intermittently failed first calls (see the serving notes).
* per-call deadline = min(link timeout, what is left of the inbound request's deadline), so
  the edge always has time to answer locally when the cloud is late.
* ``wait_for_ready`` off: a cloud that is down fails the call at once instead of queueing it.
* a circuit breaker: after N consecutive failed calls no call is attempted for a while, so a
  dead cloud costs nothing per request.
* a :class:`DynamicBatcher` per model: concurrent requests' offloads become one cloud call.
  An offload that finds the link idle is sent from the caller's own thread (``inline``), so
  a lone request pays no thread hand-offs; under load offloads queue and batch as before.

Any failure raises :class:`CloudUnavailable`; the caller answers with its best edge exit,
marked degraded. Nothing here ever fails a client request.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from concurrent.futures import CancelledError, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from edgecloud.batching import DynamicBatcher
from edgecloud.config import CloudLinkConfig
from edgecloud.edge.breaker import GAUGE_VALUE, BreakerState, CircuitBreaker
from edgecloud.edge.runner import softmax_np
from edgecloud.metrics import Metrics
from edgecloud.offload import WIRE_DTYPES
from edgecloud.protocol import SERVICE_NAME, codec, pb_grpc
from edgecloud.protocol.errors import InferenceError

log = logging.getLogger(__name__)

CIRCUIT_OPEN = "CIRCUIT_OPEN"  # failure label when the breaker refused the call
MIN_CALL_BUDGET_S = 0.002      # below this a cloud call cannot succeed: do not send it


class CloudUnavailable(Exception):
    """The cloud could not answer in time; ``code`` names why (a gRPC code or CIRCUIT_OPEN)."""

    def __init__(self, code: str, message: str, *, transmitted: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.transmitted = transmitted  # the features left the edge (radio energy was spent)


@dataclass
class CloudReply:
    probs: np.ndarray   # [K, C] float32 softmax of the cloud's logits
    latency_s: float    # from submit to answer (queue + round trip)


@dataclass(frozen=True)
class CloudModel:
    """How one bundle's cloud part is addressed."""

    name: str          # bundle name (metric label)
    cloud_name: str    # model name on the cloud server
    input_name: str
    output_name: str
    num_classes: int


def service_config(config: CloudLinkConfig) -> dict[str, Any]:
    """gRPC service config: retry on UNAVAILABLE only; no timeout here (deadlines are per call)."""
    method: dict[str, Any] = {"name": [{"service": SERVICE_NAME}]}
    if config.max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": int(config.max_attempts),
            "initialBackoff": f"{config.initial_backoff_s:.3f}s",
            "maxBackoff": f"{max(config.max_backoff_s, config.initial_backoff_s):.3f}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return {"methodConfig": [method]}


def channel_options(config: CloudLinkConfig, max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel arguments of the cloud link."""
    reconnect_ms = int(min(max(config.breaker_reset_s, 0.1), 5.0) * 1000)
    return [
        ("grpc.service_config", json.dumps(service_config(config))),
        ("grpc.enable_retries", 1 if config.max_attempts > 1 else 0),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A cloud that comes back must be reachable again within about one breaker period,
        # not after gRPC's default reconnect backoff of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", reconnect_ms),
    ]


class CloudClient:
    """Batched, deadline-bounded, breaker-protected ModelInfer calls to the cloud server."""

    def __init__(
        self,
        config: CloudLinkConfig,
        metrics: Metrics | None = None,
        *,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if not config.address:
            raise ValueError("CloudClient needs cloud.address (host:port)")
        from edgecloud.security import create_channel

        self.config = config
        self.metrics = metrics
        self.address = config.address
        self._channel = create_channel(
            config.address,
            tls=config.tls,
            ca=config.ca,
            client_cert=config.client_cert,
            client_key=config.client_key,
            token=config.token,
            server_name_override=config.server_name_override,
            options=channel_options(config, max_message_bytes),
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self.breaker = CircuitBreaker(
            config.breaker_failures, config.breaker_reset_s, on_change=self._breaker_changed
        )
        if metrics is not None:
            metrics.circuit_open.set(GAUGE_VALUE[BreakerState.CLOSED])
        self._models: dict[str, CloudModel] = {}
        self._batchers: dict[str, DynamicBatcher] = {}
        self._ids = itertools.count()

    # ---- set-up --------------------------------------------------------------------------
    def add_model(self, model: CloudModel) -> None:
        """Register a bundle's cloud part; creates its offload batcher."""
        batching = self.config.batching
        self._models[model.name] = model
        self._batchers[model.name] = DynamicBatcher(
            lambda batch, m=model: self._call(m, batch),
            max_batch_size=batching.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_ms / 1000.0,
            max_queue_size=batching.max_queue_size,
            name=f"{model.name}/cloud",
            metrics=self.metrics,
        )

    def close(self) -> None:
        for batcher in self._batchers.values():
            batcher.close(timeout=self.config.timeout_s + 1.0)
        self._channel.close()

    def _breaker_changed(self, state: BreakerState) -> None:
        log.warning("edge->cloud circuit breaker %s (cloud %s)", state.value, self.address)
        if self.metrics is not None:
            self.metrics.circuit_open.set(GAUGE_VALUE[state])

    def _failed(self, model: str, code: str) -> None:
        if self.metrics is not None:
            self.metrics.cloud_failures.labels(model=model, code=code).inc()

    # ---- the caller's side ---------------------------------------------------------------
    def budget(self, time_remaining: float | None) -> float:
        """Deadline of one cloud call: the link timeout, cut to the inbound request's remaining
        time minus a small reserve for answering locally."""
        budget = self.config.timeout_s
        if time_remaining is not None:
            reserve = min(0.02, 0.1 * max(time_remaining, 0.0))
            budget = min(budget, time_remaining - reserve)
        return budget

    def infer(self, model: str, features: np.ndarray, time_remaining: float | None = None) -> CloudReply:
        """Cloud probabilities for ``features`` of bundle ``model``: [K, ...], already in the
        bundle's wire datatype (``EdgeRunner.encode_offload``: float32, float16 or uint8); it
        is sent as is, and the offload-bytes metric counts exactly those bytes.

        Raises :class:`CloudUnavailable` when the breaker is open, the budget is gone, the
        offload queue is full, or the call failed or was late.
        """
        start = time.perf_counter()
        budget = self.budget(time_remaining)
        if budget < MIN_CALL_BUDGET_S:
            self._failed(model, grpc.StatusCode.DEADLINE_EXCEEDED.name)
            raise CloudUnavailable("DEADLINE_EXCEEDED", "no time left for a cloud call")
        if self.breaker.state is BreakerState.OPEN:
            self._failed(model, CIRCUIT_OPEN)
            raise CloudUnavailable(CIRCUIT_OPEN, f"circuit breaker open for cloud {self.address}")
        try:
            batcher = self._batchers[model]
        except KeyError as exc:
            raise CloudUnavailable("NOT_FOUND", f"model {model!r} has no cloud part registered") from exc
        k = int(features.shape[0])
        deadline = time.monotonic() + budget
        try:
            # inline: on an idle link this thread makes the call itself (no hand-off to the
            # batch worker and back); a busy link queues it, so concurrent offloads batch.
            future = batcher.submit({"x": features, "deadline": np.full(k, deadline, np.float64)},
                                    inline=True)
        except InferenceError as exc:  # queue full / shutting down
            code = exc.code.name
            self._failed(model, code)
            raise CloudUnavailable(code, str(exc)) from exc
        try:
            logits = future.result(timeout=max(0.0, deadline - time.monotonic()) + 0.005)
        except CloudUnavailable:
            raise
        except (FutureTimeout, CancelledError) as exc:
            future.cancel()
            raise CloudUnavailable("DEADLINE_EXCEEDED", f"no cloud answer within {budget:.3f} s",
                                   transmitted=future.running() or future.done()) from exc
        except Exception as exc:  # noqa: BLE001 - any other failure: degrade, never error
            raise CloudUnavailable("INTERNAL", f"cloud call failed: {exc}") from exc
        return CloudReply(softmax_np(np.asarray(logits)), time.perf_counter() - start)

    # ---- the batch worker's side ---------------------------------------------------------
    def _call(self, model: CloudModel, batch: dict[str, np.ndarray]) -> np.ndarray:
        """One ModelInfer for a whole batch of offloads; raises CloudUnavailable on failure."""
        features = np.ascontiguousarray(batch["x"])
        if features.dtype not in WIRE_DTYPES.values():  # e.g. float64 from a caller: the FP32 default
            features = features.astype(np.float32)
        timeout = min(self.config.timeout_s, float(batch["deadline"].max()) - time.monotonic())
        if timeout < MIN_CALL_BUDGET_S:
            self._failed(model.name, grpc.StatusCode.DEADLINE_EXCEEDED.name)
            raise CloudUnavailable("DEADLINE_EXCEEDED", "deadline passed while queued")
        if not self.breaker.allow():
            self._failed(model.name, CIRCUIT_OPEN)
            raise CloudUnavailable(CIRCUIT_OPEN, f"circuit breaker open for cloud {self.address}")
        request = codec.encode_request(
            model.cloud_name, {model.input_name: features},
            request_id=f"edge-{next(self._ids)}", outputs=[model.output_name],
        )
        ok = False
        code = "INTERNAL"
        try:
            try:
                response = self._stub.ModelInfer(request, timeout=timeout, wait_for_ready=False)
            except grpc.RpcError as exc:
                code = exc.code().name if exc.code() is not None else "UNKNOWN"
                sent = code != "UNAVAILABLE"
                if sent:
                    self._count_bytes(model.name, features)
                raise CloudUnavailable(code, exc.details() or code, transmitted=sent) from exc
            self._count_bytes(model.name, features)
            outputs = codec.decode_response(response)
            logits = outputs.get(model.output_name)
            expected = (features.shape[0], model.num_classes)
            if logits is None or tuple(logits.shape) != expected:
                raise CloudUnavailable(
                    "INTERNAL",
                    f"cloud answered {None if logits is None else list(logits.shape)} for "
                    f"{model.output_name!r}, expected {list(expected)}",
                    transmitted=True,
                )
            ok = True
            return np.asarray(logits, dtype=np.float32)
        except CloudUnavailable as exc:
            code = exc.code
            raise
        finally:
            if ok:
                self.breaker.record_success()
            else:
                self.breaker.record_failure()
                self._failed(model.name, code)

    def _count_bytes(self, model: str, features: np.ndarray) -> None:
        if self.metrics is not None:
            self.metrics.child("offload_bytes", model).inc(features.nbytes)
