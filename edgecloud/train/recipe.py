"""Training recipes: one YAML file per trained model, shipped in ``edgecloud/train/recipes``.

A recipe names the family and its arch kwargs, the data, the optimiser and schedule, the
per-exit loss weights, how the bundle's exit threshold is chosen (on the validation split) and
how the offloaded tensor travels to the cloud (``offload``: fp32, fp16 or uint8 calibrated on
the validation split; see :mod:`edgecloud.offload`). ``init``, ``distill`` and ``freeze`` build on
other runs (:mod:`edgecloud.train.warmstart`): start from a trained network's weights, learn from
a teacher's outputs, keep a part fixed. ``prune_regularizer`` and ``masks`` are the two phases of
crossbar-attuned pruning (:mod:`edgecloud.codesign.dub`): train with a sparsity regulariser, then
prune and fine-tune with the masks fixed. ``supernet`` trains a NAX weight-sharing supernet
(:mod:`edgecloud.codesign.nax`): several kernel configurations per step.

Sample-efficient training options (airbench, Jordan 2024, arXiv 2404.00498; all off by default):
``optim.ema`` validates and returns an exponential moving average of the weights;
``data.flip: alternating`` mirrors each image in every other epoch (random in epoch 0);
``optim.lookahead`` pulls the weights towards slow weights every k steps (Zhang et al. 2019);
``eval.tta_flip`` also records validation accuracy averaging the logits of image and mirror;
``optim.binary_weights_from_epoch`` trains binary-weight layers with real weights first, binary
ones from that epoch on (two-step training, Real-to-Binary / ReActNet); the ``resnet`` family's
``arch.whiten_stem`` is airbench's frozen 2x2 patch-whitening first layer.

``load_recipe(name, sets)`` applies ``--set KEY=VALUE`` overrides (dotted path, YAML value) to the
recipe's YAML before validation, so an override is checked like the file and recorded with it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgecloud.offload import DEFAULT_PERCENTILE


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: Literal["fashion-mnist", "mnist", "cifar10"]
    root: str | None = None          # None: the data set's default folder / environment variable
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # held out of TRAIN for threshold selection
    crop_padding: int = 0
    hflip: bool = False              # random horizontal flips (same as ``flip: random``)
    # "alternating" (airbench): epoch 0 flips a seeded random half of the images, every later epoch
    # flips exactly the images the previous one did not; None: ``hflip`` decides ("random" is stored as
    # hflip: true, so both spellings are one run and one checkpoint).
    flip: Literal["random", "alternating"] | None = None
    train_limit: int | None = None   # use only the first N training samples (smoke runs)

    @model_validator(mode="after")
    def _check_flip(self) -> "DataSpec":
        if self.hflip and self.flip not in (None, "random"):
            raise ValueError(f"data: hflip: true is random flipping; it contradicts flip: {self.flip} (drop hflip)")
        if self.flip == "random":  # stored as hflip: the same run, checkpoint and manifest as hflip: true
            self.hflip, self.flip = True, None
        return self

    @property
    def flip_mode(self) -> Literal["random", "alternating"] | None:
        """The flip augmentation in effect (``hflip: true`` is ``random``)."""
        return self.flip or ("random" if self.hflip else None)


class EmaSpec(BaseModel):
    """Exponential moving average of the weights (every ``every`` steps: avg = decay avg + (1 - decay) w;
    BN statistics copied from the trained net); validation and the returned model use the average."""

    model_config = ConfigDict(extra="forbid")
    decay: float = Field(0.99, ge=0.0, lt=1.0)
    every: int = Field(1, ge=1)  # optimiser steps between updates


class LookaheadSpec(BaseModel):
    """Lookahead (Zhang et al. 2019): every ``k`` steps the slow weights move ``alpha`` of the way to
    the fast (trained) weights and the fast weights restart from them."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(5, ge=1)
    alpha: float = Field(0.5, gt=0.0, le=1.0)


class OptimSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_fraction: float = Field(0.15, ge=0.0, lt=1.0)  # of all steps (onecycle pct_start / cosine warm-up)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    exit_weights: list[float] | None = None  # one per output (edge exits..., cloud); default all 1
    channels_last: bool = True
    grad_clip: float | None = None
    # "bf16": autocast forward/backward in bfloat16 where the CPU has it natively (AMX/AVX512-BF16: ~1.8x
    # faster for FP convs), float32 elsewhere (emulated bf16 is many times slower; edgecloud.train.perf);
    # the weights, the optimiser and every evaluation stay float32.
    precision: Literal["fp32", "bf16"] = "fp32"
    ema: EmaSpec | None = None              # validate / return an exponential moving average of the weights
    lookahead: LookaheadSpec | None = None  # Lookahead around the optimiser
    # Two-step binary training: before this epoch (0-based) binary-weight layers train with their real
    # weights (binary activations as configured), from it on with binary weights. None: binary throughout.
    binary_weights_from_epoch: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check_two_step(self) -> "OptimSpec":
        if self.binary_weights_from_epoch is not None and self.binary_weights_from_epoch >= self.epochs:
            raise ValueError(f"optim.binary_weights_from_epoch ({self.binary_weights_from_epoch}) must be below "
                             f"epochs ({self.epochs}): the last epoch must train the binary weights")
        return self


class EvalSpec(BaseModel):
    """How validation accuracy is measured during training (no effect on the weights or the bundle)."""

    model_config = ConfigDict(extra="forbid")
    # also record ``val_accuracy_tta``: argmax of the mean logits of each image and its mirror
    tta_flip: bool = False


class ThresholdSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: Literal["entropy", "max_prob"] = "entropy"
    # "auto": the largest edge-exit share on VALIDATION whose accuracy stays within
    # ``max_drop`` points of the cloud-only (final exit) accuracy; or a fixed number.
    threshold: Literal["auto"] | float = "auto"
    max_drop: float = Field(0.5, ge=0.0)
    # With a reference run (e.g. the full-precision baseline trained with the same budget), "auto"
    # measures the drop from THAT run's final validation accuracy instead of this model's cloud-only one.
    reference: str | None = None


class OffloadSpec(BaseModel):
    """How the edge sends the cloud its input (the bundle's ``cloud.encoding``).

    ``uint8`` is calibrated by ``finalize`` on the VALIDATION split's offloaded features: the
    range spans their ``100 - percentile`` .. ``percentile`` percentiles (always containing 0).
    Only the export depends on it, so changing it never requires retraining
    (``edgecloud export CHECKPOINT --encoding ...``).
    """

    model_config = ConfigDict(extra="forbid")
    encoding: Literal["fp32", "fp16", "uint8"] = "fp32"
    percentile: float = Field(DEFAULT_PERCENTILE, gt=50.0, le=100.0)  # uint8 calibration only


class InitSpec(BaseModel):
    """Start from another run's weights (``checkpoint``: a run folder or its ``checkpoint.pt``);
    the family's ``init_from`` decides what maps where (hybrid nets: a full-precision ResNet of
    the same layout; MEANet: its cloud model)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str


class DistillSpec(BaseModel):
    """Knowledge distillation from a trained teacher run (Hinton et al. 2015): every output's loss
    becomes ``(1 - alpha) CE + alpha T^2 KL(teacher_T || output_T)`` against the teacher's
    final output."""

    model_config = ConfigDict(extra="forbid")
    teacher: str
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    temperature: float = Field(4.0, gt=0.0)


def pixels(value: Any) -> Any:
    """``"2/255"`` -> 2/255: perturbation budgets are written in grey levels."""
    if isinstance(value, str) and "/" in value:
        num, _, den = value.partition("/")
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"not a number or a fraction: {value!r}") from exc
    return value


class AdversarialSpec(BaseModel):
    """PGD adversarial training (Madry et al. 2018): each batch is replaced by (or, with
    ``fraction`` < 1, partly mixed with) L-inf PGD examples crafted against the current weights,
    in eval mode (BN statistics stay those of clean data), with a seeded random start.
    ``steps: 1`` with a random start is "fast" FGSM-RS training (Wong et al. 2020)."""

    model_config = ConfigDict(extra="forbid")
    eps: float = Field(gt=0.0, le=1.0)       # pixels in [0, 1]; "8/255" accepted
    steps: int = Field(3, ge=1)
    step_size: float | None = Field(None, gt=0.0)  # default 2.5 eps / steps
    fraction: float = Field(1.0, gt=0.0, le=1.0)   # share of each batch replaced by its adversarial copy

    @field_validator("eps", "step_size", mode="before")
    @classmethod
    def _fraction(cls, value: Any) -> Any:
        return pixels(value)


class PruneRegularizerSpec(BaseModel):
    """A sparsity regulariser added to every training step's loss, on the float weights of the
    quantized conv layers (``layers: all``: and linear layers; binary-weight layers never):
    ``lambda_l2 ||W||^2`` plus, for ``dub`` (Ibrayev et al. 2024), ``lambda_var`` x the variance of
    the (``gate``d) Hoyer L0 proxies of the columns sharing a crossbar, or for ``group-lasso``
    (their baseline) ``lambda_group`` x the L2 norms of every column and row segment of each array.

    Arrays are ``rows`` x ``outputs_per_array`` outputs. The default ``outputs_per_array`` is
    ``rows // 2``: a square ``rows`` x ``rows`` crossbar holds each signed weight on a pair of
    physical columns (``crossbar.py``: cols / 2 pairs), so ``rows // 2`` outputs share its ADC
    setting. Set it to ``cols // 2`` of the backend the bundle targets. The L2 term is on top of
    the optimiser's ``weight_decay`` (the paper used plain L2; set ``optim.weight_decay: 0``
    to match it)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["dub", "group-lasso"] = "dub"
    lambda_var: float = Field(1e-3, ge=0.0)
    lambda_l2: float = Field(1e-3, ge=0.0)
    lambda_group: float = Field(1e-4, ge=0.0)
    rows: int = Field(64, ge=1)
    outputs_per_array: int | None = Field(None, ge=1)  # None: rows // 2 (filled in on validation)
    gate: bool = True
    layers: Literal["conv", "all"] = "conv"

    @model_validator(mode="after")
    def _default_outputs(self) -> "PruneRegularizerSpec":
        if self.outputs_per_array is None:
            self.outputs_per_array = max(1, self.rows // 2)
        return self

    def penalty_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`edgecloud.codesign.dub.model_penalty`."""
        return self.model_dump()


class MaskSpec(BaseModel):
    """Fine-tuning with fixed pruning masks: the pruned weights stay exactly zero.

    The masks come from ``file`` (a ``torch.save``d dict: quantized layer name -> bool mask, True =
    kept) or are computed by ``method`` from the weights the run starts from (so with ``init``: the
    regularised run's weights), over the same layers as :class:`PruneRegularizerSpec`. ``dub``:
    the D.U.B. prune step (``tol``: what counts as zero); ``magnitude``: drop ``ratio`` of each
    layer's weights; ``group-lasso``: drop crossbar column/row segments whose norm is <= ``tol``.
    The loop zeroes the pruned weights' gradients and multiplies the weights by the masks after
    each optimiser step (in place: the state_dict, checkpoints and bundles are ordinary)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["dub", "magnitude", "group-lasso"] | None = None
    file: str | None = None
    rows: int = Field(64, ge=1)
    outputs_per_array: int | None = Field(None, ge=1)  # None: rows // 2
    tol: float = Field(1e-3, ge=0.0)
    ratio: float | dict[str, float] | None = None  # magnitude (required), group-lasso (optional);
    # one for every layer or one per layer name
    layers: Literal["conv", "all"] = "conv"

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, value):
        values = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if any(not 0.0 <= float(v) <= 1.0 for v in values):
            raise ValueError(f"masks: ratio must lie in [0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _check(self) -> "MaskSpec":
        if (self.method is None) == (self.file is None):
            raise ValueError("masks: give exactly one of method (prune at the start) or file (saved masks)")
        if self.method == "magnitude" and self.ratio is None:
            raise ValueError("masks: magnitude pruning needs a ratio")
        if self.outputs_per_array is None:
            self.outputs_per_array = max(1, self.rows // 2)
        return self


class SupernetSpec(BaseModel):
    """One-shot supernet training for NAX (:mod:`edgecloud.codesign.nax`), for a family with
    elastic kernels (``resnet_q_elastic``). Every step trains several sub-networks on the same batch,
    each one's loss divided by their number and its gradients accumulated before the one optimiser
    step (the sandwich rule of slimmable networks / BigNAS, as Once-for-All trains elastic kernels):
    ``max`` = every block conv at its largest kernel, ``min`` = at its smallest, ``random`` = each
    conv uniformly among the family's ``kernel_choices``, drawn from the recipe seed and the step
    number (a resumed run draws the same). A step costs about ``len(sandwich)`` plain steps."""

    model_config = ConfigDict(extra="forbid")
    sandwich: list[Literal["max", "min", "random"]] = Field(
        default_factory=lambda: ["max", "min", "random", "random"], min_length=1)


# Recipe sections that do not change what is trained: the bundle's export (offload, baseline) and
# what validation measures (eval).
EXPORT_ONLY = ("offload", "baseline", "eval", "hardware")
# Sections added after checkpoints already existed: left out of the comparison when unset, so
# those checkpoints still resume.
OPTIONAL_TRAINING = ("prune_regularizer", "masks", "supernet")
# The same for fields added to a section: (section, field) -> the default that old checkpoints meant.
OPTIONAL_FIELDS: dict[tuple[str, str], Any] = {
    ("data", "flip"): None, ("optim", "ema"): None, ("optim", "lookahead"): None,
    ("optim", "binary_weights_from_epoch"): None,
}


def training_fields(dump: dict[str, Any]) -> dict[str, Any]:
    """What of a recipe dump a checkpoint must match to be resumed (see :meth:`Recipe.training_dump`)."""
    out = {k: v for k, v in dump.items()
           if k not in EXPORT_ONLY and not (k in OPTIONAL_TRAINING and v is None)}
    for (section, name), default in OPTIONAL_FIELDS.items():
        if isinstance(out.get(section), dict) and name in out[section] and out[section][name] == default:
            out[section] = {k: v for k, v in out[section].items() if k != name}
    return out


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str                       # bundle name
    description: str = ""
    family: str
    arch: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    data: DataSpec
    optim: OptimSpec = Field(default_factory=OptimSpec)
    exits: ThresholdSpec = Field(default_factory=ThresholdSpec)
    stages: list[dict[str, Any]] = Field(default_factory=list)  # family-specific extra stages (MEANet)
    init: InitSpec | None = None          # start from another run's weights
    distill: DistillSpec | None = None    # learn from a teacher run's outputs
    freeze: list[str] = Field(default_factory=list)  # submodules kept fixed (eval mode, no gradient)
    adversarial: AdversarialSpec | None = None  # PGD adversarial training
    prune_regularizer: PruneRegularizerSpec | None = None  # D.U.B. / group-lasso sparsity regulariser
    masks: MaskSpec | None = None          # fine-tune with fixed pruning masks
    supernet: SupernetSpec | None = None   # NAX: train an elastic-kernel supernet (sandwich rule)
    offload: OffloadSpec = Field(default_factory=OffloadSpec)  # wire encoding of the cloud input
    eval: EvalSpec = Field(default_factory=EvalSpec)  # extra validation measurements (flip TTA)
    # The run whose network, at full precision, is the energy baseline of the bundle (default: this
    # network at full precision). Set it when the edge is wider than the network it replaces.
    baseline: str | None = None
    # Backend defaults written into the bundle's manifest (``hardware: {crossbar: {layers: ...}}``,
    # e.g. a NAX network's per-layer crossbar sizes), so `eval` and the daemon run the bundle on the
    # hardware it was designed for. Export-only: it never changes what is trained.
    hardware: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def training_dump(self) -> dict[str, Any]:
        """The recipe as JSON without the export-only ``offload``, ``baseline`` and ``hardware`` and the
        validation-only ``eval``: what a checkpoint must match to be resumed (none changes what is
        trained); unset sections of ``OPTIONAL_TRAINING`` and unset ``OPTIONAL_FIELDS`` are left out too."""
        return training_fields(self.model_dump(mode="json"))


def recipes_dir() -> Path:
    return Path(str(resources.files("edgecloud.train").joinpath("recipes")))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def parse_set(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set`` -> (dotted key, value parsed as YAML: ``0.2``, ``true``, ``{k: 5}``)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
        raise ValueError(f"--set {item!r}: expected KEY=VALUE (a dotted recipe path, e.g. optim.lr=0.05)")
    if not key or any(not part.strip() for part in key.split(".")):
        raise ValueError(f"--set {item!r}: empty key or key part (expected e.g. optim.ema.decay=0.99)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"--set {key}: the value {text!r} is not valid YAML ({why})") from exc
    return key, value


def apply_overrides(data: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """A copy of the recipe dict with every ``--set KEY=VALUE`` applied in order.

    Missing or null mappings on the way are created (``optim.ema.decay=0.99`` turns EMA on with
    its other fields at their defaults); an integer part indexes a list (``optim.exit_weights.0``).
    ``data.flip`` decides the flip mode: ``hflip`` (the old spelling of ``flip: random``) is
    dropped with it unless it is set too, so ``data.flip=alternating`` works on an ``hflip: true`` recipe.
    """
    import copy

    out = copy.deepcopy(data)
    keys: list[str] = []
    for item in sets:
        key, value = parse_set(item)
        parts = [p.strip() for p in key.split(".")]
        node: Any = out
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[:depth]) or "the recipe"
            if isinstance(node, list):
                try:
                    index = int(part)
                    node[index]  # noqa: B018 - range check
                except (ValueError, IndexError):
                    raise ValueError(f"--set {key}: {where} is a list of {len(node)}; {part!r} is not an index "
                                     f"in it") from None
                if last:
                    node[index] = value
                else:
                    if node[index] is None:
                        node[index] = {}
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ValueError(f"--set {key}: {where} is {node!r}, not a mapping or a list")
        keys.append(".".join(parts))
    if "data.flip" in keys and "data.hflip" not in keys and isinstance(out.get("data"), dict):
        out["data"].pop("hflip", None)
    return out


def _error_keys(exc: ValidationError, keys: list[str]) -> list[str]:
    """The overridden keys a validation error is about (its location and the key share a prefix)."""
    hits = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        for key in keys:
            parts = key.split(".")
            n = min(len(loc), len(parts))
            if loc[:n] == parts[:n] and key not in hits:
                hits.append(key)
    return hits or keys


def load_recipe(name_or_path: str | Path, sets: Sequence[str] = ()) -> Recipe:
    """A shipped recipe by name (``fmnist-hybrid``) or any YAML file path, with ``--set KEY=VALUE``
    overrides applied before validation (an invalid override is named in the error)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = recipes_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"no recipe {str(name_or_path)!r}: not a file and not one of {', '.join(list_recipes())}"
        )
    with path.open() as fh:
        data = yaml.safe_load(fh)
    if sets:
        if not isinstance(data, dict):
            raise ValueError(f"invalid recipe {path}: not a mapping")
        changed = apply_overrides(data, sets)
        try:
            recipe = Recipe.model_validate(changed)
        except ValidationError as exc:
            try:
                Recipe.model_validate(data)
            except ValidationError:
                pass  # the file itself is invalid: reported below
            else:
                keys = _error_keys(exc, [parse_set(item)[0] for item in sets])
                raise ValueError(f"--set {', '.join(keys)}: invalid recipe {path} with this override: {exc}") from exc
        else:
            check_arch_sets(recipe, [parse_set(item)[0] for item in sets])
            return recipe
    try:
        return Recipe.model_validate(data)
    except Exception as exc:
        raise ValueError(f"invalid recipe {path}: {exc}") from exc


def check_arch_sets(recipe: Recipe, keys: Sequence[str]) -> None:
    """``arch`` is free-form for pydantic: an overridden ``arch.NAME`` must be an argument of the family,
    or the error would only come (as a TypeError) when the model is built."""
    from edgecloud.nets.registry import model_arguments

    whole = "family" in keys or "arch" in keys  # every arch argument is then up for checking
    names = set(recipe.arch) if whole else {k.split(".")[1] for k in keys if k.startswith("arch.")}
    if not names:
        return
    try:
        params = model_arguments(recipe.family)
    except KeyError as exc:
        raise ValueError(f"--set: {exc.args[0]}") from None
    unknown = sorted(names - params) if params is not None else []
    if unknown:
        raise ValueError(f"--set {', '.join('arch.' + n for n in unknown)}: family {recipe.family} has no argument "
                         f"{', '.join(unknown)} (its arguments: {', '.join(sorted(params))})")


def family_accepts(family: str, name: str) -> bool:
    """Whether ``family``'s constructor takes the arch argument ``name`` (e.g. ``whiten_stem``)."""
    from edgecloud.nets.registry import model_arguments

    try:
        params = model_arguments(family)
    except KeyError:
        return False
    return params is None or name in params
