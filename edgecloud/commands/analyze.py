"""``edgecloud analyze pca MODEL --dataset ...``: Hybrid-Net layer significance and a bit-width proposal.
``edgecloud analyze snr MODEL --dataset ... [--compare MODEL2]``: per-layer activation SNR on a
simulated CiM backend (e.g. vanilla vs adversarially trained: Tao et al.'s lower SNR of the latter).

MODEL is a bundle (name or folder) or a training checkpoint (``checkpoint.pt`` or its run folder).
The analysis runs on the VALIDATION hold-out of the train split by default, never on test data
the model will be reported on.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

DEFAULT_SAMPLES = 2000
DEFAULT_SNR_SAMPLES = 500


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("analyze", help="model analyses (Hybrid-Net PCA, activation SNR on a CiM backend)")
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

    snr = sub.add_parser(
        "snr", help="per-layer activation SNR on a simulated CiM backend (vs the digital model)",
        description="Per quantized layer: SNR (dB) of its outputs on simulated chips against the digital "
                    "model, propagated (noise of earlier layers included) and isolated (the layer fed the "
                    "digital input), mean and std over --chips chips, with top-1 accuracy of both. "
                    "--compare a second model (e.g. adversarially trained) for a side-by-side view.",
    )
    snr.add_argument("model", help="bundle name or folder, or a checkpoint.pt / run folder")
    snr.add_argument("--compare", metavar="MODEL2", help="a second model to analyse and show side by side")
    snr.add_argument("--dataset", required=True, choices=["fashion-mnist", "mnist", "cifar10"])
    snr.add_argument("--data-root", help="data folder (default: the data set's default folder / env var)")
    snr.add_argument("--split", choices=["val", "test"], default="val",
                     help="validation hold-out of train (default) or the test split")
    snr.add_argument("--samples", type=int, default=DEFAULT_SNR_SAMPLES,
                     help=f"images to analyze (default {DEFAULT_SNR_SAMPLES})")
    snr.add_argument("--backend", default="crossbar", help="simulated backend: crossbar (default) or sram")
    snr.add_argument("--backend-option", action="append", metavar="K=V",
                     help="backend option (repeatable; default preset=typical unless a preset is given)")
    snr.add_argument("--chips", type=int, default=3, help="simulated chips, seeds 0..N-1 (default 3)")
    snr.add_argument("--batch-size", type=int, default=100)
    snr.add_argument("--repository", help="model repository folder (for a bundle given by name)")
    snr.add_argument("--json", action="store_true", help="print one JSON object last")
    snr.set_defaults(func=run_snr)


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


def _snr_backend(args: argparse.Namespace) -> dict[str, Any]:
    """Validated backend options (default preset=typical), before any model or data is loaded."""
    from edgecloud.analyze.snr import noisy_backend
    from edgecloud.cim.backend import available_backends
    from edgecloud.commands.edge import parse_backend_options

    if args.chips < 1:
        raise ValueError(f"--chips must be >= 1, got {args.chips}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    simulated = [name for name in available_backends() if name != "digital"]
    if args.backend == "digital":
        raise ValueError("--backend digital: the digital reference has no noise to measure; "
                         f"choose one of {', '.join(simulated)}")
    if args.backend not in simulated:
        raise ValueError(f"--backend {args.backend!r}: unknown backend; choose one of {', '.join(simulated)}")
    options = parse_backend_options(args.backend_option)
    options.setdefault("preset", "typical")
    try:
        noisy_backend(args.backend, options)
    except ValueError as exc:
        raise ValueError(f"--backend-option: {exc}") from exc
    return options


def _snr_report(args: argparse.Namespace, model_arg: str, options: dict[str, Any]) -> tuple[Any, Any]:
    """(SNRReport, data) of one model on chips 0..--chips-1.

    A bundle runs with its manifest ``hardware`` defaults for the backend under ``options``
    (:func:`edgecloud.bundle.bundle_backend_options`); a checkpoint with ``options`` alone.
    """
    from edgecloud.analyze.snr import analyze_snr
    from edgecloud.bundle import bundle_backend_options

    model, data, _ = _load(argparse.Namespace(**{**vars(args), "model": model_arg}))
    path = Path(model_arg)
    if not (path.suffix == ".pt" or (path / "checkpoint.pt").is_file()):  # a bundle (as _load decides)
        from edgecloud.evaluate import resolve_bundle

        options = bundle_backend_options(resolve_bundle(model_arg, args.repository).manifest, args.backend, options)
    report = analyze_snr(model, data.images.float() / 255.0, data.labels, args.backend, options,
                         range(args.chips), batch_size=args.batch_size, progress=not args.json)
    return report, data


def _db(values: list[float] | None) -> str:
    """``mean ±std`` of per-chip dB values; ``inf`` when a chip saw no noise; ``-`` for no layer."""
    from edgecloud.analyze.snr import mean_std

    if values is None:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.2f} ±{std:.2f}" if math.isfinite(mean) else str(mean)


def run_snr(args: argparse.Namespace) -> int:
    """Why: Tao et al. — adversarially trained nets lose more accuracy on crossbars because their
    activations have lower SNR there; this prints that SNR per layer next to the accuracy it costs."""
    import sys

    import torch

    from edgecloud.analyze.snr import mean_std

    options = _snr_backend(args)
    reports = [_snr_report(args, args.model, options)]
    if args.compare:
        reports.append(_snr_report(args, args.compare, options))
        (_, a), (_, b) = reports
        if not (torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)):
            print(f"warning: {args.model} and {args.compare} hold out different {args.split} images; "
                  "each is analysed on its own", file=sys.stderr)
    models = [args.model] + ([args.compare] if args.compare else [])
    layers = [{layer.name: layer for layer in report.layers} for report, _ in reports]
    names = list(dict.fromkeys(name for by_name in layers for name in by_name))
    compare = len(reports) == 2

    print(f"{args.backend} {json.dumps(options)}, {reports[0][0].samples} {args.split} images, {args.chips} "
          "chip(s); SNR in dB, mean ±std over chips (propagated: end to end; isolated: the layer's own noise)")
    if compare:
        print(f"{'':<26} {'A: ' + Path(args.model).name[:28]:^31} {'B: ' + Path(args.compare).name[:28]:^31} "
              f"{'B - A':>15}")
        print(f"{'layer':<26} {'propagated':>15} {'isolated':>15} {'propagated':>15} {'isolated':>15} "
              f"{'prop':>7} {'iso':>7}")
    else:
        print(f"{'layer':<26} {'prec':>5} {'MACs':>10} {'propagated':>15} {'isolated':>15}")
    deltas = []
    for name in names:
        rows = [by_name.get(name) for by_name in layers]
        cells = [_db(getattr(row, key, None)) for row in rows for key in ("propagated_db", "isolated_db")]
        if not compare:
            row = rows[0]
            print(f"{name:<26} {row.precision:>5} {row.macs:>10} {cells[0]:>15} {cells[1]:>15}"
                  + ("" if row.on_chip else "  (stays digital)"))
            continue
        delta: dict[str, Any] = {"name": name}
        for key in ("propagated", "isolated"):
            d = mean_std(getattr(rows[1], f"{key}_db"))[0] - mean_std(getattr(rows[0], f"{key}_db"))[0] \
                if None not in rows else math.nan
            delta[f"snr_{key}_db"] = d if math.isfinite(d) else None
        deltas.append(delta)
        print(f"{name:<26} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} {cells[3]:>15} "
              + " ".join(f"{d:>+7.2f}" if d is not None else f"{'-':>7}"
                         for d in (delta["snr_propagated_db"], delta["snr_isolated_db"])))
    for tag, (report, _), model in zip("AB", reports, models):
        mean, std = mean_std(report.accuracy_hardware)
        print(f"{tag + ': ' if compare else ''}top-1 digital {100 * report.accuracy_digital:.2f}%, {args.backend} "
              f"{100 * mean:.2f} ±{100 * std:.2f}%  ({model})")
    if args.json:
        out = {"model": str(args.model), "dataset": args.dataset, "split": args.split, **reports[0][0].to_json()}
        if compare:
            out["compare"] = {"model": str(args.compare), **reports[1][0].to_json()}
            out["delta"] = deltas
        print(json.dumps(out))
    return 0
