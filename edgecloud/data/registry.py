"""Data sets by name: ``load_dataset("fashion-mnist", "train", root)``."""

from __future__ import annotations

from pathlib import Path

from edgecloud.data.cifar import load_cifar10
from edgecloud.data.dataset import ImageDataset
from edgecloud.data.fashion_mnist import load_fashion_mnist, load_mnist

DATASETS = {"fashion-mnist": load_fashion_mnist, "mnist": load_mnist, "cifar10": load_cifar10}


def load_dataset(name: str, split: str, root: str | Path | None = None) -> ImageDataset:
    try:
        fn = DATASETS[name]
    except KeyError as exc:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}") from exc
    return fn(split, root)
