"""``edgecloud analyze pca MODEL --dataset ...``: Hybrid-Net layer significance and a bit-width proposal.

MODEL is a bundle (name or folder) or a training checkpoint (``checkpoint.pt`` or its run folder).
The analysis runs on the VALIDATION hold-out of the train split by default, never on test data
the model will be reported on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_SAMPLES = 2000


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("analyze", help="model analyses (Hybrid-Net PCA)")
    sub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    pca = sub.add_parser(
        "pca", help="find significant layers by PCA and propose per-layer bit widths",
        description="Per conv layer: principal components needed to explain --variance of the output "
                    "activations' variance (D). A layer is significant when D rises by >= --delta over "
                    "the previous layer; Hybrid-Net raises significant quantized layers to --bits bits.",
    )
    pca.add_argument("model", help="bundle name or folder, or a checkpoint.pt / run folder")
    pca.add_argument("--dataset", required=True, choices=["fashion-mnist", "mnist", "cifar10"])
    pca.add_argument("--data-root", help="data folder (default: the data set's default folder / env var)")
    pca.add_argument("--split", choices=["val", "test"], default="val",
                     help="validation hold-out of train (default) or the test split")
    pca.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                     help=f"images to analyze (default {DEFAULT_SAMPLES})")
    pca.add_argument("--variance", type=float, default=0.99, help="explained-variance fraction (default 0.99)")
    pca.add_argument("--delta", type=int, default=2, help="jump in D that makes a layer significant (default 2)")
    pca.add_argument("--bits", type=int, default=2, help="bits for significant quantized layers (default 2)")
    pca.add_argument("--batch-size", type=int, default=250)
    pca.add_argument("--repository", help="model repository folder (for a bundle given by name)")
    pca.add_argument("--json", action="store_true", help="print one JSON object last")
    pca.set_defaults(func=run_pca)


def _load(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """(model, data, arch) from a checkpoint or a bundle."""
    import numpy as np

    path = Path(args.model)
    if path.suffix == ".pt" or (path / "checkpoint.pt").is_file():
        from edgecloud.data.dataset import train_val_split
        from edgecloud.data.registry import load_dataset
        from edgecloud.train.loop import load_checkpoint

        recipe, model, _ = load_checkpoint(path)
        if args.split == "val":
            _, data = train_val_split(load_dataset(args.dataset, "train", args.data_root),
                                      recipe.data.val_fraction, seed=recipe.seed)
        else:
            data = load_dataset(args.dataset, "test", args.data_root)
        arch = dict(recipe.arch)
    else:
        from edgecloud.evaluate import load_eval_data, resolve_bundle

        bundle = resolve_bundle(args.model, args.repository)
        data, _ = load_eval_data(args.dataset, args.split, bundle.manifest, args.data_root)
        model, arch = bundle.build_model(), dict(bundle.manifest.arch)
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if len(data) > args.samples:  # a seeded, class-mixed subset (image folders are ordered by class)
        data = data.subset(np.sort(np.random.default_rng(0).permutation(len(data))[:args.samples]))
    return model, data, arch


def run_pca(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgecloud.analyze.pca import analyze_layers, propose_bits, propose_block_bits, propose_exit_block_bits

    model, data, arch = _load(args)
    starts = range(0, len(data), args.batch_size)
    batches = (data.images[i:i + args.batch_size].float() / 255.0 for i in starts)
    layers = analyze_layers(model, tqdm(batches, total=len(starts), desc="pca", unit="batch", disable=args.json),
                            variance=args.variance, delta=args.delta)
    raised = propose_bits(layers, args.bits)
    block_bits = propose_block_bits(model, layers, args.bits)
    exit_block_bits = propose_exit_block_bits(model, layers, args.bits)

    print(f"{'layer':<28} {'ch':>4} {'precision':>9} {'D':>4} {'jump':>5}  significant")
    for layer in layers:
        print(f"{layer.name:<28} {layer.channels:>4} {layer.precision:>9} {layer.dims:>4} {layer.jump:>+5}  "
              f"{'yes' if layer.significant else ''}")
    print(f"\n{len(data)} images, D = components for {args.variance:g} of the variance, significant: jump >= "
          f"{args.delta}")
    if raised:
        print(f"proposal: {len(raised)} quantized layer(s) to {args.bits} bits: {', '.join(raised)}")
    else:
        print("proposal: no quantized layer is significant; keep the network as it is")
    if block_bits is not None:
        print(f"recipe arch for the hybrid: block_bits: {json.dumps(block_bits)}"
              + (f", exit_block_bits: {json.dumps(exit_block_bits)}" if exit_block_bits is not None else ""))
    if args.json:
        print(json.dumps({"model": str(args.model), "dataset": args.dataset, "split": args.split,
                          "samples": len(data), "variance": args.variance, "delta": args.delta,
                          "bits": args.bits, "layers": [layer.to_json() for layer in layers],
                          "raise": raised, "block_bits": block_bits, "exit_block_bits": exit_block_bits,
                          "arch": arch}))
    return 0
