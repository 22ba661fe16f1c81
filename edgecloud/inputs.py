"""Turning user files (images, ``.npy`` arrays) into model input batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _to_chw(array: np.ndarray, shape: Sequence[int], source: str) -> np.ndarray:
    """One sample or a batch, scaled to [0, 1] float32 with the model's [C, H, W] shape."""
    channels, height, width = shape
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    else:
        array = array.astype(np.float32)
    if array.ndim == 2:                      # H, W
        array = array[None, None]
    elif array.ndim == 3:
        if tuple(array.shape) == (channels, height, width):        # C, H, W
            array = array[None]
        elif tuple(array.shape) == (height, width, channels):      # H, W, C
            array = np.moveaxis(array, -1, 0)[None]
        elif channels == 1 and tuple(array.shape[1:]) == (height, width):
            array = array[:, None]                                 # N, H, W (grayscale)
    elif array.ndim == 4 and array.shape[1] != channels and array.shape[-1] == channels:
        array = np.moveaxis(array, -1, 1)   # N, H, W, C -> N, C, H, W
    if array.ndim != 4 or tuple(array.shape[1:]) != (channels, height, width):
        raise ValueError(
            f"{source}: array of shape {list(array.shape)} does not fit the model input "
            f"[N, {channels}, {height}, {width}]"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{source}: contains NaN or Inf")
    return np.ascontiguousarray(array)


def load_image(path: Path, shape: Sequence[int]) -> np.ndarray:
    channels, height, width = shape
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    return _to_chw(array, shape, str(path))


def load_inputs(paths: Sequence[str | Path], shape: Sequence[int]) -> tuple[np.ndarray, list[str]]:
    """Stack every sample of every file; returns the batch and one label per sample."""
    batches, labels = [], []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist")
        if path.suffix.lower() == ".npy":
            batch = _to_chw(np.load(path, allow_pickle=False), shape, str(path))
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            batch = load_image(path, shape)
        else:
            raise ValueError(f"{path}: unsupported file type; use an image or a .npy array")
        batches.append(batch)
        labels += [path.name] if len(batch) == 1 else [f"{path.name}[{i}]" for i in range(len(batch))]
    if not batches:
        raise ValueError("no input files given")
    return np.concatenate(batches), labels
