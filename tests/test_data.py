"""Data loading: IDX parsing, CIFAR-10 pickles and image folders, splits, loader, demo sample."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from edgecloud.data import Loader, load_cifar10, load_fashion_mnist, train_val_split
from edgecloud.data.classes import CIFAR10_CLASSES
from edgecloud.data.dataset import ImageDataset
from edgecloud.data.idx import read_idx, write_idx
from edgecloud.data.loader import random_crop


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    write_idx(tmp_path / name, arr)
    np.testing.assert_array_equal(read_idx(tmp_path / name), arr)


def test_idx_hand_written_header(tmp_path) -> None:
    # magic 0x00000801 (uint8, 1 dim), 3 items, payload 7 8 9
    (tmp_path / "l").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    assert read_idx(tmp_path / "l").tolist() == [7, 8, 9]
    (tmp_path / "bad").write_bytes(bytes([1, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 4, 7, 8, 9]))
    with pytest.raises(ValueError, match="bytes"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_tiny_idx(tmp_path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 9, 9, 3], dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)  # plain files are accepted too
    ds = load_fashion_mnist("test", tmp_path)
    assert ds.images.shape == (6, 1, 28, 28) and ds.images.dtype == torch.uint8
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), images)
    assert ds.labels.tolist() == labels.tolist() and ds.classes[9] == "Ankle boot"
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def _cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    with open(path, "wb") as fh:
        pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, fh)
    return data, labels


def test_cifar10_pickles(tmp_path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    parts = [_cifar_batch(root / f"data_batch_{i}", 3, i) for i in range(1, 6)]
    test_data, test_labels = _cifar_batch(root / "test_batch", 4, 9)
    train = load_cifar10("train", tmp_path)  # the parent folder works too
    assert train.images.shape == (15, 3, 32, 32)
    np.testing.assert_array_equal(train.images[3].numpy().reshape(-1), parts[1][0][0])
    assert train.labels.tolist() == sum((p[1] for p in parts), [])
    test = load_cifar10("test", root)
    # CIFAR rows are channel planes R, G, B of 32x32 each.
    np.testing.assert_array_equal(test.images[2, 1].numpy(), test_data[2, 1024:2048].reshape(32, 32))
    assert test.labels.tolist() == test_labels and test.classes == CIFAR10_CLASSES


def test_cifar10_image_folder_and_cache(tmp_path, monkeypatch) -> None:
    from PIL import Image

    monkeypatch.setenv("EDGECLOUD_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(2)
    expected = {}
    for cls in ("cat", "airplane"):
        for i in range(2):
            arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            path = tmp_path / "data" / "test" / cls / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)  # PNG: lossless, so pixels compare exactly
            expected[(cls, i)] = arr
    ds = load_cifar10("test", tmp_path / "data")
    assert ds.classes == ("airplane", "cat")  # not the 10 CIFAR names: sorted folder names
    assert ds.labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(ds.images[2].numpy().transpose(1, 2, 0), expected[("cat", 0)])
    assert len(list((tmp_path / "cache").glob("imagefolder-test-*/images.npy"))) == 1
    again = load_cifar10("test", tmp_path / "data")  # from the cache
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)
    with pytest.raises(FileNotFoundError):
        load_cifar10("train", tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10("test", tmp_path / "nowhere")
    monkeypatch.delenv("EDGECLOUD_CIFAR10", raising=False)
    monkeypatch.chdir(tmp_path / "data")  # a bare "." must not be taken for the data folder
    with pytest.raises(FileNotFoundError, match="none given"):
        load_cifar10("test")


def _toy(n=100, classes=4):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return ImageDataset(images, torch.arange(n) % classes, tuple("abcd"[:classes]))


def test_train_val_split_is_stratified_disjoint_and_seeded() -> None:
    ds = _toy()
    tr, va = train_val_split(ds, 0.2, seed=3)
    assert len(tr) == 80 and len(va) == 20
    assert va.labels.bincount().tolist() == [5, 5, 5, 5]
    rows = lambda d: {bytes(x.numpy()) for x in d.images}  # noqa: E731
    assert not rows(tr) & rows(va)
    tr2, va2 = train_val_split(ds, 0.2, seed=3)
    assert torch.equal(va.images, va2.images)
    assert not torch.equal(train_val_split(ds, 0.2, seed=4)[1].images, va.images)


def test_loader_batches_and_augmentation() -> None:
    ds = _toy(10)
    plain = list(Loader(ds, 4))
    assert [len(y) for _, y in plain] == [4, 4, 2]
    x0 = plain[0][0]
    assert x0.dtype == torch.float32 and 0 <= x0.min() and x0.max() <= 1
    torch.testing.assert_close(x0, ds.images[:4].float() / 255)
    assert len(Loader(ds, 4, drop_last=True)) == 2
    a = [y for _, y in Loader(ds, 4, shuffle=True, seed=1)]
    b = [y for _, y in Loader(ds, 4, shuffle=True, seed=1)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == sorted(ds.labels.tolist())
    # A crop shifts the image inside its zero padding: every output is a shifted copy.
    g = torch.Generator().manual_seed(0)
    img = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8).repeat(16, 1, 1, 1)
    out = random_crop(img, 2, g)
    assert out.shape == img.shape
    padded = torch.nn.functional.pad(img[0], (2, 2, 2, 2))
    for k in range(16):
        assert any(torch.equal(out[k], padded[:, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))
    flipped = next(iter(Loader(ds, 10, hflip=True, seed=5)))[0]
    orig = ds.images.float() / 255
    same = [torch.equal(flipped[i], orig[i]) for i in range(10)]
    mirrored = [torch.equal(flipped[i], orig[i].flip(-1)) for i in range(10)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and any(same)


def test_demo_sample() -> None:
    from edgecloud.data.samples import load_demo_sample

    x, y, classes = load_demo_sample()
    assert x.shape == (1000, 1, 28, 28) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    assert classes[0] == "T-shirt/top" and len(classes) == 10
    # The first test labels of Fashion-MNIST are 9, 2, 1, 1, 6.
    assert y[:5].tolist() == [9, 2, 1, 1, 6]
