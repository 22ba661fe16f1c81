"""What an evaluation runs on: the model (a bundle or an in-memory SplitModel), the data, the cloud.

Evaluation reuses the edge daemon's :class:`~edgecloud.edge.runner.EdgeRunner` for the edge part
and its energy accounting, so the numbers here are the numbers the daemon would report. The
runner only needs ``manifest``, ``name`` and ``build_model()`` from a bundle; :class:`InMemoryBundle`
provides those for a model that was never written to disk (e.g. straight after training).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from edgecloud.bundle import MANIFEST, Bundle, Manifest, ModelRepository
from edgecloud.data.dataset import ImageDataset, train_val_split
from edgecloud.data.registry import load_dataset

CloudKind = Literal["onnx", "torch", "none"]  # "none": an edge-only bundle, no cloud part


class ModelSource(Protocol):
    """The part of :class:`~edgecloud.bundle.Bundle` the evaluator (and EdgeRunner) uses."""

    manifest: Manifest

    @property
    def name(self) -> str: ...

    def build_model(self) -> nn.Module: ...


class InMemoryBundle:
    """A SplitModel + manifest that behaves like a bundle; every ``build_model`` is a fresh copy
    (each Monte-Carlo chip programs its own), so the caller's model is never modified."""

    def __init__(self, model: nn.Module, manifest: Manifest) -> None:
        self._model = model
        self.manifest = manifest
        self.path: Path | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    def build_model(self) -> nn.Module:
        return copy.deepcopy(self._model).eval()


def resolve_bundle(spec: str | Path, repository: str | Path | None = None) -> Bundle:
    """``spec`` is a bundle folder (has a manifest) or a bundle name in ``repository``."""
    path = Path(spec)
    if (path / MANIFEST).is_file():
        return Bundle(path)
    if path.exists() and path.is_dir():
        raise FileNotFoundError(f"{path} is a folder but not a model bundle: no {MANIFEST}")
    return ModelRepository(repository).get(str(spec))


# ---- data --------------------------------------------------------------------------------------

def training_dataset(manifest: Manifest) -> str | None:
    """The data set the bundle was trained on (manifest ``training.data.dataset``), if recorded."""
    return ((manifest.training or {}).get("data") or {}).get("dataset")


def load_eval_data(
    dataset: str,
    split: str,
    manifest: Manifest,
    root: str | Path | None = None,
    limit: int | None = None,
    sample: int | None = None,
) -> tuple[ImageDataset, dict[str, Any]]:
    """The evaluation samples and a description of where they came from.

    ``test`` is the data set's test split. ``val`` re-creates the validation split the bundle's
    threshold was chosen on: the same seeded, stratified hold-out of the TRAIN split that
    training used (``manifest.training`` seed and ``data.val_fraction``; defaults 0 and 0.1).
    ``limit`` keeps the first N samples; ``sample`` keeps a class-balanced subset of N samples
    instead (:func:`balanced_subset`; use it on splits stored class by class, such as the
    CIFAR-10 image-folder tree, where the first N are all one class). The data must match the
    bundle's input and classes.
    """
    info: dict[str, Any] = {"dataset": dataset, "split": split}
    if split == "test":
        data = load_dataset(dataset, "test", root)
    elif split == "val":
        training = manifest.training or {}
        data_spec = training.get("data") or {}
        seed = int(training.get("seed", 0) or 0)
        val_fraction = float(data_spec.get("val_fraction", 0.1) or 0.1)
        _, data = train_val_split(load_dataset(dataset, "train", root), val_fraction, seed=seed)
        info.update(val_fraction=val_fraction, val_seed=seed)
    else:
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    if limit is not None and sample is not None:
        raise ValueError("--limit and --sample are exclusive: give one")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        data = data.subset(np.arange(min(limit, len(data))))
    if sample is not None:
        data = data.subset(balanced_subset(data.labels.numpy(), sample))
        info["sample"] = (f"class-balanced: the first {sample // max(1, len(data.classes))} samples of each class, "
                          "interleaved by class")
    check_data(data, manifest)
    info["samples"] = len(data)
    return data, info


def balanced_subset(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first ``n // C`` samples of each of the C classes present, interleaved by
    class (one of each class, then the next of each, ...), so that every batch, including the
    first one that calibrates ADC ranges, mixes all classes; ``n`` = the split size gives the
    whole split in that order."""
    classes = np.unique(labels)
    per_class = n // max(1, classes.size)
    if per_class < 1:
        raise ValueError(f"--sample {n}: needs at least one sample per class ({classes.size} classes)")
    keep = [np.flatnonzero(labels == c)[:per_class] for c in classes]
    short = [int(c) for c, k in zip(classes, keep) if k.size < per_class]
    if short:
        raise ValueError(f"--sample {n}: classes {short} have fewer than {per_class} samples")
    return np.stack(keep).T.reshape(-1)


def check_data(data: ImageDataset, manifest: Manifest) -> None:
    """Clear errors when a data set does not fit a bundle (e.g. CIFAR-10 into a Fashion-MNIST model)."""
    if len(data) == 0:
        raise ValueError("the evaluation data set is empty")
    want = tuple(int(d) for d in manifest.input.shape)
    if tuple(data.sample_shape) != want:
        raise ValueError(
            f"bundle {manifest.name!r} takes samples of shape {list(want)} but the data set's "
            f"samples are {list(data.sample_shape)}"
        )
    classes = len(manifest.classes)
    top = int(data.labels.max())
    if top >= classes or int(data.labels.min()) < 0:
        raise ValueError(
            f"bundle {manifest.name!r} has {classes} classes but the data set has label {top}"
        )


# ---- the cloud part ----------------------------------------------------------------------------

@dataclass
class CloudPart:
    """Runs the cloud part on offloaded inputs and returns FP32 logits.

    ``onnx``: the bundle's ``cloud.onnx`` through ONNX Runtime, loaded exactly as the cloud server
    loads it (what production serves; float features are encoded per ``cloud.encoding`` first).
    ``torch``: the model's ``cloud_module()`` on the features after the same encode/decode round
    trip (for in-memory models that have no ONNX file yet).
    """

    kind: CloudKind
    _fn: Any
    _wire_fn: Any = None

    def logits(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 0:
            return np.zeros((0, 0), dtype=np.float32)
        return self._fn(np.ascontiguousarray(x, dtype=np.float32))

    def wire_logits(self, wire: np.ndarray) -> np.ndarray:
        """Logits from the encoded payload the edge sends (``EdgeRunner.encode_offload``), decoded
        as the cloud server decodes it."""
        if wire.shape[0] == 0:
            return np.zeros((0, 0), dtype=np.float32)
        if self._wire_fn is None:
            raise RuntimeError(f"the {self.kind} cloud part takes no wire payloads")
        return self._wire_fn(wire)


def make_cloud(source: ModelSource, kind: CloudKind | None, model: nn.Module | None = None) -> CloudPart:
    """The cloud part of ``source``; ``kind=None`` picks ONNX when the bundle has a cloud.onnx.
    An edge-only bundle gets the ``none`` part (no sample ever reaches it)."""
    if source.manifest.edge_only:
        def unreachable(x: np.ndarray) -> np.ndarray:
            raise RuntimeError(f"model {source.name!r} is edge-only but offloaded {x.shape[0]} samples")

        return CloudPart("none", unreachable)
    onnx_path = getattr(source, "cloud_onnx", None)
    if kind is None:
        kind = "onnx" if onnx_path is not None and Path(onnx_path).is_file() else "torch"
    if kind == "onnx":
        if not isinstance(source, Bundle):
            raise ValueError("the ONNX cloud needs a bundle on disk; use the torch cloud for in-memory models")
        from edgecloud.cloud.sessions import load_cloud_model
        from edgecloud.config import CloudConfig

        served = load_cloud_model(source, CloudConfig(allow_spinning=False))
        return CloudPart("onnx", lambda x: served.run(x)[served.output_name],
                         lambda wire: served.run(wire)[served.output_name])
    if kind == "torch":
        module = copy.deepcopy((model if model is not None else source.build_model()).cloud_module())
        module = module.float().eval()
        spec = source.manifest.cloud

        def run_wire(wire: np.ndarray) -> np.ndarray:
            from edgecloud import offload

            x = np.ascontiguousarray(offload.decode(wire, spec), dtype=np.float32)
            with torch.inference_mode():
                return module(torch.from_numpy(x)).float().numpy()

        def run(x: np.ndarray) -> np.ndarray:
            from edgecloud import offload

            # through the wire encoding (cloud.encoding), as the ONNX cloud decodes its input
            return run_wire(offload.encode(x, spec))

        return CloudPart("torch", run, run_wire)
    raise ValueError(f"cloud must be 'onnx' or 'torch', got {kind!r}")
