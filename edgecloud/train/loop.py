"""The training loop: joint multi-exit loss, checkpoint every epoch, resume, seeded.

``run_training(recipe, out_dir)`` trains (or resumes) and returns the trained model; the run
folder holds ``checkpoint.pt`` (model, optimiser, schedule, epoch, history, wall time) and
``history.json``. ``finalize`` calibrates the offload encoding (``recipe.offload``) and picks
the exit threshold on the validation split, measures the test split as it will be served (the
cloud exit on encoded features) and exports the bundle.

Pruning (:mod:`edgecloud.codesign.dub`): with ``prune_regularizer`` every step's loss gets the
D.U.B. / group-lasso penalty of the quantized layers' float weights (recorded per epoch as
``prune_penalty``). With ``masks`` the masks are made once at the start of a fresh run (pruned
from the starting weights, or loaded from a file; ``pruning.json`` and ``masks.pt`` record them),
saved in ``checkpoint.pt`` for resuming, and enforced on every step by zeroing the pruned
weights' gradients before the optimiser step and multiplying the weights by the masks after it.
In place rather than ``torch.nn.utils.prune``'s reparametrisation, so the parameters, the
state_dict keys (checkpoints, ``load_checkpoint``, ``init``) and the exported bundle stay those of
an ordinary model; re-applying after the step keeps the zeros exact whatever the optimiser does
(momentum, weight decay, resumed state). Family stages (MEANet) do not see the masks.

NAX supernet (``supernet``, :mod:`edgecloud.nets.resnet_elastic`): every step sets the model to
each kernel configuration of the recipe's sandwich in turn and accumulates the gradients of their
losses, each divided by their number, before the one optimiser step (the teacher, with
``distill``, runs once per batch); between steps the supernet sits at its largest kernels. The
per-epoch training loss and accuracy are those of each step's last sub-network.

Airbench options (all off by default; :mod:`edgecloud.train.ema`): with ``optim.lookahead`` the
slow weights are updated after the optimiser step (before the masks are re-applied); with
``optim.ema`` the average is updated after it, validation measures the average, the checkpoint's
``model`` holds the average (what ``load_checkpoint``, ``init`` and ``distill`` then use) and
``train_model`` the trained weights a resume continues from, and the returned model (and the one
family stages continue from) is the average. ``optim.binary_weights_from_epoch`` switches the
binary-weight layers from real to binary weights at that epoch (:func:`edgecloud.nn.quant.set_real_weights`;
derived from the epoch, so a resume needs no state). ``eval.tta_flip`` adds ``val_accuracy_tta``
(mean logits of each image and its mirror) to the history. A model with ``init_from_data``
(the ``resnet`` family's ``whiten_stem``) is initialised from the training images on a fresh run.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from edgecloud import offload
from edgecloud.bundle import CloudSpec
from edgecloud.cim.cpu import cpu_info
from edgecloud.data.dataset import ImageDataset, train_val_split
from edgecloud.data.loader import Loader
from edgecloud.data.registry import load_dataset
from edgecloud.nets import create_model
from edgecloud.train.device import describe, gpu_bf16, resolve_device
from edgecloud.train.exitstats import choose_threshold, policy_for, predict_exits, routed_metrics
from edgecloud.train.perf import autocast_bf16, training_precision
from edgecloud.train.recipe import MaskSpec, OptimSpec, Recipe, training_fields
from edgecloud.train.stages import run_stage
from edgecloud.train.warmstart import (
    CHECKPOINT, Distiller, frozen_modules, init_from_run, load_run_model, run_checkpoint,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Splits:
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset | None


def load_splits(recipe: Recipe, with_test: bool = True) -> Splits:
    """Train/validation from the TRAIN split (seeded, stratified); test only for reporting."""
    d = recipe.data
    full = load_dataset(d.dataset, "train", d.root)
    train, val = train_val_split(full, d.val_fraction, seed=recipe.seed)
    test = load_dataset(d.dataset, "test", d.root) if with_test else None
    if d.train_limit:  # seeded random subsets (image folders are ordered by class)
        rng = np.random.default_rng(recipe.seed)

        def pick(ds: ImageDataset, n: int) -> ImageDataset:
            return ds.subset(np.sort(rng.permutation(len(ds))[:min(n, len(ds))]))

        small = max(d.train_limit // 5, 100)
        train, val = pick(train, d.train_limit), pick(val, small)
        test = pick(test, small) if test is not None else None
    return Splits(train, val, test)


def build_model(recipe: Recipe) -> nn.Module:
    seed_everything(recipe.seed)
    return create_model(recipe.family, **recipe.arch)


class FlipAveraged(nn.Module):
    """Every output's logits averaged over the image and its mirror (airbench's test-time flip)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        plain, mirrored = self.model(x), self.model(x.flip(-1))
        plain = plain if isinstance(plain, (list, tuple)) else [plain]
        mirrored = mirrored if isinstance(mirrored, (list, tuple)) else [mirrored]
        return [(a.float() + b.float()) / 2 for a, b in zip(plain, mirrored)]


def evaluate_accuracy_tta(model: nn.Module, ds: ImageDataset, batch_size: int = 500) -> list[float]:
    """:func:`evaluate_accuracy` with flip TTA; a measurement only: the bundle serves single views."""
    return evaluate_accuracy(FlipAveraged(model), ds, batch_size)


def make_optimizer(model: nn.Module, o: OptimSpec) -> torch.optim.Optimizer:
    """No weight decay on BN parameters and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr)


def make_scheduler(opt: torch.optim.Optimizer, o: OptimSpec, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if o.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=o.lr, total_steps=total_steps, pct_start=max(o.warmup_fraction, 1e-3),
            cycle_momentum=o.optimizer == "sgd",
        )
    warm = int(o.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if o.schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def exit_weights(o: OptimSpec, n_outputs: int) -> list[float]:
    w = o.exit_weights or [1.0] * n_outputs
    if len(w) != n_outputs:
        raise ValueError(f"exit_weights has {len(w)} entries but the model has {n_outputs} outputs")
    return list(w)


def joint_loss(outputs: list[torch.Tensor], y: torch.Tensor, weights: list[float], smoothing: float) -> torch.Tensor:
    """Weighted sum of the cross-entropies of every exit (edge exits and the cloud)."""
    return sum(w * F.cross_entropy(o, y, label_smoothing=smoothing) for o, w in zip(outputs, weights) if w)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, ds: ImageDataset, batch_size: int = 500) -> list[float]:
    """Accuracy of every output on ``ds``."""
    probs = predict_exits(model, ds, batch_size)
    return [float((p.argmax(1) == ds.labels).float().mean()) for p in probs]


@torch.no_grad()
def offloaded_features(model: nn.Module, ds: ImageDataset, batch_size: int = 500) -> torch.Tensor:
    """The cloud input the edge produces for every sample of ``ds`` (no exit taken), float32."""
    feats = [offload.offload_features(model, x) for x, _ in Loader(ds, batch_size)]
    return torch.cat(feats) if feats else torch.zeros(0, *model.offload_shape())


@torch.no_grad()
def served_cloud_probs(model: nn.Module, ds: ImageDataset, spec: CloudSpec, batch_size: int = 500) -> torch.Tensor:
    """Softmax of the cloud exit for every sample of ``ds`` as served: the edge's features go
    through the wire encoding (``offload.encode`` then ``offload.decode``, the arithmetic the
    exported ``cloud.onnx`` decodes with) before the cloud part runs on them."""
    cloud = model.cloud_module().eval()
    out = []
    for x, _ in Loader(ds, batch_size):
        wire = offload.encode(offload.offload_features(model, x).numpy(), spec)
        out.append(torch.softmax(cloud(torch.from_numpy(offload.decode(wire, spec))).float(), dim=1))
    return torch.cat(out) if out else torch.zeros(0, getattr(model, "num_classes", 0))


def offload_spec(model: nn.Module, recipe: Recipe, val: ImageDataset) -> tuple[CloudSpec, dict[str, Any]]:
    """The bundle's offload encoding (``recipe.offload``), uint8 calibrated on the VALIDATION
    split's offloaded features; and a record of how, for the manifest."""
    o = recipe.offload
    base = CloudSpec(offload=model.offload_kind, input_shape=[int(v) for v in model.offload_shape()])
    record: dict[str, Any] = {"encoding": o.encoding}
    if o.encoding != "uint8":
        return offload.with_encoding(base, o.encoding), record
    if len(val) == 0:
        raise ValueError("uint8 offload is calibrated on the validation split, which is empty "
                         "(set data.val_fraction > 0 or use offload.encoding fp32/fp16)")
    spec = offload.with_encoding(base, "uint8", offloaded_features(model, val), o.percentile)
    record.update({"percentile": o.percentile, "scale": spec.scale, "zero_point": spec.zero_point,
                   "calibrated_on": f"validation split: the offloaded features of all {len(val)} samples "
                                    f"(no exit taken)"})
    return spec, record


def make_masks(model: nn.Module, spec: MaskSpec) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(masks, record): the fixed masks of ``spec`` for ``model``, applied to its weights."""
    from edgecloud.codesign.dub import apply_masks, check_masks, load_masks, prune_model

    if spec.file is not None:
        masks = load_masks(spec.file)
        check_masks(model, masks)
        apply_masks(model, masks)
        pruned = sum(int((~m).sum()) for m in masks.values())
        total = sum(int(m.numel()) for m in masks.values())
        return masks, {"file": spec.file, "weights": total, "sparsity": pruned / total if total else 0.0}
    result = prune_model(model, spec.method, spec.rows, spec.outputs_per_array, tol=spec.tol, ratio=spec.ratio,
                         layers=spec.layers, apply=True)
    return result.masks, {"rows": spec.rows, "outputs_per_array": spec.outputs_per_array, "tol": spec.tol,
                          **result.summary()}


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    epochs: int = 0
    device: str = "cpu"          # what the card says it trained on (edgecloud.train.device.describe)
    precision_used: str = "fp32"


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def run_training(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    resume: bool = False,
    splits: Splits | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    device: str = "cpu",
) -> TrainResult:
    """Train ``recipe`` into ``out_dir`` (checkpoint each epoch); with ``resume``, continue.

    ``stop_after``: stop after that many epochs of the schedule (time-boxed runs; resume later).
    ``device``: ``cpu`` or ``cuda[:N]`` (:mod:`edgecloud.train.device`); checkpoints load on either,
    and the returned model is on the CPU. Family stages (MEANet's) run on the CPU.
    """
    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    if on_gpu and recipe.adversarial:
        raise ValueError("--device cuda: adversarial training runs on the CPU only (train this recipe with --device cpu)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    o = recipe.optim
    splits = splits or load_splits(recipe, with_test=False)
    model = build_model(recipe)
    if o.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = Loader(splits.train, o.batch_size, shuffle=True, drop_last=len(splits.train) > o.batch_size,
                    crop_padding=recipe.data.crop_padding, flip=recipe.data.flip_mode, seed=recipe.seed,
                    channels_last=o.channels_last)
    ckpt_path = out / CHECKPOINT
    if hasattr(model, "init_from_data") and not (resume and ckpt_path.is_file()):
        model.init_from_data(splits.train.images)  # data-dependent layers (patch whitening); resumes load them
    if recipe.init and not (resume and ckpt_path.is_file()):
        left = init_from_run(model, recipe.init.checkpoint)
        if progress and left:
            tqdm.write(f"init from {recipe.init.checkpoint}: fresh weights in {', '.join(left)}")
    frozen = frozen_modules(model, recipe.freeze)
    distiller = Distiller(recipe.distill, channels_last=o.channels_last, device=dev) if recipe.distill else None
    bf16 = gpu_bf16(o.precision, dev) if on_gpu else autocast_bf16(o.precision)
    adversary = None
    if recipe.adversarial:
        from edgecloud.train.adversarial import Adversary

        adversary = Adversary(recipe.adversarial, seed=recipe.seed, bf16=bf16)
    penalty_kwargs = recipe.prune_regularizer.penalty_kwargs() if recipe.prune_regularizer else None
    masks: dict[str, torch.Tensor] | None = None
    if recipe.masks and not (resume and ckpt_path.is_file()):
        from edgecloud.codesign.dub import save_masks

        masks, prune_record = make_masks(model, recipe.masks)
        save_masks(masks, out / "masks.pt")
        (out / "pruning.json").write_text(json.dumps(prune_record, indent=1))
        if progress:
            tqdm.write(f"masks ({recipe.masks.method or recipe.masks.file}): "
                       f"{prune_record['sparsity']:.4f} of {prune_record['weights']} weights pruned")
    model = model.to(dev)
    opt = make_optimizer(model, o)
    sched = make_scheduler(opt, o, o.epochs * len(loader))
    ema = lookahead = None
    if o.ema is not None or o.lookahead is not None:
        from edgecloud.train.ema import Lookahead, WeightEMA, optimizer_params

        ema = WeightEMA(model, o.ema) if o.ema is not None else None
        lookahead = Lookahead(optimizer_params(opt), o.lookahead) if o.lookahead is not None else None
    two_step = o.binary_weights_from_epoch is not None
    if two_step:
        from edgecloud.nn.quant import set_real_weights

        if not set_real_weights(model, False):
            raise ValueError("optim.binary_weights_from_epoch: the model has no binary-weight layer")
    history: list[dict[str, Any]] = []
    start_epoch, wall = 0, 0.0
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = training_fields(ckpt["recipe"])
        if saved != recipe.training_dump():
            raise ValueError(f"{ckpt_path} was written by a different recipe/settings; resume with the same ones")
        model.load_state_dict(ckpt.get("train_model", ckpt["model"]))  # with EMA, "model" is the average
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch, history, wall = ckpt["epoch"], ckpt["history"], ckpt["wall_time_s"]
        torch.set_rng_state(ckpt["torch_rng"])
        if adversary is not None and "adversary_rng" in ckpt:
            adversary.generator.set_state(ckpt["adversary_rng"])
        if recipe.masks:
            if "masks" not in ckpt:
                raise ValueError(f"{ckpt_path} holds no pruning masks but the recipe has masks")
            masks = ckpt["masks"]
        if ema is not None and "ema" in ckpt:  # absent after family stages: the average is in "model"
            ema.load_state_dict(ckpt["ema"])
        if lookahead is not None and "lookahead" in ckpt:
            lookahead.load_state_dict(ckpt["lookahead"])
    if masks is not None:
        from edgecloud.codesign.dub import apply_masks, mask_gradients

        masks = {name: m.to(dev) for name, m in masks.items()}
    if penalty_kwargs is not None:
        from edgecloud.codesign.dub import model_penalty
    if recipe.supernet is not None:
        from edgecloud.nets.resnet_elastic import sample_subnets
    weights = exit_weights(o, len(getattr(model, "exit_names", [])) + 1)
    last = o.epochs if stop_after is None else min(o.epochs, stop_after)
    for epoch in range(start_epoch, last):
        t0 = time.perf_counter()
        model.train()
        for mod in frozen:
            mod.eval()  # BN statistics stay those of the trained part
        loader.set_epoch(epoch)
        if two_step:  # phase 1 (real weights) before binary_weights_from_epoch
            for net in (model, *([ema.module] if ema is not None else [])):
                set_real_weights(net, epoch < o.binary_weights_from_epoch)
        total, count, correct, penalty_sum, steps = 0.0, 0, 0, 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{o.epochs}", disable=not progress, leave=False,
                   mininterval=1.0, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            if on_gpu:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if adversary is not None:
                x = adversary.perturb(model, x, y, frozen)
            # a NAX supernet trains several kernel configurations per step (gradients accumulated)
            subnets = ([None] if recipe.supernet is None else
                       sample_subnets(model, recipe.supernet.sandwich, recipe.seed, epoch * len(loader) + step))
            opt.zero_grad(set_to_none=True)
            for j, subnet in enumerate(subnets):
                if subnet is not None:
                    model.set_kernels(subnet)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    outputs = [out.float() for out in model(x)]
                    if j == 0:
                        teacher = distiller.logits(x) if distiller else None
                if distiller:
                    loss = distiller.loss(outputs, y, teacher, weights, o.label_smoothing)
                else:
                    loss = joint_loss(outputs, y, weights, o.label_smoothing)
                if penalty_kwargs is not None:  # float32, outside autocast
                    penalty = model_penalty(model, **penalty_kwargs)
                    loss = loss + penalty
                    penalty_sum += float(penalty.detach())
                    steps += 1
                (loss / len(subnets)).backward()
            if recipe.supernet is not None:
                model.set_kernels(None)  # between steps (validation, checkpoints): every conv at its largest kernel
            if masks is not None:
                mask_gradients(model, masks)
            if o.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            global_step = epoch * len(loader) + step + 1
            if lookahead is not None:
                lookahead.step(global_step)
            if masks is not None:
                apply_masks(model, masks)
            sched.step()
            if ema is not None:
                ema.step(model, global_step)
            total += float(loss.detach()) * len(y)
            count += len(y)
            correct += int((outputs[-1].detach().argmax(1) == y).sum())
            bar.set_postfix(loss=f"{total / count:.3f}", acc=f"{correct / count:.3f}", refresh=False)
        if ema is not None and ema.ready:
            ema.sync_buffers(model)
        judged = ema.module if ema is not None and ema.ready else model
        val_acc = evaluate_accuracy(judged, splits.val) if len(splits.val) else []
        val_tta = evaluate_accuracy_tta(judged, splits.val) if recipe.eval.tta_flip and len(splits.val) else None
        wall += time.perf_counter() - t0
        record = {"epoch": epoch + 1, "loss": total / max(count, 1), "train_accuracy": correct / max(count, 1),
                  "val_accuracy": val_acc, "lr": opt.param_groups[0]["lr"], "wall_time_s": round(wall, 1)}
        if val_tta is not None:
            record["val_accuracy_tta"] = val_tta
        if penalty_kwargs is not None:
            record["prune_penalty"] = penalty_sum / max(steps, 1)
        history.append(record)
        if progress:
            accs = " ".join(f"{a:.4f}" for a in val_acc)
            tqdm.write(f"epoch {epoch + 1}/{o.epochs}: loss {record['loss']:.4f} val acc per exit [{accs}] "
                       f"({wall:.0f} s)")
        _save(ckpt_path, {
            "recipe": recipe.model_dump(mode="json"), "epoch": epoch + 1, "model": judged.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history,
            "wall_time_s": wall, "torch_rng": torch.get_rng_state(),
            **({"adversary_rng": adversary.generator.get_state()} if adversary is not None else {}),
            **({"masks": masks} if masks is not None else {}),
            **({"train_model": model.state_dict(), "ema": ema.state_dict()} if ema is not None else {}),
            **({"lookahead": lookahead.state_dict()} if lookahead is not None else {}),
        })
        (out / "history.json").write_text(json.dumps(history, indent=1))
    if two_step:  # the returned model, stages and exports run binary weights
        for net in (model, *([ema.module] if ema is not None else [])):
            set_real_weights(net, False)
    if ema is not None and ema.ready:
        ema.sync_buffers(model)
        model.load_state_dict(ema.module.state_dict())
    model = model.cpu()
    if last == o.epochs and recipe.stages:
        done = 0
        if resume and ckpt_path.is_file():
            done = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("stages_done", 0)
        for k, spec in enumerate(recipe.stages):
            if k < done:
                continue
            t0 = time.perf_counter()
            history += run_stage(spec, model, splits.train, splits.val, seed=recipe.seed, data=recipe.data,
                                 progress=progress)
            wall += time.perf_counter() - t0
            _save(ckpt_path, {
                "recipe": recipe.model_dump(mode="json"), "epoch": o.epochs, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history,
                "wall_time_s": wall, "torch_rng": torch.get_rng_state(), "stages_done": k + 1,
                **({"masks": masks} if masks is not None else {}),
            })
    model = model.to(memory_format=torch.contiguous_format).eval()
    return TrainResult(model=model, history=history, wall_time_s=wall,
                       epochs=sum(1 for h in history if "stage" not in h), device=describe(dev),
                       precision_used="bf16" if bf16 else "fp32")


def load_checkpoint(path: str | Path) -> tuple[Recipe, nn.Module, dict[str, Any]]:
    """(recipe, model with the checkpoint's weights, raw checkpoint) from ``checkpoint.pt``."""
    ckpt = torch.load(run_checkpoint(path), map_location="cpu", weights_only=False)
    recipe = Recipe.model_validate(ckpt["recipe"])
    model = build_model(recipe)
    model.load_state_dict(ckpt["model"])
    return recipe, model.eval(), ckpt


def baseline_macs(run: str | Path, model: nn.Module) -> tuple[str, int]:
    """(name, MACs per sample) of the run's network at full precision, on ``model``'s input shape."""
    from edgecloud.export import input_spec_of
    from edgecloud.nets.layers import reference_macs

    base = load_run_model(run)
    shape, theirs = tuple(input_spec_of(model).shape), tuple(input_spec_of(base).shape)
    if theirs != shape:
        raise ValueError(f"baseline {run}: its input shape {list(theirs)} differs from {list(shape)}")
    return Path(run).name, reference_macs(base, shape)


def reference_val_accuracy(run: str | Path, recipe: Recipe) -> float:
    """Final validation accuracy of another run, which must have held out the same validation split."""
    ckpt = torch.load(run_checkpoint(run), map_location="cpu", weights_only=False)
    other = Recipe.model_validate(ckpt["recipe"])
    mine = (recipe.data.dataset, recipe.data.val_fraction, recipe.seed)
    theirs = (other.data.dataset, other.data.val_fraction, other.seed)
    if mine != theirs:
        raise ValueError(f"exits.reference {run}: its validation split (dataset, val_fraction, seed) = {theirs} "
                         f"differs from this recipe's {mine}")
    history = [h for h in ckpt["history"] if h.get("val_accuracy")]
    if not history:
        raise ValueError(f"exits.reference {run}: the run recorded no validation accuracy")
    return float(history[-1]["val_accuracy"][-1])


def finalize(
    model: nn.Module,
    recipe: Recipe,
    bundle_dir: str | Path,
    *,
    splits: Splits | None = None,
    training: dict[str, Any] | None = None,
    name: str | None = None,
    threshold: float | str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Calibrate the offload encoding and choose the exit threshold on validation, measure test,
    export the bundle. With a lossy encoding (fp16, uint8) the cloud exit's probabilities, on
    validation and test alike, are computed on encoded features: what the bundle serves."""
    from edgecloud.export import export_bundle, resolve_arch

    splits = splits or load_splits(recipe)
    model = model.eval()
    kind = recipe.exits.policy
    threshold = recipe.exits.threshold if threshold is None else threshold
    split_model = hasattr(model, "cloud_module")
    spec, offload_record = offload_spec(model, recipe, splits.val) if split_model else (None, {})
    encoded = spec is not None and spec.encoding != "fp32"
    val_probs = predict_exits(model, splits.val)
    if encoded:
        val_probs[-1] = served_cloud_probs(model, splits.val, spec)
    if not getattr(model, "exit_names", []):
        t, how = None, "no edge exit"
        val_m = routed_metrics(model, val_probs, splits.val.labels, policy_for(kind, model, 0.0))
    elif threshold == "auto":
        ref_acc = reference_val_accuracy(recipe.exits.reference, recipe) if recipe.exits.reference else None
        t, val_m = choose_threshold(model, val_probs, splits.val.labels, kind, recipe.exits.max_drop, ref_acc)
        bar = (f"the validation accuracy {ref_acc:.4f} of {recipe.exits.reference}" if ref_acc is not None
               else "cloud-only")
        how = (f"auto on the validation split ({len(splits.val)} samples held out of train): largest edge-exit "
               f"share with accuracy within {recipe.exits.max_drop} points of {bar}")
    else:
        t = float(threshold)
        val_m = routed_metrics(model, val_probs, splits.val.labels, policy_for(kind, model, t))
        how = "fixed"
    policy = policy_for(kind, model, 0.0 if t is None else t)
    metrics: dict[str, Any] = {"threshold": t, "threshold_selection": how,
                               "val_accuracy": round(val_m["accuracy"], 4),
                               "val_edge_exit_share": round(val_m["edge_exit_share"], 4)}
    if splits.test is not None:
        test_probs = predict_exits(model, splits.test)
        float_cloud = test_probs[-1]
        if encoded:
            test_probs[-1] = served_cloud_probs(model, splits.test, spec)
        test_m = routed_metrics(model, test_probs, splits.test.labels, policy)
        metrics["test_samples"] = len(splits.test)
        metrics.update({f"test_{k}": round(v, 4) for k, v in test_m.items()})
        if encoded:  # what the encoding costs: the cloud exit on the features before encoding
            final = getattr(model, "final_name", "cloud")
            metrics[f"test_accuracy_{final}_alone_unencoded_features"] = round(
                float((float_cloud.argmax(1) == splits.test.labels).float().mean()), 4)
    summary = (f"{recipe.data.dataset}: {len(splits.train)} train / {len(splits.val)} validation (held out of the "
               f"train split, stratified, seed {recipe.seed})"
               + (f"; metrics on the {len(splits.test)}-image test split" if splits.test is not None else ""))
    info = {"seed": recipe.seed, "recipe": recipe.name, "data_summary": summary,
            # new options left out when unset: the manifests of existing recipes stay as they were
            **training_fields({"data": recipe.data.model_dump(mode="json"),
                               "optim": recipe.optim.model_dump(mode="json")}), "torch": torch.__version__,
            "cpu": cpu_info().model, "threads": torch.get_num_threads(),
            "precision_used": training_precision(recipe.optim.precision)}
    if split_model:
        info["offload"] = offload_record
    info.update(training or {})
    exits = [p for p in policy.thresholds]
    if not split_model:  # an edge-only classifier (lenet5, vgg_small): an edge-only bundle
        from edgecloud.export_edge import export_edge_bundle

        return export_edge_bundle(model, bundle_dir, name=name or recipe.name, family=recipe.family,
                                  arch=resolve_arch(recipe.family, recipe.arch), classes=splits.val.classes,
                                  policy=kind, training=info, metrics=metrics, hardware=recipe.hardware), metrics
    path = export_bundle(model, bundle_dir, name=name or recipe.name, family=recipe.family,
                         arch=resolve_arch(recipe.family, recipe.arch),
                         classes=splits.val.classes, exits=exits, policy=kind, training=info, metrics=metrics,
                         cloud=spec, baseline=baseline_macs(recipe.baseline, model) if recipe.baseline else None,
                         hardware=recipe.hardware)
    return path, metrics
