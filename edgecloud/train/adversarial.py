"""PGD adversarial training: the batch an epoch trains on, replaced by its adversarial copy."""

from __future__ import annotations

import torch
from torch import nn

from edgecloud.robust.attacks import pgd
from edgecloud.train.recipe import AdversarialSpec


class Adversary:
    """Crafts each batch's PGD examples against the current weights (see :class:`AdversarialSpec`)."""

    def __init__(self, spec: AdversarialSpec, seed: int, bf16: bool = False) -> None:
        self.spec = spec
        self.bf16 = bf16
        self.generator = torch.Generator()
        self.generator.manual_seed(seed ^ 0xAD5E)

    def _logits(self, model: nn.Module):
        def fn(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                return model(x)[-1].float()
        return fn

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, frozen: list[nn.Module]) -> torch.Tensor:
        s = self.spec
        n = x.shape[0] if s.fraction >= 1.0 else int(round(x.shape[0] * s.fraction))
        if n == 0:
            return x
        model.eval()
        try:
            adv = pgd(self._logits(model), x[:n], y[:n], s.eps, steps=s.steps, step_size=s.step_size,
                      generator=self.generator)
        finally:
            model.train()
            for mod in frozen:
                mod.eval()
        return adv if n == x.shape[0] else torch.cat([adv, x[n:]])
