"""``edgecloud export CHECKPOINT``: write a bundle from a training checkpoint."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def _threshold(value: str) -> float | str:
    return value if value == "auto" else float(value)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a bundle from a training checkpoint",
        description="Rebuild the model from checkpoint.pt (which embeds its recipe), choose the exit "
                    "threshold on the validation split (or use --threshold), measure the test split "
                    "and write the bundle folder.",
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt or the run folder holding it")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--name", help="bundle name (default: the recipe's)")
    p.add_argument("--threshold", type=_threshold, help="'auto' or a number (default: the recipe's)")
    p.add_argument("--max-drop", type=float, help="auto threshold: allowed accuracy drop in points "
                   "(overrides the recipe's exits.max_drop)")
    p.add_argument("--reference", help="auto threshold: measure the drop from this run's final validation "
                   "accuracy (a run folder, e.g. the full-precision baseline) instead of cloud-only")
    p.add_argument("--baseline", help="energy baseline: this run's network at full precision (a run folder, "
                   "e.g. the FP ResNet-20 a wider edge replaces; overrides the recipe's baseline)")
    p.add_argument("--data-root", help="data folder (overrides the recipe's data.root)")
    p.add_argument("--encoding", choices=["fp32", "fp16", "uint8"],
                   help="offload encoding of the cloud input (overrides the recipe's offload.encoding; "
                        "uint8 is calibrated on the validation split)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgecloud.commands.train import rounded_history
    from edgecloud.train.loop import finalize, load_checkpoint

    recipe, model, ckpt = load_checkpoint(args.checkpoint)
    run_dir = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    recorded = run_dir / "command.txt"  # written by `edgecloud train`
    trained_with = recorded.read_text().strip() if recorded.is_file() else f"edgecloud train {recipe.name}"
    if args.data_root:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"root": args.data_root})})
    exits = {k: v for k, v in (("max_drop", args.max_drop), ("reference", args.reference)) if v is not None}
    if exits:
        recipe = recipe.model_copy(update={"exits": recipe.exits.model_copy(update=exits)})
    if args.baseline:
        recipe = recipe.model_copy(update={"baseline": args.baseline})
    if args.encoding:
        recipe = recipe.model_copy(update={"offload": recipe.offload.model_copy(update={"encoding": args.encoding})})
    path, metrics = finalize(
        model, recipe, args.out, name=args.name, threshold=args.threshold,
        training={"command": f"{trained_with} && edgecloud {shlex.join(args.argv)}",
                  "epochs": ckpt["epoch"], "wall_time_s": round(ckpt["wall_time_s"], 1),
                  "history": rounded_history(ckpt.get("history", []))},
    )
    print(f"bundle written to {path}")
    print(f"  threshold: {metrics['threshold']}  test accuracy: {metrics.get('test_accuracy')}  "
          f"edge exit share: {metrics.get('test_edge_exit_share')}  offload: {recipe.offload.encoding}")
    return 0
