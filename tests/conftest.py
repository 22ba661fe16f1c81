"""Shared fixtures.

``tiny_repo``: a model repository folder holding one UNTRAINED but valid ``fmnist_hybrid``
bundle named ``"tiny"`` (seeded), for server tests that need a real bundle without training.
Its entropy threshold is the median exit entropy of the seeded model on uniform-random
``torch.rand`` inputs (seed 0), so roughly half of such inputs exit at the edge and half go to
the cloud.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_SEED = 0

# Tests run tiny tensors on a 2-core machine shared with other jobs: intra-op threads only add
# synchronisation, and under CPU contention OpenMP's spinning threads made a few training steps
# 10-20x slower (33 s vs 1.7 s measured at load ~6). One thread keeps every test fast and steady.
torch.set_num_threads(1)


def build_tiny_bundle(root: Path, name: str = "tiny", seed: int = TINY_SEED) -> Path:
    """Write an untrained, seeded fmnist_hybrid bundle to ``root / name``."""
    from edgecloud.data.classes import FASHION_MNIST_CLASSES
    from edgecloud.exits import softmax_entropy
    from edgecloud.export import export_bundle
    from edgecloud.nets import create_model

    torch.manual_seed(seed)
    arch = {"width": 8, "cloud_width": 16, "cloud_blocks": 1}
    model = create_model("fmnist_hybrid", **arch).eval()
    with torch.no_grad():
        x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
        entropy = softmax_entropy(torch.softmax(model(x)[0], dim=1))
    threshold = float(entropy.median())
    return export_bundle(
        model, root / name, name=name, family="fmnist_hybrid", arch=arch,
        classes=FASHION_MNIST_CLASSES, exits=[threshold], policy="entropy",
        training={"command": "untrained: tests/conftest.py build_tiny_bundle", "seed": seed},
    )


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository folder containing the untrained bundle ``tiny``."""
    root = tmp_path_factory.mktemp("model_repo")
    build_tiny_bundle(root)
    return root
