"""Closed-loop load: N workers, each sending its next request as soon as the last one returns.

Used by ``edgecloud bench``, ``edgecloud demo`` and ``benchmarks/serving.py``. Requests walk
through the dataset in order (cyclically), so per-sample answers can be matched to labels.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from edgecloud.serving.client import InferenceClient


@dataclass
class LoadResult:
    requests: int = 0
    samples: int = 0
    duration_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    # per answered request, aligned with latencies_s: did any of its samples go to the cloud
    # (the edge daemon's cloud_samples parameter; False for servers that do not report it)
    offloaded: list[bool] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)          # gRPC status name -> count
    exits: Counter = field(default_factory=Counter)           # exit index -> samples
    degraded_requests: int = 0
    degraded_samples: int = 0
    # per dataset row (only the first pass over the data is kept): predicted class, exit, energy
    predictions: dict[int, tuple[int, int, float]] = field(default_factory=dict)

    def percentile_ms(self, q: float, offloaded: bool | None = None) -> float:
        """Latency percentile of all answered requests, or only of those that did
        (``offloaded=True``) or did not (``False``) send samples to the cloud."""
        values = self.latencies_s
        if offloaded is not None:
            values = [t for t, o in zip(self.latencies_s, self.offloaded) if o == offloaded]
        if not values:
            return float("nan")
        return float(np.percentile(np.asarray(values), q) * 1e3)

    def summary(self) -> dict[str, Any]:
        ok = self.requests - sum(self.errors.values())
        total_exits = sum(self.exits.values()) or 1
        return {
            "requests": self.requests,
            "ok_requests": ok,
            "samples": self.samples,
            "duration_s": round(self.duration_s, 4),
            "throughput_rps": round(ok / self.duration_s, 2) if self.duration_s else 0.0,
            "throughput_sps": round(self.samples / self.duration_s, 2) if self.duration_s else 0.0,
            "latency_ms": {
                "p50": round(self.percentile_ms(50), 3),
                "p95": round(self.percentile_ms(95), 3),
                "p99": round(self.percentile_ms(99), 3),
                "mean": round(float(np.mean(self.latencies_s)) * 1e3, 3) if self.latencies_s else None,
            },
            "exit_share": {str(k): round(v / total_exits, 4) for k, v in sorted(self.exits.items())},
            "errors": dict(self.errors),
            "degraded_requests": self.degraded_requests,
            "degraded_samples": self.degraded_samples,
        }


def run_load(
    client: InferenceClient,
    model: str,
    input_name: str,
    data: np.ndarray,
    *,
    batch_size: int = 1,
    concurrency: int = 1,
    requests: int | None = None,
    duration_s: float | None = None,
    timeout_s: float = 30.0,
    progress: Any = None,
) -> LoadResult:
    """Send ``requests`` requests (or for ``duration_s`` seconds) and collect the answers."""
    if requests is None and duration_s is None:
        requests = max(1, len(data) // batch_size)
    n_rows = len(data)
    starts = itertools.count(0)
    lock = threading.Lock()
    result = LoadResult()
    stop_at = None if duration_s is None else time.perf_counter() + duration_s

    def next_request() -> int | None:
        with lock:
            if requests is not None and result.requests >= requests:
                return None
            if stop_at is not None and time.perf_counter() >= stop_at:
                return None
            result.requests += 1
            return next(starts)

    def worker() -> None:
        while (k := next_request()) is not None:
            rows = [(k * batch_size + j) % n_rows for j in range(batch_size)]
            batch = data[rows]
            t0 = time.perf_counter()
            try:
                reply = client.infer(model, {input_name: batch}, timeout_s=timeout_s)
            except grpc.RpcError as exc:
                with lock:
                    result.errors[exc.code().name] += 1
                continue
            latency = time.perf_counter() - t0
            out = reply.outputs
            cls = out.get("class_index")
            if cls is None:
                cls = np.argmax(out.get("probabilities", out.get("LOGITS")), axis=1)
            exits = out.get("exit_index", np.full(len(rows), -1))
            energy = out.get("energy_joules", np.zeros(len(rows)))
            with lock:
                result.latencies_s.append(latency)
                result.offloaded.append(int(reply.parameters.get("cloud_samples", 0) or 0) > 0)
                result.samples += len(rows)
                result.exits.update(int(e) for e in exits)
                if reply.parameters.get("degraded"):
                    result.degraded_requests += 1
                    result.degraded_samples += int(reply.parameters.get("degraded_samples", 0))
                for j, row in enumerate(rows):
                    result.predictions.setdefault(row, (int(cls[j]), int(exits[j]), float(energy[j])))
                if progress is not None:
                    progress.update(len(rows))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.duration_s = time.perf_counter() - start
    return result
