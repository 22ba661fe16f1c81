"""Ablation of training options: a base recipe and variants of it trained side by side.

Issue 14 asks for every airbench-style recipe option to come with "what it bought, measured". Each
variant is the base recipe plus a list of ``--set KEY=VALUE`` overrides (as ``edgecloud train
--set``), trained into its own run folder ``OUT/<variant>`` with the same seed, data and budget, so
the only difference between two rows is the overrides.

The built-in set ``airbench`` (default) is each option alone on top of the base, then all together:
label smoothing 0.2, alternating flips, weight EMA, Lookahead, the patch-whitening stem (only for a
family that has ``whiten_stem``), flip test-time augmentation, ``all``. ``--variant
NAME:KEY=VAL,KEY=VAL`` (repeatable) replaces it with your own (commas inside ``{}``/``[]`` stay
in the value). ``base`` is always trained first.

Variants whose training is identical (their recipes differ only in ``eval``, e.g. flip TTA, which
is reporting-only) share one training run: the later one is evaluated on the earlier one's
weights, and its row names the run in ``trained_in``.

Reported per variant: validation accuracy of every exit; for variants with ``eval.tta_flip`` the
validation and test accuracy of the final exit with flip TTA; test accuracy of the FINAL exit
alone, evaluated in float on the test split (no bundle is exported: no exit threshold, no offload
encoding; ``edgecloud export OUT/<variant>`` makes the bundle of any row); training wall time
(from the checkpoint, so a reused run keeps its own); and the deltas against ``base`` of the final
exit's validation and test accuracy (the TTA accuracy for a variant that enables TTA, since that
is what it would report). Writes ``ablation.csv`` and ``ablation.png`` into ``--out``; the last
stdout line is one JSON object. Progress goes to stderr unless ``--json``.

With ``--resume``, a variant whose folder holds a finished checkpoint of the same settings is not
retrained and a partial one continues (the training loop's resume); without it, an existing
checkpoint is an error rather than hours of training overwritten.

    python benchmarks/train_ablation.py cifar10-resnet20 --data-root ../shared/datasets/cifar10 --epochs 30 --json
    python benchmarks/train_ablation.py cifar10-resnet20 --epochs 1 --limit 500 --out /tmp/abl   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgecloud.train.recipe import Recipe, family_accepts, load_recipe, parse_set, training_fields

AIRBENCH = {  # each airbench option alone (Jordan 2024, arXiv 2404.00498)
    "label_smoothing": ["optim.label_smoothing=0.2"],
    "alternating_flip": ["data.flip=alternating"],
    "ema": ["optim.ema={decay: 0.99, every: 1}"],
    "lookahead": ["optim.lookahead={k: 5, alpha: 0.5}"],
    "whiten_stem": ["arch.whiten_stem=true"],
    "flip_tta": ["eval.tta_flip=true"],  # reporting-only: shares the base's training
}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Variant:
    name: str
    sets: list[str] = field(default_factory=list)


def airbench_variants(recipe: Recipe) -> list[Variant]:
    """Each airbench option alone, then ``all``; the whitening stem only where the family has it."""
    options = {k: v for k, v in AIRBENCH.items() if k != "whiten_stem" or family_accepts(recipe.family, "whiten_stem")}
    variants = [Variant(name, list(sets)) for name, sets in options.items()]
    return variants + [Variant("all", [s for sets in options.values() for s in sets])]


def split_top_level(text: str) -> list[str]:
    """``a=1,b={x: 1, y: 2}`` -> ``["a=1", "b={x: 1, y: 2}"]``: commas inside brackets or quotes stay."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_variant(spec: str) -> Variant:
    """``NAME:KEY=VAL,KEY=VAL`` -> a :class:`Variant` (checked: a folder-safe name, KEY=VALUE items)."""
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not sep or not NAME.match(name):
        raise ValueError(f"--variant {spec!r}: expected NAME:KEY=VAL,KEY=VAL with NAME of letters, digits, _ . -")
    sets = split_top_level(rest)
    for item in sets:
        parse_set(item)  # raises on a missing '=' or bad YAML
    return Variant(name, sets)


def finished_checkpoint(path: Path, recipe: Recipe) -> bool | None:
    """None: no checkpoint; True: finished with these settings; False: partial with these settings.
    Raises if the checkpoint was written by other settings."""
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if training_fields(ckpt["recipe"]) != recipe.training_dump():
        raise ValueError(f"{path} was trained with other settings than this variant; remove it or use another --out")
    return ckpt["epoch"] >= recipe.optim.epochs and ckpt.get("stages_done", 0) >= len(recipe.stages)


def _say(args: argparse.Namespace, msg: str) -> None:
    if not args.json:
        print(msg, file=sys.stderr, flush=True)


def _round(values: list[float] | None) -> list[float] | None:
    return None if values is None else [round(float(v), 4) for v in values]


def run_variant(args: argparse.Namespace, recipe: Recipe, run_dir: Path, splits: Any, command: str) -> dict[str, Any]:
    """Train (or resume, or reuse) one variant's run; returns its model and training record."""
    from edgecloud.train.loop import load_checkpoint, run_training
    from edgecloud.train.warmstart import CHECKPOINT

    ckpt_path = run_dir / CHECKPOINT
    state = finished_checkpoint(ckpt_path, recipe)
    if state is not None and not args.resume:
        raise ValueError(f"{ckpt_path} exists: pass --resume to reuse or continue it, or use another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    if state:
        _, model, ckpt = load_checkpoint(ckpt_path)
        return {"model": model, "wall_s": float(ckpt["wall_time_s"]), "status": "reused"}
    (run_dir / "command.txt").write_text(command + "\n")  # read back by `edgecloud export`
    with contextlib.redirect_stdout(sys.stderr):  # the loop's per-epoch lines: progress, not the report
        result = run_training(recipe, run_dir, resume=state is False, splits=splits, progress=not args.json,
                              device=args.device)
    return {"model": result.model, "wall_s": float(result.wall_time_s),
            "status": "resumed" if state is False else "trained"}


def measure(model: torch.nn.Module, recipe: Recipe, splits: Any) -> dict[str, Any]:
    """Validation accuracy per exit, final-exit test accuracy, and the TTA ones if the recipe asks."""
    from edgecloud.train.loop import evaluate_accuracy, evaluate_accuracy_tta

    if not len(splits.val) or not len(splits.test):
        raise ValueError("the ablation measures on the validation and test splits; one of them is empty")
    out: dict[str, Any] = {"val_accuracy": _round(evaluate_accuracy(model, splits.val)),
                           "test_accuracy": round(evaluate_accuracy(model, splits.test)[-1], 4),
                           "test_samples": len(splits.test)}
    if recipe.eval.tta_flip:
        out["val_accuracy_tta"] = _round(evaluate_accuracy_tta(model, splits.val))
        out["test_accuracy_tta"] = round(evaluate_accuracy_tta(model, splits.test)[-1], 4)
    return out


def headline(row: dict[str, Any], split: str) -> float:
    """The final exit's accuracy a variant reports: with flip TTA if it enables it."""
    if split == "val":
        return (row.get("val_accuracy_tta") or row["val_accuracy"])[-1]
    return row.get("test_accuracy_tta", row["test_accuracy"])


CSV_FIELDS = ["variant", "sets", "trained_in", "status", "epochs", "val_accuracy", "val_accuracy_per_exit",
              "val_accuracy_tta", "test_accuracy", "test_accuracy_tta", "test_samples", "wall_s",
              "delta_vs_base", "delta_test_vs_base"]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({
                "variant": r["name"], "sets": " ".join(r["sets"]), "trained_in": r["trained_in"],
                "status": r["status"], "epochs": r["epochs"], "val_accuracy": r["val_accuracy"][-1],
                "val_accuracy_per_exit": " ".join(str(v) for v in r["val_accuracy"]),
                "val_accuracy_tta": (r.get("val_accuracy_tta") or [""])[-1],
                "test_accuracy": r["test_accuracy"], "test_accuracy_tta": r.get("test_accuracy_tta", ""),
                "test_samples": r["test_samples"], "wall_s": r["wall_s"], "delta_vs_base": r["delta_vs_base"],
                "delta_test_vs_base": r["delta_test_vs_base"],
            })


def write_plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Grouped bars: final-exit validation and test accuracy per variant (TTA where enabled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    val = [100 * headline(r, "val") for r in rows]
    test = [100 * headline(r, "test") for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.0))
    ax.bar([i - 0.2 for i in x], val, 0.4, label="validation")
    bars = ax.bar([i + 0.2 for i in x], test, 0.4, label="test")
    for b, r in zip(bars, rows):
        ax.annotate(f"{100 * r['delta_test_vs_base']:+.1f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    lo = min(val + test)
    ax.set_ylim(max(0.0, lo - 5.0), min(100.0, max(val + test) + 3.0))
    ax.axhline(test[0], color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("final-exit accuracy (%), TTA where enabled")
    ax.set_xlabel("labels: test accuracy change vs base (points)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="base recipe: a shipped name or a YAML file")
    p.add_argument("--variants", choices=["airbench"], default="airbench",
                   help="built-in variant set (ignored when --variant is given)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VAL,KEY=VAL",
                   help="a variant: base plus these --set overrides (repeatable; replaces the built-in set)")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="override applied to the base, hence to every variant (repeatable)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (every variant)")
    p.add_argument("--limit", type=int, help="train on only the first N training samples (smoke runs)")
    p.add_argument("--data-root", help="data folder (overrides the recipe's data.root)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where training runs")
    p.add_argument("--out", type=Path, help="folder of the run folders (default runs/ablation/<recipe name>)")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished runs in --out and continue partial ones (else an existing run is an error)")
    p.add_argument("--json", action="store_true", help="no progress on stderr; stdout is only the JSON line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return ablate(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # configuration errors: one line, no traceback
        print(f"train_ablation: error: {exc}", file=sys.stderr)
        return 2


def ablate(args: argparse.Namespace) -> int:
    """Train/reuse every variant, measure, write the CSV, the plot and the JSON line."""
    from edgecloud.train.loop import load_splits
    from edgecloud.train.perf import tune_malloc

    common = list(args.sets)
    if args.epochs is not None:
        common.append(f"optim.epochs={args.epochs}")
    if args.limit:
        common.append(f"data.train_limit={args.limit}")
    if args.data_root:
        common.append(f"data.root={json.dumps(str(args.data_root))}")  # quoted: a path stays a string
    base = load_recipe(args.recipe, common)
    variants = [parse_variant(v) for v in args.variant] if args.variant else airbench_variants(base)
    names = [v.name for v in variants]
    if "base" in names or len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique and not 'base': {names}")
    variants = [Variant("base", []), *variants]
    recipes = {v.name: load_recipe(args.recipe, common + v.sets) for v in variants}  # all checked before training
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_malloc()
    out = args.out or Path("runs") / "ablation" / base.name
    out.mkdir(parents=True, exist_ok=True)
    splits_cache: dict[tuple, Any] = {}
    trained: list[tuple[dict[str, Any], str, dict[str, Any]]] = []  # (training dump, variant, run record)
    rows: list[dict[str, Any]] = []
    for i, v in enumerate(variants):
        recipe = recipes[v.name]
        d = recipe.data
        key = (d.dataset, d.root, d.val_fraction, d.train_limit, recipe.seed)
        if key not in splits_cache:
            splits_cache[key] = load_splits(recipe, with_test=True)
        splits = splits_cache[key]
        dump = recipe.training_dump()
        shared = next((name for other, name, _ in trained if other == dump), None)
        _say(args, f"[{i + 1}/{len(variants)}] {v.name}: {' '.join(v.sets) or '(the recipe as is)'}"
                   + (f" (trains as {shared}: reporting-only)" if shared else ""))
        t0 = time.perf_counter()
        if shared:
            run = next(r for other, name, r in trained if name == shared)
            run = {**run, "status": f"shared with {shared}"}
        else:
            sets = [s for item in common + v.sets for s in ("--set", item)]
            command = shlex.join(["edgecloud", "train", str(args.recipe), "--out", str(out / v.name),
                                  "--no-progress", *sets])
            run = run_variant(args, recipe, out / v.name, splits, command)
            trained.append((dump, v.name, run))
        row: dict[str, Any] = {"name": v.name, "sets": v.sets, "trained_in": shared or v.name,
                               "status": run["status"], "epochs": recipe.optim.epochs,
                               **measure(run["model"], recipe, splits), "wall_s": round(run["wall_s"], 1)}
        base_row = rows[0] if rows else row
        row["delta_vs_base"] = round(headline(row, "val") - headline(base_row, "val"), 4)
        row["delta_test_vs_base"] = round(headline(row, "test") - headline(base_row, "test"), 4)
        rows.append(row)
        (out / v.name).mkdir(parents=True, exist_ok=True)
        (out / v.name / "variant.json").write_text(json.dumps(row, indent=1))
        _say(args, f"    {run['status']}: val {row['val_accuracy']} test {row['test_accuracy']} "
                   f"delta {row['delta_vs_base']:+.4f} (val) {row['delta_test_vs_base']:+.4f} (test), "
                   f"train {row['wall_s']} s, measured in {time.perf_counter() - t0:.0f} s")
    write_csv(out / "ablation.csv", rows)
    from edgecloud.cim.cpu import cpu_info

    machine = cpu_info()
    cpu = machine.model
    write_plot(out / "ablation.png", rows,
               f"{base.name}, {base.optim.epochs} epochs, seed {base.seed}; {cpu}, {torch.get_num_threads()} threads")
    if not args.json:
        print(f"{'variant':<18} {'val':>7} {'test':>7} {'Δval':>8} {'Δtest':>8} {'wall s':>8}")
        for r in rows:
            print(f"{r['name']:<18} {headline(r, 'val'):>7.4f} {headline(r, 'test'):>7.4f} "
                  f"{r['delta_vs_base']:>+8.4f} {r['delta_test_vs_base']:>+8.4f} {r['wall_s']:>8.1f}")
    summary = {
        "benchmark": "train_ablation", "recipe": base.name, "epochs": base.optim.epochs, "seed": base.seed,
        "train_limit": base.data.train_limit, "common_sets": common, "cpu": cpu, "cpu_info": machine.as_dict(),
        "threads": torch.get_num_threads(), "device": args.device, "torch": torch.__version__, "out": str(out),
        "csv": str(out / "ablation.csv"), "plot": str(out / "ablation.png"),
        "measured": "val_accuracy per exit; test_accuracy of the final exit alone in float (no bundle, no offload "
                    "encoding); delta_vs_base on the final exit's val accuracy (TTA for TTA variants)",
        "variants": [{k: r[k] for k in ("name", "sets", "trained_in", "status", "val_accuracy", "val_accuracy_tta",
                                        "test_accuracy", "test_accuracy_tta", "test_samples", "wall_s",
                                        "delta_vs_base", "delta_test_vs_base") if k in r} for r in rows],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
