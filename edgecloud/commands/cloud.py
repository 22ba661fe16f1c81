"""``edgecloud cloud serve``: the full-precision cloud server (ONNX Runtime behind the OIP).

Flags override the config file and ``EDGECLOUD_CLOUD__...`` environment variables.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edgecloud.commands.edge import add_connection_age_flags, parse_name_map
from edgecloud.config import load_settings, set_path

# flag dest -> dotted settings path
_OVERRIDES = {
    "host": "cloud.server.host",
    "port": "cloud.server.port",
    "metrics_port": "cloud.server.metrics_port",
    "max_workers": "cloud.server.max_workers",
    "token": "cloud.server.token",
    "repository": "cloud.repository",
    "model": "cloud.models",
    "max_batch_size": "cloud.batching.max_batch_size",
    "max_queue_delay_ms": "cloud.batching.max_queue_delay_ms",
    "max_queue_size": "cloud.batching.max_queue_size",
    "max_request_batch": "cloud.batching.max_request_batch",
    "intra_op_threads": "cloud.intra_op_threads",
    "allow_spinning": "cloud.allow_spinning",
    "shutdown_grace_s": "cloud.server.shutdown_grace_s",
    "tls_client_ca": "cloud.server.tls.client_ca",
    "require_client_auth": "cloud.server.tls.require_client_auth",
    "max_connection_age_s": "cloud.server.max_connection_age_s",
    "max_connection_age_grace_s": "cloud.server.max_connection_age_grace_s",
}


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Only the flags the user gave, as a nested override tree."""
    tree: dict[str, Any] = {}
    for dest, path in _OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None and value is not False:
            set_path(tree, path, value)
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key must be given together")
        set_path(tree, "cloud.server.tls.enabled", True)
        set_path(tree, "cloud.server.tls.cert", args.tls_cert)
        set_path(tree, "cloud.server.tls.key", args.tls_key)
    if args.allow_spinning is False:
        set_path(tree, "cloud.allow_spinning", False)
    names = parse_name_map(getattr(args, "serve_as", None), "--serve-as")
    if names:
        set_path(tree, "cloud.model_names", names)
    return tree


def _serve(args: argparse.Namespace) -> int:
    from edgecloud.cloud.server import run_cloud  # imports onnxruntime only when serving

    settings = load_settings(args.config, overrides_from_args(args))
    try:
        return run_cloud(settings, args.ready_file)
    except FileNotFoundError:
        raise  # the CLI prints it as one line
    except OSError as exc:  # e.g. port in use
        print(f"edgecloud cloud: error: {exc}", file=sys.stderr)
        return 2


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cloud", help="run the cloud inference server")
    sub = parser.add_subparsers(dest="cloud_command", metavar="ACTION")
    serve = sub.add_parser("serve", help="serve bundles' cloud.onnx over the Open Inference Protocol")
    serve.add_argument("--config", help="YAML config file (the 'cloud:' section is used)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (0 = pick a free one)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (0 = pick a free one)")
    serve.add_argument("--max-workers", type=int, help="gRPC worker threads")
    serve.add_argument("--repository", help="model repository folder (default: bundled models)")
    serve.add_argument("--model", action="append", metavar="NAME",
                       help="bundle to serve (repeatable; default: all in the repository)")
    serve.add_argument("--max-batch-size", type=int, help="largest dynamic batch (samples)")
    serve.add_argument("--max-queue-delay-ms", type=float, help="longest wait for a batch to fill")
    serve.add_argument("--max-queue-size", type=int,
                       help="queued samples per model before RESOURCE_EXHAUSTED")
    serve.add_argument("--max-request-batch", type=int, help="largest batch one request may carry")
    serve.add_argument("--token", help="bearer token required on every RPC except health")
    serve.add_argument("--tls-cert", help="server certificate (PEM); enables TLS")
    serve.add_argument("--tls-key", help="server private key (PEM)")
    serve.add_argument("--tls-client-ca", help="CA (PEM) that signs client certificates")
    serve.add_argument("--require-client-auth", action="store_true", default=None,
                       help="mutual TLS: reject clients without a certificate from --tls-client-ca")
    serve.add_argument("--intra-op-threads", type=int, help="ONNX Runtime intra-op threads (0 = default)")
    serve.add_argument("--allow-spinning", action=argparse.BooleanOptionalAction, default=None,
                       help="ONNX Runtime intra-op spinning (turn off when sharing cores)")
    serve.add_argument("--serve-as", action="append", metavar="BUNDLE=NAME",
                       help="serve BUNDLE's cloud part under model name NAME (repeatable; default: "
                            "the manifest's cloud.model_name, else the bundle name; no '/')")
    serve.add_argument("--shutdown-grace-s", type=float, help="seconds to drain on SIGTERM")
    add_connection_age_flags(serve)
    serve.add_argument("--ready-file", help="write {grpc_port, metrics_port, pid} JSON here once serving")
    serve.set_defaults(func=_serve)
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])
