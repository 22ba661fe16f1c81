"""Backends: where the quantized layers' integer products run.

``create_backend(name, options, seed)`` returns a :class:`Backend`; ``backend.prepare(model)``
attaches it to every quantized layer of a model (in place) and makes full-precision conv and
linear layers record their MACs, so one model runs on ``digital``, ``crossbar`` or ``sram`` by
a configuration switch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgecloud.cim.events import record
from edgecloud.nn.quant import QuantLayerMixin, quant_layers

_BACKENDS: dict[str, Callable[..., "Backend"]] = {}


def register_backend(name: str) -> Callable[[type["Backend"]], type["Backend"]]:
    def wrap(cls: type["Backend"]) -> type["Backend"]:
        _BACKENDS[name] = cls
        return cls

    return wrap


def _fp_macs_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    if isinstance(module, QuantLayerMixin):
        return
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_out = (module.in_channels // module.groups) * kh * kw
        macs = output.shape[1] * output.shape[2] * output.shape[3] * per_out
    elif isinstance(module, nn.Linear):
        macs = module.in_features * module.out_features
    else:
        return
    record("digital", "mac_fp32", macs)


class Backend:
    """Digital reference: exact integer products on the CPU, MACs counted by precision."""

    name = "digital"

    def __init__(self, seed: int = 0, **options: Any) -> None:
        if options:
            raise ValueError(f"backend {self.name!r} takes no options, got {sorted(options)}")
        self.seed = seed

    def mvm(self, layer: QuantLayerMixin, x_int: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> nn.Module:
        """Attach to a model in place (returns it). Programs the simulated chip once."""
        for _name, layer in quant_layers(model):
            layer.mvm_fn = None if type(self) is Backend else self.mvm
        if not getattr(model, "_edgecloud_fp_hooks", False):
            for module in model.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)) and not isinstance(module, QuantLayerMixin):
                    module.register_forward_hook(_fp_macs_hook)
            model._edgecloud_fp_hooks = True  # type: ignore[attr-defined]
        return model


register_backend("digital")(Backend)


def available_backends() -> list[str]:
    _load()
    return sorted(_BACKENDS)


def _load() -> None:
    import importlib

    for module in ("crossbar", "sram"):
        try:
            importlib.import_module(f"edgecloud.cim.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"edgecloud.cim.{module}":
                raise


def create_backend(name: str = "digital", options: dict[str, Any] | None = None, seed: int = 0) -> Backend:
    _load()
    try:
        cls = _BACKENDS[name]
    except KeyError as exc:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(sorted(_BACKENDS))}") from exc
    return cls(seed=seed, **(options or {}))
