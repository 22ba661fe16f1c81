"""Crossbar simulation speed vs digital inference of the same quantized network, per kernel path.

Model: a CIFAR ResNet-20-shaped network (3 stages x 3 basic blocks, widths 16/32/64, 1x1
projection shortcuts) built here from ``QuantConv2d`` layers, BatchNorm statistics set from
one batch of random images (so activations have realistic sparsity), random 32x32 inputs.

Configurations (each against the *digital* backend running the same model):

- ``a_bitsliced``: every conv 8-bit weights / 8-bit activations; crossbar 128x128 tiles,
  2-bit cells (4 slices), bit-serial inputs (8 cycles), 8-bit ADC, preset "typical" (on/off
  10, PCM programming noise, faults, read noise, IR drop, calibrated range, 0.5 LSB ADC
  noise). Target: at least 1/15 of digital throughput.
- ``b_binary``: the binary edge configuration: binary convs (1-bit inputs, 1-bit cells, one
  cycle), full-precision stem conv as in the hybrid nets, same "typical" noise. Target >= 1/2.
- ``c_sram_typical`` (only with ``--config``): every conv 4-bit weights / 4-bit activations on
  the SRAM backend, preset "typical" (bit-line saturation, fixed per-site error, read noise,
  4-bit calibrated ADC per 10-row group). No target: it shows the saturation's cost.

Every kernel path this machine can run (``EDGECLOUD_CIM_KERNEL``: vnni, avx2, portable, torch;
see ``edgecloud/cim/kernel.py``) is measured side by side in one run. Every measurement runs in
its own fresh process (``--worker``), digital and each path interleaved, medians over rounds;
the calibration batch of the calibrated ADC is the untimed warm-up. Peak memory is each
worker's ``ru_maxrss``. ``--emulate-avx2`` runs everything as on an AVX2-only CPU: torch and
oneDNN limited to AVX2 (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``) and the
AVX-512 features hidden from kernel dispatch (``EDGECLOUD_CPU_FLAGS_OFF``). ``--device cuda``
runs both backends on the GPU (model and inputs on the device; the crossbar with
``device=cuda``). The last line is a one-line JSON summary naming the CPU (and GPU).

    python benchmarks/cim.py                    # batch 256, 3 rounds, every available path
    python benchmarks/cim.py --quick            # batch 32, 1 round (smoke run)
    python benchmarks/cim.py --paths avx2 --emulate-avx2
    python benchmarks/cim.py --device cuda
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

CONFIGS = {
    "a_bitsliced": {
        "weight_bits": 8, "act_bits": 8, "quant_stem": True, "target": 1 / 15,
        "options": {"preset": "typical", "rows": 128, "cols": 128, "cell_bits": 2, "dac_bits": 1, "adc_bits": 8},
    },
    "b_binary": {
        "weight_bits": 1, "act_bits": 1, "quant_stem": False, "target": 1 / 2,
        "options": {"preset": "typical", "rows": 128, "cols": 128, "cell_bits": 1, "dac_bits": 1, "adc_bits": 8},
    },
    "c_sram_typical": {
        "weight_bits": 4, "act_bits": 4, "quant_stem": True, "target": None, "backend": "sram",
        "options": {"preset": "typical"},
    },
}
DEFAULT_CONFIGS = ("a_bitsliced", "b_binary")
# torch eager re-faults big activation buffers without these (see notes/cpu-performance.md)
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "536870912",
}
# what an AVX2-only CPU lacks (hidden from kernel dispatch under --emulate-avx2)
AVX512_FLAGS = ["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16",
                "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq",
                "avx512_vp2intersect", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"]
EMULATE_AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "EDGECLOUD_CPU_FLAGS_OFF": ",".join(AVX512_FLAGS)}


def build_model(weight_bits: int, act_bits: int, quant_stem: bool):
    import torch
    from torch import nn

    from edgecloud.nn.quant import QuantConv2d

    def qconv(cin: int, cout: int, k: int, stride: int) -> nn.Module:
        return QuantConv2d(cin, cout, k, stride, k // 2, weight_bits=weight_bits, act_bits=act_bits)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1, self.b1 = qconv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
            self.c2, self.b2 = qconv(cout, cout, 3, 1), nn.BatchNorm2d(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(qconv(cin, cout, 1, stride), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
            return torch.relu(out + (x if self.short is None else self.short(x)))

    stem = (QuantConv2d(3, 16, 3, 1, 1, weight_bits=8, act_bits=8) if quant_stem
            else nn.Conv2d(3, 16, 3, 1, 1, bias=False))
    layers: list[nn.Module] = [stem, nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for width, stride in [(16, 1), (32, 2), (64, 2)]:
        for i in range(3):
            layers.append(Block(cin, width, stride if i == 0 else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def worker(config: str, backend: str, batch: int, reps: int, device: str) -> dict:
    import torch

    from edgecloud.cim.backend import create_backend
    from edgecloud.cim.events import EventLog, recording

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    torch.manual_seed(0)
    spec = CONFIGS[config]
    model = build_model(spec["weight_bits"], spec["act_bits"], spec["quant_stem"])
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for m in model.modules():  # BN statistics from one batch: realistic activation sparsity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    options = {**spec["options"], **({"device": device} if device != "cpu" else {})}
    if backend != "digital":
        backend = spec.get("backend", "crossbar")
    be = create_backend(backend, options if backend != "digital" else {}, seed=0)
    be.prepare(model)
    model, x = model.to(device), x.to(device)
    times = []
    with torch.inference_mode():
        log = EventLog(batch)
        with recording(log):
            logits = model(x)  # warm-up (and ADC calibration)
        sync()
        for _ in range(reps):
            start = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - start)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kern = getattr(be, "kernel", None)
    return {
        "img_s": batch / statistics.median(times),
        "peak_rss_mb": rss_mb,
        "kernel": None if backend == "digital" else (kern.path if kern is not None else "torch"),
        "top1": logits.argmax(1).tolist(),
        "events": {f"{c}/{e}": float(v.mean()) for (c, e), v in log.counts.items()},
    }


def run_worker(config: str, backend: str, batch: int, reps: int, env: dict[str, str], device: str) -> dict:
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(ROOT), **env}
    cmd = [sys.executable, __file__, "--worker", config, backend, "--batch", str(batch), "--reps", str(reps),
           "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {config}/{backend} {env.get('EDGECLOUD_CIM_KERNEL', '')} failed:\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(base_env: dict[str, str], device: str) -> dict:
    """CPU (as dispatch sees it, in a fresh process with the run's environment) and GPU."""
    code = ("import json, torch; from edgecloud.cim import kernel; d = kernel.describe(); "
            "d['gpu'] = torch.cuda.get_device_name() if torch.cuda.is_available() else None; print(json.dumps(d))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **base_env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if device == "cpu":
        info.pop("gpu")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 256, --quick 32)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, --quick 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed batches per worker (default 3, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--config", choices=sorted(CONFIGS), action="append", help="run only these")
    parser.add_argument("--paths", default=None,
                        help="comma list of kernel paths to measure (default: every path available here)")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="run as on an AVX2-only CPU (torch, oneDNN and kernel dispatch limited to AVX2)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where both backends run")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch = args.batch or (32 if args.quick else 256)
    reps = args.reps or (2 if args.quick else 3)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], batch, reps, args.device)))
        return
    rounds = args.rounds or (1 if args.quick else 3)
    base_env = dict(EMULATE_AVX2_ENV) if args.emulate_avx2 else {}
    info = machine(base_env, args.device)
    if args.device != "cpu":
        if info.get("gpu") is None:
            parser.error(f"--device {args.device}: torch sees no CUDA device on this machine")
        paths = ["cuda"]  # the torch path on the device
    else:
        paths = args.paths.split(",") if args.paths else info["available"]
        unknown = [p for p in paths if p not in info["available"]]
        if unknown:
            parser.error(f"--paths: {', '.join(unknown)} cannot run here (available: {', '.join(info['available'])}; "
                         f"why not: {info['unavailable']})")
    say = (lambda *a, **k: None) if args.json else print  # noqa: E731
    summary: dict = {"benchmark": "cim", "batch": batch, "rounds": rounds, "device": args.device,
                     "emulate_avx2": args.emulate_avx2, "auto_path": info["auto"], "cpu": info["cpu"],
                     **({"gpu": info["gpu"]} if args.device != "cpu" else {}), "configs": {}}
    for config in args.config or DEFAULT_CONFIGS:
        target = CONFIGS[config]["target"]
        speeds: dict[str, list[float]] = {"digital": [], **{p: [] for p in paths}}
        rss: dict[str, float] = {k: 0.0 for k in speeds}
        results: dict[str, dict] = {}
        for _ in range(rounds):
            for name in speeds:
                env = dict(base_env)
                if name not in ("digital", "cuda"):
                    env["EDGECLOUD_CIM_KERNEL"] = name
                res = run_worker(config, "digital" if name == "digital" else "crossbar", batch, reps, env, args.device)
                speeds[name].append(res["img_s"])
                rss[name] = max(rss[name], res["peak_rss_mb"])
                results[name] = res
        digital = statistics.median(speeds["digital"])
        entry: dict = {"digital_img_s": round(digital, 1), "target_ratio": target and round(target, 4),
                       "backend": CONFIGS[config].get("backend", "crossbar"), "paths": {}}
        for path in paths:
            ratios = [c / d for c, d in zip(speeds[path], speeds["digital"])]
            ratio = statistics.median(ratios)
            agree = sum(a == b for a, b in zip(results["digital"]["top1"], results[path]["top1"])) / batch
            entry["paths"][path] = {
                "kernel": results[path]["kernel"],
                "simulated_img_s": round(statistics.median(speeds[path]), 1),
                "ratio": round(ratio, 4),
                "ratios": [round(r, 4) for r in ratios],
                "slowdown": round(1 / ratio, 2),
                "meets_target": None if target is None else ratio >= target,
                "peak_rss_mb": round(rss[path], 1),
                "top1_agreement_with_digital": round(agree, 3),
            }
            say(f"{config} [{path}]: digital {entry['digital_img_s']} img/s, {entry['backend']} "
                f"{entry['paths'][path]['simulated_img_s']} img/s, ratio 1/{entry['paths'][path]['slowdown']} "
                f"({'no target' if target is None else f'target 1/{round(1 / target)}: ' + ('ok' if ratio >= target else 'MISSED')}), peak RSS "
                f"{entry['paths'][path]['peak_rss_mb']} MB, top-1 agreement {entry['paths'][path]['top1_agreement_with_digital']}",
                flush=True)
        entry["adc_conversions_per_image"] = sum(v for k, v in results[paths[0]]["events"].items()
                                                 if k.startswith("adc/adc_conversion"))
        entry["digital_peak_rss_mb"] = round(rss["digital"], 1)
        summary["configs"][config] = entry
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
