"""Cost of one PGD step through the simulated crossbar (hardware-in-loop attacker) vs the digital model.

A hardware-in-loop PGD step is a forward pass through the simulated arrays (every non-ideality,
the ADC, a seeded chip) plus a straight-through (BPDA) backward of the ideal integer product,
via :class:`edgecloud.robust.hardware.HardwareModel` and ``attacks._logits_grad``, i.e. exactly
what ``edgecloud robust`` runs per step. Attacking the simulated chip is what makes robustness
grids take hours; this measures by how much, so a run can be planned.

Bundle ``models/cifar10-resnet20-8bit``, seeded random images in [0, 1] (no data set needed),
random labels. Modes, each in its own fresh process (``--worker``), as in ``benchmarks/cim.py``:

- ``digital_step``: one PGD step on ``HardwareModel(net, 'digital')``;
- ``crossbar_forward``: plain inference (``inference_mode``) on the crossbar, preset "typical";
- ``crossbar_step``: one PGD step on the crossbar (forward simulated, backward ideal);
- ``eot4_step``: the same with ``eot_reads=4`` (four noisy forwards per step; ~4x expected).

The crossbar is calibrated (``HardwareModel.calibrate``) on two clean batches first, untimed.
``--warmup`` untimed reps, then the median of ``--reps``. Times are ms per image per step; the
summary also estimates a 30-step PGD over 1,000 images in seconds (what ``edgecloud robust``
runs per eps by default). The last line is a one-line JSON summary naming the CPU.

    python benchmarks/robust.py                 # batch 64, 5 reps, every mode
    python benchmarks/robust.py --quick         # batch 8, 1 rep (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUNDLE = ROOT / "models" / "cifar10-resnet20-8bit"
OPTIONS = {"preset": "typical"}
MODES = {  # name: (backend, eot_reads, with gradient)
    "digital_step": ("digital", 1, True),
    "crossbar_forward": ("crossbar", 1, False),
    "crossbar_step": ("crossbar", 1, True),
    "eot4_step": ("crossbar", 4, True),
}
PGD_STEPS, PGD_IMAGES = 30, 1000
# the same allocator settings as benchmarks/cim.py (torch eager re-faults big buffers without them)
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "536870912",
}


def worker(mode: str, batch: int, reps: int, warmup: int) -> dict:
    """Time one mode in this process: ms per image per step (median over ``reps``)."""
    import torch

    from edgecloud.cim import kernel
    from edgecloud.evaluate.source import resolve_bundle
    from edgecloud.robust import attacks
    from edgecloud.robust.hardware import HardwareModel

    backend, eot_reads, grad = MODES[mode]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    calib = torch.rand(2 * batch, 3, 32, 32, generator=gen)  # clean batches, never the timed ones
    net = resolve_bundle(BUNDLE, None).build_model()
    model = HardwareModel(net, backend, OPTIONS if backend != "digital" else {}, eot_reads=eot_reads)
    if backend != "digital":
        model.calibrate(calib, batch_size=batch)

    def step() -> None:
        if grad:
            attacks._logits_grad(model, x, y)
        else:
            with torch.inference_mode():
                model(x)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    path = None
    if backend != "digital":  # the backend's own kernel where HardwareModel keeps it, else the environment's
        be = (getattr(model, "backends", None) or [None])[0]
        kern = be.kernel if be is not None and hasattr(be, "kernel") else kernel.resolve()
        path = kern.path if kern is not None else "torch"
    return {"ms_img": 1000 * statistics.median(times) / batch, "times_s": [round(t, 4) for t in times],
            "kernel": path, "threads": torch.get_num_threads(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_worker(mode: str, batch: int, reps: int, warmup: int) -> dict:
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--worker", mode, "--batch", str(batch), "--reps", str(reps),
           "--warmup", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """CPU and kernel paths as dispatch sees them, in a fresh process with the run's environment."""
    code = "import json; from edgecloud.cim import kernel; print(json.dumps(kernel.describe()))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 64, --quick 8)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per mode (default 5, --quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, --quick 1)")
    parser.add_argument("--no-eot", action="store_true", help="skip the eot_reads=4 mode")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    parser.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch = args.batch or (8 if args.quick else 64)
    reps = args.reps or (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.worker:
        print(json.dumps(worker(args.worker, batch, reps, warmup)))
        return
    say = (lambda *a, **k: None) if args.json else print  # noqa: E731
    info = machine()
    modes = [m for m in MODES if not (args.no_eot and m == "eot4_step")]
    results: dict[str, dict] = {}
    for mode in modes:
        results[mode] = res = run_worker(mode, batch, reps, warmup)
        say(f"  {mode}: {res['ms_img']:.3f} ms/img (reps {res['times_s']} s)", flush=True)
    ms = {m: r["ms_img"] for m, r in results.items()}
    kern = results["crossbar_step"]["kernel"]
    threads = results["digital_step"]["threads"]
    ratios = {"crossbar_step/digital_step": ms["crossbar_step"] / ms["digital_step"],
              "crossbar_step/crossbar_forward": ms["crossbar_step"] / ms["crossbar_forward"]}
    if "eot4_step" in ms:
        ratios["eot4_step/crossbar_step"] = ms["eot4_step"] / ms["crossbar_step"]
    pgd_s = {m: ms[m] * PGD_STEPS * PGD_IMAGES / 1000 for m in ms if m.endswith("_step")}
    say(f"\nPGD step cost, {BUNDLE.name}, batch {batch}, median of {reps} (warm-up {warmup}), "
        f"crossbar kernel {kern} (auto: {info['auto']}), torch threads {threads}, CPU {info['cpu'].get('model')}")
    say(f"{'mode':<18}{'ms/img/step':>13}{'img/s':>10}{'PGD-30 x 1000 img':>20}{'peak RSS MB':>13}")
    for m in modes:
        est = f"{pgd_s[m]:.0f} s" if m in pgd_s else "-"
        say(f"{m:<18}{ms[m]:>13.3f}{1000 / ms[m]:>10.1f}{est:>20}{results[m]['peak_rss_mb']:>13.0f}")
    for name, value in ratios.items():
        say(f"{name:<32}{value:>8.2f}x")
    summary = {
        "benchmark": "robust", "bundle": BUNDLE.name, "batch": batch, "reps": reps, "warmup": warmup,
        "options": OPTIONS, "kernel": kern, "auto_path": info["auto"], "threads": threads,
        "ms_per_image_step": {m: round(v, 4) for m, v in ms.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        f"pgd{PGD_STEPS}_{PGD_IMAGES}img_s": {m: round(v, 1) for m, v in pgd_s.items()},
        "peak_rss_mb": {m: round(r["peak_rss_mb"], 1) for m, r in results.items()},
        "cpu": info["cpu"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
