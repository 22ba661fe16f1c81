"""A small committed sample of Fashion-MNIST (MIT-licensed) for the demo and tests.

``fashion_mnist_test_1000.npz`` holds the first 1,000 images of the Fashion-MNIST test split:
``images`` uint8 [N, 28, 28], ``labels`` int64 [N], ``classes`` (str) [10].
"""

from __future__ import annotations

from importlib import resources

import numpy as np

DEMO_SAMPLE = "fashion_mnist_test_1000.npz"


def load_demo_sample() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images float32 [N, 1, 28, 28] in [0, 1], labels int64 [N], class names)."""
    with resources.files(__package__).joinpath(DEMO_SAMPLE).open("rb") as fh:
        data = np.load(fh, allow_pickle=False)
        images, labels, classes = data["images"], data["labels"], data["classes"]
    x = (images.astype(np.float32) / 255.0)[:, None]
    return x, labels.astype(np.int64), [str(c) for c in classes]
