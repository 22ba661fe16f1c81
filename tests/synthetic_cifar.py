"""A learnable synthetic CIFAR-10 (a class template plus noise) as the data set's pickle folder."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 32, 32) images in [0, 1] and labels 0..9 in turn; the same templates for every seed."""
    templates = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    y = torch.arange(n) % 10
    x = 0.6 * templates[y] + 0.4 * torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return x, y


def write_cifar_pickles(root: Path) -> Path:
    """CIFAR-10 pickles of synthetic images: 5 training batches of 20 and a test batch of 40."""
    root.mkdir(parents=True, exist_ok=True)

    def batch(n: int, seed: int) -> dict:
        x, y = synthetic_images(n, seed)
        return {b"data": (x * 255).round().to(torch.uint8).reshape(n, -1).numpy(), b"labels": y.tolist()}

    for i in range(1, 6):
        with (root / f"data_batch_{i}").open("wb") as f:
            pickle.dump(batch(20, 100 + i), f)
    with (root / "test_batch").open("wb") as f:
        pickle.dump(batch(40, 200), f)
    return root
