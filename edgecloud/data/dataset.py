"""An in-memory image classification data set: uint8 images, int64 labels, class names."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ImageDataset:
    """``images``: uint8 [N, C, H, W]; ``labels``: int64 [N]. Kept as uint8 to save memory."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: np.ndarray | torch.Tensor) -> "ImageDataset":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageDataset(self.images[index], self.labels[index], self.classes)

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> "ImageDataset":
        """From NHWC or NHW uint8 arrays."""
        if images.ndim == 3:
            images = images[:, None]
        elif images.ndim == 4:
            images = images.transpose(0, 3, 1, 2)
        return cls(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                   torch.from_numpy(np.asarray(labels, dtype=np.int64)), tuple(classes))


def train_val_split(dataset: ImageDataset, val_fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """A seeded, stratified split of a TRAIN set into (train, validation).

    Thresholds and checkpoints are chosen on the validation part; the test split is only ever
    used to report.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    labels = dataset.labels.numpy()
    val_idx: list[np.ndarray] = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng.shuffle(rows)
        val_idx.append(rows[: int(round(len(rows) * val_fraction))])
    val = np.sort(np.concatenate(val_idx)) if val_idx else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[val] = False
    return dataset.subset(np.flatnonzero(mask)), dataset.subset(val)
