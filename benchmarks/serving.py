"""Served vs in-process: what does the serving path cost?

One run, same bundle, same batch, same data:
  * in-process: the edge runner (digital backend) + the cloud part in ONNX Runtime, called
    directly in this process — the compute the servers do, with no RPC, batching or threads;
  * served: a cloud server and an edge daemon as separate processes on loopback, driven by a
    closed-loop client in this process.
In-process is measured before and after the served run and averaged, so drift on a shared
machine hits both sides. Targets (issue #2): served throughput >= 90 % of in-process at
concurrency 16; added p50 latency at batch 1 <= 2 ms. Both sides run under the edge daemon's
compute settings (``apply_compute_settings``: torch threads, allocator). The summary names the
CPU (model, SIMD flags, usable cores, torch's SIMD level): results differ a lot between
AVX2-only and AVX-512 machines.

    python benchmarks/serving.py [--model fmnist-hybrid] [--batch 32] [--concurrency 16] [--duration 8]

The last line printed is a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _data(manifest) -> np.ndarray:
    if list(manifest.input.shape) == [1, 28, 28]:
        from edgecloud.data.samples import load_demo_sample

        return load_demo_sample()[0]
    return np.random.default_rng(0).random((1024, *manifest.input.shape), dtype=np.float32)


class InProcess:
    """The servers' compute, called directly."""

    def __init__(self, bundle) -> None:
        from edgecloud.cloud.sessions import load_cloud_model
        from edgecloud.config import CloudConfig
        from edgecloud.edge.runner import EdgeRunner

        self.runner = EdgeRunner(bundle, "digital")
        # ORT threads spin by default and starve torch threads in the same process
        # (shared notes, cpu-performance.md): no spinning for the in-process side.
        self.cloud = load_cloud_model(bundle, CloudConfig(allow_spinning=False, intra_op_threads=1))
        self.spec = bundle.manifest.cloud

    def __call__(self, x: np.ndarray):
        edge = self.runner.run(x)
        probs = None
        if edge.offload_index.size:
            wire = edge.offload
            try:
                from edgecloud.offload import encode

                wire = encode(edge.offload, self.spec)
            except ImportError:
                pass
            probs = self.cloud.run(wire)["probabilities"]
        return self.runner.complete(edge, probs, True)

    def throughput(self, data: np.ndarray, batch: int, duration: float) -> float:
        self(data[:batch])  # warm up
        done, k, start = 0, 0, time.perf_counter()
        while time.perf_counter() - start < duration:
            rows = [(k * batch + j) % len(data) for j in range(batch)]
            self(data[rows])
            done += batch
            k += 1
        return done / (time.perf_counter() - start)

    def latency_ms(self, data: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch-1 latencies (ms) and whether each sample went to the cloud part."""
        self(data[:1])
        times, offloaded = [], []
        for i in range(n):
            t0 = time.perf_counter()
            out = self(data[i % len(data): i % len(data) + 1])
            times.append(time.perf_counter() - t0)
            offloaded.append(bool(out.cloud.any()))
        return np.asarray(times) * 1e3, np.asarray(offloaded)


# SIMD extensions worth naming, in order (the /proc/cpuinfo flag names)
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
              "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """The CPU this ran on: results differ a lot between AVX2-only and AVX-512 machines."""
    import os
    import platform

    import torch

    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: no flags, the platform's processor name
        pass
    model = model or platform.processor() or platform.machine()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "model": model,
        "cores": usable,
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
    }


def _rounded(value: float, digits: int) -> float | None:
    """For the JSON line: None instead of NaN (e.g. no sample went to the cloud)."""
    return None if value != value else round(value, digits)


def _p50(times_ms, mask=None) -> float:
    values = np.asarray(times_ms) if mask is None else np.asarray(times_ms)[np.asarray(mask)]
    return float(np.percentile(values, 50)) if values.size else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fmnist-hybrid")
    parser.add_argument("--repository", default=None)
    parser.add_argument("--batch", type=int, default=32, help="samples per request (throughput)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per throughput run")
    parser.add_argument("--latency-requests", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.latency_requests = 2.0, 100

    from edgecloud.bundle import ModelRepository
    from edgecloud.serving.client import InferenceClient
    from edgecloud.serving.loadgen import run_load
    from edgecloud.procs import start_server

    from edgecloud.config import EdgeConfig
    from edgecloud.edge.server import apply_compute_settings

    # The same compute settings as the edge daemon's defaults (torch threads, allocator), so
    # only the serving path differs.
    edge_defaults = EdgeConfig()
    apply_compute_settings(edge_defaults)
    cpu = cpu_info()
    bundle = ModelRepository(args.repository).get(args.model)
    manifest = bundle.manifest
    data = _data(manifest)
    inproc = InProcess(bundle)

    print(f"model {manifest.name}, batch {args.batch}, concurrency {args.concurrency}", file=sys.stderr)
    print(f"cpu: {cpu['model']}, {cpu['cores']} cores, {' '.join(cpu['simd']) or 'no SIMD flags'}, "
          f"torch {cpu['torch_capability']}", file=sys.stderr)
    tp_in = [inproc.throughput(data, args.batch, args.duration)]
    lat_in = [inproc.latency_ms(data, args.latency_requests)]

    repo = ["--repository", str(bundle.path.parent), "--model", manifest.name]
    with tempfile.TemporaryDirectory(prefix="edgecloud-bench-") as tmp:
        workdir = Path(tmp)
        cloud = start_server("cloud", [*repo, "--no-allow-spinning", "--intra-op-threads", "1"], workdir)
        edge = start_server("edge", [*repo, "--cloud", cloud.address], workdir)
        try:
            with InferenceClient(edge.address) as client:
                client.wait_ready(30)
                run_load(client, manifest.name, manifest.input.name, data, batch_size=args.batch,
                         concurrency=args.concurrency, duration_s=1.0)  # warm up
                served = run_load(client, manifest.name, manifest.input.name, data,
                                  batch_size=args.batch, concurrency=args.concurrency,
                                  duration_s=args.duration)
                served_lat = run_load(client, manifest.name, manifest.input.name, data, batch_size=1,
                                      concurrency=1, requests=args.latency_requests)
        finally:
            codes = [edge.stop(), cloud.stop()]

    tp_in.append(inproc.throughput(data, args.batch, args.duration))
    lat_in.append(inproc.latency_ms(data, args.latency_requests))

    inproc_sps = float(np.mean(tp_in))
    inproc_p50 = float(np.mean([_p50(t) for t, _ in lat_in]))
    # The b=1 p50 mixes samples answered at the edge with samples that also took the cloud
    # hop; both groups are reported so a change of exit share is visible.
    inproc_edge = float(np.mean([_p50(t, ~o) for t, o in lat_in]))
    inproc_cloud = float(np.mean([_p50(t, o) for t, o in lat_in]))
    cloud_share = float(np.mean(served_lat.offloaded)) if served_lat.offloaded else float("nan")
    served_sps = served.samples / served.duration_s
    served_p50 = served_lat.percentile_ms(50)
    ratio = served_sps / inproc_sps
    added = served_p50 - inproc_p50
    print(f"{'':<24}{'in-process':>14}{'served':>14}{'ratio/added':>14}", file=sys.stderr)
    print(f"{'throughput (samples/s)':<24}{inproc_sps:>14.0f}{served_sps:>14.0f}{ratio:>14.3f}", file=sys.stderr)
    print(f"{'p50 latency b=1 (ms)':<24}{inproc_p50:>14.3f}{served_p50:>14.3f}{added:>+14.3f}", file=sys.stderr)
    for label, inp, srv in (("  edge-exit samples", inproc_edge, served_lat.percentile_ms(50, False)),
                            ("  cloud samples", inproc_cloud, served_lat.percentile_ms(50, True))):
        print(f"{label:<24}{inp:>14.3f}{srv:>14.3f}{srv - inp:>+14.3f}", file=sys.stderr)
    print(f"cloud share at b=1: {cloud_share:.3f}", file=sys.stderr)
    print(f"served errors: {dict(served.errors) or 'none'}; exit share: {served.summary()['exit_share']}",
          file=sys.stderr)
    summary = {
        "benchmark": "serving", "model": manifest.name, "batch": args.batch,
        "concurrency": args.concurrency,
        "inproc_samples_per_s": round(inproc_sps, 1), "inproc_samples_per_s_runs": [round(v, 1) for v in tp_in],
        "served_samples_per_s": round(served_sps, 1), "throughput_ratio": round(ratio, 4),
        "inproc_p50_ms": round(inproc_p50, 3), "served_p50_ms": round(served_p50, 3),
        "added_p50_ms": round(added, 3),
        "inproc_p50_ms_edge_exit": _rounded(inproc_edge, 3),
        "served_p50_ms_edge_exit": _rounded(served_lat.percentile_ms(50, False), 3),
        "inproc_p50_ms_cloud": _rounded(inproc_cloud, 3),
        "served_p50_ms_cloud": _rounded(served_lat.percentile_ms(50, True), 3),
        "cloud_share_b1": _rounded(cloud_share, 4),
        "target_throughput_ratio": 0.9, "target_added_p50_ms": 2.0,
        "meets_targets": bool(ratio >= 0.9 and added <= 2.0),
        "served_errors": dict(served.errors), "server_exit_codes": codes,
        "edge_compute_settings": {"torch_threads": edge_defaults.torch_threads,
                                  "keep_freed_memory": edge_defaults.keep_freed_memory},
        "cpu": cpu,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
