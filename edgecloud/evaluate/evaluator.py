"""Evaluate a bundle over a data set on a CiM backend, as the edge daemon would run it.

Per batch: :meth:`EdgeRunner.run` (``model.route(x, policy)`` under an :class:`EventLog`; edge
energy per sample from the backend's events), then the cloud part on the offloaded samples,
then :meth:`EdgeRunner.complete` (radio bits of the offloaded tensor + cloud MACs x
``mac_fp32``). Monte-Carlo over chips: chip ``s`` is a fresh ``create_backend(..., seed=s)``
programmed onto a fresh copy of the model, for ``s`` in ``seed .. seed + chips - 1``.

The backend runs with the bundle's manifest ``hardware`` defaults for it under the user's
options (:func:`edgecloud.bundle.bundle_backend_options`; ``EvalConfig.bundle_hardware=False``
ignores them). ADC conversions are priced under the energy table's ADC law, or
``EvalConfig.adc_law``; the report names it (``adc_law``).

On the crossbar backend the report adds the analytic cost model (:mod:`edgecloud.cim.cost`) of
one inference, from the layouts of the first chip after its evaluation (every chip has the same
layout: programming noise changes conductances, not tiles or ADC bits): ``latency_s``,
``area_mm2``, ``edap`` (J*s*mm^2) = ``edap_energy_j`` x latency x area, where ``edap_energy_j``
is the cost model's energy of one pass through *every* layer programmed on the crossbar
(array reads, ADC under the same law as the meter, DAC, sample & hold, shift-and-add; the digital
output scaling, the layers left digital, radio and cloud are not in it), and ``cost``: the same
with the breakdowns and one entry per layer (name, arrays, ADC bits -> arrays, energy, latency,
area). The event-based energy per sample (``summary.energy_j``, ``energy_total_j``) is reported
as before; it counts only the layers each sample ran (an early exit skips deeper edge layers).
On other backends these fields are null.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from edgecloud.cim.energy import EnergyMeter, EnergyTable
from edgecloud.data.dataset import ImageDataset
from edgecloud.data.loader import Loader
from edgecloud.distributed.executor import run_tasks
from edgecloud.edge.runner import EdgeResult, EdgeRunner, softmax_np
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
    adc_law: str | None = None                    # None: the energy table's (walden by default)
    bundle_hardware: bool = True                  # apply the bundle's manifest hardware defaults
    workers: int = 1                              # processes for the chips (1: one after another here)
    ray: str | None = None                        # Ray address: one Ray task per chip (edgecloud.distributed)

    def __post_init__(self) -> None:
        if self.chips < 1:
            raise ValueError(f"--chips must be >= 1, got {self.chips}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.input_bits is not None and not 1 <= self.input_bits <= 16:
            raise ValueError(f"--input-bits must lie in 1..16, got {self.input_bits}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")

    def meter(self) -> EnergyMeter:
        return EnergyMeter(EnergyTable.load(self.energy_table).with_adc_law(self.adc_law))


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


def baselines(source: ModelSource, meter: EnergyMeter) -> dict[str, Any] | None:
    """Energy per inference of the two ends of the design space (None when the manifest does
    not know the full-precision network's MACs, ``reference_macs`` = 0):

    - ``all_cloud``: the device sends every raw input as uint8 (1 byte per pixel value, its
      ``input.shape``) over the radio and the cloud runs the full-precision network; edge
      compute 0.
    - ``all_device``: the full-precision network runs on the device (its MACs x ``mac_fp32``,
      :func:`baseline_joules`); nothing is sent.
    """
    m = source.manifest
    macs = int(m.reference_macs)
    if macs <= 0:
        return None
    mac_j = meter.table.per_event("mac_fp32")
    raw_bytes = int(np.prod(m.input.shape, dtype=np.int64))
    radio_j = raw_bytes * 8 * meter.table.per_event("radio_bit")
    network = m.reference_network or "this network"
    return {
        "all_cloud": {"edge_compute_j": 0.0, "radio_j": radio_j, "cloud_j": macs * mac_j,
                      "total_j": radio_j + macs * mac_j, "bytes_per_inference": raw_bytes, "cloud_macs": macs,
                      "what": f"raw uint8 input ({raw_bytes:,} B) over the radio, {network} at full precision "
                              "in the cloud"},
        "all_device": {"edge_compute_j": macs * mac_j, "radio_j": 0.0, "cloud_j": 0.0, "total_j": macs * mac_j,
                       "bytes_per_inference": 0, "edge_macs": macs,
                       "what": f"{network} at full precision on the device (MACs x mac_fp32)"},
    }


def make_runner(source: ModelSource, config: EvalConfig, seed: int, policy: ExitPolicy,
                meter: EnergyMeter) -> EdgeRunner:
    """A fresh chip: a new backend instance with ``seed`` programmed onto a fresh model."""
    return EdgeRunner(source, config.backend, policy, meter,  # type: ignore[arg-type]
                      backend_options=dict(config.backend_options), seed=seed, input_bits=config.input_bits,
                      bundle_hardware=config.bundle_hardware)


COST_FIELDS = ("latency_s", "area_mm2", "edap", "edap_energy_j", "cost")


def crossbar_cost(runner: EdgeRunner, meter: EnergyMeter) -> dict[str, Any]:
    """The analytic cost of one inference on ``runner``'s crossbar chip (see module docstring).

    Layers the evaluation never reached (every sample left at an earlier exit) get their output
    positions from one extra all-zero sample through the whole model.
    """
    import torch

    from edgecloud.cim.cost import CostModel, layouts_from_backend

    backend = runner.backend
    if any(getattr(m, "positions", None) is None for _, m in backend._chips.values()):
        with torch.inference_mode():
            runner.model(torch.zeros(1, *runner.sample_shape))
    layouts = {lay.name: lay for lay in layouts_from_backend(backend)}
    if not layouts:
        return {k: None for k in COST_FIELDS}
    cost = CostModel(energy=meter.table, adc_law=meter.table.adc_law).cost(list(layouts.values()))
    layers = []
    for c in cost.layers:
        lay = layouts[c.name]
        arrays_by_bits: dict[int, int] = {}
        for row in lay.adc_bits:
            for bits in row:
                arrays_by_bits[bits] = arrays_by_bits.get(bits, 0) + 1
        layers.append({
            "name": c.name, "rows": lay.rows, "cols": lay.cols, "arrays": lay.arrays,
            "row_tiles": lay.n_row_tiles, "col_tiles": lay.n_col_tiles, "positions": lay.positions,
            "adc_bits_arrays": {str(b): n for b, n in sorted(arrays_by_bits.items())},
            "energy_j": c.energy_j, "energy_breakdown_j": dict(c.energy_breakdown_j),
            "latency_s": c.latency_s, "area_mm2": c.area_mm2, "area_breakdown_mm2": dict(c.area_breakdown_mm2),
            "conversions_by_bits": {str(b): n for b, n in lay.conversions_by_bits().items()},
        })
    detail = cost.to_dict(layers=False)
    detail["layers"] = layers
    return {"latency_s": cost.latency_s, "area_mm2": cost.area_mm2, "edap": cost.edap,
            "edap_energy_j": cost.energy_j, "cost": detail}


def offload_round_trip(runner: EdgeRunner, cloud: CloudPart, edge: EdgeResult) -> tuple[np.ndarray, np.ndarray]:
    """(cloud logits, bytes sent per row) of ``edge``'s offloaded rows, as the daemon does it:
    the edge encodes (``encode_offload``), the radio carries ``wire_bytes`` of that payload, the
    cloud decodes the payload itself."""
    if not edge.offload_index.size:
        return np.zeros((0, runner.num_classes), np.float32), np.zeros(0, np.int64)
    wire = runner.encode_offload(edge.offload)
    return cloud.wire_logits(wire), runner.wire_bytes(wire)


def run_chip(runner: EdgeRunner, cloud: CloudPart, data: ImageDataset, batch_size: int,
             progress: bool = False, desc: str = "eval") -> SampleTable:
    """Every sample through edge -> (cloud) exactly as the daemon runs it (the cloud always
    answers); radio energy from the bytes of the encoded payload actually sent."""
    parts: list[SampleTable] = []
    loader = Loader(data, batch_size)
    for x, y in tqdm(loader, desc=desc, total=len(loader), disable=not progress, leave=False,
                     file=sys.stderr, unit="batch"):
        edge = runner.run(x.numpy())
        logits, sent = offload_round_trip(runner, cloud, edge)
        cloud_probs = softmax_np(logits) if edge.offload_index.size else None
        done = runner.complete(edge, cloud_probs, transmitted=True, sent_bytes=sent)
        parts.append(SampleTable(y.numpy(), done.class_index, done.exit_index, done.energy))
    return SampleTable.concat(parts)


@dataclass
class ChipJob:
    """One chip of an evaluation (picklable: a process pool or Ray runs it)."""

    source: ModelSource
    config: EvalConfig
    seed: int
    first: bool          # the first chip also reports the layout's analytic cost


@dataclass
class ChipResult:
    seed: int
    table: SampleTable
    backend_options: dict[str, Any]
    costs: dict[str, Any]
    cloud_kind: str


def _quiet(config: EvalConfig) -> EvalConfig:
    from dataclasses import replace

    return replace(config, progress=False)


def eval_chip(job: ChipJob, data: ImageDataset) -> ChipResult:
    """Chip ``job.seed``: a fresh backend programmed onto a fresh model, every sample through it.
    Everything random is seeded by the chip, so where it runs changes nothing."""
    config = job.config
    meter = config.meter()
    policy = make_policy(job.source, config.thresholds)
    runner = make_runner(job.source, config, job.seed, policy, meter)
    cloud = make_cloud(job.source, config.cloud)  # full precision: the same on every chip
    desc = f"chip {job.seed}" if config.chips > 1 else "eval"
    table = run_chip(runner, cloud, data, config.batch_size, config.progress, desc)
    costs: dict[str, Any] = {k: None for k in COST_FIELDS}
    if job.first and config.backend == "crossbar":  # the layout is the same on every chip: cost it once
        costs = crossbar_cost(runner, meter)
    return ChipResult(job.seed, table, dict(runner.backend_options), costs, cloud.kind)


def evaluate(source: ModelSource, data: ImageDataset, config: EvalConfig | None = None) -> EvalReport:
    """Evaluate ``source`` on ``data`` over ``config.chips`` chips (see module docstring)."""
    config = config or EvalConfig()
    meter = config.meter()
    policy = make_policy(source, config.thresholds)
    baseline = baseline_joules(source, meter)
    ends = baselines(source, meter)
    all_cloud = ends["all_cloud"]["total_j"] if ends else None
    exit_names = [e.name for e in source.manifest.exits]
    seeds = list(range(config.seed, config.seed + config.chips))
    jobs = [ChipJob(source, config, s, first=s == seeds[0]) for s in seeds]
    fan_out = config.ray is not None or (config.workers > 1 and len(jobs) > 1)
    if fan_out:  # the chips' own progress bars would interleave: one bar over the chips instead
        jobs = [ChipJob(source, _quiet(config), j.seed, j.first) for j in jobs]
    results = run_tasks(eval_chip, jobs, shared=data, workers=config.workers, ray=config.ray,
                        progress=config.progress and fan_out, desc="chips")
    tables = [r.table for r in results]
    per_chip = [{"seed": r.seed, **summarize(r.table, exit_names, baseline, all_cloud_j=all_cloud)} for r in results]
    effective, costs = results[0].backend_options, results[0].costs
    cloud_kind = results[0].cloud_kind
    info = {
        "bundle": source.name,
        "backend": config.backend,
        "backend_options": dict(config.backend_options),
        # the bundle's manifest hardware defaults applied under backend_options, and the result
        "bundle_hardware": (dict((getattr(source.manifest, "hardware", None) or {}).get(config.backend) or {})
                            if config.bundle_hardware else {}),
        "backend_options_effective": effective,
        "chips": config.chips,
        "seeds": seeds,
        "cloud_runtime": cloud_kind,
        "policy": policy.kind,
        "thresholds": {n: t for n, t in zip(exit_names, policy.thresholds)},
        "exits": exit_names + ["cloud"],
        "energy_table": config.energy_table or "packaged",
        "adc_law": meter.table.adc_law,  # how ADC conversion energy scales with bits (edgecloud.cim.energy)
        **costs,
        "baseline_network": source.manifest.reference_network or "this network",
        "baselines": ends,  # all-cloud and all-device energy per inference (constants)
        "samples": len(data),
    }
    summary = aggregate([{k: v for k, v in chip.items() if k not in ("seed", "samples")} for chip in per_chip])
    return EvalReport(info, per_chip, summary, tables)
