"""Per-layer activation signal-to-noise ratio of a model on a simulated compute-in-memory chip.

Tao et al. observe that adversarially trained networks lose more clean accuracy on crossbars than
vanilla ones because their activations have a lower signal-to-noise ratio there: the same
hardware noise is larger relative to the (smaller) activations. This module measures that SNR
for every quantized layer (the layers a backend runs on arrays), against the digital model:

    SNR_dB = 10 log10( sum a_ideal^2 / sum (a_hw - a_ideal)^2 )    over all samples and outputs

- *propagated*: digital and hardware models run end to end on the same images, so the noise of
  earlier layers is included: what the network experiences;
- *isolated*: the hardware layer is fed the digital layer's input, so only its own noise counts.

Each chip (seed) is programmed twice, as a propagated and an isolated twin: same seed, same
calibration pass, same sequence of noise draws (they depend only on shapes), so the twins differ
only in what the measured layers are fed (the first layer's two SNRs are equal). ADC ranges are
calibrated on the first clean batches before measuring, as :meth:`HardwareModel.calibrate` does.
No noise gives ``inf`` dB.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from edgecloud.cim.backend import Backend, create_backend
from edgecloud.nn.quant import QuantLayerMixin, QuantLinear, quant_layers


def snr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) of two energies; inf without noise (also for a silent layer)."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std over chips (std 0 for one chip; inf mean and nan std if any chip is inf)."""
    xs = np.asarray(values, dtype=np.float64)
    if not np.isfinite(xs).all():
        return float(xs.mean()), math.nan
    return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else 0.0


def _finite(x: float) -> float | None:
    """JSON has no inf/nan: null instead."""
    return x if math.isfinite(x) else None


@dataclass
class LayerSNR:
    """One quantized layer's SNR, one value per chip, in forward order."""

    name: str
    kind: str                 # "conv" or "linear"
    precision: str            # "w{weight_bits}a{act_bits}"
    macs: int                 # per sample
    on_chip: bool             # False: the backend leaves it digital (its isolated SNR is inf)
    propagated_db: list[float] = field(default_factory=list)
    isolated_db: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        prop, iso = mean_std(self.propagated_db), mean_std(self.isolated_db)
        return {"name": self.name, "kind": self.kind, "precision": self.precision, "macs": self.macs,
                "on_chip": self.on_chip,
                "snr_propagated_db_mean": _finite(prop[0]), "snr_propagated_db_std": _finite(prop[1]),
                "snr_isolated_db_mean": _finite(iso[0]), "snr_isolated_db_std": _finite(iso[1]),
                "snr_propagated_db": [_finite(v) for v in self.propagated_db],
                "snr_isolated_db": [_finite(v) for v in self.isolated_db]}


@dataclass
class SNRReport:
    backend: str
    options: dict[str, Any]
    seeds: list[int]
    samples: int
    layers: list[LayerSNR]
    accuracy_digital: float
    accuracy_hardware: list[float]  # per chip

    def to_json(self) -> dict[str, Any]:
        mean, std = mean_std(self.accuracy_hardware)
        return {"backend": self.backend, "options": self.options, "samples": self.samples,
                "chips": len(self.seeds), "seeds": self.seeds, "layers": [layer.to_json() for layer in self.layers],
                "accuracy": {"digital": self.accuracy_digital, "hardware_mean": mean, "hardware_std": std,
                             "hardware": self.accuracy_hardware}}


def noisy_backend(backend: str, options: dict[str, Any] | None, seed: int = 0) -> Backend:
    """The backend, refusing the digital reference (it has no noise to measure)."""
    be = create_backend(backend, options, seed=seed)
    if type(be) is Backend:
        raise ValueError(f"backend {backend!r} is the digital reference: no noise to measure; "
                         "use a simulated backend (crossbar or sram)")
    return be


def _chip(model: nn.Module, backend: str, options: dict[str, Any], seed: int) -> nn.Module:
    chip = copy.deepcopy(model).eval()
    chip.requires_grad_(False)
    noisy_backend(backend, options, seed).prepare(chip)
    return chip


def _logits(out: Any) -> torch.Tensor:
    """The final output of a multi-exit model (``[exit logits..., final]``) or a plain tensor."""
    return out[-1] if isinstance(out, (list, tuple)) else out


def analyze_snr(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, backend: str = "crossbar",
                options: dict[str, Any] | None = None, seeds: Sequence[int] = (0,), *, batch_size: int = 100,
                progress: bool = False) -> SNRReport:
    """SNR of every quantized layer of the digital ``model`` on ``backend`` chips ``seeds`` (see module
    docstring), over ``images`` (model inputs) with top-1 accuracy against ``labels``."""
    options = dict(options or {})
    if not seeds:
        raise ValueError("at least one chip (seed) is needed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need as many labels as images, and at least one: got {len(images)} / {len(labels)}")
    layers = dict(quant_layers(model))
    if not layers:
        raise ValueError("the model has no quantized layers: a backend runs nothing of it on arrays")
    if any(layer.mvm_fn is not None for layer in layers.values()):
        raise ValueError("the model is already prepared on a backend: pass the digital model")
    calib_batches = getattr(getattr(noisy_backend(backend, options), "options", None), "calib_batches", 1)
    batches = [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(images), batch_size)]

    was_training = model.training
    model.eval()
    result: dict[str, LayerSNR] = {}
    correct_digital, accuracy_hw = 0, []
    try:
        for seed in tqdm(list(seeds), desc="chips", unit="chip", disable=not progress):
            prop, iso = _chip(model, backend, options, seed), _chip(model, backend, options, seed)
            with torch.no_grad():
                for x, _ in batches[:calib_batches]:  # ADC ranges from clean batches, identically on both twins
                    prop(x)
                    iso(x)
            energy, correct_digital, correct_hw = _measure(model, prop, iso, batches, result)
            for name, (signal, noise_prop, noise_iso) in energy.items():
                result[name].propagated_db.append(snr_db(signal, noise_prop))
                result[name].isolated_db.append(snr_db(signal, noise_iso))
            accuracy_hw.append(correct_hw / len(images))
    finally:
        model.train(was_training)
    return SNRReport(backend, options, [int(s) for s in seeds], len(images), list(result.values()),
                     correct_digital / len(images), accuracy_hw)


def _measure(model: nn.Module, prop: nn.Module, iso: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
             result: dict[str, LayerSNR]) -> tuple[dict[str, list[float]], int, int]:
    """One chip: per layer [signal, propagated noise, isolated noise] energies (first-call order), and
    the digital and hardware top-1 hits. New layers are added to ``result``."""
    layers, prop_layers, iso_layers = dict(quant_layers(model)), dict(quant_layers(prop)), dict(quant_layers(iso))
    ideal: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # this batch's digital (input, output) per call
    calls: dict[str, int] = {}
    energy: dict[str, list[float]] = {}

    def keep(name: str) -> Any:
        def hook(module: QuantLayerMixin, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            ideal.setdefault(name, []).append((inputs[0], out))
            energy.setdefault(name, [0.0, 0.0, 0.0])[0] += float(out.double().square().sum())
            if name not in result:
                result[name] = LayerSNR(name, "linear" if isinstance(module, QuantLinear) else "conv",
                                        f"w{module.weight_bits}a{module.act_bits}",
                                        int(module.macs_per_sample(inputs[0])), prop_layers[name].mvm_fn is not None)
        return hook

    def compare(name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            k = calls[name] = calls.get(name, -1) + 1
            energy[name][1] += float((out.double() - ideal[name][k][1].double()).square().sum())
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    handles += [m.register_forward_hook(compare(n)) for n, m in prop_layers.items()]
    correct_digital = correct_hw = 0
    try:
        with torch.no_grad():
            for x, y in batches:
                ideal.clear()
                calls.clear()
                correct_digital += int((_logits(model(x)).argmax(1) == y).sum())
                correct_hw += int((_logits(prop(x)).argmax(1) == y).sum())
                for name, records in ideal.items():  # in first-call order: the twin's noise draws match prop's
                    for inp, a in records:
                        energy[name][2] += float((iso_layers[name](inp).double() - a.double()).square().sum())
    finally:
        for h in handles:
            h.remove()
    return energy, correct_digital, correct_hw
