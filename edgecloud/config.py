"""One typed configuration for every server: YAML file < environment variables < flags.

Environment variables use the prefix ``EDGECLOUD_`` and ``__`` between levels, e.g.
``EDGECLOUD_EDGE__SERVER__PORT=9000`` or ``EDGECLOUD_CLOUD__BATCHING__MAX_BATCH_SIZE=64``.
Everything is validated at start-up; :func:`load_settings` raises :class:`ConfigError` with
every problem listed.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
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


def check_model_name(name: str, key: str) -> str:
    """An OIP model name that every OIP server can serve, or ValueError naming ``key``.

    Why: Triton and KServe use model names as directory names and URL path segments, so a name
    with ``/`` cannot be served (or addressed over KServe REST) there, and an edge must be able
    to call any OIP cloud.
    """
    if not name or not name.strip():
        raise ValueError(f"{key}: the model name is empty")
    if name != name.strip():
        raise ValueError(f"{key}: model name {name!r} has leading or trailing spaces")
    if "/" in name:
        raise ValueError(
            f"{key}: model name {name!r} contains '/', which Triton and KServe cannot serve "
            "(model names are directory names and URL path segments); pick a name without '/'"
        )
    return name


def _check_model_names(names: dict[str, str], key: str) -> dict[str, str]:
    for bundle, name in names.items():
        check_model_name(name, f"{key}.{bundle}")
    return names


# gRPC name-resolver schemes: an address starting with one of these is a whole channel target
# (``dns:///cloud.ns.svc:8001``, ``ipv4:10.0.0.1:8001,10.0.0.2:8001``), not one host:port.
TARGET_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds")


def is_target(entry: str) -> bool:
    """True for a gRPC target with a resolver scheme (``dns:///h:p``), False for ``host:port``."""
    scheme, sep, rest = entry.partition(":")
    return bool(sep) and scheme in TARGET_SCHEMES and not rest.isdigit()


def split_host_port(entry: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port), or ValueError saying what is wrong."""
    host, sep, port = entry.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{entry!r} is not host:port (e.g. 10.0.0.2:8001) nor a gRPC target "
                         "such as dns:///cloud.example:8001")
    if ":" in host:  # an IPv6 literal must be bracketed so the port is unambiguous
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{entry!r} is not host:port") from None
        if not entry.startswith("["):
            raise ValueError(f"{entry!r}: write an IPv6 address in brackets, e.g. [::1]:8001")
    return host, int(port)


def parse_cloud_addresses(value: str | list[str] | None) -> list[str]:
    """The cloud address setting as a list of entries: each ``host:port``, or one gRPC target.

    Accepts ``"a:1"``, ``"a:1,b:2"``, ``["a:1", "b:2"]`` (items may be comma lists too) and a
    single target such as ``"dns:///cloud.ns.svc:8001"`` (resolved by gRPC to every replica)
    or ``"ipv4:10.0.0.1:8001,10.0.0.2:8001"``. Raises ValueError with the reason.
    """
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    entries: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"cloud addresses are strings, got {item!r}")
        text = item.strip()
        if is_target(text) and text.split(":", 1)[0] in ("ipv4", "ipv6"):
            entries.append(text)  # an address-list target holds commas itself (ipv4:a:1,b:2)
            continue
        parts = [part.strip() for part in text.split(",")]
        if any(not part for part in parts):
            raise ValueError(f"empty address in {item!r}")
        entries.extend(parts)
    if not entries:
        return []
    targets = [entry for entry in entries if is_target(entry)]
    if targets and len(entries) > 1:
        raise ValueError(
            f"{targets[0]!r} is a gRPC target that resolves to every replica itself; give it "
            "alone, or list host:port addresses instead"
        )
    if not targets:
        for entry in entries:
            split_host_port(entry)
        seen: set[str] = set()
        for entry in entries:
            if entry in seen:
                raise ValueError(f"cloud address {entry!r} is listed twice")
            seen.add(entry)
    return entries


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port; 0 picks a free one")
    max_workers: int = Field(32, ge=1)
    token: str | None = Field(None, description="bearer token required on every RPC but health")
    tls: TLSConfig = TLSConfig()
    shutdown_grace_s: float = Field(10.0, ge=0)
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_connection_age_s: float = Field(
        300.0, ge=0,
        description="close every client connection after this long (GOAWAY; gRPC adds +-10 % "
        "jitter) so clients re-resolve and spread over replicas added since; 0 = never",
    )
    max_connection_age_grace_s: float = Field(
        30.0, ge=0,
        description="after max_connection_age_s, calls still running on the old connection get "
        "this long to finish before it is closed (longer than any call's deadline)",
    )


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
    """How the edge reaches the cloud: one server or a replicated tier behind one channel."""

    address: str | list[str] | None = Field(
        None,
        description="cloud server(s): 'host:port', a comma list 'a:8001,b:8001' or a YAML list "
        "(replicas; offloads are spread round-robin), or one gRPC target resolved to every "
        "replica such as 'dns:///cloud.ns.svc.cluster.local:8001'; None = edge only",
    )
    health_check: bool = Field(
        False,
        description="client-side gRPC health checking (grpc.health.v1 Watch): a replica whose "
        "status turns NOT_SERVING gets no new offloads at once, not only when it stops accepting. "
        "Off by default: each checked connection holds a Watch stream on the replica, and "
        "grpcio's health servicer can stall a draining edgecloud server on them (see "
        "docs/deploying-replicas.md); a draining replica is left anyway when it closes its "
        "connections",
    )
    model_names: dict[str, str] = Field(
        default_factory=dict,
        description="bundle name -> model name to call on the cloud (default: the manifest's "
        "cloud.model_name, else the bundle name); no '/' (Triton/KServe cannot serve it)",
    )
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

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | list[str] | None) -> str | list[str] | None:
        parse_cloud_addresses(value)
        return value

    @field_validator("model_names")
    @classmethod
    def _model_names(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_model_names(value, "model_names")

    @model_validator(mode="after")
    def _tls_names(self) -> "CloudLinkConfig":
        entries = self.addresses
        tls = self.tls or self.ca is not None or self.client_cert is not None
        if tls and len(entries) > 1 and not self.server_name_override:
            hosts = {split_host_port(entry)[0] for entry in entries}
            if len(hosts) > 1:
                raise ValueError(
                    "TLS over several cloud hosts needs server_name_override (--cloud-server-name): "
                    "the one name every replica's certificate carries"
                )
        return self

    @property
    def addresses(self) -> list[str]:
        """The configured cloud entries (host:port each, or one gRPC target)."""
        return parse_cloud_addresses(self.address)


class BackendConfig(_Strict):
    name: Literal["digital", "crossbar", "sram"] = "digital"
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)


CONTROL_BUDGET_NAMES = ("agreement", "energy", "uplink", "latency")


class ControlConfig(_Strict):
    """Online exit control of one served model (``edge.control.<model>``): the budgets it holds
    (see :class:`edgecloud.control.budgets.Budgets`) and how the controller estimates and moves
    (see :class:`edgecloud.control.controller.ControlSettings`). ``None`` = budget not set."""

    agreement: float | None = Field(None, gt=0, le=1, description="share of answers equal to "
                                    "the cloud's, held with confidence 1 - delta (1 - epsilon)")
    delta: float = Field(0.05, gt=0, lt=1, description="risk of the agreement guarantee")
    energy_j: float | None = Field(None, gt=0, description="mean energy per inference (edge "
                                   "compute + radio, shadow traffic included), joules")
    uplink_bytes_s: float | None = Field(None, gt=0, description="bytes/s sent to the cloud, "
                                         "shadow traffic included")
    p99_latency_ms: float | None = Field(None, gt=0, description="99th percentile request latency")
    priority: list[str] = Field(default_factory=lambda: list(CONTROL_BUDGET_NAMES),
                                description="which budget wins when not all can be met (first wins)")
    exit_index: int | None = Field(None, ge=0, description="the exit whose threshold moves; "
                                   "default: the first exit with a threshold")
    window: int = Field(4000, ge=1, description="samples the estimates look back over")
    min_samples: int = Field(200, ge=0, description="no move before the window holds this many")
    interval_s: float = Field(1.0, gt=0, description="step the controller this often")
    step_samples: int = Field(0, ge=0, description="also step after this many observed samples "
                              "(0: timer only)")
    shadow_min: float = Field(0.01, gt=0, le=1, description="lowest shadow rate")
    shadow_max: float = Field(0.25, gt=0, le=1, description="highest shadow rate")
    shadow_target: int = Field(200, ge=0, description="shadowed samples wanted per window")
    bound: Literal["clopper-pearson", "anytime"] = "clopper-pearson"
    act_on: Literal["bound", "estimate"] = "bound"
    max_step: float | None = Field(None, gt=0, description="largest threshold move per step")
    backoff_s: float = Field(10.0, ge=0, description="how long a cloud saturation caps offloads")
    backoff_factor: float = Field(0.5, ge=0, le=1, description="the cap: this share of the "
                                  "offload share before the saturation report")
    seed: int = Field(0, description="seed of the shadow draws")
    curve_memory: int = Field(0, ge=0, description="samples over which the exits' disagreement "
                              "rate is bounded (model-based, > window; 0: off)")
    estimator: Literal["shadows", "profile"] = Field(
        "shadows", description="D(t) from the window's labels, or from an offline disagreement "
        "profile rescaled online (edgecloud.control.profile)")
    profile: str | None = Field(None, description="the profile JSON (estimator: profile), from "
                                "`edgecloud control profile`")
    meet_window: int = Field(0, ge=0, description="> 0: keep a sampling margin so that windows "
                             "of this many samples meet the target (0: none)")
    profile_band: int = Field(0, ge=0, description="> 0: rescale the profile from shadows and "
                              "the this-many most confident offloaded samples (0: all labelled)")
    profile_bound: Literal["poisson", "exact", "predictive"] = Field(
        "poisson", description="the profile's scale bound: Garwood's Poisson bound, or the exact "
        "Poisson-binomial bound from the labelled samples' own probabilities; 'predictive': the "
        "(1 - delta) quantile of a meet_window-sample window's share, r's uncertainty and the "
        "sampling scatter in one distribution")
    shift_alpha: float = Field(0.0, ge=0.0, lt=1.0, description="> 0: while the window's scores "
                               "pass a chi-square test against the profile's validation scores at "
                               "this level, the profile's scale also pools its validation labels (0: off)")
    shift_factor: float = Field(1.0, ge=1.0, description="while that test rejects, the exits' rates "
                                "are this many times r x profile (a shift may raise the confident "
                                "part of the curve more than the band r is measured on; from "
                                "`edgecloud control shift-family`; 1: off)")
    shifted_bound: Literal["", "poisson", "predictive"] = Field(
        "", description="the profile's scale bound while that test rejects ('': profile_bound); "
        "e.g. 'predictive' for stable scores, 'poisson' (stacked with the margin) once they moved")

    @field_validator("priority")
    @classmethod
    def _priority(cls, value: list[str]) -> list[str]:
        unknown = [p for p in value if p not in CONTROL_BUDGET_NAMES]
        if unknown:
            raise ValueError(f"unknown budget(s) {unknown}; budgets: {', '.join(CONTROL_BUDGET_NAMES)}")
        if len(set(value)) != len(value):
            raise ValueError(f"a budget is named twice in {value}")
        return value

    @model_validator(mode="after")
    def _shadow_bounds(self) -> "ControlConfig":
        if self.shadow_min > self.shadow_max:
            raise ValueError(f"shadow_min ({self.shadow_min}) must not exceed shadow_max "
                             f"({self.shadow_max})")
        return self


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
    control: dict[str, ControlConfig] = Field(
        default_factory=dict,
        description="model name -> online exit control (budgets and controller settings); a "
        "controlled model's exit threshold is moved at run time (see edgecloud/edge/dataplane.py)",
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
    model_names: dict[str, str] = Field(
        default_factory=dict,
        description="bundle name -> name to serve its cloud part under (default: the manifest's "
        "cloud.model_name, else the bundle name); no '/' (Triton/KServe cannot serve it)",
    )

    @field_validator("model_names")
    @classmethod
    def _model_names(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_model_names(value, "model_names")


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
