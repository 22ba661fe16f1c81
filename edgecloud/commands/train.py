"""``edgecloud train RECIPE``: train a recipe, then export its bundle with measured metrics."""

from __future__ import annotations

import argparse
import os
import shlex
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model recipe and export its bundle",
        description="Train a recipe (a name from edgecloud/train/recipes or a YAML path); checkpoints every "
                    "epoch into --out; then picks the exit threshold on the validation split, measures the "
                    "test split and writes the bundle.",
    )
    p.add_argument("recipe", nargs="?", help="recipe name or YAML file (see --list)")
    p.add_argument("--list", action="store_true", help="list the shipped recipes and exit")
    p.add_argument("--epochs", type=int, help="override the recipe's number of epochs")
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    p.add_argument("--out", type=Path, help="run folder for checkpoints (default: runs/<recipe name>)")
    p.add_argument("--export", type=Path, dest="export_dir",
                   help="bundle folder to write (default: <out>/<recipe name>)")
    p.add_argument("--name", help="bundle name (default: the recipe's)")
    p.add_argument("--data-root", help="data folder (overrides the recipe's data.root)")
    p.add_argument("--limit", type=int, help="train on only the first N training samples (smoke runs)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda[:N]: where the training steps run (the card names it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="override a recipe field before validation (repeatable): a dotted path and a YAML "
                        "value, e.g. --set optim.ema.decay=0.99 --set data.flip=alternating "
                        "--set 'optim.lookahead={k: 5, alpha: 0.5}'; recorded in the checkpoint and bundle, so "
                        "a --resume with other values is refused. --epochs, --seed, --data-root and --limit "
                        "are applied after these")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def reproduce_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (rebuilt from the parsed arguments)."""
    parts = ["edgecloud", "train", str(args.recipe)]
    for flag, value in (("--epochs", args.epochs), ("--seed", args.seed), ("--out", args.out),
                        ("--export", args.export_dir), ("--name", args.name), ("--data-root", args.data_root),
                        ("--limit", args.limit), ("--threads", args.threads),
                        ("--device", None if args.device == "cpu" else args.device)):
        if value is not None:
            parts += [flag, str(value)]
    for item in getattr(args, "sets", None) or []:
        parts += ["--set", item]
    parts += ["--resume"] * bool(args.resume) + ["--no-progress"] * bool(args.no_progress)
    return shlex.join(parts)


def rounded_history(history: list[dict]) -> list[dict]:
    """The per-epoch records for the model card (4 decimals, no learning rate)."""
    return [{k: (round(v, 4) if isinstance(v, float) else [round(a, 4) for a in v] if isinstance(v, list) else v)
             for k, v in h.items() if k != "lr"} for h in history]


def run(args: argparse.Namespace) -> int:
    import torch

    from edgecloud.train.loop import finalize, load_splits, run_training
    from edgecloud.train.perf import tune_malloc
    from edgecloud.train.recipe import list_recipes, load_recipe

    if args.list or not args.recipe:
        print("\n".join(list_recipes()))
        return 0 if args.list else 2
    from edgecloud.train.device import resolve_device

    resolve_device(args.device)  # before any data is loaded: a missing GPU is one error line
    recipe = load_recipe(args.recipe, args.sets)  # --set applied to the YAML, then validated
    updates: dict = {}
    if args.seed is not None:
        updates["seed"] = args.seed
    if args.epochs is not None:
        updates["optim"] = recipe.optim.model_copy(update={"epochs": args.epochs})
    data_updates = {}
    if args.data_root:
        data_updates["root"] = args.data_root
    if args.limit:
        data_updates["train_limit"] = args.limit
    if data_updates:
        updates["data"] = recipe.data.model_copy(update=data_updates)
    recipe = recipe.model_copy(update=updates)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_malloc()
    out = args.out or Path("runs") / recipe.name
    bundle_dir = args.export_dir or out / (args.name or recipe.name)
    command = reproduce_command(args)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "command.txt").write_text(command + "\n")  # read back by `edgecloud export`
    started = time.perf_counter()
    splits = load_splits(recipe)
    result = run_training(recipe, out, resume=args.resume, splits=splits, progress=not args.no_progress,
                          device=args.device)
    path, metrics = finalize(
        result.model, recipe, bundle_dir, splits=splits, name=args.name,
        training={"command": command, "epochs": result.epochs,
                  "wall_time_s": round(result.wall_time_s, 1), "cpu_count": os.cpu_count(),
                  "device": result.device, "precision_used": result.precision_used,
                  "history": rounded_history(result.history),
                  "total_wall_time_s": round(time.perf_counter() - started, 1)},
    )
    print(f"bundle written to {path}")
    for key in ("threshold", "val_accuracy", "val_edge_exit_share", "test_accuracy",
                "test_accuracy_cloud_alone", "test_edge_exit_share"):
        if key in metrics:
            print(f"  {key}: {metrics[key]}")
    return 0
