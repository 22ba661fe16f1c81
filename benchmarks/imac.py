"""The README's "IMAC reproduction" table: run each `edgecloud eval` command, print the rows.

Every number in the table comes from the JSON (last stdout line) of the command written in its
row; this script runs those commands (``python -m edgecloud eval ...`` in this interpreter, from
the repository root), keeps each output under ``--out`` and prints the markdown table, so the
README can be regenerated and checked. Accuracy evaluations of the sram backend take minutes
(LeNet-5, 20 chips x 10,000 images) to tens of minutes (VGG-small, 20 chips x 1,000 images);
``--reuse`` takes outputs already under ``--out``.

    python benchmarks/imac.py --only lenet --out runs/imac
    python benchmarks/imac.py --only vgg --out runs/imac --reuse
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = "--dataset cifar10 --data-root ../shared/datasets/cifar10"
LENET = "edgecloud eval models/fmnist-lenet5-4bit --dataset fashion-mnist"
VGG = f"edgecloud eval models/cifar10-vgg-small-4bit {CIFAR}"
IMAC_L = "--backend sram --backend-option preset=imac --backend-option group_size=25"
IMAC_V = "--backend sram --backend-option preset=imac --backend-option group_size=10"
TABLE_IMAC = "--energy-table edgecloud/cim/energy_table_imac.yaml"
SEQ = "--baseline von-neumann --baseline-option accumulate=sequential"

# (key, network, quantity, what to read, published, command)
ROWS = [
    ("lenet-digital", "LeNet-5, Fashion-MNIST test", "4-bit digital accuracy (10,000 images)", "accuracy",
     "MNIST: 99 % with non-idealities", f"{LENET} --json"),
    ("lenet-arrays", "", "SRAM-CiM, arrays model, 20 chips (10,000 images)", "accuracy", "—",
     f"{LENET} {IMAC_L} --chips 20 --baseline von-neumann --json"),
    ("lenet-imac", "", "SRAM-CiM, IMAC's error model, 20 chips (10,000 images)", "accuracy", "—",
     f"{LENET} {IMAC_L} --backend-option accuracy_model=imac --chips 20 --json"),
    ("lenet-arrays", "", "energy, delay: von Neumann / SRAM-CiM (packaged table, bit-line accumulation)",
     "ratios", "6.24×, 9.42×", "the arrays-model command above (its `baseline` block)"),
    ("lenet-seq", "", "same, one product per compute cycle (IMAC's system-script convention)", "ratios",
     "6.24×, 9.42×", f"{LENET} {IMAC_L} --limit 1000 {SEQ} --json"),
    ("lenet-seq-imac", "", "same, with IMAC's 65 nm constants", "ratios", "6.24×, 9.42×",
     f"{LENET} {IMAC_L} --limit 1000 {TABLE_IMAC} {SEQ} --json"),
    ("vgg-digital", "VGG-small, CIFAR-10 test", "4-bit digital accuracy (10,000 images)", "accuracy",
     "VGG: 91.38 % full precision", f"{VGG} --json"),
    ("vgg-digital-1k", "", "4-bit digital accuracy, 1,000-image class-balanced subset", "accuracy", "—",
     f"{VGG} --sample 1000 --json"),
    ("vgg-arrays", "", "SRAM-CiM, arrays model, 20 chips (1,000-image class-balanced subset)", "accuracy",
     "88.8 % (repo: 88.99 ± 0.15 over 1000 runs)",
     f"{VGG} --sample 1000 {IMAC_V} --chips 20 --baseline von-neumann --json"),
    ("vgg-imac", "", "SRAM-CiM, IMAC's error model, 20 chips (all 10,000 images, class-interleaved)", "accuracy",
     "88.8 %", f"{VGG} --sample 10000 {IMAC_V} --backend-option accuracy_model=imac --chips 20 --json"),
    ("vgg-arrays", "", "energy, delay: von Neumann / SRAM-CiM (packaged table, bit-line accumulation)",
     "ratios", "6.24×, 9.42×", "the arrays-model command above (its `baseline` block)"),
    ("vgg-seq", "", "same, one product per compute cycle", "ratios", "6.24×, 9.42×",
     f"{VGG} --sample 100 {IMAC_V} {SEQ} --json"),
    ("vgg-seq-imac", "", "same, with IMAC's 65 nm constants", "ratios", "6.24×, 9.42×",
     f"{VGG} --sample 100 {IMAC_V} {TABLE_IMAC} {SEQ} --json"),
]


def run(key: str, command: str, out: Path, reuse: bool) -> dict:
    path = out / f"{key}.txt"
    if not (reuse and path.is_file()):
        argv = [sys.executable, "-m", "edgecloud", *shlex.split(command)[1:]]
        print(f"running: {command}", file=sys.stderr, flush=True)
        result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{command}\nfailed ({result.returncode}):\n{result.stderr[-2000:]}")
        path.write_text(result.stdout)
    return json.loads(path.read_text().strip().splitlines()[-1])


def cell(report: dict, what: str) -> str:
    s = report["summary"]
    if what == "ratios":
        b, m = report["baseline"], report["baseline"]["mapped_layers_only"]
        text = f"{b['energy_ratio']:.3g}×, {b['delay_ratio']:.3g}×"
        if any(lay["mapped"] != "sram" for lay in b["layers"]):  # digital layers are paid on both sides
            text += f" (SRAM-mapped layers only: {m['energy_ratio']:.3g}×, {m['delay_ratio']:.3g}×)"
        return text
    acc = s["accuracy"]
    if report["chips"] == 1:
        return f"{100 * acc['mean']:.2f} %"
    chips = [c["accuracy"] for c in report["per_chip"]]
    return f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} % (chips {100 * min(chips):.1f}–{100 * max(chips):.1f} %)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["lenet", "vgg"], help="one network's rows")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "imac", help="where each command's output is kept")
    p.add_argument("--reuse", action="store_true", help="reuse outputs already under --out")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| network | quantity | ours | IMAC (published) | command |", "|---|---|---|---|---|"]
    commands = {key: command for key, *_, command in ROWS if command.startswith("edgecloud")}
    for key, network, quantity, what, published, command in ROWS:
        if args.only and not key.startswith(args.only):
            continue
        report = run(key, commands[key], args.out, args.reuse or not command.startswith("edgecloud"))
        shown = f"`{command}`" if command.startswith("edgecloud") else command
        lines.append(f"| {network} | {quantity} | {cell(report, what)} | {published} | {shown} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
