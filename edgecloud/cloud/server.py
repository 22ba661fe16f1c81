"""Assemble the cloud server: settings -> ORT sessions -> servicer -> :class:`GrpcServer`."""

from __future__ import annotations

from pathlib import Path

from edgecloud.cloud.servicer import CloudServicer
from edgecloud.cloud.sessions import load_cloud_models
from edgecloud.config import Settings
from edgecloud.serving.grpc_server import GrpcServer
from edgecloud.serving.metrics import Metrics


def build_cloud_server(settings: Settings, ready_file: str | Path | None = None) -> GrpcServer:
    """A configured, not yet started cloud server (models are loaded and warmed up here)."""
    cfg = settings.cloud
    models = load_cloud_models(cfg)
    metrics = Metrics("cloud")
    servicer = CloudServicer(models, cfg.batching, metrics)
    return GrpcServer("cloud", cfg.server, servicer, metrics=metrics, ready_file=ready_file)


def run_cloud(settings: Settings, ready_file: str | Path | None = None) -> int:
    """Serve until SIGTERM/SIGINT, drain, return the exit code (0)."""
    server = build_cloud_server(settings, ready_file)
    server.start()
    return server.serve_forever()
