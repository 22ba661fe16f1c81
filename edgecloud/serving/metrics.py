"""Every Prometheus metric family, named once (prefix ``edgecloud_``, base units).

Each server owns a :class:`Metrics` with its own ``CollectorRegistry`` so that several servers
can live in one process (tests) without "Duplicated timeseries". Energy is a joules *counter*;
power is ``rate()`` of it.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from edgecloud import __version__

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The metric families of one server (``role`` is ``edge`` or ``cloud``)."""

    def __init__(self, role: str, registry: CollectorRegistry | None = None) -> None:
        self.role = role
        self.registry = registry or CollectorRegistry()
        self._children: dict[tuple[str, ...], Any] = {}
        r = self.registry
        self.build_info = Info("edgecloud_build", "edgecloud build information", registry=r)
        self.build_info.info({"version": __version__, "role": role})
        self.requests = Counter(
            "edgecloud_requests", "Inference requests by model and final gRPC status",
            ["model", "status"], registry=r,
        )
        self.samples = Counter(
            "edgecloud_samples", "Samples answered, by model and the exit that answered them",
            ["model", "exit"], registry=r,
        )
        self.degraded_samples = Counter(
            "edgecloud_degraded_samples",
            "Samples that needed the cloud but were answered by an edge exit (cloud down or late)",
            ["model"], registry=r,
        )
        self.energy = Counter(
            "edgecloud_energy_joules", "Simulated energy spent, by component",
            ["model", "component"], registry=r,
        )
        self.latency = Histogram(
            "edgecloud_request_duration_seconds", "Latency by stage (queue, edge_compute, "
            "cloud_round_trip, cloud_compute, total)",
            ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.offload_bytes = Counter(
            "edgecloud_offload_bytes", "Bytes of tensors sent from the edge to the cloud",
            ["model"], registry=r,
        )
        self.cloud_failures = Counter(
            "edgecloud_cloud_failures", "Failed edge->cloud calls by gRPC status code",
            ["model", "code"], registry=r,
        )
        self.batch_size = Histogram(
            "edgecloud_batch_size", "Samples per executed batch", ["model"],
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "edgecloud_queue_depth", "Samples waiting in the batching queue", ["model"], registry=r,
        )
        self.circuit_open = Gauge(
            "edgecloud_circuit_breaker_open",
            "Edge->cloud circuit breaker state (0 closed, 0.5 half-open, 1 open)", registry=r,
        )
        self.exit_threshold = Gauge(
            "edgecloud_exit_threshold", "Current exit threshold per exit", ["model", "exit"],
            registry=r,
        )
        # ---- online exit control (edge daemon, controlled models only; updated every step) ----
        self.shadow_samples = Counter(
            "edgecloud_shadow_samples",
            "Edge-exited samples also sent to the cloud as shadow samples (the agreement signal)",
            ["model"], registry=r,
        )
        self.shadow_dropped = Counter(
            "edgecloud_shadow_dropped",
            "Shadow samples drawn but dropped because the shadow queue was full",
            ["model"], registry=r,
        )
        self.shadow_bytes = Counter(
            "edgecloud_shadow_bytes",
            "Bytes of shadow samples sent to the cloud (also in edgecloud_offload_bytes_total)",
            ["model"], registry=r,
        )
        self.shadow_rate = Gauge(
            "edgecloud_shadow_rate", "Current shadow rate (share of edge-exited samples shadowed)",
            ["model"], registry=r,
        )
        self.agreement = Gauge(
            "edgecloud_agreement",
            "Agreement with the cloud at the current threshold: scope system (all answers) or exit "
            "(edge-exited answers); stat estimate or lower_bound (1 - delta confidence)",
            ["model", "scope", "stat"], registry=r,
        )
        self.control_target = Gauge(
            "edgecloud_control_target",
            "Budget target (agreement share, energy J/inference, uplink bytes/s, p99 latency s)",
            ["model", "budget"], registry=r,
        )
        self.control_value = Gauge(
            "edgecloud_control_value", "The controller's estimate of a budget's value at the "
            "current threshold (same units as the target; NaN: no data yet)",
            ["model", "budget"], registry=r,
        )
        self.control_violation = Gauge(
            "edgecloud_control_violation", "1 when a budget is not met at the current threshold",
            ["model", "budget"], registry=r,
        )
        self.control_unreachable = Gauge(
            "edgecloud_control_unreachable",
            "1 when no threshold would meet a budget (given the higher-priority budgets)",
            ["model", "budget"], registry=r,
        )
        self.control_backoff = Gauge(
            "edgecloud_control_backoff",
            "1 while a cloud saturation report (RESOURCE_EXHAUSTED, breaker open) caps offloads",
            ["model"], registry=r,
        )
        self.control_score_shift_p = Gauge(
            "edgecloud_control_score_shift_p",
            "p-value of the test that the window's exit scores did not move from the profile's "
            "validation scores (shift_alpha: at or above it, validation labels are pooled)",
            ["model"], registry=r,
        )

    def child(self, family: str, *labels: str) -> Any:
        """``getattr(self, family).labels(*labels)``, looked up once: prometheus_client's
        ``labels()`` validates and takes a lock on every call, several times per request."""
        key = (family, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = getattr(self, family).labels(*labels)
        return found

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the ``/metrics`` HTTP endpoint; returns the bound port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http_server = server
        return int(server.server_address[1])

    def shutdown(self) -> None:
        server = getattr(self, "_http_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
