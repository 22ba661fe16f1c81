"""``edgecloud edge``: run the edge daemon, and read/change its exit thresholds at run time.

``serve`` flags override the config file and ``EDGECLOUD_EDGE__...`` environment variables;
``--threshold MODEL:EXIT=VALUE`` pins one exit's threshold over both (also across SIGHUP
reloads); ``--target-agreement A`` puts every served model with a gated exit under online exit
control at agreement A. ``set-threshold``, ``thresholds`` and ``budgets`` talk to a running
daemon's admin API.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

from edgecloud.config import check_model_name, load_settings, parse_cloud_addresses, set_path

# flag dest -> dotted settings path
_OVERRIDES = {
    "host": "edge.server.host",
    "port": "edge.server.port",
    "metrics_port": "edge.server.metrics_port",
    "max_workers": "edge.server.max_workers",
    "token": "edge.server.token",
    "shutdown_grace_s": "edge.server.shutdown_grace_s",
    "tls_client_ca": "edge.server.tls.client_ca",
    "require_client_auth": "edge.server.tls.require_client_auth",
    "repository": "edge.repository",
    "model": "edge.models",
    "cloud_health_check": "edge.cloud.health_check",
    "max_connection_age_s": "edge.server.max_connection_age_s",
    "max_connection_age_grace_s": "edge.server.max_connection_age_grace_s",
    "cloud_timeout": "edge.cloud.timeout_s",
    "cloud_token": "edge.cloud.token",
    "cloud_ca": "edge.cloud.ca",
    "cloud_cert": "edge.cloud.client_cert",
    "cloud_key": "edge.cloud.client_key",
    "cloud_server_name": "edge.cloud.server_name_override",
    "backend": "edge.backend.name",
    "seed": "edge.backend.seed",
    "max_batch_size": "edge.batching.max_batch_size",
    "max_queue_delay_ms": "edge.batching.max_queue_delay_ms",
    "max_queue_size": "edge.batching.max_queue_size",
    "max_request_batch": "edge.batching.max_request_batch",
    "torch_threads": "edge.torch_threads",
    "input_bits": "edge.input_bits",
}


def parse_backend_options(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values parsed as YAML scalars (``8`` -> int, ``true`` -> bool)."""
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--backend-option {item!r}: expected KEY=VALUE")
        options[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return options


def parse_name_map(items: list[str] | None, flag: str) -> dict[str, str]:
    """``BUNDLE=NAME`` pairs -> {bundle: name}; errors name ``flag`` (a name may not hold '/')."""
    names: dict[str, str] = {}
    for item in items or ():
        bundle, sep, name = item.partition("=")
        if not sep or not bundle.strip():
            raise ValueError(f"{flag} {item!r}: expected BUNDLE=NAME, e.g. fmnist-hybrid=fmnist")
        names[bundle.strip()] = check_model_name(name, f"{flag} {item!r}")
    return names


def cloud_address_override(values: list[str] | None) -> str | list[str] | None:
    """``--cloud`` given once stays a string (as in a config file); repeated, a list."""
    if not values:
        return None
    try:
        parse_cloud_addresses(values)
    except ValueError as exc:
        raise ValueError(f"--cloud: {exc}") from None
    return values[0] if len(values) == 1 else list(values)


def parse_threshold_pins(items: list[str] | None) -> dict[str, dict[int, float | None]]:
    """``MODEL:EXIT=VALUE`` (VALUE ``none`` removes the gate) -> {model: {exit: value}}."""
    pins: dict[str, dict[int, float | None]] = {}
    for item in items or ():
        target, sep, value = item.rpartition("=")
        model, colon, exit_text = target.rpartition(":")
        if not sep or not colon or not model:
            raise ValueError(f"--threshold {item!r}: expected MODEL:EXIT=VALUE, e.g. tiny:0=0.5")
        try:
            exit_index = int(exit_text)
        except ValueError as exc:
            raise ValueError(f"--threshold {item!r}: exit {exit_text!r} is not an integer") from exc
        if value.strip().lower() in ("none", "null", "off"):
            number: float | None = None
        else:
            try:
                number = float(value)
            except ValueError as exc:
                raise ValueError(f"--threshold {item!r}: value {value!r} is not a number") from exc
        pins.setdefault(model, {})[exit_index] = number
    return pins


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Only the flags the user gave, as a nested override tree."""
    tree: dict[str, Any] = {}
    for dest, path in _OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            set_path(tree, path, value)
    cloud = cloud_address_override(getattr(args, "cloud", None))
    if cloud is not None:
        set_path(tree, "edge.cloud.address", cloud)
    names = parse_name_map(getattr(args, "cloud_model_name", None), "--cloud-model-name")
    if names:
        set_path(tree, "edge.cloud.model_names", names)
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key must be given together")
        set_path(tree, "edge.server.tls.enabled", True)
        set_path(tree, "edge.server.tls.cert", args.tls_cert)
        set_path(tree, "edge.server.tls.key", args.tls_key)
    if (args.cloud_cert is None) != (args.cloud_key is None):
        raise ValueError("--cloud-cert and --cloud-key must be given together")
    if args.cloud_ca or args.cloud_cert:
        set_path(tree, "edge.cloud.tls", True)
    if args.backend_option:
        set_path(tree, "edge.backend.options", parse_backend_options(args.backend_option))
    return tree


def _serve(args: argparse.Namespace) -> int:
    from edgecloud.edge.server import run_edge  # imports torch only when serving

    overrides = overrides_from_args(args)
    pins = parse_threshold_pins(args.threshold)
    target = getattr(args, "target_agreement", None)
    if target is not None and not 0.0 < target <= 1.0:
        raise ValueError(f"--target-agreement must lie in (0, 1], got {target}")
    settings = load_settings(args.config, overrides)
    return run_edge(settings, args.ready_file, args.config, overrides=overrides, threshold_pins=pins,
                    target_agreement=target)


def _admin_stub(args: argparse.Namespace):
    from edgecloud.protocol import admin_pb2_grpc
    from edgecloud.serving.security import create_channel

    channel = create_channel(
        args.address, tls=bool(args.ca), ca=args.ca, client_cert=args.cert,
        client_key=args.key, token=args.token,
    )
    return channel, admin_pb2_grpc.EdgeAdminStub(channel)


def _print_thresholds(models: Any, as_json: bool) -> None:
    rows = [
        {
            "model": m.model, "policy": m.policy,
            "exits": [
                {"index": e.exit_index, "name": e.exit_name,
                 "threshold": e.threshold if e.HasField("threshold") else None}
                for e in m.exits
            ],
        }
        for m in models
    ]
    if as_json:
        print(json.dumps(rows))
        return
    for row in rows:
        gates = ", ".join(
            f"{e['index']}:{e['name']}={'none' if e['threshold'] is None else format(e['threshold'], 'g')}"
            for e in row["exits"]
        )
        print(f"{row['model']} ({row['policy']}): {gates}")


def _rpc(fn: Any, request: Any, address: str) -> Any:
    import grpc

    try:
        return fn(request, timeout=10.0)
    except grpc.RpcError as exc:
        raise ValueError(f"{address}: {exc.code().name}: {exc.details()}") from exc


def _set_threshold(args: argparse.Namespace) -> int:
    from edgecloud.protocol import admin_pb2

    if (args.value is None) == (not args.clear):
        raise ValueError("give exactly one of --value V or --clear")
    request = admin_pb2.SetThresholdRequest(model=args.model, exit_index=args.exit)
    if args.clear:
        request.clear = True
    else:
        request.value = args.value
    channel, stub = _admin_stub(args)
    with channel:
        response = _rpc(stub.SetThreshold, request, args.address)
    _print_thresholds([response.model], args.json)
    return 0


def _thresholds(args: argparse.Namespace) -> int:
    from edgecloud.protocol import admin_pb2

    channel, stub = _admin_stub(args)
    with channel:
        response = _rpc(stub.GetThresholds, admin_pb2.GetThresholdsRequest(model=args.model or ""),
                        args.address)
    _print_thresholds(response.models, args.json)
    return 0


_BUDGET_FLAGS = ("agreement", "delta", "energy_j", "uplink_bytes_s", "p99_latency_ms")


def _control_rows(states: Any) -> list[dict[str, Any]]:
    def opt(msg: Any, name: str) -> float | None:
        return getattr(msg, name) if msg.HasField(name) else None

    return [
        {
            "model": s.model, "exit_index": s.exit_index, "exit_name": s.exit_name,
            "policy": s.policy, "threshold": opt(s, "threshold"), "shadow_rate": s.shadow_rate,
            "window_samples": s.window_samples, "window_shadowed": s.window_shadowed,
            "agreement": s.agreement, "agreement_lower": s.agreement_lower,
            "exit_agreement": s.exit_agreement, "exit_agreement_lower": s.exit_agreement_lower,
            "exit_share": s.exit_share, "backoff": s.backoff, "steps": s.steps,
            "targets": {**{name: opt(s.targets, name) for name in _BUDGET_FLAGS},
                        "priority": list(s.targets.priority)},
            "budgets": [
                {"name": b.name, "target": b.target, "value": b.value, "bound": opt(b, "bound"),
                 "met": b.met, "reachable": b.reachable, "message": b.message}
                for b in s.budgets
            ],
        }
        for s in states
    ]


def _print_control(states: Any, as_json: bool) -> None:
    rows = _control_rows(states)
    if as_json:
        print(json.dumps(rows))
        return
    for row in rows:
        threshold = "none" if row["threshold"] is None else format(row["threshold"], "g")
        print(f"{row['model']} exit {row['exit_index']}:{row['exit_name']} ({row['policy']}) "
              f"threshold={threshold} shadow_rate={row['shadow_rate']:g} "
              f"agreement={row['agreement']:.4g} (lower {row['agreement_lower']:.4g}) "
              f"exit_share={row['exit_share']:.4g} steps={row['steps']}"
              f"{' BACKOFF' if row['backoff'] else ''}")
        for b in row["budgets"]:
            state = "met" if b["met"] else ("VIOLATED" if b["reachable"] else "UNREACHABLE")
            note = f" ({b['message']})" if b["message"] else ""
            print(f"  {b['name']}: target {b['target']:g} value {b['value']:.4g} {state}{note}")


def _budgets(args: argparse.Namespace) -> int:
    from edgecloud.protocol import admin_pb2

    given = {name: getattr(args, name) for name in _BUDGET_FLAGS if getattr(args, name) is not None}
    priority = [p.strip() for p in args.priority.split(",")] if args.priority else []
    channel, stub = _admin_stub(args)
    with channel:
        if given or priority or args.clear:
            if not args.model:
                raise ValueError("--model is required to change budgets")
            request = admin_pb2.SetBudgetsRequest(
                model=args.model, budgets=admin_pb2.Budgets(**given, priority=priority),
                clear=list(args.clear or []),
            )
            states = [_rpc(stub.SetBudgets, request, args.address).model]
        else:
            states = _rpc(stub.GetControl, admin_pb2.GetControlRequest(model=args.model or ""),
                          args.address).models
    _print_control(states, args.json)
    return 0


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", required=True, help="edge daemon host:port")
    p.add_argument("--token", help="bearer token of the edge daemon")
    p.add_argument("--ca", help="CA certificate (PEM); implies TLS")
    p.add_argument("--cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--key", help="client key (PEM) for mutual TLS")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_connection_age_flags(serve: argparse.ArgumentParser) -> None:
    """The maximum-connection-age flags both servers take."""
    serve.add_argument("--max-connection-age-s", type=float, metavar="S",
                       help="close each client connection after S seconds so clients re-resolve "
                            "and find new replicas (default 300; 0 = never)")
    serve.add_argument("--max-connection-age-grace-s", type=float, metavar="S",
                       help="time calls on a connection past its age get to finish (default 30)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("edge", help="run the edge daemon; change its exit thresholds")
    sub = parser.add_subparsers(dest="edge_command", metavar="ACTION")

    serve = sub.add_parser("serve", help="serve bundles' edge parts over the Open Inference Protocol")
    serve.add_argument("--config", help="YAML config file (the 'edge:' section is used); "
                                        "SIGHUP re-reads its thresholds")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (0 = pick a free one)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (0 = pick a free one)")
    serve.add_argument("--max-workers", type=int, help="gRPC worker threads")
    serve.add_argument("--repository", help="model repository folder (default: bundled models)")
    serve.add_argument("--model", action="append", metavar="NAME",
                       help="bundle to serve (repeatable; default: all in the repository)")
    serve.add_argument("--cloud", action="append", metavar="HOST:PORT",
                       help="cloud server; repeat it or give a comma list for replicas (offloads "
                            "spread round-robin, failover when one dies or drains), or one gRPC "
                            "target resolved to every replica, e.g. dns:///cloud.ns.svc:8001; "
                            "without it: edge only")
    serve.add_argument("--cloud-model-name", action="append", metavar="BUNDLE=NAME",
                       help="call BUNDLE's cloud part under NAME on the cloud (repeatable; default: "
                            "the manifest's cloud.model_name, else the bundle name; no '/')")
    serve.add_argument("--cloud-health-check", action=argparse.BooleanOptionalAction, default=None,
                       help="watch each cloud replica's gRPC health and skip it once NOT_SERVING "
                            "(default off; see edge.cloud.health_check)")
    serve.add_argument("--cloud-timeout", type=float, metavar="S", help="deadline of one cloud call")
    serve.add_argument("--backend", choices=["digital", "crossbar", "sram"], help="CiM backend")
    serve.add_argument("--backend-option", action="append", metavar="KEY=VALUE",
                       help="backend option (repeatable), e.g. adc_bits=6")
    serve.add_argument("--seed", type=int, help="backend seed (noise, variation)")
    serve.add_argument("--input-bits", type=int, metavar="B",
                       help="discretise request pixels to 2^B levels before the edge model (a defence "
                            "against small adversarial perturbations; default: each bundle's input.bits)")
    serve.add_argument("--threshold", action="append", metavar="MODEL:EXIT=VALUE",
                       help="pin an exit threshold (repeatable; VALUE none = no gate)")
    serve.add_argument("--target-agreement", type=float, metavar="A",
                       help="online exit control: hold agreement with the cloud >= A (in (0, 1], "
                            "with confidence 0.95) on every served model with a gated exit, by "
                            "moving its first gated exit's threshold (other budgets and settings: "
                            "the edge.control config section)")
    serve.add_argument("--token", help="bearer token required on every RPC except health")
    serve.add_argument("--tls-cert", help="server certificate (PEM); enables TLS")
    serve.add_argument("--tls-key", help="server private key (PEM)")
    serve.add_argument("--tls-client-ca", help="CA (PEM) that signs client certificates")
    serve.add_argument("--require-client-auth", action="store_true", default=None,
                       help="mutual TLS: reject clients without a certificate from --tls-client-ca")
    serve.add_argument("--cloud-token", help="bearer token the cloud server expects")
    serve.add_argument("--cloud-ca", help="CA (PEM) of the cloud server's certificate; enables TLS")
    serve.add_argument("--cloud-cert", help="edge client certificate (PEM) for mutual TLS")
    serve.add_argument("--cloud-key", help="edge client key (PEM) for mutual TLS")
    serve.add_argument("--cloud-server-name", help="expected name in the cloud's certificate")
    serve.add_argument("--max-batch-size", type=int, help="largest edge micro-batch (samples)")
    serve.add_argument("--max-queue-delay-ms", type=float, help="longest wait for a batch to fill")
    serve.add_argument("--max-queue-size", type=int,
                       help="queued samples per model before RESOURCE_EXHAUSTED")
    serve.add_argument("--max-request-batch", type=int, help="largest batch one request may carry")
    serve.add_argument("--torch-threads", type=int, help="torch intra-op threads (0 = default)")
    serve.add_argument("--shutdown-grace-s", type=float, help="seconds to drain on SIGTERM")
    add_connection_age_flags(serve)
    serve.add_argument("--ready-file", help="write {grpc_port, metrics_port, pid} JSON here once serving")
    serve.set_defaults(func=_serve)

    setp = sub.add_parser("set-threshold", help="change one exit threshold of a running daemon")
    _client_flags(setp)
    setp.add_argument("--model", required=True, help="model name")
    setp.add_argument("--exit", type=int, required=True, help="exit index (0 = first edge exit)")
    setp.add_argument("--value", type=float, help="new threshold")
    setp.add_argument("--clear", action="store_true", help="remove the gate of this exit")
    setp.set_defaults(func=_set_threshold)

    show = sub.add_parser("thresholds", help="show the exit thresholds of a running daemon")
    _client_flags(show)
    show.add_argument("--model", help="one model (default: all)")
    show.set_defaults(func=_thresholds)

    budgets = sub.add_parser(
        "budgets", help="show the online exit controllers' state and budgets of a running daemon, "
                        "or change a model's budgets (any budget flag given)")
    _client_flags(budgets)
    budgets.add_argument("--model", help="one model (default: every controlled model; required "
                                         "to change budgets)")
    budgets.add_argument("--agreement", type=float, metavar="A", help="agreement budget, in (0, 1]")
    budgets.add_argument("--delta", type=float, metavar="D", help="risk of the agreement guarantee")
    budgets.add_argument("--energy-j", type=float, metavar="J", help="mean energy per inference")
    budgets.add_argument("--uplink-bytes-s", type=float, metavar="B", help="uplink bytes per second")
    budgets.add_argument("--p99-latency-ms", type=float, metavar="MS", help="p99 latency")
    budgets.add_argument("--priority", metavar="LIST",
                         help="comma list of agreement,energy,uplink,latency (first wins)")
    budgets.add_argument("--clear", action="append", metavar="BUDGET",
                         choices=["agreement", "energy", "uplink", "latency"],
                         help="remove a budget (repeatable)")
    budgets.set_defaults(func=_budgets)

    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])
