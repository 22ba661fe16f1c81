"""Weight averaging for the training loop: an exponential moving average and Lookahead.

Both are airbench tricks (Jordan 2024, arXiv 2404.00498) that buy accuracy per step for free:
the EMA (``optim.ema``) is a smoother model to validate and ship than the last iterate; Lookahead
(``optim.lookahead``, Zhang et al. 2019) periodically pulls the trained ("fast") weights back
towards slow weights. Their schedules are functions of the global step number, and their states
go into the checkpoint, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from edgecloud.train.recipe import EmaSpec, LookaheadSpec


class WeightEMA:
    """``avg = decay avg + (1 - decay) w`` every ``spec.every`` optimiser steps (the first update
    copies ``w``), BN statistics and other buffers copied from the trained model, through
    :class:`torch.optim.swa_utils.AveragedModel` (``use_buffers=False`` copies the buffers)."""

    def __init__(self, model: nn.Module, spec: EmaSpec) -> None:
        self.spec = spec
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(spec.decay), use_buffers=False)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged network (same class as the trained one)."""
        return self.averaged.module

    @property
    def ready(self) -> bool:
        """Whether the average has been updated at least once (before that it holds stale weights)."""
        return bool(self.averaged.n_averaged > 0)

    def step(self, model: nn.Module, global_step: int) -> None:
        """Call after optimiser step number ``global_step`` (1-based, over the whole run)."""
        if global_step % self.spec.every == 0:
            self.averaged.update_parameters(model)

    @torch.no_grad()
    def sync_buffers(self, model: nn.Module) -> None:
        """Copy the trained model's buffers (BN statistics), which may have moved since the last update."""
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)


class Lookahead:
    """Slow weights for ``params`` (the optimiser's): every ``spec.k`` steps
    ``slow += alpha (fast - slow)`` and ``fast = slow``. Kept beside the optimiser rather than
    subclassing it, so the LR schedulers and the optimiser's own state_dict stay as they are."""

    def __init__(self, params: Iterable[nn.Parameter], spec: LookaheadSpec) -> None:
        self.spec = spec
        self.params = list(params)
        self.slow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        """Call after optimiser step number ``global_step`` (1-based, over the whole run)."""
        if global_step % self.spec.k:
            return
        for p, s in zip(self.params, self.slow, strict=True):
            s.add_(p.detach() - s, alpha=self.spec.alpha)
            p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": [s.clone() for s in self.slow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["slow"]) != len(self.slow):
            raise ValueError(f"lookahead state holds {len(state['slow'])} tensors, the optimiser {len(self.slow)}")
        for s, saved in zip(self.slow, state["slow"], strict=True):
            s.copy_(saved)


def optimizer_params(opt: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Every parameter the optimiser updates, in its order."""
    return [p for group in opt.param_groups for p in group["params"]]
