"""Exec probe: grpc.health.v1 Check over TLS, for servers whose only port speaks TLS.

Why: the kubelet's native gRPC probe dials in plaintext (no TLS before the ``mode`` field of
Kubernetes 1.37), so it cannot check a TLS-only edgecloud server. This runs inside the container
with the image's Python and grpcio. Exit 0 = SERVING; 1 = any other status or error.

    python grpc_health_probe.py --port 8001 --ca ca.crt --server-name NAME [--service S]
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(port: int, ca: str, server_name: str, service: str, timeout_s: float) -> int:
    """Status code of one Check call on 127.0.0.1:port (0 = SERVING)."""
    with open(ca, "rb") as fh:
        creds = grpc.ssl_channel_credentials(root_certificates=fh.read())
    options = [("grpc.ssl_target_name_override", server_name)]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            print(f"health check failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"not serving: {status}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True, help="CA (PEM) that signed the server certificate")
    p.add_argument("--server-name", required=True, help="a DNS name in the server certificate")
    p.add_argument("--service", default="", help="health service name ('' = the whole server)")
    p.add_argument("--timeout-s", type=float, default=2.0)
    a = p.parse_args(argv)
    return check(a.port, a.ca, a.server_name, a.service, a.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
