"""Family-specific training stages run after the joint stage (``recipe.stages``).

``meanet_extension`` (MEANet, ICDCS 2021): pick the hard classes from the trained main block on
the VALIDATION split (the ``num_hard`` classes with the lowest per-predicted-class precision,
as in the paper's code), store them in the model's buffer, freeze the main block (and the cloud
model, trained alongside in the joint stage), then train the adaptive + extension blocks on the
training samples whose label is a hard class.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from edgecloud.data.dataset import ImageDataset
from edgecloud.data.loader import Loader
from edgecloud.train.perf import autocast_bf16
from edgecloud.train.recipe import OptimSpec

StageFn = Callable[..., list[dict[str, Any]]]
STAGES: dict[str, StageFn] = {}


def stage(name: str) -> Callable[[StageFn], StageFn]:
    def wrap(fn: StageFn) -> StageFn:
        STAGES[name] = fn
        return fn

    return wrap


def run_stage(spec: dict[str, Any], model: nn.Module, train: ImageDataset, val: ImageDataset, *,
              seed: int, data: Any, progress: bool) -> list[dict[str, Any]]:
    kind = spec.get("kind")
    if kind not in STAGES:
        raise ValueError(f"unknown training stage {kind!r}; known: {', '.join(sorted(STAGES))}")
    return STAGES[kind](model, train, val, spec=spec, seed=seed, data=data, progress=progress)


@torch.no_grad()
def hard_classes_by_precision(model: nn.Module, ds: ImageDataset, num_hard: int) -> list[int]:
    """The ``num_hard`` classes whose predictions by the main block are least often right."""
    model.eval()
    preds = torch.cat([model.main(x).argmax(1) for x, _ in Loader(ds, 500)])
    c = model.num_classes
    predicted = torch.bincount(preds, minlength=c).float()
    correct = torch.bincount(preds[preds == ds.labels], minlength=c).float()
    precision = torch.where(predicted > 0, correct / predicted.clamp_min(1), torch.zeros(c))
    return sorted(precision.argsort()[:num_hard].tolist())


@stage("meanet_extension")
def meanet_extension(model: nn.Module, train: ImageDataset, val: ImageDataset, *, spec: dict[str, Any],
                     seed: int, data: Any, progress: bool) -> list[dict[str, Any]]:
    from edgecloud.train.loop import make_optimizer, make_scheduler

    hard = hard_classes_by_precision(model, val, model.hard_classes.numel())
    model.set_hard_classes(hard)
    for part in (model.main, model.cloud):
        part.requires_grad_(False)
    mask = model.is_hard()[train.labels]
    hard_train = train.subset(torch.nonzero(mask).flatten())
    o = OptimSpec(**{k: v for k, v in spec.items() if k != "kind"})
    trainable = nn.ModuleList([model.adaptive, model.extension, model.extension_head])
    loader = Loader(hard_train, o.batch_size, shuffle=True, drop_last=len(hard_train) > o.batch_size,
                    crop_padding=data.crop_padding, hflip=data.hflip, seed=seed + 7919)
    opt = make_optimizer(trainable, o)
    sched = make_scheduler(opt, o, o.epochs * len(loader))
    bf16 = autocast_bf16(o.precision)
    history = []
    for epoch in range(o.epochs):
        t0 = time.perf_counter()
        model.train()
        model.main.eval()  # frozen, BN statistics included
        model.cloud.eval()
        loader.set_epoch(epoch)
        total, n = 0.0, 0
        for x, y in tqdm(loader, desc=f"extension {epoch + 1}/{o.epochs}", disable=not progress, leave=False):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                with torch.no_grad():
                    feats = model.main.features(x)
                logits = model.extension_logits(x, feats).float()
            loss = F.cross_entropy(logits, y, label_smoothing=o.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        history.append({"stage": "meanet_extension", "epoch": epoch + 1, "loss": total / max(n, 1),
                        "hard_classes": hard, "wall_time_s": round(time.perf_counter() - t0, 1)})
    model.eval()
    return history
