"""Accuracy against training compute: a binary-edge hybrid and its full-precision control, budget by budget.

Issue 14 asks for a binary-edge hybrid at the published operating point (>= 65 % edge exits, >= 5.5x
less compute energy, accuracy within 1.0 point of the full-precision control trained on the same
budget) and, where that is out of reach, for "the curve of accuracy against training compute for
binary and control, and what compute the trend says it needs". This benchmark draws that curve.

For each budget B (``--budgets``, fine-tuning epochs; both recipes start from the same trained
network, so the pretraining is a shared, fixed cost) it trains the control recipe and the binary
recipe with ``optim.epochs=B`` (same seed, data and ``--set`` overrides; ``OUT/control-eB``,
``OUT/binary-eB``), then measures on the full test split, every threshold chosen on validation:

- control: accuracy of its final output;
- binary, *within*: the bundle ``finalize`` exports with ``exits.reference`` = the control run of the
  same budget and ``max_drop`` = ``--max-drop``: the largest edge-exit share whose validation accuracy
  stays within that many points of the control's; its test accuracy, exit share and compute-energy
  reduction (as ``edgecloud eval`` reports them, digital backend, offload encoding served);
- binary, *at exits*: the smallest threshold whose validation edge-exit share is >= ``--exit-share``;
  the same test numbers and the gap to the control.

The trend: a least-squares line of the at-exits gap (control - binary, points) against log2(B), and
the budget where it reaches ``--max-drop`` (None where the line does not fall); the same for ln(gap)
(a power law: each doubling keeps a fixed fraction of the gap, the diminishing returns a line in
points misses; the more cautious of the two once the gap flattens); likewise the
within-point exit share against log2(B) and the budget where it reaches ``--exit-share``; each
converted to wall hours at the measured seconds per binary epoch. Writes ``curve.csv`` and
``curve.png`` into ``--out``; the last stdout line is one JSON object naming the CPU. ``--resume``
reuses finished runs and continues partial ones (as ``train_ablation.py``).

    python benchmarks/train_compute_curve.py --binary cifar10-hybrid-resnet20-binary \\
        --control cifar10-resnet20-finetune --budgets 1,2,4 --data-root ../shared/datasets/cifar10 \\
        --set init.checkpoint=models/cifar10-resnet20 --set distill.teacher=models/cifar10-resnet20 --json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's training helpers
from train_ablation import run_variant  # noqa: E402

from edgecloud.train.recipe import Recipe, load_recipe  # noqa: E402


def parse_budgets(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``: distinct positive epoch counts, ascending."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError as exc:
        raise ValueError(f"--budgets {text!r}: expected comma-separated whole epochs, e.g. 1,2,4") from exc
    if not values or values[0] < 1:
        raise ValueError(f"--budgets {text!r}: every budget must be >= 1 epoch")
    return values


def _say(args: argparse.Namespace, msg: str) -> None:
    if not args.json:
        print(msg, file=sys.stderr, flush=True)


def threshold_for_share(entropies: np.ndarray, share: float) -> float:
    """The smallest entropy threshold under which at least ``share`` of these samples exit
    (a sample exits when its entropy is < the threshold)."""
    ordered = np.sort(entropies)
    k = min(len(ordered), max(1, math.ceil(share * len(ordered))))
    return float(np.nextafter(ordered[k - 1], np.inf))


def point(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": round(metrics["accuracy"], 4), "edge_exit_share": round(metrics["edge_exit_share"], 4),
            "compute_energy_reduction": round(metrics["compute_energy_reduction"], 3)}


def measure_binary(args: argparse.Namespace, model: Any, recipe: Recipe, control_dir: Path, bundle_dir: Path,
                   splits: Any, command: str, epochs: int, wall_s: float) -> dict[str, Any]:
    """Export the binary run (threshold: within --max-drop of the control on validation), then both
    operating points on the test split from cached outputs (digital backend, as ``edgecloud eval``)."""
    from edgecloud.bundle import Bundle
    from edgecloud.evaluate import build_cache
    from edgecloud.evaluate.evaluator import EvalConfig
    from edgecloud.evaluate.sweep import manifest_policy, policy_at, swept_exits
    from edgecloud.train.loop import finalize

    exits = recipe.exits.model_copy(update={"threshold": "auto", "reference": str(control_dir),
                                            "max_drop": args.max_drop})
    recipe = recipe.model_copy(update={"exits": exits})
    with contextlib.redirect_stdout(sys.stderr):
        finalize(model, recipe, bundle_dir, splits=splits,
                 training={"command": command, "epochs": epochs, "wall_time_s": round(wall_s, 1)})
    bundle = Bundle(bundle_dir)
    config = EvalConfig(progress=not args.json)
    val, test = build_cache(bundle, splits.val, config), build_cache(bundle, splits.test, config)
    within = manifest_policy(test)
    t = threshold_for_share(val.entropies(0), args.exit_share)
    at_exits = policy_at(test, t, swept_exits(test))
    return {"threshold_within": within.thresholds[0], "within": point(test.metrics(within)),
            "threshold_at_exits": round(t, 6), "val_edge_share_at_exits": round(val.metrics(at_exits)["edge_exit_share"], 4),
            "at_exits": point(test.metrics(at_exits))}


def fit_log2(budgets: list[int], values: list[float], target: float, falling: bool) -> dict[str, Any] | None:
    """Line ``value = a + b log2(budget)``; the budget where it reaches ``target`` (None where the
    line moves away from it, or fewer than two budgets)."""
    if len(budgets) < 2:
        return None
    x = np.log2(np.asarray(budgets, dtype=float))
    b, a = np.polyfit(x, np.asarray(values, dtype=float), 1)
    toward = b < 0 if falling else b > 0
    reached = (values[-1] <= target) if falling else (values[-1] >= target)
    needed = None
    if reached:
        needed = float(budgets[-1])
    elif toward:
        needed = float(2 ** ((target - a) / b))
    return {"intercept": round(float(a), 4), "slope_per_doubling": round(float(b), 4), "target": target,
            "needs_epochs": None if needed is None else round(needed, 1)}


def fit_power(budgets: list[int], gaps: list[float], target: float) -> dict[str, Any] | None:
    """Line ``ln gap = a + b log2(budget)``: each doubling of the budget keeps the fraction 2^b of
    the gap (diminishing returns in points, which a line in points misses); the budget where the
    gap reaches ``target``. None with fewer than two budgets or a gap <= 0 (already closed)."""
    if len(budgets) < 2 or min(gaps) <= 0:
        return None
    x = np.log2(np.asarray(budgets, dtype=float))
    b, a = np.polyfit(x, np.log(np.asarray(gaps, dtype=float)), 1)
    needed = float(2 ** ((math.log(target) - a) / b)) if b < 0 else None
    return {"intercept_ln": round(float(a), 4), "gap_kept_per_doubling": round(float(math.exp(b)), 4), "target": target,
            "needs_epochs": None if needed is None else round(needed, 1)}


CSV_FIELDS = ["budget_epochs", "control_test_accuracy", "control_wall_s", "binary_wall_s",
              "within_threshold", "within_accuracy", "within_edge_share", "within_reduction",
              "at_exits_threshold", "at_exits_val_share", "at_exits_accuracy", "at_exits_edge_share",
              "at_exits_reduction", "gap_at_exits_points"]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({
                "budget_epochs": r["budget_epochs"], "control_test_accuracy": r["control"]["test_accuracy"],
                "control_wall_s": r["control"]["wall_s"], "binary_wall_s": r["binary"]["wall_s"],
                "within_threshold": r["binary"]["threshold_within"], "within_accuracy": r["binary"]["within"]["accuracy"],
                "within_edge_share": r["binary"]["within"]["edge_exit_share"],
                "within_reduction": r["binary"]["within"]["compute_energy_reduction"],
                "at_exits_threshold": r["binary"]["threshold_at_exits"],
                "at_exits_val_share": r["binary"]["val_edge_share_at_exits"],
                "at_exits_accuracy": r["binary"]["at_exits"]["accuracy"],
                "at_exits_edge_share": r["binary"]["at_exits"]["edge_exit_share"],
                "at_exits_reduction": r["binary"]["at_exits"]["compute_energy_reduction"],
                "gap_at_exits_points": r["gap_at_exits_points"],
            })


def write_plot(path: Path, rows: list[dict[str, Any]], gap_fit: dict[str, Any] | None,
               power_fit: dict[str, Any] | None, args: argparse.Namespace, title: str) -> None:
    """Left: test accuracy against budget; right: the gap at the exit target with its fitted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = [r["budget_epochs"] for r in rows]
    fig, (ax, gx) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot(b, [100 * r["control"]["test_accuracy"] for r in rows], "o-", label="FP control")
    ax.plot(b, [100 * r["binary"]["at_exits"]["accuracy"] for r in rows], "s-",
            label=f"binary hybrid, >= {args.exit_share:.0%} edge exits (val)")
    ax.plot(b, [100 * r["binary"]["within"]["accuracy"] for r in rows], "^--",
            label=f"binary hybrid, within {args.max_drop} pt of control (val)")
    for r in rows:
        ax.annotate(f"{r['binary']['within']['edge_exit_share']:.0%}",
                    (r["budget_epochs"], 100 * r["binary"]["within"]["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training budget (fine-tuning epochs)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    gaps = [r["gap_at_exits_points"] for r in rows]
    gx.plot(b, gaps, "s-", label="control - binary at the exit target (points)")
    gx.axhline(args.max_drop, color="grey", ls="--", lw=0.8, label=f"target: {args.max_drop} point")
    ends = [f["needs_epochs"] for f in (gap_fit, power_fit) if f and f["needs_epochs"]]
    xs = np.geomspace(b[0], max([b[-1], *ends]), 50)
    if gap_fit:
        gx.plot(xs, gap_fit["intercept"] + gap_fit["slope_per_doubling"] * np.log2(xs), ":", color="C3",
                label=f"linear fit: {gap_fit['slope_per_doubling']:+.2f} points per doubling")
    if power_fit:
        gx.plot(xs, np.exp(power_fit["intercept_ln"] + math.log(power_fit["gap_kept_per_doubling"]) * np.log2(xs)), "--",
                color="C4", label=f"power fit: {power_fit['gap_kept_per_doubling']:.2f} of the gap kept per doubling")
    gx.set_ylim(min(0.0, *gaps) - 2.0, max(gaps) + 3.0)  # a falling line extrapolated far is not the point
    gx.set_xscale("log", base=2)
    gx.set_xlabel("training budget (fine-tuning epochs)")
    gx.set_ylabel("accuracy gap (points)")
    gx.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default="cifar10-hybrid-resnet20-binary", help="binary-edge hybrid recipe")
    p.add_argument("--control", default="cifar10-resnet20-finetune", help="its full-precision control recipe")
    p.add_argument("--budgets", default="1,2,4", help="fine-tuning epochs per point, comma-separated")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="override for both recipes (repeatable)")
    p.add_argument("--binary-set", action="append", default=[], metavar="KEY=VALUE", help="override for the binary only")
    p.add_argument("--control-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the control only")
    p.add_argument("--two-step", type=float, metavar="F",
                   help="train the binary in two steps, binary weights from epoch round(F x budget) "
                        "(real weights before; optim.binary_weights_from_epoch per budget; 0 < F < 1)")
    p.add_argument("--exit-share", type=float, default=0.65, help="edge-exit target of the at-exits point")
    p.add_argument("--max-drop", type=float, default=1.0, help="accuracy target: points under the control")
    p.add_argument("--limit", type=int, help="train on only the first N training samples (smoke runs)")
    p.add_argument("--data-root", help="data folder (overrides the recipes' data.root)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where training runs")
    p.add_argument("--out", type=Path, default=Path("runs/compute-curve"), help="folder of the run folders")
    p.add_argument("--resume", action="store_true", help="reuse finished runs and continue partial ones")
    p.add_argument("--json", action="store_true", help="no progress on stderr; stdout is only the JSON line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return curve(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"train_compute_curve: error: {exc}", file=sys.stderr)
        return 2


def curve(args: argparse.Namespace) -> int:
    from edgecloud.cim.cpu import cpu_info
    from edgecloud.train.loop import evaluate_accuracy, load_splits
    from edgecloud.train.perf import tune_malloc

    budgets = parse_budgets(args.budgets)
    if not 0 < args.exit_share <= 1:
        raise ValueError(f"--exit-share must lie in (0, 1], got {args.exit_share}")
    if args.max_drop < 0:
        raise ValueError(f"--max-drop must be >= 0, got {args.max_drop}")
    common = list(args.sets)
    if args.limit:
        common.append(f"data.train_limit={args.limit}")
    if args.data_root:
        common.append(f"data.root={json.dumps(str(args.data_root))}")
    sets = {"control": common + args.control_set, "binary": common + args.binary_set}
    names = {"control": args.control, "binary": args.binary}
    per_budget = {(kind, b): [f"optim.epochs={b}"] for b in budgets for kind in ("control", "binary")}
    if args.two_step is not None:
        if not 0 < args.two_step < 1:
            raise ValueError(f"--two-step must lie in (0, 1), got {args.two_step}")
        if min(budgets) < 2:
            raise ValueError("--two-step needs budgets of >= 2 epochs (one per step)")
        for b in budgets:
            per_budget[("binary", b)].append(
                f"optim.binary_weights_from_epoch={min(b - 1, max(1, round(args.two_step * b)))}")
    recipes = {key: load_recipe(names[key[0]], sets[key[0]] + extra)
               for key, extra in per_budget.items()}  # every recipe checked before training
    for b in budgets:
        c, h = recipes[("control", b)], recipes[("binary", b)]
        if (c.data.dataset, c.data.val_fraction, c.seed) != (h.data.dataset, h.data.val_fraction, h.seed):
            raise ValueError("--binary and --control must hold out the same validation split (dataset, "
                             "val_fraction, seed)")
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_malloc()
    args.out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(recipes[("binary", budgets[0])], with_test=True)
    rows: list[dict[str, Any]] = []
    for b in budgets:
        row: dict[str, Any] = {"budget_epochs": b}
        for kind in ("control", "binary"):
            recipe, run_dir = recipes[(kind, b)], args.out / f"{kind}-e{b}"
            flags = [s for item in sets[kind] + per_budget[(kind, b)] for s in ("--set", item)]
            command = shlex.join(["edgecloud", "train", names[kind], "--out", str(run_dir), "--no-progress", *flags])
            _say(args, f"[{b} epochs] {kind}: {names[kind]}")
            t0 = time.perf_counter()
            run = run_variant(args, recipe, run_dir, splits, command)
            model, wall_s, status = run["model"], run["wall_s"], run["status"]
            if kind == "control":
                row["control"] = {"test_accuracy": round(evaluate_accuracy(model, splits.test)[-1], 4),
                                  "wall_s": round(wall_s, 1), "status": status}
            else:
                row["binary"] = {**measure_binary(args, model, recipe, args.out / f"control-e{b}", run_dir / "bundle",
                                                  splits, command, b, wall_s),
                                 "wall_s": round(wall_s, 1), "status": status}
            _say(args, f"    {status} in {wall_s:.0f} s; measured in {time.perf_counter() - t0:.0f} s")
        row["gap_at_exits_points"] = round(100 * (row["control"]["test_accuracy"]
                                                  - row["binary"]["at_exits"]["accuracy"]), 2)
        rows.append(row)
        _say(args, f"    control {row['control']['test_accuracy']:.4f} | binary within {args.max_drop} pt: "
                   f"{row['binary']['within']} | at >= {args.exit_share} exits: {row['binary']['at_exits']} "
                   f"(gap {row['gap_at_exits_points']} points)")
    gap_fit = fit_log2(budgets, [r["gap_at_exits_points"] for r in rows], args.max_drop, falling=True)
    power_fit = fit_power(budgets, [r["gap_at_exits_points"] for r in rows], args.max_drop)
    share_fit = fit_log2(budgets, [r["binary"]["within"]["edge_exit_share"] for r in rows], args.exit_share,
                         falling=False)
    per_epoch = sum(r["binary"]["wall_s"] for r in rows) / sum(budgets)
    for fit in (gap_fit, power_fit, share_fit):
        if fit and fit["needs_epochs"] is not None:
            fit["needs_wall_hours_here"] = round(fit["needs_epochs"] * per_epoch / 3600, 1)
    machine = cpu_info()
    write_csv(args.out / "curve.csv", rows)
    write_plot(args.out / "curve.png", rows, gap_fit, power_fit, args,
               f"{args.binary} vs {args.control}, seed {recipes[('binary', budgets[0])].seed}; "
               f"{machine.model}, {torch.get_num_threads()} threads")
    if not args.json:
        print(f"{'epochs':>6} {'control':>8} {'bin@exits':>10} {'exits':>6} {'x':>6} {'gap':>6} "
              f"{'bin within':>10} {'exits':>6} {'x':>6}")
        for r in rows:
            a, w = r["binary"]["at_exits"], r["binary"]["within"]
            print(f"{r['budget_epochs']:>6} {r['control']['test_accuracy']:>8.4f} {a['accuracy']:>10.4f} "
                  f"{a['edge_exit_share']:>6.3f} {a['compute_energy_reduction']:>6.2f} {r['gap_at_exits_points']:>6.2f} "
                  f"{w['accuracy']:>10.4f} {w['edge_exit_share']:>6.3f} {w['compute_energy_reduction']:>6.2f}")
    summary = {
        "benchmark": "train_compute_curve", "binary": args.binary, "control": args.control, "budgets": budgets,
        "sets": common, "binary_sets": args.binary_set, "control_sets": args.control_set,
        "two_step": args.two_step,
        "exit_share_target": args.exit_share, "max_drop_points": args.max_drop, "test_samples": len(splits.test),
        "cpu": machine.model, "cpu_info": machine.as_dict(), "threads": torch.get_num_threads(), "device": args.device,
        "torch": torch.__version__, "binary_wall_s_per_epoch": round(per_epoch, 1),
        "gap_fit": gap_fit, "gap_power_fit": power_fit, "exit_share_fit": share_fit, "rows": rows,
        "csv": str(args.out / "curve.csv"), "plot": str(args.out / "curve.png"),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
