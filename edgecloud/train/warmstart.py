"""Warm starts: initialise from another run, distil from a teacher run, keep parts frozen.

Binary and low-bit networks reach much better accuracy in a short CPU budget when they start
from a trained full-precision network and learn from its outputs (XNOR-Net, Bi-Real Net and
Real-to-Binary all do both). A recipe names the runs it builds on (``init``, ``distill``); the
family's ``init_from`` decides which weights map where.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.train.recipe import DistillSpec

CHECKPOINT = "checkpoint.pt"  # the file every run folder keeps (``edgecloud.train.loop`` writes it)


def run_checkpoint(path: str | Path) -> Path:
    """``checkpoint.pt`` of a run folder (or the file itself), with an error that says what to do."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.is_file():
        raise FileNotFoundError(
            f"no training checkpoint at {p}: train that run first (edgecloud train RECIPE --out {p.parent})"
        )
    return p


def load_run_model(path: str | Path) -> nn.Module:
    """A trained run's network: a run folder, its ``checkpoint.pt``, or a bundle folder (a shipped
    model, whose training run is not kept: ``models/cifar10-resnet20``)."""
    from edgecloud.bundle import MANIFEST, Bundle
    from edgecloud.train.loop import load_checkpoint  # the loop imports this module

    p = Path(path)
    if p.is_dir() and (p / MANIFEST).is_file() and not (p / CHECKPOINT).is_file():
        return Bundle(p).build_model().eval()
    _, model, _ = load_checkpoint(run_checkpoint(path))
    return model.eval()


def init_from_run(model: nn.Module, path: str | Path) -> list[str]:
    """Initialise ``model`` from the run at ``path``; returns the parts left at their fresh init.

    The family's ``init_from`` decides what maps where; a family without one (``vgg_small``,
    ``lenet5``) can still continue a run (or an edge-only bundle) of its own class: every weight
    is copied (fine-tuning, pruning)."""
    init = getattr(model, "init_from", None)
    if init is None:
        from edgecloud.nets.edge_only import EdgeOnlyModel

        source = load_run_model(path)
        net = source.net if isinstance(source, EdgeOnlyModel) else source
        if type(net) is not type(model):
            raise ValueError(f"{type(model).__name__} cannot be initialised from a {type(net).__name__} "
                             f"({path}): no init_from, and not a run of the same network")
        try:
            model.load_state_dict(net.state_dict())
        except RuntimeError as exc:
            raise ValueError(f"init from {path}: the network there has another architecture: {exc}") from exc
        return []
    return init(load_run_model(path))


def frozen_modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The named submodules, with gradients switched off (call ``.eval()`` on them each epoch)."""
    mods = []
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError as exc:
            children = ", ".join(n for n, _ in model.named_children())
            raise ValueError(f"freeze: {type(model).__name__} has no submodule {name!r} (top level: {children})") from exc
        mod.requires_grad_(False)
        mods.append(mod)
    return mods


class Distiller:
    """A frozen teacher whose final output every student output learns from."""

    def __init__(self, spec: DistillSpec, channels_last: bool = False, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.teacher = load_run_model(spec.teacher).to(device)
        self.teacher.requires_grad_(False)
        if channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.teacher(x)
        return (out[-1] if isinstance(out, (list, tuple)) else out).float()

    def loss(self, outputs: list[torch.Tensor], y: torch.Tensor, teacher: torch.Tensor, weights: list[float],
             smoothing: float = 0.0) -> torch.Tensor:
        a, t = self.spec.alpha, self.spec.temperature
        soft = F.softmax(teacher / t, dim=1)
        total = outputs[0].new_zeros(())
        for out, w in zip(outputs, weights):
            if not w:
                continue
            kd = F.kl_div(F.log_softmax(out / t, dim=1), soft, reduction="batchmean") * (t * t)
            total = total + w * ((1 - a) * F.cross_entropy(out, y, label_smoothing=smoothing) + a * kd)
        return total
