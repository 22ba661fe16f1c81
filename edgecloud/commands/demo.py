"""``edgecloud demo``: the main job, end to end on one machine.

Starts a cloud server and an edge daemon as separate processes on free loopback ports, sends
the bundled Fashion-MNIST sample through the edge, prints accuracy, exit shares, energy per
inference against sending everything to the cloud, latency percentiles and the metrics URLs,
then shuts both down with SIGTERM and checks that they exit cleanly.
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start cloud + edge, send the bundled sample, print a summary")
    p.add_argument("--model", default="fmnist-hybrid", help="bundle to serve")
    p.add_argument("--repository", default=None, help="model repository (default: bundled models)")
    p.add_argument("--backend", default="digital", choices=["digital", "crossbar", "sram"],
                   help="edge compute-in-memory backend")
    p.add_argument("--samples", type=int, default=1000, help="how many bundled samples to send")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--batch-size", type=int, default=1, help="samples per request")
    p.add_argument("--startup-timeout", type=float, default=90.0, help="seconds to wait for servers")
    p.add_argument("--keep-running", action="store_true",
                   help="leave both servers up after the run (scrape their metrics) until Ctrl-C")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=run)


def _scrape(url: str, prefixes: tuple[str, ...]) -> list[str]:
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return []
    return [line for line in text.splitlines() if line.startswith(prefixes) and not line.startswith("#")]


def run(args: argparse.Namespace) -> int:
    from edgecloud.bundle import ModelRepository
    from edgecloud.cim.energy import EnergyTable
    from edgecloud.serving.client import InferenceClient
    from edgecloud.data.samples import load_demo_sample
    from edgecloud.serving.loadgen import run_load
    from edgecloud.procs import start_server

    bundle = ModelRepository(args.repository).get(args.model)
    manifest = bundle.manifest
    images, labels, _classes = load_demo_sample()
    images, labels = images[: args.samples], labels[: args.samples]
    repo = ["--repository", str(bundle.path.parent), "--model", manifest.name]
    say = (lambda *a, **k: None) if args.json else print

    with tempfile.TemporaryDirectory(prefix="edgecloud-demo-") as tmp:
        workdir = Path(tmp)
        servers = []
        try:
            say(f"starting cloud server (model {manifest.name}) ...")
            # Both servers share this machine's cores: no ORT spinning, one ORT thread.
            cloud = start_server("cloud", [*repo, "--no-allow-spinning", "--intra-op-threads", "1"],
                                 workdir, timeout=args.startup_timeout)
            servers.append(cloud)
            say(f"  cloud listening on {cloud.address}, metrics {cloud.metrics_url}")
            say(f"starting edge daemon (backend {args.backend}, cloud at {cloud.address}) ...")
            edge = start_server("edge", [*repo, "--cloud", cloud.address, "--backend", args.backend],
                                workdir, timeout=args.startup_timeout)
            servers.append(edge)
            say(f"  edge listening on {edge.address}, metrics {edge.metrics_url}")
            with InferenceClient(edge.address) as client:
                client.wait_ready(30.0)
                n_requests = -(-len(images) // args.batch_size)
                bar = None if args.json else tqdm(total=n_requests * args.batch_size, unit="img",
                                                  desc="inference via edge")
                result = run_load(client, manifest.name, manifest.input.name, images,
                                  batch_size=args.batch_size, concurrency=args.concurrency,
                                  requests=n_requests, progress=bar)
                if bar is not None:
                    bar.close()
            scraped = _scrape(edge.metrics_url, ("edgecloud_samples_total", "edgecloud_energy_joules_total"))
            if args.keep_running and not args.json:
                print(f"servers running: edge {edge.address} ({edge.metrics_url}), "
                      f"cloud {cloud.address} ({cloud.metrics_url}); Ctrl-C stops them")
                try:
                    signal.pause()
                except KeyboardInterrupt:
                    pass
        finally:
            codes = {s.role: s.stop() for s in reversed(servers)}

    summary = _summary(args, manifest, labels, result, EnergyTable.load())
    summary["metrics_urls"] = {"edge": edge.metrics_url, "cloud": cloud.metrics_url}
    summary["server_exit_codes"] = codes
    if args.json:
        print(json.dumps(summary))
    else:
        _print(summary, scraped)
    ok = not result.errors and all(code == 0 for code in codes.values())
    return 0 if ok else 1


def _summary(args, manifest, labels: np.ndarray, result, table) -> dict[str, Any]:
    rows = sorted(result.predictions)
    pred = np.array([result.predictions[r][0] for r in rows])
    energy = np.array([result.predictions[r][2] for r in rows])
    names = [e.name for e in manifest.exits] + ["cloud"]
    accuracy = float((pred == labels[rows]).mean()) if rows else float("nan")
    # Baseline: every sample's raw pixels (uint8) go over the radio, the cloud runs the whole
    # network in full precision. Same energy table as the edge's per-sample accounting.
    raw_bits = 8 * int(np.prod(manifest.input.shape))
    baseline = raw_bits * table.per_event("radio_bit") + manifest.reference_macs * table.per_event("mac_fp32")
    mean_energy = float(energy.mean()) if rows else float("nan")
    base = result.summary()
    return {
        "model": manifest.name,
        "backend": args.backend,
        "samples": len(rows),
        "accuracy": round(accuracy, 4),
        "exit_share": {names[int(k)] if 0 <= int(k) < len(names) else k: v for k, v in base["exit_share"].items()},
        "energy_joules_per_inference": mean_energy,
        "energy_joules_all_cloud": baseline,
        "energy_ratio_all_cloud_over_edgecloud": round(baseline / mean_energy, 3) if mean_energy else None,
        "latency_ms": base["latency_ms"],
        "throughput_sps": base["throughput_sps"],
        "errors": base["errors"],
        "degraded_samples": base["degraded_samples"],
    }


def _print(s: dict[str, Any], scraped: list[str]) -> None:
    print()
    print(f"edgecloud demo — {s['model']} on the {s['backend']} backend, {s['samples']} samples")
    print(f"  accuracy                  {s['accuracy'] * 100:.2f} %")
    shares = ", ".join(f"{k} {v * 100:.1f} %" for k, v in s["exit_share"].items())
    print(f"  answered at               {shares}")
    print(f"  energy per inference      {s['energy_joules_per_inference'] * 1e6:.3f} µJ "
          f"(all-cloud: {s['energy_joules_all_cloud'] * 1e6:.3f} µJ, "
          f"{s['energy_ratio_all_cloud_over_edgecloud']}x)")
    lat = s["latency_ms"]
    print(f"  latency (ms)              p50 {lat['p50']:.2f}  p95 {lat['p95']:.2f}  p99 {lat['p99']:.2f}")
    print(f"  throughput                {s['throughput_sps']:.0f} samples/s")
    if s["errors"]:
        print(f"  errors                    {s['errors']}")
    if s["degraded_samples"]:
        print(f"  degraded samples          {s['degraded_samples']}")
    print(f"  metrics                   edge {s['metrics_urls']['edge']}  cloud {s['metrics_urls']['cloud']}")
    if scraped:
        print("  from the edge's /metrics:")
        for line in scraped[:12]:
            print(f"    {line}")
    print(f"  servers stopped           edge exit {s['server_exit_codes']['edge']}, "
          f"cloud exit {s['server_exit_codes']['cloud']}")
