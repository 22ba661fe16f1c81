"""Plumbing shared by the simulated in-memory backends (crossbar, sram).

A :class:`SimulatedBackend` validates its options (a pydantic model per backend, with named
presets), programs every supported quantized layer of a model once in :meth:`prepare` (the
simulated chip: same seed, same chip), replaces only the layer's integer MVM, runs the shared
array engine (:mod:`edgecloud.cim.engine`) and records per-sample events. A layer whose weights
change after programming (e.g. further training) is programmed again, with the same seed.
Layers that cannot run on arrays (full-precision inputs, more than 8 bits) stay digital.

``device`` ("cpu", "cuda", "cuda:N") is where the array pass runs: the chip is programmed on the
CPU (same seed, same chip) and moved there once; inputs are moved to it and results come back on
the input's device, so a CPU model can run its arrays on a GPU.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from edgecloud.cim import kernel
from edgecloud.cim.backend import Backend
from edgecloud.cim.engine import MappedLayer, run_mapped
from edgecloud.cim.events import record
from edgecloud.cim.noise import ReadNoise
from edgecloud.cim.tiling import check_supported, layer_source, to_output
from edgecloud.nn.quant import QuantLayerMixin, quant_layers

log = logging.getLogger(__name__)


class ArrayOptions(BaseModel):
    """Options common to the simulated backends (see each backend's module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"ideal": {}}

    preset: str = "ideal"
    adc_bits: int | None = Field(None, ge=1, le=16)
    adc_range: str = Field("max", pattern="^(max|calibrated)$")
    adc_percentile: float = Field(99.9, gt=50.0, le=100.0)
    calib_batches: int = Field(1, ge=1)
    adc_noise_lsb: float = Field(0.0, ge=0.0)
    fresh_noise: bool = False
    block_kib: int = Field(8192, ge=16)
    fused_kernel: bool = True
    kernel: Literal["auto", "vnni", "avx2", "portable", "torch"] | None = None
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        """Fail at construction, naming the option, when the device cannot be used here."""
        name = value.strip().lower()
        found = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
        if found is None:
            raise ValueError(f"device={value!r}: choose 'cpu', 'cuda' or 'cuda:N'")
        if name != "cpu":
            if not torch.cuda.is_available():
                raise ValueError(f"device={value!r} needs CUDA, but torch.cuda.is_available() is False here "
                                 f"(no GPU or driver, or a CPU-only torch {torch.__version__}); use device='cpu'")
            count = torch.cuda.device_count()
            if found.group(1) is not None and int(found.group(1)) >= count:
                raise ValueError(f"device={value!r}: this machine has {count} CUDA device(s) "
                                 f"(cuda:0..cuda:{count - 1})")
        return name

    @model_validator(mode="after")
    def _check_device_kernel(self) -> "ArrayOptions":
        if self.device != "cpu" and self.kernel not in (None, "auto", "torch"):
            raise ValueError(f"kernel={self.kernel!r} is a CPU kernel; with device={self.device!r} the torch path "
                             "runs on the device (leave kernel unset, or use 'auto' or 'torch')")
        return self

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "ideal")
        if preset not in cls.PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(cls.PRESETS)}")
        return {**cls.PRESETS[preset], **data}


class SimulatedBackend(Backend):
    """Base class: subclasses set ``name``/``Options`` and implement :meth:`program` / :meth:`events`."""

    Options: ClassVar[type[ArrayOptions]] = ArrayOptions

    def __init__(self, seed: int = 0, **options: Any) -> None:
        try:
            self.options = self.Options(**options)
        except ValidationError as exc:
            raise ValueError(f"invalid {self.name} backend options: {exc}") from exc
        self.seed = int(seed)
        self.device = torch_device(self.options.device)
        # the compiled kernel (None: torch), chosen now so a forced path this machine lacks fails here;
        # on a CUDA device the torch path runs there (EDGECLOUD_CIM_KERNEL does not apply)
        self.kernel = None if self.device.type != "cpu" else \
            kernel.resolve("torch" if not self.options.fused_kernel else self.options.kernel)
        self.noise = ReadNoise(self.seed, fresh=self.options.fresh_noise)
        self._names: dict[int, str] = {}
        self._chips: dict[int, tuple[torch.Tensor, MappedLayer]] = {}
        self._lock = threading.Lock()

    # ---- subclass hooks ---------------------------------------------------------------------
    def unsupported(self, layer: QuantLayerMixin) -> str | None:
        return check_supported(layer)

    def program(self, layer: QuantLayerMixin, w_int: torch.Tensor, name: str) -> MappedLayer:
        raise NotImplementedError

    def events(self, mapped: MappedLayer, layer: QuantLayerMixin) -> list[tuple[str, str, float]]:
        """(component, event, count per output position) of one layer call."""
        raise NotImplementedError

    # ---- Backend API ------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        super().prepare(model)
        for name, layer in quant_layers(model):
            reason = self.unsupported(layer)
            if reason is not None:
                layer.mvm_fn = None
                log.warning("%s backend: layer %s stays digital (%s)", self.name, name, reason)
                continue
            self._names[id(layer)] = name
            with torch.no_grad():
                w_int, _ = layer.quantize_weight()
            self.mapped(layer, w_int)
        return model

    def mapped(self, layer: QuantLayerMixin, w_int: torch.Tensor) -> MappedLayer:
        """The layer's programmed arrays, programming them on first use or after a weight change."""
        key = id(layer)
        with self._lock:
            held = self._chips.get(key)
            if held is not None and held[0].shape == w_int.shape and torch.equal(held[0], w_int.to(held[0].device)):
                return held[1]
            name = self._names.setdefault(key, f"layer{len(self._names)}")
            # programmed on the CPU with the CPU generators (the same chip on every device), then moved
            mapped = self.program(layer, w_int.detach().cpu(), name).to(self.device)
            self._chips[key] = (w_int.detach().clone(), mapped)
            return mapped

    def mvm(self, layer: QuantLayerMixin, x_int: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
        mapped = self.mapped(layer, w_int)
        source, geo = layer_source(layer, x_int)  # uint8 on the input's device; run_mapped moves it as uint8
        acc = run_mapped(mapped, source, self.noise, self.options.block_kib * 1024, self.kernel)
        mapped.positions = int(geo.positions)
        for component, event, per_position in self.events(mapped, layer):
            record(component, event, per_position * geo.positions)
        return to_output(acc, geo).to(x_int.device)


def torch_device(name: str) -> torch.device:
    """The torch device of a validated ``device`` option, with an explicit CUDA index (so that
    device comparisons with tensors' devices hold)."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
