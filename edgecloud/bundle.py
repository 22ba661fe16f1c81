"""A trained model on disk: ``<repo>/<name>/manifest.yaml`` + edge weights + cloud ONNX + card.

Edge and cloud both load bundles by name from a model repository folder (default: the bundles
installed with the package, ``edgecloud.models``), as Triton does.

Layout of a bundle folder::

    manifest.yaml   this schema (family, arch kwargs, input, classes, exits, cloud, training,
                    hardware: default options per backend, see bundle_backend_options)
    edge.pt         torch state_dict of the whole SplitModel (edge parts are what the edge uses)
    cloud.onnx      the cloud part, full precision, input tensor ``cloud.input_name``
    README.md       the model card

An *edge-only* bundle (a plain classifier such as ``lenet5`` or ``vgg_small``, written by
:func:`edgecloud.export_edge.export_edge_bundle`) has ``cloud: {offload: none}``, no
``cloud.onnx`` and one exit that always answers; :meth:`Bundle.build_model` wraps the
classifier in :class:`edgecloud.nets.edge_only.EdgeOnlyModel` so the edge runner, ``edgecloud
eval`` and the edge daemon run it like any other bundle (nothing is ever offloaded), and the
cloud server skips it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST = "manifest.yaml"
EDGE_WEIGHTS = "edge.pt"
CLOUD_ONNX = "cloud.onnx"


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "INPUT"
    shape: list[int]                    # one sample, e.g. [1, 28, 28]
    datatype: Literal["FP32"] = "FP32"  # pixels in [0, 1]; the daemon also accepts UINT8 0..255
    mean: list[float] = Field(default_factory=list)  # normalisation applied inside the model
    std: list[float] = Field(default_factory=list)
    # Input discretisation (a defence, Panda et al. 2019): the edge rounds every request's pixels
    # to 2^bits levels before the model; None = off. 8 is the identity on 8-bit images.
    bits: int | None = Field(None, ge=1, le=16)


class ExitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    threshold: float | None = None  # None: this exit always answers what reaches it


class CloudSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # "none": an edge-only bundle, no cloud part (input_shape [], macs 0, no cloud.onnx)
    offload: Literal["features", "raw", "none"] = "features"
    input_name: str = "FEATURES"
    input_shape: list[int] = Field(default_factory=list)  # one sample; required unless offload none
    output_name: str = "LOGITS"
    model_name: str = ""            # name the cloud serves it under; default: the bundle name
    macs: int = 0                   # MACs per sample of the cloud part (for energy accounting)
    # How the offloaded tensor travels (see edgecloud.offload): the radio is paid per bit, so a
    # compact encoding is what makes offloading features cheaper than sending the raw input.
    # uintK (K = 8, 4, 2): x ~= (q - zero_point) * scale; "+zstd": entropy coded per sample (a
    # BYTES payload each); cloud.onnx takes the base's levels (see edgecloud.offload).
    encoding: Literal["fp32", "fp16", "uint8", "uint4", "uint2",
                      "fp32+zstd", "fp16+zstd", "uint8+zstd", "uint4+zstd", "uint2+zstd"] = "fp32"
    scale: float = 1.0
    zero_point: int = 0

    @property
    def present(self) -> bool:
        """False for an edge-only bundle (``offload: none``)."""
        return self.offload != "none"

    @model_validator(mode="after")
    def _check_quantization(self) -> "CloudSpec":
        if self.offload == "none":
            if self.input_shape or self.macs:
                raise ValueError("cloud.offload 'none' (edge-only bundle) takes no input_shape and no macs")
        elif not self.input_shape:
            raise ValueError(f"cloud.input_shape is required for cloud.offload {self.offload!r}")
        if not (math.isfinite(self.scale) and self.scale > 0.0):
            raise ValueError(f"cloud.scale must be a finite number > 0, got {self.scale}")
        top = {"uint4": 15, "uint2": 3}.get(self.encoding.split("+")[0], 255)
        if not 0 <= self.zero_point <= top:
            raise ValueError(f"cloud.zero_point must lie in 0..{top} for cloud.encoding {self.encoding!r}, "
                             f"got {self.zero_point}")
        return self


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    version: str = "1"
    family: str                     # registry name, e.g. "cdhn"
    arch: dict[str, Any] = Field(default_factory=dict)  # kwargs for the family's constructor
    input: InputSpec
    classes: list[str]
    reference_macs: int = 0  # MACs per sample of the whole network in full precision, i.e. the
    #                          "send everything to the cloud" baseline the energy is compared to
    reference_network: str = ""  # whose MACs reference_macs are: "" = this network's; else a run's name
    policy: Literal["entropy", "max_prob"] = "entropy"
    exits: list[ExitSpec]
    cloud: CloudSpec
    training: dict[str, Any] = Field(default_factory=dict)  # command, seed, wall_time_s, data
    metrics: dict[str, Any] = Field(default_factory=dict)   # measured results (from eval)
    # Backend name -> this bundle's default options for that backend, e.g. the crossbar layout a
    # co-design search chose: {crossbar: {layers: {conv1: {rows: 64}}, adc_reduce: sparsity}}.
    # Applied under the user's options wherever a backend runs this bundle (bundle_backend_options).
    hardware: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @property
    def cloud_model_name(self) -> str:
        return self.cloud.model_name or self.name

    @property
    def edge_only(self) -> bool:
        """No cloud part: every sample is answered at the edge."""
        return not self.cloud.present

    @model_validator(mode="after")
    def _check_edge_only(self) -> "Manifest":
        if self.edge_only and (not self.exits or self.exits[-1].threshold is not None):
            raise ValueError("an edge-only bundle (cloud.offload 'none') needs a last exit with "
                             "threshold null: with no cloud, it must answer every sample")
        return self


# Per-layer keys that describe the arrays of one tiling: a bundle's explicit per-array ADC bits
# (a list per row tile of a list per column tile) no longer fit once the user changes the tiling.
_TILING_KEYS = ("rows", "cols")


def _plain(value: Any) -> Any:
    """A pydantic model (e.g. a ``LayerHardware``) as a plain dict of the fields it sets; else as is."""
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    return value


def bundle_backend_options(manifest: Any, backend: str, options: Mapping[str, Any] | None = None, *,
                           use_bundle: bool = True) -> dict[str, Any]:
    """The options a backend runs a bundle with: the bundle's ``hardware[backend]`` under ``options``.

    The user's ``options`` win key by key. ``layers`` (per-layer overrides) is merged per layer
    name, and within one layer field by field (the user's fields win); when the user gives a
    layer its own ``rows`` or ``cols`` but no ``adc_bits``, the bundle's per-array ``adc_bits``
    list for that layer (shaped by the bundle's tiling) is dropped, one number is kept. A
    backend-wide user option (``rows=256``) does not replace a bundle's per-layer value (the
    per-layer one is the more specific); override it with ``layers={NAME: {...}}``, or pass
    ``use_bundle=False`` (``edgecloud eval --no-bundle-hardware``) to ignore the bundle's defaults.
    ``manifest`` is a :class:`Manifest` (or anything with ``hardware``; None: no defaults).
    Returns a new dict; neither input is modified.
    """
    user = {k: _plain(v) for k, v in (options or {}).items()}
    defaults = getattr(manifest, "hardware", None) or {}
    base = defaults.get(backend) if use_bundle else None
    if not base:
        return copy.deepcopy(user)
    out = copy.deepcopy(dict(base))
    for key, value in user.items():
        if key == "layers" and isinstance(value, Mapping) and isinstance(out.get("layers"), Mapping):
            layers = dict(out["layers"])
            for name, own in value.items():
                own = _plain(own)
                theirs = layers.get(name)
                if isinstance(own, Mapping) and isinstance(theirs, Mapping):
                    merged = {**theirs, **own}
                    if ("adc_bits" not in own and isinstance(theirs.get("adc_bits"), list)
                            and any(k in own and own[k] != theirs.get(k) for k in _TILING_KEYS)):
                        del merged["adc_bits"]
                    layers[name] = merged
                else:
                    layers[name] = copy.deepcopy(own)
            out["layers"] = layers
        else:
            out[key] = copy.deepcopy(value)
    return out


def cloud_name_for(manifest: Manifest, overrides: Mapping[str, str], how_to_override: str) -> str:
    """The name a bundle's cloud part goes by: ``overrides`` (validated with the configuration),
    else the manifest's ``cloud.model_name`` or the bundle name. ValueError for a manifest name
    with '/': Triton and KServe could not serve it (model names are directory names and URL
    path segments), so an edge that also talks to them cannot rely on it."""
    name = overrides.get(manifest.name)
    if name is not None:
        return name
    name = manifest.cloud_model_name
    if "/" in name:
        raise ValueError(
            f"bundle {manifest.name!r}: its cloud model name {name!r} (manifest cloud.model_name) "
            f"contains '/', which Triton and KServe cannot serve; {how_to_override}"
        )
    return name


def default_repository() -> Path:
    """The folder of bundles installed with the package."""
    return Path(str(resources.files("edgecloud.models")))


class Bundle:
    """One bundle folder, loaded lazily (the cloud never needs torch weights, the edge never ONNX)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a model bundle: no {MANIFEST}")
        with manifest_path.open() as fh:
            data = yaml.safe_load(fh)
        try:
            self.manifest = Manifest.model_validate(data)
        except Exception as exc:  # pydantic.ValidationError: re-raise naming the file
            raise ValueError(f"invalid manifest {manifest_path}: {exc}") from exc

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def edge_weights(self) -> Path:
        return self.path / EDGE_WEIGHTS

    @property
    def cloud_onnx(self) -> Path:
        return self.path / CLOUD_ONNX

    def build_model(self):  # -> SplitModel; imported lazily so the cloud does not import torch nets
        import torch

        from edgecloud.nets import create_model

        model = create_model(self.manifest.family, **self.manifest.arch)
        state = torch.load(self.edge_weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        if self.manifest.edge_only:
            from edgecloud.nets.edge_only import EdgeOnlyModel

            model = EdgeOnlyModel(model, exit_name=self.manifest.exits[-1].name)
        model.eval()
        return model


class ModelRepository:
    """A folder of bundle folders, looked up by bundle name."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root else default_repository()
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} does not exist")

    def names(self, with_cloud: bool = False) -> list[str]:
        """Bundle names; ``with_cloud``: only bundles that have a cloud part (what a cloud serves)."""
        names = sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())
        if with_cloud:
            names = [n for n in names if not Bundle(self.root / n).manifest.edge_only]
        return names

    def get(self, name: str) -> Bundle:
        path = self.root / name
        if not (path / MANIFEST).is_file():
            raise KeyError(
                f"no bundle {name!r} in {self.root}; available: {', '.join(self.names()) or 'none'}"
            )
        return Bundle(path)
