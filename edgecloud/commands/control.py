"""``edgecloud control profile BUNDLE --data-root ... --out FILE``: the offline disagreement profile
an exit controller with ``estimator: profile`` reads (:mod:`edgecloud.control.profile`).

Runs every image of the bundle's VALIDATION split through the edge part and through the cloud
part the cloud server runs, and bins P(edge answer != cloud answer) by the exit's score. Only
the validation split: the profile steers thresholds, so measuring it on test would leak test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgecloud.commands.offload import DATASETS  # the data sets a bundle can be evaluated on


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("control", help="exit-control tools: the offline disagreement profile",
                              description="Tools for the online exit controller.")
    sub = p.add_subparsers(dest="control_command", metavar="ACTION")
    q = sub.add_parser(
        "profile", help="measure P(edge != cloud | exit score) on the validation split",
        description="Measure the bundle's disagreement profile (edge exit vs cloud answer, binned by the "
                    "exit's score) on the validation split and write it as JSON for edge.control "
                    "'estimator: profile'.")
    q.add_argument("bundle", help="bundle name in the repository, or a bundle folder")
    q.add_argument("--out", required=True, help="JSON file to write")
    q.add_argument("--dataset", choices=DATASETS,
                   help="data set (default: the bundle's training data set)")
    q.add_argument("--data-root", help="data folder (default: the data set's default folder)")
    q.add_argument("--bins", type=int, default=40, help="equal-count score bins (default 40)")
    q.add_argument("--limit", type=int, help="only the first N images of the validation split")
    q.add_argument("--fit", choices=("envelope", "isotonic", "upper"), default="envelope",
                   help="how noisy bins are made monotone: the upper envelope (conservative, "
                        "default), isotonic regression (unbiased shape), or each bin's upper "
                        "confidence bound at --level, then the envelope (pessimistic by rule)")
    q.add_argument("--level", type=float, default=0.8,
                   help="--fit upper: the per-bin one-sided confidence level (default 0.8)")
    q.add_argument("--part", choices=("a", "b"),
                   help="only half of the validation split: its even (a) or odd (b) rows, so a "
                        "controller can be tuned on a stream of the other half (benchmarks/controller.py "
                        "--split val-b) out of sample")
    q.add_argument("--repository", help="model repository folder (for a bundle given by name)")
    q.add_argument("--json", action="store_true", help="print one JSON object last")
    q.set_defaults(func=run_profile)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_profile(args: argparse.Namespace) -> int:
    if args.bins < 2:
        raise ValueError(f"--bins must be >= 2, got {args.bins}")
    from edgecloud.control.profile import DisagreementProfile
    from edgecloud.control.trace import compute_reference, val_part_rows
    from edgecloud.evaluate import load_eval_data, resolve_bundle
    from edgecloud.evaluate.source import training_dataset

    bundle = resolve_bundle(args.bundle, args.repository)
    dataset = args.dataset or training_dataset(bundle.manifest)
    if dataset not in DATASETS:
        raise ValueError(f"--dataset is needed: bundle {bundle.name!r}'s manifest names no known data set")
    data, info = load_eval_data(dataset, "val", bundle.manifest, args.data_root, limit=args.limit)
    split = "val" if args.part is None else f"val-{args.part}"
    rows = val_part_rows(len(data), split)
    ref = compute_reference(bundle, data.images.numpy()[rows])
    info = {**info, "split": split, "samples": int(rows.size)}
    fit = f"{args.fit} {args.level:g}" if args.fit == "upper" else args.fit
    profile = DisagreementProfile.fit(ref.policy, ref.score, (~ref.edge_agrees).astype(float), bins=args.bins,
                                      source=f"{bundle.name} {dataset} {split} ({rows.size} images, {fit})",
                                      method=args.fit, level=args.level)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    profile.save(args.out)
    summary = {"out": str(args.out), "bundle": bundle.name, **info, "policy": profile.kind,
               "bins": len(profile.rates), "disagreement": float((~ref.edge_agrees).mean())}
    print(json.dumps(summary) if args.json else
          f"profile: {args.out} ({summary['samples']} validation images, {summary['bins']} bins, "
          f"overall disagreement {summary['disagreement']:.2%})")
    return 0
