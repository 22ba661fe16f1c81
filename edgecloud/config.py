"""One typed configuration for every server: YAML file < environment variables < flags.

Environment variables use the prefix ``EDGECLOUD_`` and ``__`` between levels, e.g.
``EDGECLOUD_EDGE__SERVER__PORT=9000`` or ``EDGECLOUD_CLOUD__BATCHING__MAX_BATCH_SIZE=64``.
Everything is validated at start-up; :func:`load_settings` raises :class:`ConfigError` with
every problem listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class ConfigError(ValueError):
    """Configuration that cannot be used; the message lists what is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Strict):
    """Server-side TLS. ``client_ca`` set + ``require_client_auth`` = mutual TLS."""

    enabled: bool = False
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    require_client_auth: bool = False

    @model_validator(mode="after")
    def _files(self) -> "TLSConfig":
        if self.enabled:
            for label, path in (("cert", self.cert), ("key", self.key)):
                if path is None:
                    raise ValueError(f"tls.enabled needs tls.{label}")
                if not Path(path).is_file():
                    raise ValueError(f"tls.{label}: file {path} does not exist")
            if self.require_client_auth and self.client_ca is None:
                raise ValueError("tls.require_client_auth needs tls.client_ca")
        return self


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port; 0 picks a free one")
    max_workers: int = Field(32, ge=1)
    token: str | None = Field(None, description="bearer token required on every RPC but health")
    tls: TLSConfig = TLSConfig()
    shutdown_grace_s: float = Field(10.0, ge=0)
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)


class BatchingConfig(_Strict):
    max_batch_size: int = Field(256, ge=1, description="largest batch run at once (samples)")
    max_queue_delay_ms: float = Field(
        0.0, ge=0,
        description="how long a batch may wait to fill; 0 = take whatever is queued when the worker "
        "is free (batches still form under load, and a lone request pays no delay)",
    )
    max_queue_size: int = Field(1024, ge=1, description="samples queued before RESOURCE_EXHAUSTED")
    max_request_batch: int = Field(256, ge=1, description="largest batch one request may carry")


class CloudLinkConfig(_Strict):
    """How the edge reaches the cloud."""

    address: str | None = Field(None, description="host:port of the cloud server; None = edge only")
    timeout_s: float = Field(1.0, gt=0, description="deadline of one edge->cloud call")
    max_attempts: int = Field(3, ge=1, le=5, description="attempts on UNAVAILABLE (gRPC retry policy)")
    initial_backoff_s: float = Field(0.02, gt=0)
    max_backoff_s: float = Field(0.2, gt=0)
    breaker_failures: int = Field(5, ge=1, description="consecutive failures that open the breaker")
    breaker_reset_s: float = Field(2.0, gt=0, description="open time before a half-open probe")
    token: str | None = None
    tls: bool = False
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name_override: str | None = None
    batching: BatchingConfig = BatchingConfig(max_batch_size=128)


class BackendConfig(_Strict):
    name: Literal["digital", "crossbar", "sram"] = "digital"
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)


class EdgeConfig(_Strict):
    server: ServerConfig = ServerConfig()
    repository: Path | None = Field(None, description="model repository; default: bundled models")
    models: list[str] = Field(default_factory=list, description="bundles to load; empty = all")
    batching: BatchingConfig = BatchingConfig()
    cloud: CloudLinkConfig = CloudLinkConfig()
    backend: BackendConfig = BackendConfig()
    input_bits: int | None = Field(
        None, ge=1, le=16,
        description="discretise every request's pixels to 2^bits levels before the edge model, for "
        "every loaded model (a defence against small adversarial perturbations, Panda et al. 2019; "
        "see the README section 'Adversarial robustness on CiM'); default: each bundle's input.bits",
    )
    thresholds: dict[str, list[float | None]] = Field(
        default_factory=dict, description="per-model exit thresholds overriding the manifest"
    )
    torch_threads: int = Field(
        1, ge=0,
        description="torch intra-op threads for edge compute; 0 = torch default. One batch runs at a "
        "time, so 1 leaves the other cores to gRPC and the cloud link; more than 1 on an "
        "oversubscribed machine makes OpenMP threads fight (measured 1.9 ms -> 268 ms per sample)",
    )
    keep_freed_memory: bool = Field(
        True,
        description="tell glibc malloc to keep freed memory in the process (no trimming, no mmap "
        "for large blocks): torch frees its activations after every batch and glibc would hand "
        "them back to the OS, so the next batch page-faults them in again (measured 1.7x slower "
        "edge compute at batch 32-256, and bimodal between processes); no effect off glibc",
    )


class CloudConfig(_Strict):
    server: ServerConfig = ServerConfig()
    repository: Path | None = None
    models: list[str] = Field(default_factory=list)
    batching: BatchingConfig = BatchingConfig()
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads; 0 = ORT default")
    allow_spinning: bool = Field(True, description="ORT intra-op spinning (off when sharing cores)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EDGECLOUD_", env_nested_delimiter="__", extra="forbid"
    )
    edge: EdgeConfig = EdgeConfig()
    cloud: CloudConfig = CloudConfig()

    _yaml_data: dict[str, Any] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: flags (init kwargs), then the environment, then the YAML file.
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    data: dict[str, Any] = {}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_YamlSource.data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_path(d, "edge.server.port", 9000)`` — how CLI flags become overrides."""
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Validated settings from a YAML file, the environment and flag overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    _YamlSource.data = data
    try:
        # Flags are merged over the environment by pydantic-settings only at the top level, so
        # nested flag overrides are merged here over env+YAML explicitly.
        base = Settings()
        if overrides:
            merged = _deep_merge(base.model_dump(mode="json"), overrides)
            return _validate(merged)
        return base
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc
    finally:
        _YamlSource.data = {}


def _validate(data: dict[str, Any]) -> Settings:
    _YamlSource.data = {}
    return Settings(**data)
