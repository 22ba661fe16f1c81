"""The edge->cloud link: one channel to one or many cloud replicas, retries, deadlines, a
circuit breaker, batched offloads.

Why each part:

* one gRPC channel for the whole cloud tier, load-balanced ``round_robin`` over every replica:
  ``address`` may be ``host:port``, several (a comma list or a list: one ``ipv4:``/``ipv6:``
  target, hostnames resolved once at start), or a ``dns:///name:port`` target that gRPC resolves
  to every replica (and re-resolves when a connection closes, e.g. at the server's maximum
  connection age). round_robin keeps one subchannel per replica and picks only READY ones: a
  replica that dies drops out of the rotation when its connection closes, and is reconnected
  in the background with backoff; that is the per-replica breaker.
* a replica that drains after SIGTERM keeps answering what it gets, then stops accepting: its
  GOAWAY takes it out of the rotation, and calls that raced the GOAWAY are refused unprocessed
  and retried transparently on another replica. Optional client-side health checking
  (``health_check``, off by default) leaves it as soon as its ``grpc.health.v1`` status turns
  NOT_SERVING; a server without the health service then counts as healthy.
* retries on UNAVAILABLE, and on CANCELLED from a replica that stopped or rotated a connection
  before an accepted call finished (seen once in CI: a degraded answer while another replica
  lived), in the channel's service config (gRPC retries transparently
  with backoff, and a retry goes through the picker again, i.e. to another live replica; other
  codes are final). The per-RPC retry buffer is as large as a message, so an offload can always
  be retried. Deadlines are per call and cover every attempt — a ``timeout`` inside the service
  config intermittently failed first calls (see the serving notes).
* per-call deadline = min(link timeout, what is left of the inbound request's deadline), so
  the edge always has time to answer locally when the cloud is late.
* ``wait_for_ready`` off: with no replica connected a call fails at once instead of queueing.
* a circuit breaker over the whole tier: after N consecutive failed calls no call is attempted
  for a while, so a dead cloud costs nothing per request. It sits above round_robin and the
  retries, so a call fails (and counts) only when every attempt failed: one dead or draining
  replica costs at most a retry, never a failed call, and cannot open it while a replica lives.
  Not covered: a replica that hangs with its connections open (stopped process, network cut
  without a reset) keeps its share of calls, which end at their deadline (degraded answers).
* a :class:`DynamicBatcher` per model: concurrent requests' offloads become one cloud call.
  An offload that finds the link idle is sent from the caller's own thread (``inline``), so
  a lone request pays no thread hand-offs; under load offloads queue and batch as before.

Any failure raises :class:`CloudUnavailable`; the caller answers with its best edge exit,
marked degraded. Nothing here ever fails a client request.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from edgecloud.serving.batching import DynamicBatcher
from edgecloud.config import CloudLinkConfig, parse_cloud_addresses, split_host_port
from edgecloud.edge.breaker import GAUGE_VALUE, BreakerState, CircuitBreaker
from edgecloud.edge.runner import softmax_np
from edgecloud.serving.metrics import Metrics
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


Resolver = Callable[[str, int], list[str]]


def resolve_host(host: str, port: int) -> list[str]:
    """Every IP address of ``host`` (TCP), in the resolver's order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def cloud_target(
    address: str | list[str] | None, resolve: Resolver = resolve_host
) -> tuple[str, str | None]:
    """The channel target for the cloud setting, and the authority to present (or None).

    One entry is used as is (``host:port`` goes through gRPC's DNS resolver, ``dns:///...``
    and other targets likewise), so gRPC resolves it to every replica behind the name. Several
    ``host:port`` entries become one ``ipv4:``/``ipv6:`` address-list target — gRPC has no
    target for several hostnames, so hostnames are resolved here, once (use a ``dns:///``
    target for a fleet that changes). IPv4 is used where a name has both families (servers
    usually bind one). The authority is then the first entry as written, so TLS checks a name
    and not an IP.
    """
    entries = parse_cloud_addresses(address)
    if not entries:
        raise ValueError("no cloud address configured")
    if len(entries) == 1:
        return entries[0], None
    v4: list[str] = []
    v6: list[str] = []
    unresolved: list[str] = []
    for entry in entries:
        host, port = split_host_port(entry)
        try:
            ips = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                ips = resolve(host, port)
            except OSError as exc:
                log.warning("cloud address %s: cannot resolve %s (%s); left out", entry, host, exc)
                unresolved.append(entry)
                continue
        for ip in ips:
            if ipaddress.ip_address(ip).version == 4:
                v4.append(f"{ip}:{port}")
            else:
                v6.append(f"[{ip}]:{port}")
    v4, v6 = list(dict.fromkeys(v4)), list(dict.fromkeys(v6))
    if not v4 and not v6:
        raise ValueError(f"none of the cloud addresses {', '.join(unresolved)} resolves")
    if v4 and v6:
        log.info("cloud replicas: using the IPv4 addresses %s; IPv6 %s left out", v4, v6)
    target = f"ipv4:{','.join(v4)}" if v4 else f"ipv6:{','.join(v6)}"
    return target, entries[0]


def service_config(config: CloudLinkConfig) -> dict[str, Any]:
    """gRPC service config: round_robin over the replicas, health-checked; retry on UNAVAILABLE
    and on a server-side CANCELLED; no timeout here (deadlines are per call)."""
    method: dict[str, Any] = {"name": [{"service": SERVICE_NAME}]}
    if config.max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": int(config.max_attempts),
            "initialBackoff": f"{config.initial_backoff_s:.3f}s",
            "maxBackoff": f"{max(config.max_backoff_s, config.initial_backoff_s):.3f}s",
            "backoffMultiplier": 2,
            # CANCELLED: a replica that shut down (or rotated a connection) before its grace let an
            # accepted call finish; inference is idempotent, so another replica answers it
            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
        }
    out: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method]}
    if config.health_check:
        out["healthCheckConfig"] = {"serviceName": ""}  # the server-wide status
    return out


def channel_options(
    config: CloudLinkConfig, max_message_bytes: int, authority: str | None = None
) -> list[tuple[str, Any]]:
    """Channel arguments of the cloud link."""
    reconnect_ms = int(min(max(config.breaker_reset_s, 0.1), 5.0) * 1000)
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(service_config(config))),
        # Ours, not one a DNS TXT record could replace.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1 if config.max_attempts > 1 else 0),
        # gRPC retries only what it kept: default 256 KiB per call, smaller than a big offload.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A cloud that comes back must be reachable again within about one breaker period,
        # not after gRPC's default reconnect backoff of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", reconnect_ms),
    ]
    if authority:
        options.append(("grpc.default_authority", authority))
    return options


class CloudClient:
    """Batched, deadline-bounded, breaker-protected ModelInfer calls to the cloud server."""

    def __init__(
        self,
        config: CloudLinkConfig,
        metrics: Metrics | None = None,
        *,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if not config.addresses:
            raise ValueError("CloudClient needs cloud.address (host:port, a list, or a target)")
        from edgecloud.serving.security import create_channel

        self.config = config
        self.metrics = metrics
        self.address = ",".join(config.addresses)  # as configured, for messages
        self.target, authority = cloud_target(config.address)
        self._channel = create_channel(
            self.target,
            tls=config.tls,
            ca=config.ca,
            client_cert=config.client_cert,
            client_key=config.client_key,
            token=config.token,
            server_name_override=config.server_name_override,
            options=channel_options(config, max_message_bytes, authority),
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
