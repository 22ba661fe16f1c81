"""Training-step speed, fp32 vs bf16 autocast (``optim.precision``), side by side in one process.

For each recipe given, builds its model (channels-last, as training does), runs SGD steps on a
random batch of 128 32x32 images in alternating rounds of fp32 and bf16 (the recipe's own joint
loss over all outputs), and reports the median step time of each and the speed-up. bf16 pays on
CPUs with AMX or AVX512-BF16; elsewhere oneDNN emulates it and it is several times SLOWER, which is
why training resolves ``precision: bf16`` to float32 there (``edgecloud.train.perf``; the summary
says which this CPU gets). The last line is a one-line JSON summary naming the CPU.

    python benchmarks/train_precision.py                                  # the FP and binary-hybrid ResNet-20s
    python benchmarks/train_precision.py --recipes cifar10-resnet20 --rounds 1 --steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from edgecloud.cim.cpu import cpu_info
from edgecloud.train.loop import build_model, exit_weights, joint_loss
from edgecloud.train.perf import native_bf16, training_precision
from edgecloud.train.recipe import load_recipe


def step_times(name: str, rounds: int, steps: int, batch: int) -> dict[str, float]:
    recipe = load_recipe(name)
    model = build_model(recipe).to(memory_format=torch.channels_last).train()
    weights = exit_weights(recipe.optim, len(getattr(model, "exit_names", [])) + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=g)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs = [o.float() for o in model(x)]
        loss = joint_loss(outputs, y, weights, 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        for mode in ("fp32", "bf16"):
            step(mode == "bf16")  # warm-up of this mode's kernels
            t0 = time.perf_counter()
            for _ in range(steps):
                step(mode == "bf16")
            times[mode].append((time.perf_counter() - t0) / steps)
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    return {"fp32_ms_per_step": round(fp32 * 1e3, 1), "bf16_ms_per_step": round(bf16 * 1e3, 1),
            "speedup": round(fp32 / bf16, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["cifar10-resnet20", "cifar10-hybrid-resnet20-binary"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    summary = {}
    for name in args.recipes:
        summary[name] = step_times(name, args.rounds, args.steps, args.batch)
        r = summary[name]
        print(f"{name}: fp32 {r['fp32_ms_per_step']} ms/step, bf16 {r['bf16_ms_per_step']} ms/step, "
              f"speed-up {r['speedup']}x", flush=True)
    print(json.dumps({"benchmark": "train_precision", "batch": args.batch, "threads": args.threads,
                      "cpu": cpu_info().model, "simd": cpu_info().simd(), "native_bf16": native_bf16(),
                      "recipe_bf16_trains_in": training_precision("bf16"), "results": summary}))


if __name__ == "__main__":
    main()
