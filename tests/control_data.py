"""Paths the control tests share: the CIFAR-10 folder and the shipped 4-bit hybrid bundle, and
the mark that skips a test (saying why) where either is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR = REPO_ROOT.parent / "shared" / "datasets" / "cifar10"
BUNDLE = REPO_ROOT / "models" / "cifar10-hybrid-resnet20-4bit"

needs_cifar_bundle = pytest.mark.skipif(
    not CIFAR.is_dir() or not (BUNDLE / "manifest.yaml").is_file(),
    reason="needs ../shared/datasets/cifar10 and models/cifar10-hybrid-resnet20-4bit")
