"""CIFAR-10 from the standard ``cifar-10-batches-py`` pickles or from an image-folder tree.

Image folders (``<root>/{train,test}/<class>/*.jpg|png``) are decoded once with Pillow and the
uint8 arrays cached as ``.npy`` under the cache folder (``$EDGECLOUD_CACHE`` or
``~/.cache/edgecloud``), keyed by the folder's path, file count and newest modification time, so
the second load takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np

from edgecloud.data.classes import CIFAR10_CLASSES
from edgecloud.data.dataset import ImageDataset

ENV_ROOT = "EDGECLOUD_CIFAR10"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def cache_dir() -> Path:
    return Path(os.environ.get("EDGECLOUD_CACHE", Path.home() / ".cache" / "edgecloud"))


def _pickle_dir(root: Path) -> Path | None:
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "test_batch").is_file() or (cand / "data_batch_1").is_file():
            return cand
    return None


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as fh:
        batch = pickle.load(fh, encoding="bytes")  # the official format is a pickled dict
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch.get(b"labels", batch.get(b"fine_labels")), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: not a CIFAR-10 batch (data {data.shape}, labels {labels.shape})")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10_pickles(root: Path, split: str) -> ImageDataset:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 batches {missing} missing in {root}")
    parts = [_load_batch(root / n) for n in names]
    classes = CIFAR10_CLASSES
    meta = root / "batches.meta"
    if meta.is_file():
        with meta.open("rb") as fh:
            names_b = pickle.load(fh, encoding="bytes").get(b"label_names")
        if names_b:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names_b)
    import torch

    return ImageDataset(
        torch.from_numpy(np.concatenate([p[0] for p in parts])),
        torch.from_numpy(np.concatenate([p[1] for p in parts])),
        classes,
    )


def _folder_classes(split_dir: Path) -> tuple[str, ...]:
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not found:
        raise FileNotFoundError(f"no class folders in {split_dir}")
    if set(found) == set(CIFAR10_CLASSES):
        return CIFAR10_CLASSES  # the standard label order
    return tuple(found)


def load_image_folder(root: Path, split: str, classes: tuple[str, ...] | None = None,
                      use_cache: bool = True) -> ImageDataset:
    """``<root>/<split>/<class>/*`` -> uint8 [N, 3, H, W] (all images must share one size)."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder {split_dir} does not exist")
    classes = classes or _folder_classes(split_dir)
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        cdir = split_dir / name
        if not cdir.is_dir():
            raise FileNotFoundError(f"class folder {cdir} does not exist")
        files += [(p, label) for p in sorted(cdir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"no images under {split_dir}")
    newest = max(p.stat().st_mtime_ns for p, _ in files)
    key = hashlib.sha1(f"{split_dir.resolve()}|{len(files)}|{newest}|{classes}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"imagefolder-{split}-{key}"
    if use_cache and (cached / "labels.npy").is_file():
        images, labels = np.load(cached / "images.npy"), np.load(cached / "labels.npy")
    else:
        images, labels = _decode(files)
        if use_cache:
            _save_cache(cached, images, labels, classes)
    import torch

    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), tuple(classes))


def _decode(files: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    first = np.asarray(Image.open(files[0][0]).convert("RGB"))
    images = np.empty((len(files), 3, *first.shape[:2]), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
        if arr.shape != first.shape:
            raise ValueError(f"{path}: size {arr.shape[:2]} differs from {first.shape[:2]}")
        images[i] = arr.transpose(2, 0, 1)
    return images, np.array([label for _, label in files], dtype=np.int64)


def _save_cache(folder: Path, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".images.{os.getpid()}.npy"
        np.save(tmp, images)
        os.replace(tmp, folder / "images.npy")
        (folder / "classes.json").write_text(json.dumps(list(classes)))
        tmp = folder / f".labels.{os.getpid()}.npy"
        np.save(tmp, labels)
        os.replace(tmp, folder / "labels.npy")  # written last: its presence marks a complete cache
    except OSError:
        pass  # a read-only home is not an error; we just decode again next time


def load_cifar10(split: str = "train", root: str | Path | None = None, use_cache: bool = True) -> ImageDataset:
    """CIFAR-10 ``train`` or ``test`` from ``root`` (pickle batches or an image-folder tree)."""
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    given = str(root or os.environ.get(ENV_ROOT, ""))
    root = Path(given)
    if not given or not root.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 folder {given or '(none given)'} not found: pass the folder holding "
            f"cifar-10-batches-py (or its batches) or an image-folder tree <root>/{{train,test}}/<class>/, "
            f"or set {ENV_ROOT}"
        )
    pickles = _pickle_dir(root)
    if pickles is not None:
        return load_cifar10_pickles(pickles, split)
    return load_image_folder(root, split, use_cache=use_cache)
