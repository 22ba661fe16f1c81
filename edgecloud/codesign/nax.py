"""NAX: per-layer kernel size and crossbar size chosen together, scored on the non-ideal crossbar.

Negi, Chakraborty, Ankit, Roy, "NAX: Neural Architecture and Memristive Xbar based Accelerator
Co-design", DAC 2022 (arXiv 2106.12125). No public code. Published: CIFAR-10 +0.8 points of
accuracy and -17 % EDAP against ResNet-20; Tiny ImageNet +0.2 points and -4 % EDAP vs ResNet-18.

The trade-off it exploits: a larger crossbar is cheaper per MAC (fewer arrays, fewer partial sums
to convert and add, fewer peripherals per cell) but less accurate (IR drop along its wires grows
about as N^2, and an ADC of fixed resolution sums more rows); a larger kernel adds accuracy and
rows. So each layer gets its own (kernel, crossbar) pair.

Search space (:class:`SearchSpace`): every block conv of a CIFAR ResNet (conv1 and conv2 of each
basic block; 18 in ResNet-20) picks a kernel from ``kernels`` (default 1, 3, 5), and every
quantized layer that the crossbar maps (the stem, the block convs, the 1x1 projection shortcuts,
the classifier: 22 in ResNet-20) a square crossbar from ``xbars`` (rows = cols; default 32, 64,
128, 256). The stem (3x3) and the shortcuts (1x1) keep their kernels.

Objectives (as the paper; both from the simulator and cost model this project ships):

- accuracy: the mean top-1 over ``chips`` simulated chips (seeds ``seed .. seed + chips - 1``, the
  same chips for every candidate: common random numbers, so two candidates differ by their
  choices and not by their draws) of the candidate network on the crossbar backend (default preset
  ``typical``: programming variation, stuck cells, read noise, 1-ohm wires whose IR drop grows
  ~N^2, 8-bit calibrated ADCs) with the candidate's per-layer ``layers: {name: {rows, cols}}``,
  on a class-balanced subset of the VALIDATION split held out of the supernet's training (never
  the test split). Each chip's ADC ranges are calibrated first on training images.
- EDAP (energy x delay x area) of the candidate's layout from :mod:`edgecloud.cim.cost`:
  ``LayerLayout.plan`` for every mapped layer (rows K = C k^2 of the candidate's kernel, O
  outputs, positions oh*ow, the backend's cell bits, DAC bits and ADC bits), then
  ``CostModel().cost(layouts)``. Maximise accuracy, minimise EDAP.

Method. A weight-sharing one-shot supernet (:mod:`edgecloud.nets.resnet_elastic`: elastic
kernels, trained with the sandwich rule, recipe ``supernet``) plus a multi-objective sampler
(Optuna's NSGA-II, seeded; its first trials are the uniform 3x3 networks at every crossbar size,
so crossover starts from the known design and not only from random ones), rather than DARTS-style
differentiable architecture weights. Why:
the crossbar simulator is not differentiable in the crossbar size (a discrete tiling: which rows
share an array, an ADC and a wire), and NAX's accuracy term must come from the actual non-ideal
simulator, not from a relaxation; a sampler scores each candidate exactly as it would run. Each
candidate is the supernet's sub-network (:meth:`ElasticQuantResNet.extract`) with its BatchNorm
statistics recalibrated on training images (the BN layers are shared by all kernel sizes; Once-
for-All does the same), so it is scored as a plain ``resnet_q``. A candidate's chips are cached
(``cache.jsonl`` in the output folder, keyed by the supernet's weights, the data and every
setting): a repeated candidate, or a rerun of the same command, costs nothing.

Results (:func:`write_outputs`): every trial (and the uniform ResNet-20 references, all kernels 3
at every reference crossbar size) in ``trials.csv``, the Pareto front in ``pareto.csv``, a PNG of
accuracy against EDAP and ``choice.yaml``: the chosen ``resnet_q`` arch (``kernels``) for a
recipe and ``hardware: {crossbar: {layers: {...}}}`` for the bundle manifest; plus bundles of the
chosen and the reference sub-networks (``chosen/``, ``reference/``) and recipes that fine-tune
them on the same budget (``retrain-chosen.yaml``, ``retrain-reference.yaml``). The pick:
``constrained`` (default) = the most accurate trial whose EDAP is at most the reference's (the
uniform ResNet-20 at the first reference crossbar size; the references themselves are never
picked, so the choice is a searched network even where none beats them, and ``versus`` then says
by how much); ``score`` = the largest
``accuracy - lam * ln(EDAP / EDAP_ref)``. Layer names are those of the model a bundle builds (an
edge-only bundle wraps the classifier as ``net``): ``net.stem``, ``net.blocks.0.conv1``, ...
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from edgecloud.codesign.measure_cache import MeasurementCache, net_fingerprint, tensor_digest
from edgecloud.nets.resnet_elastic import ElasticQuantResNet
from edgecloud.nets.resnet_quant import QuantResNet
from edgecloud.nn.quant import QuantConv2d, QuantLinear, quant_layers

PREFIX = "net."  # an edge-only bundle's model wraps the classifier as ``net``: the crossbar's layer names
DEFAULT_XBARS = (32, 64, 128, 256)
DEFAULT_KERNELS = (1, 3, 5)
REFERENCE_KERNEL = 3  # ResNet-20


# ---- search space and cost ----------------------------------------------------------------------

@dataclass(frozen=True)
class LayerGeom:
    """One crossbar-mapped layer: what its layout needs apart from the kernel and crossbar size."""

    name: str            # as in the served model (``net.`` + the module path)
    kind: str            # "conv" or "linear"
    in_channels: int     # C of a conv, in_features of a linear layer
    outputs: int
    kernel: int          # the layer's own kernel (1 for a linear layer); elastic layers: the candidate's
    elastic: bool        # its kernel is searched
    positions: int       # output positions per sample (oh * ow; 1 for a linear layer)
    weight_bits: int
    act_bits: int

    def k_rows(self, kernel: int | None = None) -> int:
        k = self.kernel if kernel is None else kernel
        return self.in_channels * k * k if self.kind == "conv" else self.in_channels


def layer_geometry(net: QuantResNet, image_size: int | None = None) -> list[LayerGeom]:
    """Every quantized layer of ``net`` (a ``resnet_q`` or its supernet), in module order, with its
    output positions measured by one forward pass of a zero image."""
    elastic = {name for name, _ in net.block_convs()}
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, layer in quant_layers(net):
        hooks.append(layer.register_forward_hook(
            lambda mod, inputs, output, name=name: shapes.__setitem__(name, tuple(output.shape))))
    size = image_size or int(getattr(net, "image_size", 32))
    try:
        with torch.no_grad():
            was = net.training
            net.eval()
            net(torch.zeros(1, int(getattr(net, "in_channels", 3)), size, size))
            net.train(was)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for name, layer in quant_layers(net):
        if isinstance(layer, QuantConv2d):
            oh, ow = shapes[name][-2:]
            out.append(LayerGeom(PREFIX + name, "conv", layer.in_channels, layer.out_channels,
                                 int(layer.kernel_size[0]), name in elastic, int(oh * ow),
                                 layer.weight_bits, layer.act_bits))
        elif isinstance(layer, QuantLinear):
            out.append(LayerGeom(PREFIX + name, "linear", layer.in_features, layer.out_features, 1, False, 1,
                                 layer.weight_bits, layer.act_bits))
    return out


@dataclass(frozen=True)
class Candidate:
    """A kernel per searched conv and a square crossbar size per mapped layer (in the space's order)."""

    kernels: tuple[int, ...]
    xbars: tuple[int, ...]

    @property
    def key(self) -> str:
        return "k" + "-".join(map(str, self.kernels)) + "_x" + "-".join(map(str, self.xbars))


@dataclass(frozen=True)
class SearchSpace:
    geoms: tuple[LayerGeom, ...]
    kernels: tuple[int, ...] = DEFAULT_KERNELS
    xbars: tuple[int, ...] = DEFAULT_XBARS

    def __post_init__(self) -> None:
        if not self.kernels or any(k < 1 or k % 2 == 0 for k in self.kernels):
            raise ValueError(f"kernels must be odd positive sizes, got {list(self.kernels)}")
        if not self.xbars or any(x < 2 or x % 2 for x in self.xbars):
            raise ValueError(f"crossbar sizes must be even (differential pairs of columns), got {list(self.xbars)}")

    @property
    def kernel_layers(self) -> list[str]:
        return [g.name for g in self.geoms if g.elastic]

    @property
    def layers(self) -> list[str]:
        return [g.name for g in self.geoms]

    def uniform(self, kernel: int, xbar: int) -> Candidate:
        return Candidate(tuple([kernel] * len(self.kernel_layers)), tuple([xbar] * len(self.geoms)))

    def hardware(self, cand: Candidate) -> dict[str, dict[str, int]]:
        """The crossbar backend's ``layers`` option of a candidate."""
        return {name: {"rows": x, "cols": x} for name, x in zip(self.layers, cand.xbars)}

    def param_names(self) -> tuple[list[str], list[str]]:
        """Sampler parameter names: ``k:<module>`` per searched conv, ``xbar:<module>`` per layer."""
        strip = lambda n: n[len(PREFIX):] if n.startswith(PREFIX) else n  # noqa: E731
        return [f"k:{strip(n)}" for n in self.kernel_layers], [f"xbar:{strip(n)}" for n in self.layers]

    def distributions(self) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution

        kn, xn = self.param_names()
        out: dict[str, Any] = {n: CategoricalDistribution(list(self.kernels)) for n in kn}
        out.update({n: CategoricalDistribution(list(self.xbars)) for n in xn})
        return out

    def from_params(self, params: dict[str, Any]) -> Candidate:
        kn, xn = self.param_names()
        return Candidate(tuple(int(params[n]) for n in kn), tuple(int(params[n]) for n in xn))

    def to_params(self, cand: Candidate) -> dict[str, int]:
        kn, xn = self.param_names()
        return {**dict(zip(kn, cand.kernels)), **dict(zip(xn, cand.xbars))}

    def layouts(self, cand: Candidate, *, cell_bits: int = 2, dac_bits: int = 1, adc_bits: int | None = 8) -> list[Any]:
        """The candidate's ``LayerLayout`` of every mapped layer (:meth:`LayerLayout.plan`)."""
        from edgecloud.cim.cost import LayerLayout

        kernel_of = dict(zip(self.kernel_layers, cand.kernels))
        out = []
        for g, x in zip(self.geoms, cand.xbars):
            out.append(LayerLayout.plan(g.name, g.k_rows(kernel_of.get(g.name)), g.outputs,
                                        weight_bits=g.weight_bits, act_bits=g.act_bits, rows=x, cols=x,
                                        cell_bits=cell_bits, dac_bits=dac_bits, positions=g.positions,
                                        adc_bits=adc_bits))
        return out


def crossbar_options(options: dict[str, Any] | None) -> Any:
    """Validated ``CrossbarOptions`` (presets applied) of the backend options the search runs with."""
    from edgecloud.cim.crossbar import CrossbarOptions

    return CrossbarOptions(**dict(options or {}))


def candidate_cost(space: SearchSpace, cand: Candidate, options: dict[str, Any] | None = None,
                   cost_model: Any = None) -> Any:
    """The candidate's :class:`~edgecloud.cim.cost.Cost` (energy, latency, area, EDAP per inference),
    priced with the crossbar backend's cell, DAC and ADC bits (``options``, presets applied)."""
    from edgecloud.cim.cost import CostModel

    opt = crossbar_options(options)
    model = cost_model or CostModel()
    layouts = space.layouts(cand, cell_bits=opt.cell_bits, dac_bits=opt.dac_bits, adc_bits=opt.adc_bits)
    return model.cost(layouts, name=cand.key)


# ---- sub-networks ------------------------------------------------------------------------------

@torch.no_grad()
def recalibrate_bn(net: nn.Module, images: torch.Tensor, batch_size: int = 250) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics of ``net`` on ``images`` (in place, returned
    in eval mode): the cumulative average over the batches, as Once-for-All does per sub-network.
    Learned activation ranges and weights are left as they are."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(images) == 0:
        return net.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    net.eval()
    for m in bns:
        m.train()
    try:
        for start in range(0, len(images), batch_size):
            net(images[start:start + batch_size])
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
    return net.eval()


def as_supernet(net: nn.Module, kernels: Sequence[int]) -> ElasticQuantResNet:
    """``net`` as a supernet: itself when elastic; a plain ``resnet_q`` of uniform kernels becomes a
    one-kernel supernet (a crossbar-size-only search), which needs ``kernels`` to be that kernel."""
    net = getattr(net, "net", net)
    if isinstance(net, ElasticQuantResNet):
        missing = sorted(set(kernels) - set(net.kernel_choices))
        if missing:
            raise ValueError(f"--kernels {list(kernels)}: the supernet was trained for kernels "
                             f"{net.kernel_choices} only (not {missing})")
        return net
    if isinstance(net, QuantResNet):
        own = sorted(set(net.kernels))
        if own != sorted(set(kernels)) or len(own) != 1:
            raise ValueError(f"a plain resnet_q (block kernels {own}) can only be searched over crossbar sizes: "
                             f"give --kernels {','.join(map(str, own))}")
        sup = ElasticQuantResNet(**net.arch, kernel_choices=own, kernel_transform=False)
        sup.init_from(net)
        return sup.eval()
    raise ValueError(f"NAX searches a resnet_q_elastic supernet (or a resnet_q), not a {type(net).__name__}")


@dataclass
class SupernetSource:
    net: ElasticQuantResNet
    name: str
    fingerprint: str        # of the weights: part of every cache key
    dataset: str
    data_root: str | None
    val_fraction: float
    seed: int               # the training seed: the validation split held out of train
    data: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    path: str = ""


def load_supernet(spec: str | Path, kernels: Sequence[int]) -> SupernetSource:
    """A supernet bundle folder (``resnet_q_elastic``, or a ``resnet_q`` for a crossbar-only search)
    or a training run folder / ``checkpoint.pt``; with the data its validation split comes from."""
    from edgecloud.bundle import MANIFEST, Bundle
    from edgecloud.train.warmstart import CHECKPOINT, run_checkpoint

    p = Path(spec)
    if p.is_dir() and (p / MANIFEST).is_file() and not (p / CHECKPOINT).is_file():
        bundle = Bundle(p)
        model = bundle.build_model()
        training = bundle.manifest.training or {}
        data = dict(training.get("data") or {})
        optim = dict(training.get("optim") or {})
        seed, name = int(training.get("seed", 0) or 0), bundle.manifest.name
    else:
        from edgecloud.train.loop import load_checkpoint

        recipe, model, _ = load_checkpoint(run_checkpoint(p))
        data, optim = recipe.data.model_dump(mode="json"), recipe.optim.model_dump(mode="json")
        seed, name = recipe.seed, recipe.name
    net = as_supernet(model, kernels).eval()
    return SupernetSource(net=net, name=name, fingerprint=net_fingerprint(net), dataset=data.get("dataset") or "cifar10",
                          data_root=data.get("root"), val_fraction=float(data.get("val_fraction") or 0.1), seed=seed,
                          data=data, optim=optim, path=str(p))


# ---- data --------------------------------------------------------------------------------------

@dataclass
class SearchData:
    val_x: torch.Tensor      # float pixels in [0, 1]
    val_y: torch.Tensor
    bn_x: torch.Tensor       # training images for the BN recalibration
    calib_x: torch.Tensor    # training images for the ADC calibration (one batch)
    classes: tuple[str, ...]
    info: dict[str, Any]


def load_search_data(dataset: str, root: str | None, val_fraction: float, seed: int, val_limit: int | None,
                     bn_images: int, calib_images: int, crop_padding: int = 0, hflip: bool = False) -> SearchData:
    """The validation split the supernet's training held out (same seed and fraction; a class-balanced
    subset of ``val_limit``) and disjoint seeded subsets of the rest of train for BN and ADC calibration.

    The BN images get the training augmentation (``crop_padding``, ``hflip``; drawn once, seeded):
    the weights were trained against statistics of augmented batches, and statistics of plain images
    cost accuracy (the shipped 8-bit ResNet-20 on 1000 validation images: 84.1 % as shipped, 83.9 %
    recalibrated on 500 augmented training images, 81.1 % on 500 plain ones). The ADC calibration
    images stay plain, like the images the chips are scored on."""
    from edgecloud.data.dataset import train_val_split
    from edgecloud.data.loader import random_crop, random_hflip
    from edgecloud.data.registry import load_dataset
    from edgecloud.evaluate.source import balanced_subset

    train, val = train_val_split(load_dataset(dataset, "train", root), val_fraction, seed=seed)
    if len(val) == 0:
        raise ValueError("the validation split is empty (val_fraction 0): NAX scores candidates on it, never on test")
    if val_limit is not None and val_limit < len(val):
        val = val.subset(balanced_subset(val.labels.numpy(), val_limit))
    # in the permutation's order: an image folder stores train class by class, and a BN batch of a
    # few classes would miss the between-class part of the variance
    order = np.random.default_rng(seed).permutation(len(train))
    bn_idx = order[:bn_images]
    calib_idx = order[bn_images:bn_images + calib_images]
    bn = train.images[torch.as_tensor(bn_idx, dtype=torch.long)]
    gen = torch.Generator().manual_seed(seed)
    if crop_padding:
        bn = random_crop(bn, crop_padding, gen)
    if hflip:
        bn = random_hflip(bn, gen)
    calib = train.images[torch.as_tensor(calib_idx, dtype=torch.long)]
    info = {"dataset": dataset, "val_split": f"held out of train: fraction {val_fraction}, seed {seed}",
            "val_samples": len(val), "bn_images": len(bn_idx), "bn_augmentation": {"crop_padding": crop_padding,
                                                                                 "hflip": hflip},
            "calib_images": len(calib_idx)}
    return SearchData(val.images.float() / 255.0, val.labels.clone(), bn.float() / 255.0, calib.float() / 255.0,
                      tuple(val.classes), info)


# ---- evaluation ----------------------------------------------------------------------------------

@dataclass
class Row:
    """One scored candidate (a trial, or a reference)."""

    trial: int                 # -1, -2, ...: references
    kind: str                  # "trial" or "reference"
    label: str
    kernels: tuple[int, ...]
    xbars: tuple[int, ...]
    accuracy_mean: float
    accuracy_std: float
    accuracy_chips: tuple[float, ...]
    accuracy_digital: float
    energy_j: float
    latency_s: float
    area_mm2: float
    edap: float
    edap_vs_reference: float = float("nan")
    score: float = float("nan")
    pareto: bool = False


class Evaluator:
    """Scores candidates: the supernet's sub-network, BN recalibrated, on ``chips`` crossbar chips."""

    def __init__(self, source: SupernetSource, space: SearchSpace, data: SearchData, *,
                 options: dict[str, Any] | None = None, chips: int = 1, seed: int = 0, batch_size: int = 250,
                 cost_model: Any = None, cache: str | Path | None = None) -> None:
        from edgecloud.cim.cost import CostModel

        self.source, self.space, self.data = source, space, data
        self.options = dict(options or {"preset": "typical"})
        self.opt = crossbar_options(self.options)
        self.chips, self.seed, self.batch_size = int(chips), int(seed), int(batch_size)
        if self.chips < 1:
            raise ValueError(f"chips must be >= 1, got {chips}")
        self.cost_model = cost_model or CostModel()
        self.cache = MeasurementCache(cache)
        self._nets: dict[tuple[int, ...], nn.Module] = {}
        digest = hashlib.sha1(json.dumps({
            "supernet": source.fingerprint, "data": data.info, "val": tensor_digest(data.val_x),
            "bn": tensor_digest(data.bn_x), "calib": tensor_digest(data.calib_x),
            "options": self.opt.model_dump(mode="json", exclude={"layers"}), "batch": self.batch_size,
        }, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.context = digest

    # ---- the sub-network of a kernel configuration ----------------------------------------------
    def subnet(self, kernels: tuple[int, ...]) -> nn.Module:
        """The ``resnet_q`` of ``kernels``, BN recalibrated (the last few are kept for reuse)."""
        net = self._nets.get(kernels)
        if net is None:
            net = recalibrate_bn(self.source.net.extract(list(kernels)), self.data.bn_x, self.batch_size)
            if len(self._nets) >= 4:
                self._nets.pop(next(iter(self._nets)))
            self._nets[kernels] = net
        return net

    def digital_accuracy(self, kernels: tuple[int, ...]) -> float:
        """The sub-network's validation accuracy without the crossbar (digital integer reference)."""
        net = lambda: self.subnet(kernels)  # noqa: E731
        return self.cache.get_or_measure(f"{self.context}:k{'-'.join(map(str, kernels))}:digital",
                                         lambda: accuracy(lambda x: net()(x)[-1], self.data.val_x,
                                                          self.data.val_y, self.batch_size))

    def chip_accuracy(self, cand: Candidate, chip: int) -> float:
        """Validation accuracy on the crossbar chip of seed ``seed + chip`` with the candidate's layout."""
        return self.cache.get_or_measure(f"{self.context}:{cand.key}:chip{self.seed + chip}",
                                         lambda: self._measure(cand, chip))

    def _measure(self, cand: Candidate, chip: int) -> float:
        from edgecloud.cim.backend import create_backend
        from edgecloud.nets.edge_only import EdgeOnlyModel

        model = EdgeOnlyModel(copy.deepcopy(self.subnet(cand.kernels))).eval()
        backend = create_backend("crossbar", {**self.options, "layers": self.space.hardware(cand)},
                                 seed=self.seed + chip)
        backend.prepare(model)
        with torch.no_grad():
            if self.opt.adc_bits is not None and self.opt.adc_range == "calibrated" and len(self.data.calib_x):
                model(self.data.calib_x)  # one batch: every array's ADC range, from training images
            return accuracy(lambda x: model(x)[-1], self.data.val_x, self.data.val_y, self.batch_size)

    def cost(self, cand: Candidate) -> Any:
        return candidate_cost(self.space, cand, self.options, self.cost_model)

    def evaluate(self, cand: Candidate, *, trial: int, kind: str = "trial", label: str = "") -> Row:
        chips = tuple(self.chip_accuracy(cand, c) for c in range(self.chips))
        digital = self.digital_accuracy(cand.kernels)
        cost = self.cost(cand)
        return Row(trial=trial, kind=kind, label=label or cand.key, kernels=cand.kernels, xbars=cand.xbars,
                   accuracy_mean=float(np.mean(chips)), accuracy_std=float(np.std(chips)), accuracy_chips=chips,
                   accuracy_digital=digital, energy_j=cost.energy_j, latency_s=cost.latency_s,
                   area_mm2=cost.area_mm2, edap=cost.edap)


@torch.no_grad()
def accuracy(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    correct = 0
    for start in range(0, len(x), batch_size):
        correct += int((fn(x[start:start + batch_size]).argmax(1) == y[start:start + batch_size]).sum())
    return correct / max(1, len(x))


# ---- the search ------------------------------------------------------------------------------------

@dataclass
class NaxConfig:
    supernet: str
    out: str
    trials: int = 100
    chips: int = 2
    val_limit: int | None = 1000
    xbars: tuple[int, ...] = DEFAULT_XBARS
    kernels: tuple[int, ...] = DEFAULT_KERNELS
    reference_xbars: tuple[int, ...] = (64, 128)
    options: dict[str, Any] = field(default_factory=lambda: {"preset": "typical"})
    seed: int = 0
    population: int = 20
    warm_start: bool = True     # the first trials are the uniform kernel-3 networks at every crossbar size
    bn_images: int = 500
    calib_images: int = 200
    batch_size: int = 250
    pick: str = "constrained"   # "constrained" | "score"
    lam: float = 0.01           # score: accuracy - lam * ln(EDAP / EDAP_ref)
    data_root: str | None = None
    cache: bool = True
    cost_table: str | None = None
    energy_table: str | None = None

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {self.trials}")
        if self.population < 2:
            raise ValueError(f"--population must be >= 2 (NSGA-II crosses two parents), got {self.population}")
        if self.pick not in ("constrained", "score"):
            raise ValueError(f"--pick must be constrained or score, got {self.pick!r}")
        if not self.reference_xbars:
            raise ValueError("--ref-xbars: at least one crossbar size for the uniform ResNet-20 reference")
        if self.val_limit is not None and self.val_limit < 1:
            raise ValueError(f"--val-limit must be >= 1, got {self.val_limit}")


@dataclass
class NaxResult:
    rows: list[Row]             # trials in order
    references: list[Row]
    chosen: Row
    space: SearchSpace
    source: SupernetSource
    data: SearchData
    config: NaxConfig
    info: dict[str, Any]


def pareto_front(rows: Sequence[Row]) -> list[Row]:
    """The rows no other row beats in both accuracy (higher) and EDAP (lower); one per candidate, by EDAP."""
    seen: dict[tuple, Row] = {}
    for r in rows:
        seen.setdefault((r.kernels, r.xbars), r)
    unique = list(seen.values())
    front = [r for r in unique
             if not any((o.accuracy_mean >= r.accuracy_mean and o.edap <= r.edap)
                        and (o.accuracy_mean > r.accuracy_mean or o.edap < r.edap) for o in unique)]
    return sorted(front, key=lambda r: (r.edap, -r.accuracy_mean, r.trial))


def pick(rows: Sequence[Row], reference: Row, how: str, lam: float) -> tuple[Row, str]:
    """The chosen trial and why (see module docstring)."""
    def score(r: Row) -> float:
        return r.accuracy_mean - lam * math.log(r.edap / reference.edap)

    if how == "constrained":
        ok = [r for r in rows if r.edap <= reference.edap]
        if ok:
            best = max(ok, key=lambda r: (r.accuracy_mean, -r.edap, -r.trial))
            return best, (f"constrained: the most accurate trial with EDAP <= the reference "
                          f"({reference.label}, {reference.edap:.4g})")
        why = f"no trial has EDAP <= the reference ({reference.label}); fell back to the score, lam {lam}"
    else:
        why = f"score: accuracy - {lam} * ln(EDAP / EDAP_ref({reference.label}))"
    return max(rows, key=lambda r: (score(r), -r.trial)), why


def run_search(config: NaxConfig, progress: bool = True,
               on_row: Callable[[Row], None] | None = None) -> NaxResult:
    """Load the supernet and data, evaluate the references, run the NSGA-II trials (see module docstring)."""
    import optuna
    from tqdm import tqdm

    from edgecloud.cim.cost import CostModel

    started = time.perf_counter()
    kernels = tuple(sorted(set(int(k) for k in config.kernels)))
    xbars = tuple(sorted(set(int(x) for x in config.xbars)))
    source = load_supernet(config.supernet, kernels)
    if REFERENCE_KERNEL not in source.net.kernel_choices:
        raise ValueError(f"the reference ResNet-20 has {REFERENCE_KERNEL}x{REFERENCE_KERNEL} kernels, which the "
                         f"supernet ({source.net.kernel_choices}) was not trained for")
    space = SearchSpace(tuple(layer_geometry(source.net)), kernels, xbars)
    data = load_search_data(source.dataset, config.data_root or source.data_root, source.val_fraction, source.seed,
                            config.val_limit, config.bn_images, config.calib_images,
                            crop_padding=int(source.data.get("crop_padding") or 0),
                            hflip=bool(source.data.get("hflip")))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(source, space, data, options=config.options, chips=config.chips, seed=config.seed,
                          batch_size=config.batch_size,
                          cost_model=CostModel(config.cost_table, config.energy_table),
                          cache=out / "cache.jsonl" if config.cache else None)
    bar = tqdm(total=config.trials + len(config.reference_xbars), desc="nax", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    references = []
    for i, x in enumerate(config.reference_xbars):
        ref = evaluator.evaluate(space.uniform(REFERENCE_KERNEL, int(x)), trial=-(i + 1), kind="reference",
                                 label=f"ResNet-20 @{x}")
        references.append(ref)
        bar.update(1)
    reference = references[0]

    def relate(r: Row) -> None:
        r.edap_vs_reference = r.edap / reference.edap
        r.score = r.accuracy_mean - config.lam * math.log(r.edap / reference.edap)

    for r in references:
        relate(r)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(population_size=config.population, seed=config.seed)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    distributions = space.distributions()
    if config.warm_start:  # start the first generation from the known networks (cache hits for the references)
        for x in xbars[:config.trials]:
            study.enqueue_trial(space.to_params(space.uniform(REFERENCE_KERNEL, x)))
    rows: list[Row] = []
    for _ in range(config.trials):
        trial = study.ask(distributions)
        cand = space.from_params(trial.params)
        row = evaluator.evaluate(cand, trial=trial.number)
        study.tell(trial, [row.accuracy_mean, row.edap])
        relate(row)
        rows.append(row)
        write_csv(references + rows, space, out / "trials.csv")  # so far (the Pareto column at the end)
        if on_row is not None:
            on_row(row)
        bar.update(1)
        bar.set_postfix(acc=f"{row.accuracy_mean:.3f}", edap=f"{row.edap_vs_reference:.2f}x", refresh=False)
    bar.close()
    front = {(r.kernels, r.xbars) for r in pareto_front(rows)}
    for r in rows:
        r.pareto = (r.kernels, r.xbars) in front
    # the references are what the pick is compared with, not candidates for it (warm start measures them)
    known = {(r.kernels, r.xbars) for r in references}
    searched = [r for r in rows if (r.kernels, r.xbars) not in known] or rows
    chosen, why = pick(searched, reference, config.pick, config.lam)
    info = {"why": why, "wall_time_s": round(time.perf_counter() - started, 1), "cache_hits": evaluator.cache.hits,
            "measured": evaluator.cache.misses, "options": evaluator.opt.model_dump(mode="json", exclude={"layers"}),
            "data": data.info, "supernet": {"path": source.path, "name": source.name,
                                            "kernel_choices": source.net.kernel_choices,
                                            "fingerprint": source.fingerprint}}
    return NaxResult(rows, references, chosen, space, source, data, config, info)


# ---- outputs -----------------------------------------------------------------------------------------

def row_dict(r: Row, space: SearchSpace) -> dict[str, Any]:
    kn, xn = space.param_names()
    out: dict[str, Any] = {"trial": r.trial, "kind": r.kind, "label": r.label,
                           "accuracy_mean": round(r.accuracy_mean, 6), "accuracy_std": round(r.accuracy_std, 6),
                           "accuracy_chips": " ".join(f"{a:.6f}" for a in r.accuracy_chips),
                           "accuracy_digital": round(r.accuracy_digital, 6),
                           "energy_j": r.energy_j, "latency_s": r.latency_s, "area_mm2": r.area_mm2, "edap": r.edap,
                           "edap_vs_reference": round(r.edap_vs_reference, 6), "score": round(r.score, 6),
                           "pareto": r.pareto}
    out.update(dict(zip(kn, r.kernels)))
    out.update(dict(zip(xn, r.xbars)))
    return out


def write_csv(rows: Sequence[Row], space: SearchSpace, path: Path) -> Path:
    dicts = [row_dict(r, space) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dicts[0]) if dicts else ["trial"])
        writer.writeheader()
        writer.writerows(dicts)
    return path


def plot(result: NaxResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, refs = result.rows, result.references
    front = pareto_front(rows)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.scatter([r.edap for r in rows], [100 * r.accuracy_mean for r in rows], s=14, c="0.6", label="trials")
    ax.plot([r.edap for r in front], [100 * r.accuracy_mean for r in front], "-o", c="tab:blue", ms=4,
            label="Pareto front")
    for r, marker in zip(refs, "s^Dv<>"):
        ax.scatter([r.edap], [100 * r.accuracy_mean], marker=marker, s=70, c="tab:red", zorder=5,
                   label=f"{r.label} (uniform 3x3)")
    c = result.chosen
    ax.scatter([c.edap], [100 * c.accuracy_mean], s=160, facecolors="none", edgecolors="tab:green", linewidths=2,
               zorder=6, label=f"chosen (trial {c.trial})")
    ax.set_xscale("log")
    ax.set_xlabel("EDAP per inference (J s mm$^2$, cost model)")
    ax.set_ylabel(f"validation accuracy on the crossbar (%), mean of {result.config.chips} chip(s)")
    ax.set_title(f"NAX search: {result.source.name}, {len(rows)} trials, {result.data.info['val_samples']} val images",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def choice_dict(result: NaxResult, row: Row) -> dict[str, Any]:
    """A candidate as a recipe's ``family`` + ``arch`` and a manifest's ``hardware`` section."""
    net = result.source.net
    return {
        "family": "resnet_q",
        "arch": {**net.arch, "kernels": list(row.kernels)},
        "hardware": {"crossbar": {"layers": result.space.hardware(Candidate(row.kernels, row.xbars))}},
        "nax": {"trial": row.trial, "label": row.label, "accuracy_mean": round(row.accuracy_mean, 6),
                "accuracy_std": round(row.accuracy_std, 6), "accuracy_digital": round(row.accuracy_digital, 6),
                "energy_j": row.energy_j, "latency_s": row.latency_s, "area_mm2": row.area_mm2, "edap": row.edap,
                "edap_vs_reference": round(row.edap_vs_reference, 6)},
    }


def export_candidate(result: NaxResult, row: Row, out_dir: Path, name: str) -> Path:
    """The candidate's sub-network (BN recalibrated) as an edge-only ``resnet_q`` bundle; its manifest
    holds the candidate's crossbar layout (``hardware``)."""
    from edgecloud.export import resolve_arch
    from edgecloud.export_edge import export_edge_bundle

    net = result.source.net.extract(list(row.kernels))
    recalibrate_bn(net, result.data.bn_x, result.config.batch_size)
    choice = choice_dict(result, row)
    training = {"seed": result.source.seed, "data": result.source.data, "optim": result.source.optim,
                "nax": {"supernet": result.source.path, "fingerprint": result.source.fingerprint,
                        "bn_recalibrated_on": f"{len(result.data.bn_x)} training images"}}
    path = export_edge_bundle(net, out_dir, name=name, family="resnet_q", arch=resolve_arch("resnet_q", choice["arch"]),
                              classes=result.data.classes, training=training, metrics={"nax": choice["nax"]},
                              hardware=choice["hardware"])
    return Path(path)


def retrain_recipe(result: NaxResult, row: Row, bundle: Path, name: str) -> dict[str, Any]:
    """A recipe that fine-tunes the exported sub-network (``init``) with the supernet's data settings
    and optimiser (set ``--epochs`` for the budget); its bundle keeps the candidate's crossbar layout
    (``hardware``), so `edgecloud eval --backend crossbar` runs it as the search scored it."""
    src = result.source
    data = {k: v for k, v in src.data.items() if k in ("dataset", "root", "val_fraction", "crop_padding", "hflip")}
    optim = {k: v for k, v in src.optim.items()
             if k in ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule",
                      "warmup_fraction", "label_smoothing", "channels_last", "grad_clip", "precision")}
    return {"name": name, "description": f"NAX: fine-tune {row.label} of the supernet {src.name} "
                                         f"(trial {row.trial})",
            "family": "resnet_q", "arch": {**src.net.arch, "kernels": list(row.kernels)}, "seed": src.seed,
            "data": data or {"dataset": src.dataset}, "init": {"checkpoint": str(bundle)},
            **({"optim": optim} if optim else {}), "hardware": choice_dict(result, row)["hardware"]}


def write_outputs(result: NaxResult, out: str | Path, export: bool = True) -> dict[str, Any]:
    """trials.csv, pareto.csv, nax.png, choice.yaml (+ the chosen and reference bundles and their
    fine-tuning recipes); returns the paths."""
    out = Path(out)
    space = result.space
    paths: dict[str, Any] = {
        "csv": str(write_csv(result.references + result.rows, space, out / "trials.csv")),
        "pareto_csv": str(write_csv(pareto_front(result.rows), space, out / "pareto.csv")),
        "png": str(plot(result, out / "nax.png")),
    }
    choice = choice_dict(result, result.chosen)
    choice["nax"]["why"] = result.info["why"]
    choice["nax"]["reference"] = {r.label: {"accuracy_mean": round(r.accuracy_mean, 6), "edap": r.edap}
                                  for r in result.references}
    choice["nax"]["versus"] = versus_references(result, result.chosen)
    header = ("# NAX choice (edgecloud search nax). `family` + `arch`: a training recipe's network;\n"
              "# `hardware`: the bundle manifest's per-layer crossbar sizes (layer names as the bundle's model has\n"
              "# them). Accuracy: validation split, crossbar backend; EDAP: edgecloud.cim.cost, J*s*mm^2.\n")
    (out / "choice.yaml").write_text(header + yaml.safe_dump(choice, sort_keys=False))
    paths["choice_yaml"] = str(out / "choice.yaml")
    if export:
        base = result.source.name
        chosen = export_candidate(result, result.chosen, out / "chosen", f"{base}-nax")
        reference = export_candidate(result, result.references[0], out / "reference", f"{base}-resnet20")
        for key, row, bundle, name in (("chosen", result.chosen, chosen, f"{base}-nax-retrain"),
                                       ("reference", result.references[0], reference, f"{base}-resnet20-retrain")):
            recipe = retrain_recipe(result, row, bundle.resolve(), name)
            path = out / f"retrain-{key}.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            paths[f"{key}_bundle"], paths[f"retrain_{key}"] = str(bundle), str(path)
    return paths


def versus_references(result: NaxResult, row: Row) -> dict[str, dict[str, float]]:
    """The row against each reference: accuracy difference (points) and EDAP, energy, area ratios."""
    return {r.label: {"accuracy_points": round(100 * (row.accuracy_mean - r.accuracy_mean), 3),
                      "edap_ratio": round(row.edap / r.edap, 6), "energy_ratio": round(row.energy_j / r.energy_j, 6),
                      "latency_ratio": round(row.latency_s / r.latency_s, 6),
                      "area_ratio": round(row.area_mm2 / r.area_mm2, 6)} for r in result.references}


def result_json(result: NaxResult, paths: dict[str, Any]) -> dict[str, Any]:
    space = result.space
    return {
        "supernet": result.info["supernet"], "data": result.info["data"], "settings": {
            **{k: v for k, v in asdict(result.config).items() if k not in ("supernet", "out")},
            "options": result.info["options"]},
        "trials": len(result.rows), "measured": result.info["measured"],
        "cache_hits": result.info["cache_hits"], "wall_time_s": result.info["wall_time_s"],
        "references": [row_dict(r, space) for r in result.references],
        "chosen": {**row_dict(result.chosen, space), "why": result.info["why"],
                   "versus": versus_references(result, result.chosen)},
        "pareto": [row_dict(r, space) for r in pareto_front(result.rows)],
        **paths,
    }
