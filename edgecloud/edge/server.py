"""Assembling the edge daemon: bundles -> runners -> servicer + admin + cloud link -> GrpcServer.

``build_edge_server(settings)`` returns a not-yet-started :class:`GrpcServer`;
``run_edge(settings, ready_file, config_path)`` starts it, re-reads exit thresholds from the
config file on SIGHUP, and serves until SIGTERM/SIGINT (then drains).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from edgecloud.bundle import ModelRepository, cloud_name_for
from edgecloud.cim.energy import EnergyMeter, EnergyTable
from edgecloud.config import ControlConfig, EdgeConfig, Settings, load_settings
from edgecloud.edge.admin import ADMIN_SERVICE_NAME, EdgeAdminServicer
from edgecloud.edge.cloud_client import CloudClient, CloudModel
from edgecloud.edge.dataplane import ControllerFactory, ControlSpec, control_spec
from edgecloud.edge.runner import EdgeRunner, policy_from_manifest
from edgecloud.edge.servicer import EdgeServicer
from edgecloud.serving.grpc_server import GrpcServer
from edgecloud.serving.metrics import Metrics
from edgecloud.protocol import admin_pb2_grpc

log = logging.getLogger(__name__)

# {model: {exit_index: threshold or None}}: thresholds pinned by --threshold flags, applied
# over the manifest and the config file (also after a SIGHUP reload).
ThresholdPins = Mapping[str, Mapping[int, float | None]]


def resolve_thresholds(
    runner_or_bundle: Any,
    configured: list[float | None] | None,
    pins: Mapping[int, float | None] | None,
) -> list[float | None]:
    """Manifest thresholds < config file/env list < pinned flags, validated."""
    bundle = getattr(runner_or_bundle, "bundle", runner_or_bundle)
    policy = policy_from_manifest(bundle, configured)
    values = list(policy.thresholds)
    for index, value in (pins or {}).items():
        if not 0 <= index < len(values):
            raise ValueError(
                f"--threshold {bundle.name}:{index}: the model has exits 0..{len(values) - 1}"
            )
        values[index] = value
    policy_from_manifest(bundle, values)  # validates the pinned values too
    return values


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOPT_SETTINGS = (
    (_M_TRIM_THRESHOLD, 1 << 30),   # never give the top of the heap back below 1 GiB free
    (_M_TOP_PAD, 256 << 20),        # grow the heap in large steps: fewer brk calls
    (_M_MMAP_THRESHOLD, 1 << 30),   # activations come from the heap, not fresh mmaps
)


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory in the process; False where that is not possible.

    Why: torch eager frees an MB-sized activation after every layer of every batch. By default
    glibc serves such blocks with mmap (and trims the heap top), so each batch page-faults the
    same memory in again; on our 2-core machines that made edge compute 1.7x slower at batch
    32-256 and bimodal between fresh processes. The memory is kept at its peak instead.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, ...)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in _MALLOPT_SETTINGS])


def apply_compute_settings(edge: EdgeConfig) -> None:
    """Process-wide compute settings of the edge daemon (torch threads, allocator).

    Also what ``benchmarks/serving.py`` applies to its in-process side, so that served and
    in-process compute run under the same settings and only the serving path differs.
    """
    if edge.torch_threads:
        import torch

        torch.set_num_threads(edge.torch_threads)
    if edge.keep_freed_memory and not keep_freed_memory():
        log.info("keep_freed_memory: glibc mallopt not available; allocator left as is")


def cloud_model_name(manifest: Any, overrides: Mapping[str, str]) -> str:
    """The model name the edge calls on the cloud for a bundle: ``edge.cloud.model_names``,
    else the manifest's (see :func:`edgecloud.bundle.cloud_name_for`)."""
    return cloud_name_for(manifest, overrides,
                          f"call it under another name with edge.cloud.model_names.{manifest.name} "
                          f"(--cloud-model-name {manifest.name}=NAME) and serve it under that name "
                          "(--serve-as on the cloud)")


def _check_names(kind: str, names: list[str], served: list[str]) -> None:
    unknown = sorted(set(names) - set(served))
    if unknown:
        raise ValueError(f"{kind} names unknown model(s) {unknown}; served: {', '.join(served)}")


def control_specs(
    edge: EdgeConfig,
    runners: Mapping[str, EdgeRunner],
    target_agreement: float | None = None,
) -> dict[str, ControlSpec]:
    """The controlled models: ``edge.control`` entries, plus (``--target-agreement A``) every
    served model with a gated exit and a cloud part, at agreement A (over a configured entry's
    agreement too: flags win). ValueError naming the key when a model cannot be controlled."""
    configs: dict[str, ControlConfig] = dict(edge.control)
    if target_agreement is not None:
        if not 0.0 < target_agreement <= 1.0:
            raise ValueError(f"--target-agreement must lie in (0, 1], got {target_agreement}")
        for name, runner in runners.items():
            base = configs.get(name)
            if base is None and (runner.manifest.edge_only
                                 or all(t is None for t in runner.thresholds())):
                continue  # nothing to control: no cloud part or no gated exit
            configs[name] = (base or ControlConfig()).model_copy(update={"agreement": target_agreement})
        if not configs:
            raise ValueError("--target-agreement: no served model has a gated exit and a cloud part")
    return {name: control_spec(config, runners[name], f"edge.control.{name}")
            for name, config in configs.items()}


def build_edge_server(
    settings: Settings,
    *,
    ready_file: str | Path | None = None,
    threshold_pins: ThresholdPins | None = None,
    out: TextIO | None = None,
    target_agreement: float | None = None,
    controller_factory: ControllerFactory | None = None,
    shadow_queue_size: int | None = None,
) -> GrpcServer:
    """The edge daemon as an unstarted :class:`GrpcServer` (``.servicer`` is the EdgeServicer).

    ``target_agreement``: ``--target-agreement`` (see :func:`control_specs`);
    ``controller_factory``/``shadow_queue_size``: the data plane's (tests)."""
    edge = settings.edge
    apply_compute_settings(edge)
    repository = ModelRepository(edge.repository)
    available = repository.names()
    names = list(edge.models) or available
    if not names:
        raise ValueError(f"model repository {repository.root} holds no bundles")
    _check_names("edge.models", names, available)
    _check_names("edge.thresholds", list(edge.thresholds), names)
    _check_names("--threshold", list(threshold_pins or {}), names)
    _check_names("edge.cloud.model_names (--cloud-model-name)", list(edge.cloud.model_names), names)
    _check_names("edge.control", list(edge.control), names)

    options = dict(edge.backend.options)
    table_path = options.pop("energy_table", None)
    meter = EnergyMeter(EnergyTable.load(table_path).with_adc_law(options.pop("adc_law", None)))
    metrics = Metrics("edge")
    runners: dict[str, EdgeRunner] = {}
    for name in names:
        bundle = repository.get(name)
        thresholds = resolve_thresholds(bundle, edge.thresholds.get(name),
                                        (threshold_pins or {}).get(name))
        policy = policy_from_manifest(bundle, thresholds)
        runners[name] = EdgeRunner(
            bundle, edge.backend.name, policy, meter,
            backend_options=options, seed=edge.backend.seed, input_bits=edge.input_bits,
        )

    cloud: CloudClient | None = None
    if edge.cloud.addresses:
        cloud_names = {name: cloud_model_name(runner.manifest, edge.cloud.model_names)
                       for name, runner in runners.items() if not runner.manifest.edge_only}
        cloud = CloudClient(edge.cloud, metrics, max_message_bytes=edge.server.max_message_bytes)
        for name, cloud_name in cloud_names.items():  # edge-only bundles forward nothing
            runner = runners[name]
            spec = runner.manifest.cloud
            cloud.add_model(CloudModel(
                name=runner.name, cloud_name=cloud_name,
                input_name=spec.input_name, output_name=spec.output_name,
                num_classes=runner.num_classes,
            ))
    control = control_specs(edge, runners, target_agreement)
    if control and cloud is None:
        raise ValueError(f"online exit control of {', '.join(sorted(control))} needs a cloud "
                         "(edge.cloud.address / --cloud): the cloud's answers are its signal")
    servicer = EdgeServicer(
        runners, metrics=metrics, batching=edge.batching, cloud=cloud,
        backend_name=edge.backend.name, control=control, controller_factory=controller_factory,
        shadow_queue_size=shadow_queue_size,
    )
    admin = EdgeAdminServicer(runners, on_change=servicer.publish_thresholds,
                              dataplane=servicer.dataplane)
    return GrpcServer(
        "edge", edge.server, servicer, metrics=metrics,
        extra_services=[(admin_pb2_grpc.add_EdgeAdminServicer_to_server, admin, ADMIN_SERVICE_NAME)],
        ready_file=ready_file, out=out,
    )


def reload_thresholds(
    server: GrpcServer,
    config_path: str | Path,
    overrides: dict[str, Any] | None = None,
    threshold_pins: ThresholdPins | None = None,
) -> None:
    """Re-read thresholds from the config file (SIGHUP). All models are validated before any
    changes, so a bad file leaves every threshold as it was."""
    settings = load_settings(config_path, overrides)
    servicer: EdgeServicer = server.servicer
    runners = {name: model.runner for name, model in servicer.models.items()}
    _check_names("edge.thresholds", list(settings.edge.thresholds), list(runners))
    fresh = {
        name: resolve_thresholds(runner, settings.edge.thresholds.get(name),
                                 (threshold_pins or {}).get(name))
        for name, runner in runners.items()
    }
    for name, values in fresh.items():
        controlled = servicer.dataplane.controlled_exit(name)
        if controlled is not None:  # the controller owns that threshold: keep its value
            values[controlled] = runners[name].thresholds()[controlled]
        runners[name].set_thresholds(values)
        servicer.publish_thresholds(runners[name])
    log.info("thresholds reloaded from %s: %s", config_path, fresh)


def run_edge(
    settings: Settings,
    ready_file: str | Path | None = None,
    config_path: str | Path | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    threshold_pins: ThresholdPins | None = None,
    target_agreement: float | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; SIGHUP re-reads thresholds from ``config_path`` (and is
    ignored, not fatal, without one; a controlled exit keeps the controller's threshold)."""
    server = build_edge_server(settings, ready_file=ready_file, threshold_pins=threshold_pins,
                               target_agreement=target_agreement)
    previous = None
    if threading.current_thread() is threading.main_thread():

        def on_hup(_signum: int, _frame: Any) -> None:
            if config_path is None:  # the default action would kill the daemon
                print("edgecloud edge: SIGHUP ignored: started without --config", flush=True)
                return

            def work() -> None:
                try:
                    reload_thresholds(server, config_path, overrides, threshold_pins)
                except Exception as exc:  # noqa: BLE001 - keep serving with the old thresholds
                    print(f"edgecloud edge: SIGHUP reload failed, thresholds unchanged: {exc}",
                          file=sys.stderr, flush=True)
                else:
                    print(f"edgecloud edge: thresholds reloaded from {config_path}", flush=True)

            threading.Thread(target=work, name="edge-sighup", daemon=True).start()

        previous = signal.signal(signal.SIGHUP, on_hup)  # before the ready file exists
    try:
        server.start()
        return server.serve_forever()
    finally:
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)
