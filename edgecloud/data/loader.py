"""A small in-memory loader: uint8 images -> float [0, 1] batches, with tensor-op augmentation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from edgecloud.data.dataset import ImageDataset


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of a zero-padded batch (same size out), as one gather."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # [n, h]
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # [n, w]
    idx_n = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    out = x.clone()
    out[flip] = x[flip].flip(-1)
    return out


def alternating_flip_mask(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Which of ``n`` images (by dataset index) are mirrored in ``epoch`` under alternating flips
    (airbench): a seeded random half in epoch 0, then each epoch the complement of the previous one.
    Every image is seen both ways within any two consecutive epochs, with less variance than
    random flips; a function of (seed, epoch) only, so a resumed run repeats it exactly."""
    base = torch.rand(n, generator=torch.Generator().manual_seed(seed * 100_003 + 7_919_000)) < 0.5
    return base if epoch % 2 == 0 else ~base


class Loader:
    """Iterates over an :class:`ImageDataset` in batches of float32 pixels in [0, 1].

    Shuffling and augmentation draw from one seeded generator, re-seeded per epoch
    (``seed + epoch``) so a resumed run sees the same batches as an uninterrupted one.
    ``flip``: ``"random"`` (what ``hflip=True`` means) or ``"alternating"`` (see
    :func:`alternating_flip_mask`; it draws nothing from the epoch's generator).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        crop_padding: int = 0,
        hflip: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        flip: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.crop_padding = crop_padding
        if flip not in (None, "random", "alternating"):
            raise ValueError(f"flip must be None, 'random' or 'alternating', got {flip!r}")
        if hflip and flip == "alternating":
            raise ValueError("hflip=True (random flips) contradicts flip='alternating'")
        self.hflip = hflip or flip == "random"
        self.alternating = flip == "alternating"
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.channels_last = channels_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.dataset)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        mirror = alternating_flip_mask(n, self.seed, self.epoch) if self.alternating else None
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.dataset.images[idx]
            if self.crop_padding:
                x = random_crop(x, self.crop_padding, gen)
            if self.hflip:
                x = random_hflip(x, gen)
            elif mirror is not None:
                flip = mirror[idx]
                x = x.clone()
                x[flip] = x[flip].flip(-1)
            x = x.float().div_(255.0)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.dataset.labels[idx]
