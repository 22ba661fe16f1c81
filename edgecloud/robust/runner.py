"""The robustness grid: bundle x backend x threat x attack x eps x chip -> accuracy.

Phase 1 (this process): images crafted on the digital model (``white-box`` rows and every
``non-adaptive`` attack) are crafted once, since they do not depend on the chip. Phase 2: one
job per (backend, chip) in a pool of local processes (``workers``), each programming its
chip once, calibrating its ADCs on clean validation images (never on test or adversarial
images), then crafting what depends on the chip and evaluating everything on it.

Resuming: with a ``cache`` folder every finished row (and the digitally crafted images) is
written as it is measured, under a key of the settings that change results; a rerun of the same
command skips what is there. Hardware-in-loop attacks take hours on a CPU: a unit crafted
through a chip also saves a checkpoint after each batch, so a stopped run loses at most the batch
it was in, and the resumed run gives exactly the uninterrupted one's rows.

Every random choice is seeded: the images (a class-balanced subset), the chips (seed = chip
index), the attacks' random starts (from ``seed``, the attack, eps and chip), read noise (the
backend's seeded stream), so a run repeats exactly.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from edgecloud.bundle import bundle_backend_options
from edgecloud.distributed.executor import cores, run_tasks
from edgecloud.robust import attacks
from edgecloud.robust.hardware import HardwareModel
from edgecloud.robust.partial import Partial, load_partial, save_partial
from edgecloud.robust.threats import check_threats, crafted_digitally, surrogate_seeds

ATTACKS = ("fgsm", "pgd", "pgd-l2", "square", "transfer")
GRID_AXES = ("attacks", "eps", "backends", "threats", "chips")


@dataclass
class RobustConfig:
    """What to attack and how (the options of ``edgecloud robust``)."""

    bundle: str
    repository: str | None = None
    dataset: str | None = None        # default: the bundle's data set (from its training section)
    data_root: str | None = None
    limit: int = 1000                 # class-balanced subset of the test split
    attacks: list[str] = field(default_factory=lambda: ["pgd"])
    eps: list[float] = field(default_factory=lambda: [1 / 255, 2 / 255, 4 / 255, 8 / 255])
    steps: int = 30
    step_size: float | None = None    # default 2.5 eps / steps
    queries: int = 1000               # Square: iterations (queries per image)
    square_p_init: float = 0.8        # Square: share of the image the first squares cover (AutoAttack's CIFAR value)
    backends: list[str] = field(default_factory=lambda: ["digital", "crossbar"])
    backend_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per backend name
    threats: list[str] = field(default_factory=lambda: ["non-adaptive", "hardware-in-loop"])
    chips: int = 3
    eot_reads: int = 1                # hardware-in-loop: forward passes averaged per step
    eot_chips: int = 1                # chip-transfer: surrogate chips averaged per step
    output: str | None = None         # which output to attack (an exit name; default the final one)
    input_bits: int | None = None     # input discretisation (a defence), attacked with BPDA
    transfer_from: str | None = None  # attack "transfer": the bundle the images are crafted on
    calib_samples: int = 256          # clean validation images through each chip first (ADC ranges)
    stop_on_success: bool = True      # PGD: images already misclassified leave the batch
    batch_size: int = 250
    seed: int = 0
    workers: int | None = None        # processes for the chip jobs (default: one per core, <= jobs)
    ray: str | None = None            # Ray address: the chip jobs run as Ray tasks (edgecloud.distributed)
    cache: str | None = None          # folder of finished rows (resume); None: no cache

    def key(self) -> str:
        """A digest of every setting that changes a row's result.

        Not the grid's axes (attacks, eps, backends, threats, chips): each row is measured on its
        own seeded sub-streams, so a run that widens the grid (adds a threat, an eps, a chip)
        reuses every row an earlier run measured. Not workers, cache or progress either. Square's
        ``square_p_init`` only where Square is among the attacks (PGD-only runs keep their keys).
        """
        settings = {k: v for k, v in asdict(self).items() if k not in GRID_AXES + ("workers", "cache", "ray")}
        if "square" not in self.attacks:
            settings.pop("square_p_init")
        bundle = Path(self.bundle)
        if (bundle / "edge.pt").is_file():  # a bundle folder: its weights are part of the key
            settings["weights"] = hashlib.sha256((bundle / "edge.pt").read_bytes()).hexdigest()
        hardware = bundle_hardware(self.bundle, self.repository)
        if hardware:  # the manifest's backend defaults change the chips (absent: keys as before)
            settings["bundle_hardware"] = hardware
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def __post_init__(self) -> None:
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad:
            raise ValueError(f"--attack: unknown {', '.join(bad)}; choose from {', '.join(ATTACKS)}")
        if "transfer" in self.attacks and not self.transfer_from:
            raise ValueError("--attack transfer needs --transfer-from BUNDLE (the model the images are crafted on)")
        if any(e < 0 or e > 1 for e in self.eps):
            raise ValueError(f"--eps: every value must lie in [0, 1] (pixels), got {self.eps}")
        if self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.chips < 1:
            raise ValueError(f"--chips must be >= 1, got {self.chips}")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.queries < 1:
            raise ValueError(f"--queries must be >= 1, got {self.queries}")
        if not 0 < self.square_p_init <= 1:
            raise ValueError(f"--square-p-init must lie in (0, 1], got {self.square_p_init}")
        for backend in self.backends:
            check_threats(backend, self.threats)


@dataclass
class Row:
    """One measured accuracy (the ``results`` rows of ``--json``; eps 0 is the clean accuracy)."""

    backend: str
    threat: str
    attack: str
    eps: float
    chip: int | None
    samples: int
    accuracy: float


class RowCache:
    """Finished rows of one job in a JSON-lines file (None path: remembers nothing)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.rows: dict[tuple[str, str, float], Row] = {}
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = Row(**json.loads(line))
                    self.rows[(row.threat, row.attack, row.eps)] = row

    def get(self, threat: str, attack: str, eps: float) -> Row | None:
        return self.rows.get((threat, attack, eps))

    def add(self, row: Row) -> Row:
        self.rows[(row.threat, row.attack, row.eps)] = row
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(asdict(row)) + "\n")
        return row


def _cache_file(config: RobustConfig, name: str) -> Path | None:
    return Path(config.cache) / config.key() / name if config.cache else None


# ---- data and models ------------------------------------------------------------------------------

def bundle_hardware(bundle: str, repository: str | None) -> dict[str, Any]:
    """The bundle's manifest ``hardware`` defaults ({} when it has none or cannot be read here)."""
    from edgecloud.evaluate.source import resolve_bundle

    try:
        return dict(resolve_bundle(bundle, repository).manifest.hardware)
    except (OSError, KeyError, ValueError):
        return {}


def load_model(bundle: str, repository: str | None) -> tuple[torch.nn.Module, Any]:
    from edgecloud.evaluate.source import resolve_bundle

    b = resolve_bundle(bundle, repository)
    return b.build_model(), b.manifest


def load_images(config: RobustConfig, manifest: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(test images, labels, calibration images from the validation split, data description)."""
    from edgecloud.evaluate.source import load_eval_data, training_dataset

    dataset = config.dataset or training_dataset(manifest) or "cifar10"
    test, info = load_eval_data(dataset, "test", manifest, config.data_root, sample=config.limit)
    try:
        val, _ = load_eval_data(dataset, "val", manifest, config.data_root, sample=config.calib_samples)
    except ValueError:  # a validation split smaller than calib_samples: calibrate on all of it
        val, _ = load_eval_data(dataset, "val", manifest, config.data_root)
    return test.images.float() / 255.0, test.labels, val.images.float() / 255.0, info


def _generator(config: RobustConfig, *parts: Any) -> torch.Generator:
    key = zlib.crc32(repr((config.seed, *parts)).encode())
    gen = torch.Generator()
    gen.manual_seed(key)
    return gen


def _fingerprint(x: torch.Tensor, y: torch.Tensor, attack: str, eps: float, key: tuple[Any, ...]) -> str:
    digest = hashlib.sha256(x.contiguous().numpy().tobytes())
    digest.update(y.contiguous().numpy().tobytes())
    digest.update(repr((attack, eps, key)).encode())
    return digest.hexdigest()[:16]


def craft(model: Callable[[torch.Tensor], torch.Tensor], attack: str, x: torch.Tensor, y: torch.Tensor, eps: float,
          config: RobustConfig, key: tuple[Any, ...], checkpoint: Path | None = None,
          note: Callable[[str], None] | None = None) -> torch.Tensor:
    """Adversarial copies of ``x`` (batch by batch) by ``attack`` on ``model``.

    ``checkpoint``: a file saved after each batch (with the attack's generator and ``model``'s
    read noise, see :mod:`edgecloud.robust.partial`); when it exists, crafting continues after its
    last batch and gives what an uninterrupted run gives. The caller removes it when done.
    ``note``: told one line per saved batch (a run of hours says how far it is, even without bars).
    """
    out: list[torch.Tensor] = []
    gen = _generator(config, attack, eps, *key)
    fingerprint = _fingerprint(x, y, attack, eps, key) if checkpoint is not None else ""
    resumed = load_partial(checkpoint, fingerprint) if checkpoint is not None else None
    if resumed is not None:
        out = list(resumed.batches)
        gen.set_state(resumed.generator)
        if hasattr(model, "set_read_state"):
            model.set_read_state(resumed.reads)
    # Early stop trusts one forward pass: only sound on a deterministic model. On a noisy chip an
    # image "misclassified" by one read is often classified right by the next (measured: it made
    # hardware-in-loop PGD weaker than the non-adaptive attack), so noisy crafting runs every step.
    stop = config.stop_on_success and getattr(model, "deterministic", True)
    for start in range(len(out) * config.batch_size, len(x), config.batch_size):
        xb, yb = x[start:start + config.batch_size], y[start:start + config.batch_size]
        if attack == "fgsm":
            out.append(attacks.fgsm(model, xb, yb, eps))
        elif attack in ("pgd", "transfer"):
            out.append(attacks.pgd(model, xb, yb, eps, steps=config.steps, step_size=config.step_size,
                                   generator=gen, stop_on_success=stop and attack == "pgd"))
        elif attack == "pgd-l2":
            out.append(attacks.pgd(model, xb, yb, eps, steps=config.steps, step_size=config.step_size, norm="l2",
                                   generator=gen, stop_on_success=stop))
        elif attack == "square":
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            out.append(attacks.square(model, xb, yb, eps, queries=config.queries, p_init=config.square_p_init, seed=seed,
                                      batch_size=config.batch_size))
        else:
            raise ValueError(f"unknown attack {attack!r}")
        if checkpoint is not None and start + config.batch_size < len(x):
            reads = model.read_state() if hasattr(model, "read_state") else []
            save_partial(checkpoint, Partial(out, gen.get_state(), reads, fingerprint))
            if note is not None:
                batches = -(-len(x) // config.batch_size)
                note(f"{attack} eps {eps:.4g} crafted on {key}: batch {len(out)}/{batches} saved ({checkpoint.name})")
    return torch.cat(out) if out else x.clone()


@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    correct = 0
    for start in range(0, len(x), batch_size):
        correct += int((model(x[start:start + batch_size]).argmax(1) == y[start:start + batch_size]).sum())
    return correct / max(len(x), 1)


# ---- phase 1: digital --------------------------------------------------------------------------

def digital_phase(config: RobustConfig, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  progress: bool) -> tuple[list[Row], dict[tuple[str, float], torch.Tensor]]:
    """Rows of the digital model and the images crafted on it (keyed by attack and eps)."""
    needed = "digital" in config.backends or any(
        crafted_digitally(t) for b in config.backends if b != "digital" for t in check_threats(b, config.threats))
    crafted: dict[tuple[str, float], torch.Tensor] = {}
    rows: list[Row] = []
    if not needed:
        return rows, crafted
    digital = HardwareModel(net, "digital", output=config.output, input_bits=config.input_bits)
    source = digital
    if "transfer" in config.attacks:
        src_net, _ = load_model(config.transfer_from, config.repository)  # type: ignore[arg-type]
        source = HardwareModel(src_net, "digital", input_bits=config.input_bits)
    cache = RowCache(_cache_file(config, "digital.jsonl"))
    images = _cache_file(config, "digital-crafted")
    clean = cache.get("clean", "none", 0.0) or cache.add(
        Row("digital", "clean", "none", 0.0, None, len(x), accuracy(digital, x, y, config.batch_size)))
    rows.append(clean)
    todo = [(a, e) for a in config.attacks for e in config.eps if e > 0]
    for attack, eps in tqdm(todo, desc="digital: crafting", disable=not progress, leave=False):
        threat = "transfer" if attack == "transfer" else "white-box"
        saved = images / f"{attack}-{eps!r}.pt" if images is not None else None
        row = cache.get(threat, attack, eps)
        if row is not None and saved is not None and saved.is_file():
            crafted[(attack, eps)] = torch.load(saved)
            rows.append(row)
            continue
        crafter = source if attack == "transfer" else digital
        crafted[(attack, eps)] = craft(crafter, attack, x, y, eps, config, ("digital",))
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            torch.save(crafted[(attack, eps)], saved)
        rows.append(cache.add(Row("digital", threat, attack, eps, None, len(x),
                                  accuracy(digital, crafted[(attack, eps)], y, config.batch_size))))
    return rows, crafted


# ---- phase 2: one chip -------------------------------------------------------------------------

@dataclass
class ChipJob:
    config: RobustConfig
    backend: str
    chip: int
    data_path: str      # torch.save'd {"x", "y", "calib", "crafted"} (or "" when run_chip is given them)
    threads: int
    progress_position: int = 0
    progress: bool = True
    units: list[tuple[str, str, float]] | None = None  # None: the clean row and every cheap unit


Unit = tuple[str, str, float]  # (threat, attack, eps)


def chip_units(config: RobustConfig, backend: str) -> tuple[list[Unit], list[Unit]]:
    """(cheap, costly) units of one chip. Costly ones craft through a chip (hardware-in-loop,
    chip-transfer): each becomes its own job, so a few chips keep every core busy."""
    units = [(t, a, e) for t in check_threats(backend, config.threats) for a in config.attacks
             for e in config.eps if e > 0]
    costly = [u for u in units if u[1] != "transfer" and not crafted_digitally(u[0])]
    return [u for u in units if u not in costly], costly


def _note(line: str) -> None:
    tqdm.write(f"robust: {time.strftime('%H:%M:%S')} {line}", file=sys.stderr)


def run_chip(job: ChipJob, data: dict[str, Any] | None = None) -> list[Row]:
    """Evaluate units of one chip (runs in a worker process): the clean row and the cheap units,
    or the costly units ``job.units``. The chip is programmed and calibrated the same way in
    every job, and each unit reads noise from its own sub-stream, so the split changes nothing."""
    torch.set_num_threads(max(1, job.threads))
    config = job.config
    if data is None:
        data = torch.load(job.data_path, weights_only=False)
    x, y, calib, crafted = data["x"], data["y"], data["calib"], data["crafted"]
    net, manifest = load_model(config.bundle, config.repository)
    # the bundle's manifest hardware defaults for this backend, under the user's options
    options = bundle_backend_options(manifest, job.backend, config.backend_options.get(job.backend, {}))
    victim = HardwareModel(net, job.backend, options, [job.chip], output=config.output,
                           input_bits=config.input_bits)
    victim.calibrate(calib, config.batch_size)
    cache = RowCache(_cache_file(config, f"{job.backend}-chip{job.chip}.jsonl"))
    # Each unit of work reads noise from its own sub-stream: a resumed run repeats an uninterrupted one.
    rows: list[Row] = []
    if job.units is None:
        clean = cache.get("clean", "none", 0.0)
        if clean is None:
            victim.restart_reads("clean")
            clean = cache.add(Row(job.backend, "clean", "none", 0.0, job.chip, len(x),
                                  accuracy(victim, x, y, config.batch_size)))
        rows.append(clean)
    units = chip_units(config, job.backend)[0] if job.units is None else job.units
    surrogate: HardwareModel | None = None
    crafter_eot: HardwareModel | None = None
    bar = tqdm(units, desc=f"{job.backend} chip {job.chip}", disable=not job.progress, leave=False,
               position=job.progress_position)
    for threat, attack, eps in bar:
        label = "transfer" if attack == "transfer" else threat
        done = cache.get(label, attack, eps)
        if done is not None:
            rows.append(done)
            continue
        if threat == "hardware-in-loop" and config.eot_reads > 1 and crafter_eot is None:
            crafter_eot = HardwareModel(net, job.backend, options, [job.chip], output=config.output,
                                        eot_reads=config.eot_reads, input_bits=config.input_bits)
            crafter_eot.calibrate(calib, config.batch_size)
        if threat == "chip-transfer" and surrogate is None:
            surrogate = HardwareModel(net, job.backend, options, surrogate_seeds(job.chip, config.eot_chips),
                                      output=config.output, input_bits=config.input_bits)
            surrogate.calibrate(calib, config.batch_size)
        for model in (victim, crafter_eot, surrogate):
            if model is not None:
                model.restart_reads(f"{label}/{attack}/{eps!r}")
        if attack == "transfer" or crafted_digitally(threat):
            adv = crafted[(attack, eps)]
        else:  # crafted through a chip: hours on a CPU, so checkpointed after each batch
            partial = _cache_file(config, f"{job.backend}-chip{job.chip}-{label}-{attack}-{eps!r}.partial.pt.zst")
            crafter = (crafter_eot or victim) if threat == "hardware-in-loop" else surrogate
            assert crafter is not None
            adv = craft(crafter, attack, x, y, eps, config, (job.backend, job.chip, threat), partial,
                        note=_note)
            if partial is not None:
                partial.unlink(missing_ok=True)
        rows.append(cache.add(Row(job.backend, label, attack, eps, job.chip, len(x),
                                  accuracy(victim, adv, y, config.batch_size))))
    return rows


# ---- the whole grid ----------------------------------------------------------------------------

def run_robustness(config: RobustConfig, progress: bool = True) -> tuple[list[Row], dict[str, Any]]:
    """Every row of the grid, and a description of the run (data, settings)."""
    torch.manual_seed(config.seed)
    net, manifest = load_model(config.bundle, config.repository)
    x, y, calib, info = load_images(config, manifest)
    rows, crafted = digital_phase(config, net, x, y, progress)
    chip_backends = [b for b in config.backends if b != "digital"]
    # costly units (one job each, first: longest first packs the pool best), then one job per chip
    # for its clean row and cheap units; costly units already in the cache are read here
    jobs_spec: list[tuple[str, int, list[Unit] | None]] = []
    for b in chip_backends:
        for c in range(config.chips):
            cache = RowCache(_cache_file(config, f"{b}-chip{c}.jsonl"))
            for unit in chip_units(config, b)[1]:
                done = cache.get(*unit)
                if done is not None:
                    rows.append(done)
                else:
                    jobs_spec.append((b, c, [unit]))
    jobs_spec += [(b, c, None) for b in chip_backends for c in range(config.chips)]
    if jobs_spec:
        n = max(1, min(config.workers or cores(), len(jobs_spec)))
        threads = 1 if config.ray else max(1, cores() // n)  # Ray: one CPU per task, the cluster schedules
        jobs = [ChipJob(config, b, c, "", threads, i % n + 1, progress and not config.ray, units)
                for i, (b, c, units) in enumerate(jobs_spec)]
        shared = {"x": x, "y": y, "calib": calib, "crafted": crafted}
        results = run_tasks(run_chip, jobs, shared=shared, workers=n, ray=config.ray,
                            cpus_per_task=threads, progress=progress, desc="chip jobs")
        for job, chip_rows in zip(jobs, results):
            if config.ray:  # a task on another node wrote its cache there: keep the rows here too
                cache = RowCache(_cache_file(config, f"{job.backend}-chip{job.chip}.jsonl"))
                for row in chip_rows:
                    if cache.get(row.threat, row.attack, row.eps) is None:
                        cache.add(row)
            rows += chip_rows
    order = {b: i for i, b in enumerate(config.backends)}
    rows.sort(key=lambda r: (order.get(r.backend, 99), r.threat, r.attack, r.eps, -1 if r.chip is None else r.chip))
    settings = {k: v for k, v in asdict(config).items() if k not in ("workers", "cache", "ray")}
    return rows, {"data": info, "settings": settings, "bundle": manifest.name,
                  "bundle_hardware": {b: manifest.hardware[b] for b in chip_backends if b in manifest.hardware}}
