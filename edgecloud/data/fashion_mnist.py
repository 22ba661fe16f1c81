"""Fashion-MNIST from its IDX(.gz) files (Debian package ``dataset-fashion-mnist``)."""

from __future__ import annotations

import os
from pathlib import Path

from edgecloud.data.classes import FASHION_MNIST_CLASSES
from edgecloud.data.dataset import ImageDataset
from edgecloud.data.idx import read_idx

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_ROOT = "EDGECLOUD_FASHION_MNIST"
_PREFIX = {"train": "train", "test": "t10k"}


def default_root() -> Path:
    return Path(os.environ.get(ENV_ROOT, DEFAULT_ROOT))


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"IDX file {stem}[.gz] not found in {root}. For Fashion-MNIST install the data set "
        f"with `apt-get install dataset-fashion-mnist` (files land in {DEFAULT_ROOT}), or pass "
        f"the folder holding the IDX files (or set {ENV_ROOT})."
    )


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> ImageDataset:
    """The ``train`` (60,000) or ``test`` (10,000) split as uint8 [N, 1, 28, 28]."""
    return load_idx_dataset(split, Path(root) if root else default_root(), FASHION_MNIST_CLASSES)


def load_mnist(split: str = "train", root: str | Path | None = None) -> ImageDataset:
    """MNIST digits from the same IDX file names (``$EDGECLOUD_MNIST`` or ``root``)."""
    root = Path(root or os.environ.get("EDGECLOUD_MNIST", "/usr/share/datasets/mnist"))
    return load_idx_dataset(split, root, tuple(str(d) for d in range(10)))


def load_idx_dataset(split: str, root: Path, classes: tuple[str, ...]) -> ImageDataset:
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images = read_idx(_find(root, f"{_PREFIX[split]}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{_PREFIX[split]}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{split} split in {root}: images {images.shape} do not match labels {labels.shape}")
    return ImageDataset.from_numpy(images, labels, classes)
