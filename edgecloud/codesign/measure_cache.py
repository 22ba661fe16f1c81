"""Measured accuracies kept on disk, so a number the simulator already produced is not paid twice.

Used by the prune pipeline (SOURCE's and the pruned net's chips) and the NAX search (every
candidate's chips and digital accuracy; there the key is the search's own context). A crossbar
chip's test accuracy is a pure function of the network's weights, the backend options, the chip's
seed, the images and the simulator itself. Evaluating a ResNet-20 on three chips over the 10,000
test images takes the better part of an hour on one core, and every baseline pruned
from the same SOURCE evaluates SOURCE on the same chips again. The key therefore holds all five:
a digest of the weights, the options, the seed, a digest of the images and labels, and a digest
of the simulator's sources (``edgecloud/cim``: Python, C and the cost tables), so editing the
simulator invalidates every entry instead of serving stale numbers. Entries are JSON lines
(``crossbar-accuracy.jsonl`` under ``$EDGECLOUD_CACHE`` or ``~/.cache/edgecloud``), appended, and
the file is read again before each miss, so a run picks up chips that a concurrent run finished;
two runs measuring the same chip at the same time each measure it once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

CACHE_FILE = "crossbar-accuracy.jsonl"
_SIMULATOR_SUFFIXES = (".py", ".c", ".h", ".yaml")


def net_fingerprint(net: nn.Module) -> str:
    """Digest of a network's parameters and buffers (names and values)."""
    h = hashlib.sha1()
    for key, value in sorted(net.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


@lru_cache(maxsize=1)
def simulator_digest() -> str:
    """Digest of the simulator's sources, so a changed simulator never reads an old number."""
    import edgecloud.cim as cim

    root = Path(cim.__file__).parent
    h = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.suffix in _SIMULATOR_SUFFIXES and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def default_cache_path() -> Path:
    from edgecloud.data.cifar import cache_dir

    return cache_dir() / CACHE_FILE


class MeasurementCache:
    """``get_or_measure(key, measure)``: the stored number, or ``measure()`` stored for next time.
    ``path`` None: an in-memory cache."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.hits = self.misses = 0
        self._items: dict[str, float] = {}
        self._read()

    def _read(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        for line in self.path.read_text().splitlines():
            try:
                item = json.loads(line)
                self._items[item["key"]] = float(item["value"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn line from an interrupted append

    @staticmethod
    def chip_keys(net: nn.Module, options: dict[str, Any], images: torch.Tensor, labels: torch.Tensor,
                  seeds: list[int]) -> list[str]:
        """One key per chip seed (the weights and images are digested once for all of them)."""
        parts = {"net": net_fingerprint(net), "options": options,
                 "images": tensor_digest(images), "labels": tensor_digest(labels),
                 "simulator": simulator_digest(), "torch": str(torch.__version__)}
        return [hashlib.sha1(json.dumps({**parts, "seed": seed}, sort_keys=True, default=str).encode()).hexdigest()
                for seed in seeds]

    def get_or_measure(self, key: str, measure: Callable[[], float]) -> float:
        if key not in self._items:
            self._read()  # another run may have measured it since
        if key in self._items:
            self.hits += 1
            return self._items[key]
        self.misses += 1
        value = float(measure())
        self._items[key] = value
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(json.dumps({"key": key, "value": value}) + "\n")
        return value
