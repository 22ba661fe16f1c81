"""Prune a trained bundle for crossbar ADC efficiency: regularise, prune, fine-tune, export, measure.

The three phases of D.U.B. (Ibrayev et al., arXiv 2403.13082; :mod:`edgecloud.codesign.dub`), and
the same pipeline for its baselines, run through the ordinary training loop
(:func:`edgecloud.train.loop.run_training`), so every phase checkpoints each epoch and a second
run of the same command resumes where the first stopped:

1. **regularise** (``regularize_epochs`` > 0): fine-tune from SOURCE (``init: SOURCE``) with the
   method's regulariser (``prune_regularizer``): D.U.B.'s gated variance of the Hoyer L0 proxies
   of the columns sharing a crossbar plus ``lambda_l2 ||W||^2``; group lasso on the crossbar
   column and row segments plus L2; magnitude pruning: the L2 term alone (weights that L2
   drives towards zero are the ones magnitude pruning removes). Run folder ``WORK/regularize``.
2. **prune** the regularised weights once (``masks: {method: ...}`` at the start of phase 3:
   :func:`~edgecloud.codesign.dub.prune_model`): D.U.B.'s balanced discrete step per array,
   magnitude's ``ratio`` of each layer, group lasso's dead segments (then, with a ratio, its smallest
   surviving weights up to it); ``--match-sparsity BUNDLE`` gives each layer the sparsity it has in
   another pruned bundle, so the baselines can be compared with D.U.B. at equal sparsity.
3. **fine-tune** (``finetune_epochs`` > 0) with the masks fixed (the loop zeroes the pruned
   weights' gradients and re-applies the masks after every step). Run folder ``WORK/finetune``.

The recipes are built from SOURCE's own manifest: family and arch, and its ``training`` section
(data set and augmentation, optimiser and schedule, seed), with the epochs, learning rate, batch
size and training subset of the command. Then the bundle is exported as ``edgecloud train`` does
(:func:`~edgecloud.train.loop.finalize`), with ``hardware: {crossbar: {rows, cols, adc_reduce:
sparsity}}`` in its manifest so the crossbar backend gives each array the ADC resolution its
densest column needs, and everything below is MEASURED into the manifest (``metrics.codesign``),
the model card and the returned report:

- per pruned layer: the fraction of weights pruned and the discrete level (bits saved) each array
  reaches with the final weights;
- per crossbar-mapped layer: the histogram of ADC bits per array, as the crossbar backend
  programs the pruned bundle (``adc_reduce: sparsity``, ideal ADC: lossless full resolution
  ``ceil(log2(rows (2^cell_bits - 1) + 1))`` less the bits each array saves), against SOURCE's;
- ADC energy per inference from the cost model (:mod:`edgecloud.cim.cost`, layouts of the
  programmed backend after one image) under each ADC law (walden, schreier, linear), for SOURCE
  at full resolution, SOURCE with the same sparsity-aware ADCs (zero cells it already has, e.g.
  high bit slices of small weights) and the pruned bundle, on the same ``rows`` x ``cols`` arrays;
- test accuracy, digital, of SOURCE and of the pruned bundle; with ``crossbar_chips`` > 0 also on
  the ``typical`` crossbar with an ideal ADC (device variation, faults, read noise, IR drop; the
  reduced ADCs are lossless there), mean and std over chips ``seed .. seed + N - 1``. Each chip's
  number is cached (:mod:`edgecloud.codesign.measure_cache`), so the baselines pruned from one SOURCE
  evaluate SOURCE's chips once.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgecloud.cim.cpu import cpu_info
from edgecloud.codesign.measure_cache import MeasurementCache, default_cache_path

METHODS = ("dub", "magnitude", "group-lasso")
ADC_LAWS = ("walden", "schreier", "linear")
LAYER_SETS = ("conv", "all")
DEFAULT_LR = 0.01  # the paper's fine-tuning learning rate; fine-tuning from a trained bundle, not from scratch
DEFAULT_LAMBDAS = {"lambda_var": 1e-3, "lambda_l2": 1e-3, "lambda_group": 1e-4}  # the paper's CIFAR-10 grid point
REGULARIZE, FINETUNE = "regularize", "finetune"


@dataclass
class PruneConfig:
    """Everything ``edgecloud prune`` takes (``None``: the default described per field)."""

    source: str                              # a bundle folder, or a bundle name in ``repository``
    method: str = "dub"
    repository: str | None = None
    dataset: str | None = None               # default: SOURCE's training data set
    data_root: str | None = None             # default: SOURCE's training data.root
    rows: int = 64                           # crossbar rows per array = the D.U.B. tile
    outputs_per_array: int | None = None     # default rows // 2 (cols = 2 x this: differential pairs)
    layers: str = "conv"                     # conv (the paper) or all (conv and linear)
    regularize_epochs: int = 1
    finetune_epochs: int = 1
    lambda_var: float | None = None          # dub only; default 1e-3
    lambda_l2: float | None = None           # default 1e-3
    lambda_group: float | None = None        # group-lasso only; default 1e-4
    ratio: float | None = None               # magnitude (it or match_sparsity required), group-lasso
    match_sparsity: str | None = None        # a pruned bundle: prune each layer to its sparsity
    tol: float = 1e-3                        # |w| <= tol counts as zero (dub, group-lasso)
    lr: float | None = None                  # default 0.01
    batch_size: int | None = None            # default SOURCE's
    limit_train: int | None = None           # seeded subset of N training images (val / test shrink too)
    seed: int | None = None                  # default SOURCE's training seed
    out: str | None = None                   # bundle folder; default runs/prune/<source>-<method>
    work: str | None = None                  # run folders; default <out>.work
    crossbar_chips: int = 0                  # > 0: crossbar (typical, ideal ADC) accuracy over N chips
    cache: bool = True                       # reuse chips already measured (edgecloud.codesign.measure_cache)
    command: str = ""                        # the command line, for the model card

    # ---- checks -----------------------------------------------------------------------------
    def validate(self) -> "PruneConfig":
        """Raise ValueError naming the flag of the first bad setting."""
        if self.method not in METHODS:
            raise ValueError(f"--method: unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.layers not in LAYER_SETS:
            raise ValueError(f"--layers: {self.layers!r}; choose conv or all")
        if self.ratio is not None and self.match_sparsity is not None:
            raise ValueError("give --ratio or --match-sparsity, not both")
        if self.method == "magnitude" and self.ratio is None and self.match_sparsity is None:
            raise ValueError("--method magnitude needs --ratio (the fraction of each layer's weights to "
                             "remove, e.g. --ratio 0.5) or --match-sparsity BUNDLE (each layer as sparse as "
                             "in that pruned bundle)")
        if self.method == "dub" and (self.ratio is not None or self.match_sparsity is not None):
            raise ValueError("--ratio and --match-sparsity apply to --method magnitude or group-lasso, not dub "
                             "(D.U.B. chooses its own sparsity per array)")
        if self.ratio is not None and not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"--ratio must lie in 0..1, got {self.ratio}")
        if self.lambda_var is not None and self.method != "dub":
            raise ValueError(f"--lambda-var applies to --method dub only, not {self.method}")
        if self.lambda_group is not None and self.method != "group-lasso":
            raise ValueError(f"--lambda-group applies to --method group-lasso only, not {self.method}")
        for flag, value in (("--lambda-var", self.lambda_var), ("--lambda-l2", self.lambda_l2),
                            ("--lambda-group", self.lambda_group), ("--tol", self.tol)):
            if value is not None and not value >= 0.0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        if not 2 <= self.rows <= 4096:
            raise ValueError(f"--rows must lie in 2..4096 (crossbar rows per array), got {self.rows}")
        if self.outputs_per_array is not None and not 1 <= self.outputs_per_array <= 2048:
            raise ValueError(f"--outputs-per-array must lie in 1..2048 (cols = 2 x outputs <= 4096), "
                             f"got {self.outputs_per_array}")
        for flag, value, low in (("--regularize-epochs", self.regularize_epochs, 0),
                                 ("--finetune-epochs", self.finetune_epochs, 0),
                                 ("--crossbar-chips", self.crossbar_chips, 0),
                                 ("--batch-size", self.batch_size, 1), ("--limit-train", self.limit_train, 1)):
            if value is not None and value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")
        if self.lr is not None and not self.lr > 0.0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        return self

    # ---- derived ----------------------------------------------------------------------------
    @property
    def opa(self) -> int:
        """Outputs per array: the differential pairs of a ``rows`` x ``cols`` array."""
        return self.outputs_per_array or max(1, self.rows // 2)

    @property
    def cols(self) -> int:
        return 2 * self.opa

    def lam(self, key: str) -> float:
        value = getattr(self, key)
        return DEFAULT_LAMBDAS[key] if value is None else float(value)

    def out_dir(self, source_name: str) -> Path:
        return Path(self.out) if self.out else Path("runs") / "prune" / f"{source_name}-{self.method}"

    def work_dir(self, out: Path) -> Path:
        return Path(self.work) if self.work else out.with_name(out.name + ".work")

    def hardware(self) -> dict[str, Any]:
        """The manifest's ``hardware`` section: crossbar arrays of the pruned tile size whose ADCs
        follow each array's densest column."""
        return {"crossbar": {"rows": self.rows, "cols": self.cols, "adc_reduce": "sparsity"}}


# ---- SOURCE ------------------------------------------------------------------------------------

@dataclass
class Source:
    bundle: Any            # edgecloud.bundle.Bundle
    net: nn.Module         # the trained network as the training loop builds it (edge-only: unwrapped)

    @property
    def name(self) -> str:
        return self.bundle.name


def matched_ratios(config: PruneConfig) -> dict[str, float] | None:
    """Per-layer prune ratios of ``--match-sparsity BUNDLE``: the sparsity each layer has there
    (a bundle ``edgecloud prune`` wrote); None without the flag."""
    if config.match_sparsity is None:
        return None
    from edgecloud.evaluate.source import resolve_bundle

    bundle = resolve_bundle(config.match_sparsity, config.repository)
    try:
        layers = bundle.manifest.metrics["codesign"]["measured"]["sparsity"]["layers"]
        ratios = {name: float(v["sparsity"]) for name, v in layers.items()}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"--match-sparsity {config.match_sparsity}: not a bundle `edgecloud prune` wrote "
                         f"(no metrics.codesign.measured.sparsity.layers in its manifest)") from exc
    if not ratios:
        raise ValueError(f"--match-sparsity {config.match_sparsity}: its manifest names no pruned layer")
    return ratios


def load_source(config: PruneConfig) -> Source:
    """SOURCE's bundle and network; ValueError unless it has layers to prune."""
    from edgecloud.codesign.dub import prunable_layers
    from edgecloud.evaluate.source import resolve_bundle
    from edgecloud.nets.edge_only import EdgeOnlyModel

    bundle = resolve_bundle(config.source, config.repository)
    model = bundle.build_model()
    net = model.net if isinstance(model, EdgeOnlyModel) else model
    if not prunable_layers(net, config.layers):  # type: ignore[arg-type]
        kinds = "conv" if config.layers == "conv" else "conv or linear"
        raise ValueError(f"SOURCE {bundle.name} ({bundle.manifest.family}) has no quantized {kinds} layer with "
                         f">= 2-bit weights to prune (the crossbar maps quantized layers only; binary weights "
                         f"cannot store a zero); prune a quantized bundle such as cifar10-resnet20-8bit"
                         + (", or give --layers all (it has quantized linear layers)"
                            if config.layers == "conv" and prunable_layers(net, "all") else ""))
    return Source(bundle, net.eval())


def base_recipe(source: Source, config: PruneConfig, name: str) -> Any:
    """A recipe for SOURCE's network and data, from its manifest (family, arch, ``training``)."""
    from edgecloud.train.recipe import DataSpec, OffloadSpec, OptimSpec, Recipe, ThresholdSpec

    m = source.bundle.manifest
    t = m.training or {}
    data = {k: v for k, v in dict(t.get("data") or {}).items() if k in DataSpec.model_fields}
    if config.dataset:
        data["dataset"] = config.dataset
    if not data.get("dataset"):
        raise ValueError(f"SOURCE {m.name}: its manifest records no training data set; give --dataset")
    if config.data_root:
        data["root"] = config.data_root
    data["train_limit"] = config.limit_train
    optim = {k: v for k, v in dict(t.get("optim") or {}).items() if k in OptimSpec.model_fields}
    optim["lr"] = DEFAULT_LR if config.lr is None else config.lr
    if config.batch_size:
        optim["batch_size"] = config.batch_size
    seed = config.seed if config.seed is not None else int(t.get("seed", 0) or 0)
    try:
        return Recipe(
            name=name, description=f"{m.name} pruned for crossbar ADC efficiency ({config.method})",
            family=m.family, arch=dict(m.arch), seed=seed, data=DataSpec(**data), optim=OptimSpec(**optim),
            exits=ThresholdSpec(policy=m.policy),
            offload=OffloadSpec(encoding=m.cloud.encoding) if m.cloud.present else OffloadSpec(),
        )
    except ValueError as exc:
        raise ValueError(f"SOURCE {m.name}: cannot build a training recipe from its manifest: {exc}") from exc


def phase_recipes(source: Source, config: PruneConfig, name: str, work: Path) -> tuple[Any | None, Any]:
    """(regularise recipe or None, prune + fine-tune recipe); the second's epochs are at least 1
    (the caller skips its training with ``finetune_epochs`` 0)."""
    from edgecloud.train.recipe import InitSpec, MaskSpec, PruneRegularizerSpec

    base = base_recipe(source, config, name)
    src = InitSpec(checkpoint=str(source.bundle.path))
    regularize = None
    if config.regularize_epochs > 0:
        reg_method = "group-lasso" if config.method == "group-lasso" else "dub"
        reg = PruneRegularizerSpec(
            method=reg_method, rows=config.rows, outputs_per_array=config.opa, layers=config.layers,
            lambda_l2=config.lam("lambda_l2"),
            lambda_var=config.lam("lambda_var") if config.method == "dub" else 0.0,  # magnitude: L2 alone
            lambda_group=config.lam("lambda_group") if config.method == "group-lasso" else 0.0,
        )
        regularize = base.model_copy(update={
            "name": f"{name}-{REGULARIZE}", "init": src, "prune_regularizer": reg,
            "optim": base.optim.model_copy(update={"epochs": config.regularize_epochs})})
    masks = MaskSpec(method=config.method, rows=config.rows, outputs_per_array=config.opa, tol=config.tol,
                     ratio=config.ratio if config.match_sparsity is None else matched_ratios(config),
                     layers=config.layers)
    finetune = base.model_copy(update={
        "init": InitSpec(checkpoint=str(work / REGULARIZE)) if regularize is not None else src, "masks": masks,
        "optim": base.optim.model_copy(update={"epochs": max(1, config.finetune_epochs)})})
    return regularize, finetune


def check_warm_start(source: Source, recipe: Any) -> None:
    """The recipe's network initialised from SOURCE must be SOURCE exactly (else pruning would
    start from partly fresh weights): ValueError otherwise."""
    from edgecloud.train.loop import build_model
    from edgecloud.train.warmstart import init_from_run

    model = build_model(recipe)
    try:
        left = init_from_run(model, source.bundle.path)
    except ValueError as exc:
        raise ValueError(f"SOURCE {source.name}: cannot start its family {recipe.family!r} from the bundle: {exc}") \
            from exc
    mine, theirs = model.state_dict(), source.net.state_dict()
    if left or set(mine) != set(theirs) or any(not torch.equal(mine[k], theirs[k]) for k in mine):
        raise ValueError(f"SOURCE {source.name}: family {recipe.family!r} does not restore the bundle's network "
                         f"exactly from it (left at fresh init: {left or 'none'}); it cannot be fine-tuned here")


# ---- phases ------------------------------------------------------------------------------------

def _train(recipe: Any, run_dir: Path, splits: Any, progress: bool, phase: str) -> Any:
    from edgecloud.train.loop import run_training

    try:
        return run_training(recipe, run_dir, resume=True, splits=splits, progress=progress)
    except ValueError as exc:
        if "different recipe" in str(exc):
            raise ValueError(f"{run_dir} holds a {phase} run made with other settings (flags, SOURCE or data); "
                             f"rerun with the same ones to resume, or give another --out / --work") from exc
        raise


@dataclass
class PhaseRecord:
    epochs: int = 0
    wall_time_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def run_phases(source: Source, config: PruneConfig, recipes: tuple[Any | None, Any], work: Path, splits: Any,
               progress: bool) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, PhaseRecord]]:
    """(pruned network, masks, phase records) of the recipes of :func:`phase_recipes`."""
    from edgecloud.codesign.dub import load_masks, prune_model
    from edgecloud.train.loop import build_model
    from edgecloud.train.warmstart import init_from_run

    regularize, finetune = recipes
    check_warm_start(source, regularize or finetune)
    records: dict[str, PhaseRecord] = {}
    if regularize is not None:
        res = _train(regularize, work / REGULARIZE, splits, progress, REGULARIZE)
        records[REGULARIZE] = PhaseRecord(res.epochs, res.wall_time_s, res.history)
    if config.finetune_epochs > 0:
        res = _train(finetune, work / FINETUNE, splits, progress, FINETUNE)
        records[FINETUNE] = PhaseRecord(res.epochs, res.wall_time_s, res.history)
        masks = load_masks(work / FINETUNE / "masks.pt")
        return res.model, masks, records
    # no fine-tuning: prune the (regularised) weights and export them as they are
    model = build_model(finetune)
    init_from_run(model, finetune.init.checkpoint)
    spec = finetune.masks
    result = prune_model(model, spec.method, spec.rows, spec.outputs_per_array, tol=spec.tol, ratio=spec.ratio,
                         layers=spec.layers, apply=True)
    return model.eval(), result.masks, records


# ---- measurements ------------------------------------------------------------------------------

def _test_image(splits: Any) -> torch.Tensor:
    from edgecloud.data.loader import Loader

    data = splits.test if splits.test is not None and len(splits.test) else splits.val
    return next(iter(Loader(data.subset(torch.arange(1)), 1)))[0]


@torch.no_grad()
def crossbar_layouts(net: nn.Module, options: dict[str, Any], image: torch.Tensor
                     ) -> tuple[list[Any], dict[str, list[list[int]]]]:
    """(cost-model layouts, ADC bits per array by layer) of ``net`` programmed on a crossbar with
    ``options``, after one image (the layouts need each layer's output positions)."""
    from edgecloud.cim.backend import create_backend
    from edgecloud.cim.cost import layouts_from_backend

    chip = copy.deepcopy(net).eval()
    backend = create_backend("crossbar", options, seed=0)
    backend.prepare(chip)
    chip(image)
    bits = {k: v.tolist() for k, v in backend.array_bits.items()}
    return layouts_from_backend(backend), bits


def adc_energy(layouts: list[Any], law: str) -> float:
    """Joules of ADC conversions per inference under ``law`` (the cost model's ADC component)."""
    from edgecloud.cim.cost import CostModel

    return float(CostModel(adc_law=law).cost(layouts).energy_breakdown_j["adc"])


def histogram(bits: list[list[int]]) -> dict[str, int]:
    """{bits: arrays}, ascending."""
    counts = Counter(int(b) for row in bits for b in row)
    return {str(b): counts[b] for b in sorted(counts)}


def sparsity_report(net: nn.Module, masks: dict[str, torch.Tensor], config: PruneConfig) -> dict[str, Any]:
    """Per pruned layer: weights, fraction pruned (mask), fraction zero now, and the histogram of
    the discrete levels (ADC bits saved) each array reaches with the final weights (exact zeros)."""
    from edgecloud.codesign.dub import array_levels

    layers: dict[str, Any] = {}
    total = pruned = 0
    for name, mask in masks.items():
        w = net.get_submodule(name).weight.detach()
        levels = array_levels(w, config.rows, config.opa)
        n, p = int(mask.numel()), int((~mask).sum())
        total, pruned = total + n, pruned + p
        layers[name] = {"weights": n, "sparsity": round(p / n, 6), "zero": round(float((w == 0).float().mean()), 6),
                        "arrays": int(levels.numel()), "levels": histogram(levels.tolist())}
    return {"weights": total, "sparsity": round(pruned / total, 6) if total else 0.0, "layers": layers}


@torch.no_grad()
def accuracy(net: nn.Module, data: Any, batch_size: int = 500) -> float:
    from edgecloud.data.loader import Loader

    correct = 0
    for x, y in Loader(data, batch_size):
        out = net(x)
        correct += int(((out[-1] if isinstance(out, (list, tuple)) else out).argmax(1) == y).sum())
    return correct / max(len(data), 1)


def crossbar_accuracy(net: nn.Module, options: dict[str, Any], data: Any, seeds: list[int], progress: bool,
                      label: str, cache: MeasurementCache | None = None) -> dict[str, Any]:
    """Test accuracy on crossbar chips ``seeds`` (each programmed anew): per chip, mean and std. A chip
    already measured with the same weights, options, images and simulator comes from ``cache``."""
    from tqdm import tqdm

    from edgecloud.cim.backend import create_backend

    def measure_chip(seed: int) -> float:
        chip = copy.deepcopy(net).eval()
        create_backend("crossbar", options, seed=seed).prepare(chip)
        return accuracy(chip, data, batch_size=250)

    cache = cache or MeasurementCache(None)
    keys = cache.chip_keys(net, options, data.images, data.labels, seeds)
    per_chip = []
    for seed, key in tqdm(list(zip(seeds, keys)), desc=f"crossbar chips ({label})", unit="chip",
                          disable=not progress, leave=False):
        per_chip.append(cache.get_or_measure(key, lambda: measure_chip(seed)))
    mean = sum(per_chip) / len(per_chip)
    std = (sum((a - mean) ** 2 for a in per_chip) / (len(per_chip) - 1)) ** 0.5 if len(per_chip) > 1 else 0.0
    return {"mean": round(mean, 4), "std": round(std, 4), "per_chip": [round(a, 4) for a in per_chip]}


def measure(source: Source, pruned: nn.Module, masks: dict[str, torch.Tensor], config: PruneConfig, splits: Any,
            seed: int, progress: bool) -> dict[str, Any]:
    """Sparsity, ADC bits per array, ADC energy per law and accuracy (see the module docstring)."""
    hw = config.hardware()["crossbar"]
    dense = {"rows": config.rows, "cols": config.cols}
    image = _test_image(splits)
    lay_src, bits_src = crossbar_layouts(source.net, dense, image)
    lay_src_red, _ = crossbar_layouts(source.net, hw, image)
    lay_pruned, bits_pruned = crossbar_layouts(pruned, hw, image)
    energy = {}
    for law in ADC_LAWS:
        e_src, e_red, e_pr = adc_energy(lay_src, law), adc_energy(lay_src_red, law), adc_energy(lay_pruned, law)
        energy[law] = {"source_j": e_src, "source_sparsity_adc_j": e_red, "pruned_j": e_pr,
                       "ratio": round(e_src / e_pr, 4) if e_pr else None,
                       "ratio_vs_source_sparsity_adc": round(e_red / e_pr, 4) if e_pr else None}
    adc_bits = {name: {"pruned": histogram(bits), "source": histogram(bits_src.get(name, [])),
                       "pruned_layer": name in masks}
                for name, bits in bits_pruned.items()}
    test = splits.test
    acc: dict[str, Any] = {"test_samples": len(test), "digital": {"source": round(accuracy(source.net, test), 4),
                                                                 "pruned": round(accuracy(pruned, test), 4)}}
    if config.crossbar_chips > 0:
        seeds = list(range(seed, seed + config.crossbar_chips))
        cache = MeasurementCache(default_cache_path() if config.cache else None)
        ideal_adc = {"preset": "typical", "adc_bits": None, "adc_noise_lsb": 0.0}
        acc["crossbar"] = {
            "options": {**hw, **ideal_adc}, "chips": config.crossbar_chips, "seeds": seeds,
            "source": crossbar_accuracy(source.net, {**dense, **ideal_adc}, test, seeds, progress, "source", cache),
            "pruned": crossbar_accuracy(pruned, {**hw, **ideal_adc}, test, seeds, progress, "pruned", cache),
        }
        acc["crossbar"]["cached_chips"] = cache.hits
    return {"sparsity": sparsity_report(pruned, masks, config), "adc_bits": adc_bits, "adc_energy": energy,
            "accuracy": acc}


# ---- bundle ------------------------------------------------------------------------------------

def write_manifest_extras(bundle_dir: Path, hardware: dict[str, Any], codesign: dict[str, Any]) -> None:
    """Add ``hardware`` (backend name -> default options) and ``metrics.codesign`` to the
    manifest ``finalize`` wrote (rewritten atomically, key order kept)."""
    import yaml

    from edgecloud.bundle import MANIFEST
    from edgecloud.export import _atomic_write

    path = bundle_dir / MANIFEST
    data = yaml.safe_load(path.read_text())
    data["hardware"] = hardware
    data["metrics"] = {**(data.get("metrics") or {}), "codesign": json.loads(json.dumps(codesign))}  # plain types
    _atomic_write(path, yaml.safe_dump(data, sort_keys=False))


def _e(j: float) -> str:
    return f"{j * 1e9:.4g} nJ"


def card_section(report: dict[str, Any]) -> str:
    """The model card's co-design section (appended to the card ``finalize`` wrote)."""
    s, m = report["settings"], report["measured"]
    hw = report["hardware"]["crossbar"]
    method = {"dub": "D.U.B. (discrete, unstructured, balanced per crossbar; Ibrayev et al., arXiv 2403.13082)",
              "magnitude": "magnitude pruning",
              "group-lasso": "crossbar-aware group lasso (column and row segments per array)"}[s["method"]]
    if s.get("match_sparsity"):
        method += f", each layer pruned to the sparsity it has in `{s['match_sparsity']}`"
    elif s.get("ratio") is not None:
        method += f", ratio {s['ratio']} of each layer"
    phases = report["phases"]
    lines = [
        "", "## Crossbar co-design: pruned for ADC efficiency (measured)", "",
        f"Pruned from `{report['source']}` with {method}, tile = crossbar array of {s['rows']} rows x "
        f"{s['cols']} columns ({s['outputs_per_array']} outputs per array on differential pairs), layers: "
        f"{s['layers']}. The manifest's `hardware: {{crossbar: {json.dumps(hw)}}}` gives every array the ADC "
        "resolution its densest column needs.", "",
        "Exact command:", "", "```bash", report["command"], "```", "",
        f"- data: {report['data']}",
        f"- seed: {report['seed']}",
        "- phases: " + ("; ".join(f"{k} {v['epochs']} epochs, {v['wall_time_s']} s" for k, v in phases.items())
                        or "none (pruned without training)"),
        "- settings: " + ", ".join(f"{k} {v}" for k, v in s.items() if v is not None and k not in ("rows", "cols")),
        f"- wall time: {report['wall_time_s']} s for the command's last invocation (training phases: "
        f"{report['train_wall_time_s']} s, summed over resumes); {report['threads']} torch threads on "
        f"{report['cpu_count']} CPUs ({report['cpu']}), torch {report['torch']}",
        "",
        f"Pruned weights: {m['sparsity']['sparsity']:.4f} of {m['sparsity']['weights']:,}.", "",
        "Levels are counted per D.U.B. array (row tile x group of outputs sharing an ADC setting); the ADC "
        "bits per physical array as the crossbar backend programs the bundle, where each weight's bit slices "
        "sit on their own columns (so a layer has slices x as many physical arrays, and a zero slice of a "
        "small weight is a zero cell in SOURCE too).", "",
        "| layer | weights | pruned | D.U.B. arrays | levels (bits saved: arrays) | ADC bits per physical array, "
        "pruned (bits: arrays) | SOURCE |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, bits in m["adc_bits"].items():
        sp = m["sparsity"]["layers"].get(name)
        fmt = lambda h: ", ".join(f"{b}b: {n}" for b, n in h.items())  # noqa: E731
        if sp:
            lines.append(f"| {name} | {sp['weights']} | {sp['sparsity']:.4f} | {sp['arrays']} | "
                         f"{', '.join(f'{k}: {v}' for k, v in sp['levels'].items())} | {fmt(bits['pruned'])} | "
                         f"{fmt(bits['source'])} |")
        else:
            lines.append(f"| {name} (not pruned) | | | | | {fmt(bits['pruned'])} | {fmt(bits['source'])} |")
    lines += ["", "ADC energy per inference (cost model, `edgecloud.cim.cost`, same arrays; ideal ADC: lossless "
              "full resolution per row tile less the bits each array saves):", "",
              "| ADC law | SOURCE | SOURCE, sparsity-aware ADC | pruned | SOURCE / pruned | "
              "sparsity-aware SOURCE / pruned |", "|---|---|---|---|---|---|"]
    for law, e in m["adc_energy"].items():
        lines.append(f"| {law} | {_e(e['source_j'])} | {_e(e['source_sparsity_adc_j'])} | {_e(e['pruned_j'])} | "
                     f"{e['ratio']}x | {e['ratio_vs_source_sparsity_adc']}x |")
    acc = m["accuracy"]
    lines += ["", f"Test accuracy ({acc['test_samples']} images):", "", "| | SOURCE | pruned |", "|---|---|---|",
              f"| digital | {acc['digital']['source']:.4f} | {acc['digital']['pruned']:.4f} |"]
    if "crossbar" in acc:
        c = acc["crossbar"]
        lines.append(f"| crossbar typical, ideal ADC, {c['chips']} chips (seeds {c['seeds'][0]}.."
                     f"{c['seeds'][-1]}), mean ± std | {c['source']['mean']:.4f} ± {c['source']['std']:.4f} | "
                     f"{c['pruned']['mean']:.4f} ± {c['pruned']['std']:.4f} |")
    lines.append("")
    return "\n".join(lines)


# ---- the whole run -----------------------------------------------------------------------------

def run_prune(config: PruneConfig, progress: bool = True) -> dict[str, Any]:
    """Regularise, prune, fine-tune, export and measure (module docstring); returns the report,
    which also goes to the bundle's manifest (``metrics.codesign``) and model card."""
    from edgecloud.train.loop import finalize, load_splits

    started = time.perf_counter()
    config.validate()
    source = load_source(config)
    out = config.out_dir(source.name)
    work = config.work_dir(out)
    if out.resolve() == Path(source.bundle.path).resolve():
        raise ValueError(f"--out {out} is SOURCE's own folder; write the pruned bundle elsewhere")
    name = out.name
    recipes = phase_recipes(source, config, name, work)
    recipe = recipes[1]  # the bundle is exported with the prune + fine-tune recipe
    splits = load_splits(recipe)
    if splits.test is None or not len(splits.test):
        raise ValueError(f"no test split for {recipe.data.dataset} under {recipe.data.root or 'the default root'}")
    work.mkdir(parents=True, exist_ok=True)
    (work / "command.txt").write_text(config.command + "\n")
    model, masks, records = run_phases(source, config, recipes, work, splits, progress)

    train_wall = round(sum(r.wall_time_s for r in records.values()), 1)
    history = [{"stage": phase, **h} for phase, r in records.items() for h in r.history]
    settings = {"method": config.method, "rows": config.rows, "cols": config.cols,
                "outputs_per_array": config.opa, "layers": config.layers,
                "regularize_epochs": config.regularize_epochs, "finetune_epochs": config.finetune_epochs,
                "lambda_var": config.lam("lambda_var") if config.method == "dub" else None,
                "lambda_l2": config.lam("lambda_l2") if config.regularize_epochs else None,
                "lambda_group": config.lam("lambda_group") if config.method == "group-lasso" else None,
                "ratio": config.ratio, "match_sparsity": config.match_sparsity,
                "tol": config.tol if config.method != "magnitude" else None,
                "lr": recipe.optim.lr, "batch_size": recipe.optim.batch_size, "limit_train": config.limit_train}
    training = {"command": config.command, "source": source.name, "pruning": settings,
                "epochs": sum(r.epochs for r in records.values()), "wall_time_s": train_wall,
                "cpu_count": os.cpu_count(), "history": [{k: v for k, v in h.items() if k != "lr"} for h in history]}
    path, metrics = finalize(model, recipe, out, splits=splits, name=name, training=training)
    measured = measure(source, model, masks, config, splits, recipe.seed, progress)
    report = {
        "bundle": str(path), "name": name, "source": source.name, "source_path": str(source.bundle.path),
        "method": config.method, "command": config.command, "seed": recipe.seed,
        "data": (f"{recipe.data.dataset}: {len(splits.train)} train / {len(splits.val)} validation / "
                 f"{len(splits.test)} test images" + (f" (seeded subset: --limit-train {config.limit_train})"
                                                      if config.limit_train else "")),
        "settings": settings, "hardware": config.hardware(),
        "phases": {k: {"epochs": r.epochs, "wall_time_s": round(r.wall_time_s, 1)} for k, r in records.items()},
        "train_wall_time_s": train_wall, "work": str(work),
        "torch": str(torch.__version__), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "cpu": cpu_info().model,
        "measured": measured,
        "test_accuracy": metrics.get("test_accuracy"),
    }
    report["wall_time_s"] = round(time.perf_counter() - started, 1)  # this invocation
    write_manifest_extras(Path(path), config.hardware(), {k: v for k, v in report.items()
                                                           if k not in ("bundle", "source_path", "work")})
    readme = Path(path) / "README.md"
    readme.write_text(readme.read_text().rstrip("\n") + "\n" + card_section(report))
    return report


def command_line(argv: list[str]) -> str:
    return shlex.join(["edgecloud", *argv])

