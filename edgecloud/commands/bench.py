"""``edgecloud bench``: closed-loop load against an edge daemon or cloud server."""

from __future__ import annotations

import argparse
import json

import numpy as np
from tqdm import tqdm


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="closed-loop load: throughput, latency percentiles, exit mix")
    p.add_argument("--address", default="127.0.0.1:8001", help="server host:port")
    p.add_argument("--model", default="fmnist-hybrid", help="model name")
    p.add_argument("--data", default=None,
                   help=".npy array of inputs [N, C, H, W]; default: the bundled Fashion-MNIST sample "
                        "(or random inputs of the model's shape for other models)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--batch-size", type=int, default=1, help="samples per request")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--requests", type=int, default=None, help="stop after this many requests")
    bound.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per request, seconds")
    p.add_argument("--token", default=None, help="bearer token")
    p.add_argument("--ca", default=None, help="CA certificate (PEM); implies TLS")
    p.add_argument("--cert", default=None, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--key", default=None, help="client key (PEM) for mutual TLS")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _data(args: argparse.Namespace, shape: list[int]) -> np.ndarray:
    if args.data:
        from edgecloud.inputs import load_inputs

        return load_inputs([args.data], shape)[0]
    if shape == [1, 28, 28]:
        from edgecloud.data.samples import load_demo_sample

        return load_demo_sample()[0]
    return np.random.default_rng(0).random((256, *shape), dtype=np.float32)


def run(args: argparse.Namespace) -> int:
    from edgecloud.serving.client import InferenceClient
    from edgecloud.serving.loadgen import run_load

    if args.concurrency < 1 or args.batch_size < 1:
        raise ValueError("--concurrency and --batch-size must be >= 1")
    with InferenceClient(args.address, token=args.token, tls=bool(args.ca), ca=args.ca,
                         client_cert=args.cert, client_key=args.key) as client:
        client.wait_ready(10.0)
        meta = client.metadata(args.model)
        spec = meta.inputs[0]
        data = _data(args, [int(d) for d in spec.shape[1:]])
        requests = args.requests if args.requests or args.duration else max(1, 2000 // args.batch_size)
        bar = None if args.json else tqdm(
            total=None if args.duration else requests * args.batch_size, unit="sample", desc="bench"
        )
        result = run_load(client, args.model, spec.name, data, batch_size=args.batch_size,
                          concurrency=args.concurrency, requests=None if args.duration else requests,
                          duration_s=args.duration, timeout_s=args.timeout, progress=bar)
        if bar is not None:
            bar.close()
    summary = {"model": args.model, "address": args.address, "concurrency": args.concurrency,
               "batch_size": args.batch_size, **result.summary()}
    if args.json:
        print(json.dumps(summary))
    else:
        lat = summary["latency_ms"]
        print(f"requests {summary['ok_requests']}/{summary['requests']} ok, samples {summary['samples']}, "
              f"{summary['duration_s']:.2f} s")
        print(f"throughput {summary['throughput_rps']:.1f} req/s, {summary['throughput_sps']:.1f} samples/s")
        print(f"latency ms: p50 {lat['p50']:.2f}  p95 {lat['p95']:.2f}  p99 {lat['p99']:.2f}")
        print(f"exit share (by exit index): {summary['exit_share']}")
        if summary["errors"]:
            print(f"errors: {summary['errors']}")
        if summary["degraded_requests"]:
            print(f"degraded: {summary['degraded_requests']} requests, {summary['degraded_samples']} samples")
    return 1 if result.errors and not result.samples else 0
