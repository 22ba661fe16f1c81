"""A replicated cloud tier: offload throughput with 1, 2, 3 cloud replicas behind N edges.

One run, loopback only. It starts the largest number of cloud replicas asked for (separate
``edgecloud cloud serve`` processes, one ONNX Runtime thread each, no spinning) and, for each
replica count k, N edge daemons (``edgecloud edge serve``) whose ``--cloud`` lists the first k
replicas, so their offloads spread over k replicas round-robin. Every exit threshold is pinned
so that every sample is offloaded: the cloud tier is the part under test. A closed-loop client
per edge then drives all N edges of one k at a time; the measurements are interleaved (round
r runs k = 1, 2, 3 in a rotated order), so drift on a shared machine hits every k alike and
the ratios are measured side by side. Offload throughput is the samples the replicas computed
(each replica's own ``edgecloud_samples_total{exit="cloud"}``) per second; the per-replica
shares show the spread.

On a machine with fewer cores than replicas + edges the replicas compete for the same cores,
so the ratio says how much of the tier's capacity the edges can use, not how a fleet of
machines scales; the summary names the CPU and the usable cores for that reason. Starting the
3 + 3N processes (each imports torch) is most of a default run on a small machine: about 85 s
of its 2 minutes on our shared 2-core machine under load, where 1, 2 and 3 replicas gave the
same offload throughput (ratios 0.94 and 0.98: the two cores, not the replicas, are the limit).

    python benchmarks/fleet.py [--edges 2] [--replicas 1,2,3] [--duration 3] [--rounds 2] [--json]

The last line printed is a one-line JSON summary (``--json``: only that line).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import cpu_info  # noqa: E402  (the CPU, named as every benchmark names it)


def _samples_computed(url: str, model: str) -> float:
    """Samples a cloud replica computed, from its own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "edgecloud_samples_total" and s.labels.get("exit") == "cloud"
        and s.labels.get("model") == model
    )


def _all_cloud_pins(manifest) -> list[str]:
    """``--threshold`` flags under which no edge exit is ever confident."""
    if manifest.edge_only:
        raise SystemExit(f"{manifest.name} is edge-only: it offloads nothing")
    never = "0" if manifest.policy == "entropy" else "1"  # entropy < 0 / max p >= 1: never
    return [arg for i, e in enumerate(manifest.exits) if e.threshold is not None
            for arg in ("--threshold", f"{manifest.name}:{i}={never}")]


def _data(manifest) -> np.ndarray:
    if list(manifest.input.shape) == [1, 28, 28]:
        from edgecloud.data.samples import load_demo_sample

        return load_demo_sample()[0]
    return np.random.default_rng(0).random((512, *manifest.input.shape), dtype=np.float32)


def _start_all(role: str, arg_lists: list[list[str]], workdir: Path, name: str) -> list:
    """Servers started side by side (imports dominate start-up); all stopped if one fails."""
    from edgecloud.procs import start_server

    dirs = [workdir / f"{name}{i}" for i in range(len(arg_lists))]
    for d in dirs:
        d.mkdir()
    with ThreadPoolExecutor(len(arg_lists)) as pool:
        futures = [pool.submit(start_server, role, args, d) for args, d in zip(arg_lists, dirs)]
    started = [f.result() for f in futures if f.exception() is None]
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        for server in started:
            server.stop()
        raise failed[0]
    return started


def _drive(edges, manifest, data, *, batch: int, concurrency: int, duration: float):
    """All ``edges`` under closed-loop load at once; the LoadResults."""
    from edgecloud.client import InferenceClient
    from edgecloud.loadgen import run_load

    results = [None] * len(edges)

    def one(i: int) -> None:
        with InferenceClient(edges[i].address) as client:
            results[i] = run_load(client, manifest.name, manifest.input.name, data,
                                  batch_size=batch, concurrency=concurrency, duration_s=duration)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(edges))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fmnist-hybrid")
    parser.add_argument("--repository", default=None)
    parser.add_argument("--edges", type=int, default=2, help="edge daemons per replica count")
    parser.add_argument("--replicas", default="1,2,3", help="replica counts to compare")
    parser.add_argument("--batch", type=int, default=16, help="samples per request")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per edge")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = 1.0, 1
    try:
        counts = sorted({int(k) for k in args.replicas.split(",")})
    except ValueError:
        parser.error(f"--replicas {args.replicas!r}: expected a comma list of integers, e.g. 1,2,3")
    if not counts or counts[0] < 1 or args.edges < 1 or args.rounds < 1:
        parser.error("--replicas, --edges and --rounds must be >= 1")
    say = (lambda *a, **k: None) if args.json else (lambda *a: print(*a, file=sys.stderr))

    from edgecloud.bundle import ModelRepository

    cpu = cpu_info()
    bundle = ModelRepository(args.repository).get(args.model)
    manifest = bundle.manifest
    data = _data(manifest)
    repo = ["--repository", str(bundle.path.parent), "--model", manifest.name]
    say(f"model {manifest.name}, {args.edges} edges x replicas {counts}, batch {args.batch}, "
        f"concurrency {args.concurrency}/edge, {args.duration:g} s x {args.rounds} rounds")
    say(f"cpu: {cpu['model']}, {cpu['cores']} cores, {' '.join(cpu['simd']) or 'no SIMD flags'}")

    sps: dict[int, list[float]] = {k: [] for k in counts}
    shares: dict[int, list[float]] = {k: [] for k in counts}
    errors: dict[int, dict[str, int]] = {k: {} for k in counts}
    degraded: dict[int, int] = {k: 0 for k in counts}
    with tempfile.TemporaryDirectory(prefix="edgecloud-fleet-") as tmp:
        workdir = Path(tmp)
        t0 = time.monotonic()
        replicas = _start_all("cloud", [[*repo, "--intra-op-threads", "1", "--no-allow-spinning"]]
                              * counts[-1], workdir, "cloud")
        fleets: dict[int, list] = {}
        try:
            for k in counts:
                cloud = [a for r in replicas[:k] for a in ("--cloud", r.address)]
                fleets[k] = _start_all("edge", [[*repo, *cloud, *_all_cloud_pins(manifest)]]
                                       * args.edges, workdir, f"edge-k{k}-")
            say(f"started {len(replicas)} replicas and {args.edges * len(counts)} edges "
                f"in {time.monotonic() - t0:.1f} s")
            for k in counts:  # warm up every path once (connections, arenas, batchers)
                _drive(fleets[k], manifest, data, batch=args.batch,
                       concurrency=args.concurrency, duration=0.5)
            for r in range(args.rounds):
                order = counts[r % len(counts):] + counts[:r % len(counts)]
                for k in order:
                    urls = [rep.metrics_url for rep in replicas[:k]]
                    before = [_samples_computed(u, manifest.name) for u in urls]
                    start = time.perf_counter()
                    results = _drive(fleets[k], manifest, data, batch=args.batch,
                                     concurrency=args.concurrency, duration=args.duration)
                    wall = time.perf_counter() - start
                    done = [_samples_computed(u, manifest.name) - b for u, b in zip(urls, before)]
                    sps[k].append(sum(done) / wall)
                    shares[k].append(min(done) / max(sum(done), 1.0) * k)  # 1.0 = perfectly even
                    for res in results:
                        degraded[k] += res.degraded_samples
                        for code, n in res.errors.items():
                            errors[k][code] = errors[k].get(code, 0) + n
                    say(f"round {r + 1} replicas {k}: {sum(done) / wall:8.0f} offloaded samples/s, "
                        f"per replica {[int(d) for d in done]}")
        finally:
            codes = [s.stop() for fleet in fleets.values() for s in fleet]
            codes += [s.stop() for s in replicas]

    base = float(np.mean(sps[counts[0]]))
    rows = {}
    say(f"{'replicas':>8}{'offload samples/s':>20}{'ratio':>8}{'min share':>11}")
    for k in counts:
        mean = float(np.mean(sps[k]))
        rows[str(k)] = {
            "offload_samples_per_s": round(mean, 1),
            "offload_samples_per_s_runs": [round(v, 1) for v in sps[k]],
            "ratio_to_first": round(mean / base, 3) if base else None,
            "min_replica_share": round(float(np.min(shares[k])), 3),
            "degraded_samples": degraded[k],
            "errors": errors[k],
        }
        say(f"{k:>8}{mean:>20.0f}{rows[str(k)]['ratio_to_first']:>8.3f}"
            f"{rows[str(k)]['min_replica_share']:>11.3f}")
    summary = {
        "benchmark": "fleet", "model": manifest.name, "edges": args.edges,
        "replica_counts": counts, "batch": args.batch, "concurrency_per_edge": args.concurrency,
        "duration_s": args.duration, "rounds": args.rounds, "all_samples_offloaded": True,
        "by_replicas": rows, "server_exit_codes": codes, "cpu": cpu,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
