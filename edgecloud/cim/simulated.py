"""Plumbing shared by the simulated in-memory backends (crossbar, sram).

A :class:`SimulatedBackend` validates its options (a pydantic model per backend, with named
presets), programs every supported quantized layer of a model once in :meth:`prepare` (the
simulated chip: same seed, same chip), replaces only the layer's integer MVM, runs the shared
array engine (:mod:`edgecloud.cim.engine`) and records per-sample events. A layer whose weights
change after programming (e.g. further training) is programmed again, with the same seed.
Layers that cannot run on arrays (full-precision inputs, more than 8 bits) stay digital.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
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
        # the compiled kernel (None: torch), chosen now so a forced path this machine lacks fails here
        self.kernel = kernel.resolve("torch" if not self.options.fused_kernel else self.options.kernel)
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
            if held is not None and held[0].shape == w_int.shape and torch.equal(held[0], w_int):
                return held[1]
            name = self._names.setdefault(key, f"layer{len(self._names)}")
            mapped = self.program(layer, w_int.detach(), name)
            self._chips[key] = (w_int.detach().clone(), mapped)
            return mapped

    def mvm(self, layer: QuantLayerMixin, x_int: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
        mapped = self.mapped(layer, w_int)
        source, geo = layer_source(layer, x_int)
        acc = run_mapped(mapped, source, self.noise, self.options.block_kib * 1024, self.kernel)
        for component, event, per_position in self.events(mapped, layer):
            record(component, event, per_position * geo.positions)
        return to_output(acc, geo)
