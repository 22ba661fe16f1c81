"""Evaluate a bundle over a data set on a CiM backend, as the edge daemon would run it.

Per batch: :meth:`EdgeRunner.run` (``model.route(x, policy)`` under an :class:`EventLog`; edge
energy per sample from the backend's events), then the cloud part on the offloaded samples,
then :meth:`EdgeRunner.complete` (radio bits of the offloaded tensor + cloud MACs x
``mac_fp32``). Monte-Carlo over chips: chip ``s`` is a fresh ``create_backend(..., seed=s)``
programmed onto a fresh copy of the model, for ``s`` in ``seed .. seed + chips - 1``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from edgecloud.cim.energy import EnergyMeter, EnergyTable
from edgecloud.data.dataset import ImageDataset
from edgecloud.data.loader import Loader
from edgecloud.edge.runner import EdgeRunner, softmax_np
from edgecloud.evaluate.results import SampleTable, aggregate, summarize
from edgecloud.evaluate.source import CloudKind, CloudPart, ModelSource, make_cloud
from edgecloud.exits import ExitPolicy

DEFAULT_BATCH = 256


@dataclass
class EvalConfig:
    """How to evaluate: backend, chips, thresholds, energy table, batching."""

    backend: str = "digital"
    backend_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    chips: int = 1
    thresholds: list[float | None] | None = None  # None: the manifest's
    energy_table: str | None = None               # None: the packaged table
    cloud: CloudKind | None = None                # None: ONNX when the bundle has one, else torch
    batch_size: int = DEFAULT_BATCH
    progress: bool = True
    input_bits: int | None = None                 # None: the manifest's input.bits (usually off)

    def __post_init__(self) -> None:
        if self.chips < 1:
            raise ValueError(f"--chips must be >= 1, got {self.chips}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.input_bits is not None and not 1 <= self.input_bits <= 16:
            raise ValueError(f"--input-bits must lie in 1..16, got {self.input_bits}")

    def meter(self) -> EnergyMeter:
        return EnergyMeter(EnergyTable.load(self.energy_table))


@dataclass
class EvalReport:
    """Per-chip metrics, their mean ± std, and the per-sample tables behind them."""

    info: dict[str, Any]
    per_chip: list[dict[str, Any]]
    summary: dict[str, Any]
    tables: list[SampleTable]

    def to_json(self) -> dict[str, Any]:
        return {**self.info, "summary": self.summary, "per_chip": self.per_chip}


def make_policy(source: ModelSource, thresholds: list[float | None] | None) -> ExitPolicy:
    """The manifest's policy kind with the manifest's (or the given) per-exit thresholds."""
    m = source.manifest
    values = [e.threshold for e in m.exits] if thresholds is None else list(thresholds)
    if len(values) != len(m.exits):
        raise ValueError(
            f"model {m.name!r}: {len(values)} thresholds given but it has {len(m.exits)} exits "
            f"({', '.join(e.name for e in m.exits)})"
        )
    try:
        return ExitPolicy(kind=m.policy, thresholds=values)
    except ValueError as exc:
        raise ValueError(f"model {m.name!r}: {exc}") from exc


def baseline_joules(source: ModelSource, meter: EnergyMeter) -> float:
    """Energy per sample of the whole network at full precision (0 if the manifest lacks it)."""
    return float(source.manifest.reference_macs) * meter.table.per_event("mac_fp32")


def make_runner(source: ModelSource, config: EvalConfig, seed: int, policy: ExitPolicy,
                meter: EnergyMeter) -> EdgeRunner:
    """A fresh chip: a new backend instance with ``seed`` programmed onto a fresh model."""
    return EdgeRunner(source, config.backend, policy, meter,  # type: ignore[arg-type]
                      backend_options=dict(config.backend_options), seed=seed, input_bits=config.input_bits)


def run_chip(runner: EdgeRunner, cloud: CloudPart, data: ImageDataset, batch_size: int,
             progress: bool = False, desc: str = "eval") -> SampleTable:
    """Every sample through edge -> (cloud) exactly as the daemon runs it (the cloud always answers)."""
    parts: list[SampleTable] = []
    loader = Loader(data, batch_size)
    for x, y in tqdm(loader, desc=desc, total=len(loader), disable=not progress, leave=False,
                     file=sys.stderr, unit="batch"):
        edge = runner.run(x.numpy())
        cloud_probs = softmax_np(cloud.logits(edge.offload)) if edge.offload_index.size else None
        done = runner.complete(edge, cloud_probs, transmitted=True)
        parts.append(SampleTable(y.numpy(), done.class_index, done.exit_index, done.energy))
    return SampleTable.concat(parts)


def evaluate(source: ModelSource, data: ImageDataset, config: EvalConfig | None = None) -> EvalReport:
    """Evaluate ``source`` on ``data`` over ``config.chips`` chips (see module docstring)."""
    config = config or EvalConfig()
    meter = config.meter()
    policy = make_policy(source, config.thresholds)
    baseline = baseline_joules(source, meter)
    exit_names = [e.name for e in source.manifest.exits]
    seeds = list(range(config.seed, config.seed + config.chips))
    cloud: CloudPart | None = None
    per_chip: list[dict[str, Any]] = []
    tables: list[SampleTable] = []
    for s in seeds:
        runner = make_runner(source, config, s, policy, meter)
        if cloud is None:  # full precision: the same on every chip
            cloud = make_cloud(source, config.cloud)
        desc = f"chip {s}" if config.chips > 1 else "eval"
        table = run_chip(runner, cloud, data, config.batch_size, config.progress, desc)
        tables.append(table)
        per_chip.append({"seed": s, **summarize(table, exit_names, baseline)})
    info = {
        "bundle": source.name,
        "backend": config.backend,
        "backend_options": dict(config.backend_options),
        "chips": config.chips,
        "seeds": seeds,
        "cloud_runtime": cloud.kind if cloud else None,
        "policy": policy.kind,
        "thresholds": {n: t for n, t in zip(exit_names, policy.thresholds)},
        "exits": exit_names + ["cloud"],
        "energy_table": config.energy_table or "packaged",
        "baseline_network": source.manifest.reference_network or "this network",
        "samples": len(data),
    }
    summary = aggregate([{k: v for k, v in chip.items() if k not in ("seed", "samples")} for chip in per_chip])
    return EvalReport(info, per_chip, summary, tables)
