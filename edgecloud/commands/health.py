"""``edgecloud health``: ask a running edge daemon or cloud server whether it is SERVING.

Exists for container health checks (docker/Dockerfile ``HEALTHCHECK``, the compose file's
``healthcheck``) so the image needs no extra probe binary: it calls ``grpc.health.v1.Health/Check``,
which every edgecloud server answers without a token, and exits 0 only on ``SERVING``. During a
graceful stop the servers report NOT_SERVING first, so a draining replica turns unhealthy at once.

The address comes from ``--address``, or from the same configuration the server was started
with (``--config`` file < ``EDGECLOUD_...`` environment), so the probe cannot drift from the
port the server really binds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

# A wildcard bind is reachable on loopback from inside the same container.
_WILDCARDS = {"0.0.0.0", "::", "[::]", ""}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "health", help="gRPC health check of a running edge daemon or cloud server (exit 0 = SERVING)"
    )
    p.add_argument("--address", help="host:port to check (default: from --config/--role, else 127.0.0.1:8001)")
    p.add_argument("--config", help="the server's YAML config: its gRPC host and port are checked")
    p.add_argument("--role", choices=("edge", "cloud"),
                   help="which section of --config (default: the only one the file has)")
    p.add_argument("--service", default="",
                   help="service name to check ('' = the whole server, the default)")
    p.add_argument("--timeout", type=float, default=3.0, help="deadline of the check, seconds")
    p.add_argument("--tls", action="store_true", help="use TLS")
    p.add_argument("--ca", default=None, help="CA certificate (PEM) to verify the server")
    p.add_argument("--cert", default=None, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--key", default=None, help="client key (PEM) for mutual TLS")
    p.add_argument("--server-name", default=None, help="TLS server name override")
    p.add_argument("--quiet", action="store_true", help="print nothing, only set the exit code")
    p.set_defaults(func=run)


def resolve_address(address: str | None, config: str | None, role: str | None) -> str:
    """The address to probe: explicit, else the configured server's port on loopback."""
    if address:
        return address
    if config is None and role is None:
        return "127.0.0.1:8001"
    import yaml

    from edgecloud.config import load_settings

    if role is None:
        if config is None:
            raise ValueError("--role needs --config or --address")
        data = yaml.safe_load(Path(config).read_text()) or {}
        sections = [name for name in ("edge", "cloud") if name in data]
        if len(sections) != 1:
            raise ValueError(f"{config}: cannot tell edge from cloud ({sections or 'no section'}); pass --role")
        role = sections[0]
    server = getattr(load_settings(config), role).server
    if server.port == 0:
        raise ValueError(f"{role}.server.port is 0 (a free port picked at start): pass --address")
    host = "127.0.0.1" if server.host in _WILDCARDS else server.host
    return f"{host}:{server.port}"


def check(address: str, *, service: str = "", timeout: float = 3.0, tls: bool = False,
          ca: str | None = None, cert: str | None = None, key: str | None = None,
          server_name: str | None = None) -> str:
    """The server's health status name (``SERVING``, ``NOT_SERVING``, ...) for ``service``.

    Raises ``grpc.RpcError`` when the server cannot be reached or does not know the service.
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from edgecloud.serving.security import create_channel

    channel = create_channel(address, tls=tls, ca=ca, client_cert=cert, client_key=key,
                             server_name_override=server_name)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    finally:
        channel.close()


def run(args: argparse.Namespace) -> int:
    address = resolve_address(args.address, args.config, args.role)
    try:
        status = check(address, service=args.service, timeout=args.timeout, tls=args.tls or bool(args.ca),
                       ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)
    except grpc.RpcError as exc:
        if not args.quiet:
            print(f"edgecloud health: {address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{address} {status}", file=sys.stdout if status == "SERVING" else sys.stderr)
    return 0 if status == "SERVING" else 1
