"""``edgecloud export CHECKPOINT``: write a bundle from a training checkpoint.

``edgecloud export triton --out DIR``: write bundles' cloud parts as a Triton model repository
(:mod:`edgecloud.export_triton`).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

TRITON = "triton"


class _ExportParser(argparse.ArgumentParser):
    """``export CHECKPOINT`` with a ``triton`` sub-action beside it.

    Why not add_subparsers: ``export`` takes a checkpoint path as its first positional, which a
    subparser choice would reject; so a first argument ``triton`` is handed to its own parser
    (a checkpoint folder literally named ``triton`` is still reachable as ``./triton``).
    """

    triton: argparse.ArgumentParser

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        if args and args[0] == TRITON:
            return self.triton.parse_known_args(args[1:], namespace)
        return super().parse_known_args(args, namespace)


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
    p.epilog = "Triton model repository from bundles: edgecloud export triton --out DIR (see --help there)"
    p.__class__ = _ExportParser
    p.triton = _triton_parser()


def _name_map(items: list[str] | None) -> dict[str, str]:
    names: dict[str, str] = {}
    for item in items or ():
        bundle, sep, name = item.partition("=")
        if not sep or not bundle.strip() or not name.strip():
            raise ValueError(f"--name {item!r}: expected BUNDLE=NAME, e.g. fmnist-hybrid=fmnist")
        names[bundle.strip()] = name.strip()
    return names


def _triton_parser() -> argparse.ArgumentParser:
    t = argparse.ArgumentParser(
        prog="edgecloud export triton",
        description="Write a Triton Inference Server model repository (<out>/<name>/config.pbtxt + "
                    "<out>/<name>/<version>/model.onnx) from bundles' cloud parts: ONNX Runtime "
                    "backend, dynamic batching, tensor names/types/dims read from each cloud.onnx.",
    )
    t.add_argument("--out", type=Path, required=True, help="model repository folder to write into")
    t.add_argument("--repository", type=Path, help="bundle repository (default: the bundled models)")
    t.add_argument("--model", action="append", metavar="BUNDLE",
                   help="bundle to export (repeatable; default: every bundle with a cloud part)")
    t.add_argument("--name", action="append", metavar="BUNDLE=NAME",
                   help="Triton model name for BUNDLE (default: the manifest's cloud model name, "
                        "which the edge calls; no '/')")
    t.add_argument("--max-batch-size", type=int, default=128, help="Triton max_batch_size (default 128)")
    t.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="dynamic batching: longest wait for a batch to fill (default 2000)")
    t.add_argument("--instances", type=int, default=1, help="model instances (CPU) per model (default 1)")
    t.add_argument("--overwrite", action="store_true", help="replace model folders that exist")
    t.set_defaults(func=run_triton)
    return t


def run_triton(args: argparse.Namespace) -> int:
    from edgecloud.export_triton import export_triton

    written = export_triton(
        args.out, repository=args.repository, models=args.model, names=_name_map(args.name),
        max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
        instances=args.instances, overwrite=args.overwrite,
    )
    for m in written:
        ins = ", ".join(f"{t.name} {t.data_type} {t.dims}" for t in m.inputs)
        print(f"{m.path}  (bundle {m.bundle}, version {m.version}; input {ins})")
    print(f"Triton model repository: {args.out}  ({len(written)} model(s))")
    return 0


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
