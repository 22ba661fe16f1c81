"""``edgecloud infer``: classify images or .npy arrays through an edge daemon (or a cloud server)."""

from __future__ import annotations

import argparse
import json
import sys

import grpc
import numpy as np

from edgecloud.bundle import ModelRepository


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="classify images or .npy files through a running edge daemon")
    p.add_argument("files", nargs="+", help="image files (png, jpg, ...) or .npy arrays")
    p.add_argument("--address", default="127.0.0.1:8001", help="edge daemon host:port")
    p.add_argument("--model", default="fmnist-hybrid", help="model name")
    p.add_argument("--repository", default=None, help="local model repository (for class names)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per request")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per request, seconds")
    p.add_argument("--token", default=None, help="bearer token")
    p.add_argument("--tls", action="store_true", help="use TLS")
    p.add_argument("--ca", default=None, help="CA certificate (PEM) to verify the server")
    p.add_argument("--cert", default=None, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--key", default=None, help="client key (PEM) for mutual TLS")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgecloud.serving.client import InferenceClient
    from edgecloud.inputs import load_inputs

    with InferenceClient(args.address, token=args.token, tls=args.tls or bool(args.ca),
                         ca=args.ca, client_cert=args.cert, client_key=args.key) as client:
        meta = client.metadata(args.model)
        if not meta.inputs:
            raise ValueError(f"model {args.model!r} declares no inputs")
        spec = meta.inputs[0]
        shape = [int(d) for d in spec.shape[1:]]
        batch, labels = load_inputs(args.files, shape)
        classes, exits = _names(args.model, args.repository)
        rows = []
        for start in range(0, len(batch), args.batch_size):
            chunk = batch[start:start + args.batch_size]
            try:
                result = client.infer(args.model, {spec.name: chunk}, timeout_s=args.timeout)
            except grpc.RpcError as exc:
                print(f"edgecloud infer: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            out = result.outputs
            probs = out.get("probabilities", out.get("LOGITS"))
            cls = out["class_index"] if "class_index" in out else np.argmax(probs, axis=1)
            for i in range(len(chunk)):
                exit_i = int(out["exit_index"][i]) if "exit_index" in out else -1
                rows.append({
                    "input": labels[start + i],
                    "class_index": int(cls[i]),
                    "class": classes[int(cls[i])] if classes else str(int(cls[i])),
                    "exit_index": exit_i,
                    "exit": exits[exit_i] if exits and 0 <= exit_i < len(exits) else str(exit_i),
                    "confidence": float(out["confidence"][i]) if "confidence" in out else float(np.max(probs[i])),
                    "energy_joules": float(out["energy_joules"][i]) if "energy_joules" in out else None,
                    "degraded": bool(result.parameters.get("degraded", False)),
                })
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'input':<28} {'class':<14} {'exit':<10} {'confidence':>10} {'energy µJ':>10}")
    for row in rows:
        energy = "-" if row["energy_joules"] is None else f"{row['energy_joules'] * 1e6:10.3f}"
        flag = "  (degraded)" if row["degraded"] else ""
        print(f"{row['input'][:28]:<28} {row['class'][:14]:<14} {row['exit'][:10]:<10} "
              f"{row['confidence']:>10.3f} {energy:>10}{flag}")
    return 0


def _names(model: str, repository: str | None) -> tuple[list[str], list[str]]:
    """Class and exit names from a local copy of the bundle, when there is one."""
    try:
        manifest = ModelRepository(repository).get(model).manifest
    except (KeyError, FileNotFoundError, ValueError):
        return [], []
    return list(manifest.classes), [e.name for e in manifest.exits] + ["cloud"]
