"""IBM ART's view of an edgecloud model (its ``PyTorchClassifier``), for ART's attacks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class _AsModule(nn.Module):
    """A logits function as a module (ART wraps modules); holds no parameters of its own."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x).float()


def art_classifier(model: Callable[[torch.Tensor], torch.Tensor], input_shape: Sequence[int], n_classes: int):
    """An ART ``PyTorchClassifier`` over ``model`` (pixels in [0, 1], logits out, on the CPU)."""
    from art.estimators.classification import PyTorchClassifier

    module = model if isinstance(model, nn.Module) else _AsModule(model)
    return PyTorchClassifier(model=module, loss=nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
                             nb_classes=n_classes, clip_values=(0.0, 1.0), device_type="cpu")
