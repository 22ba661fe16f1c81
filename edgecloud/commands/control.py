"""``edgecloud control profile BUNDLE --data-root ... --out FILE``: the offline disagreement profile
an exit controller with ``estimator: profile`` reads (:mod:`edgecloud.control.profile`);
``edgecloud control shift-family``: the factor ``shift_factor`` a shift may add on top of it
(:mod:`edgecloud.control.shifts`).

Runs every image of the bundle's VALIDATION split through the edge part and through the cloud
part the cloud server runs, and bins P(edge answer != cloud answer) by the exit's score. Only
the validation split: the profile steers thresholds, so measuring it on test would leak test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgecloud.commands.offload import DATASETS  # the data sets a bundle can be evaluated on


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("control", help="exit-control tools: the offline disagreement profile, "
                              "the shift family",
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
    q.add_argument("--part", type=_part,
                   help="only part of the validation split: its even (a) or odd (b) rows, fold I "
                        "of K (KfI: rows = I mod K) or all but it (KfIc), so a controller can be "
                        "tuned on a stream of the rest (benchmarks/controller.py --split val-b, "
                        "val-5f0) out of sample")
    q.add_argument("--repository", help="model repository folder (for a bundle given by name)")
    q.add_argument("--json", action="store_true", help="print one JSON object last")
    q.set_defaults(func=run_profile)
    f = sub.add_parser(
        "shift-family", help="measure how far shifts raise the exits' disagreement above the band's",
        description="Apply a family of corruptions to the validation images and measure, per "
                    "corruption, kappa = r_exit / r_band: how many times the profile-times-r "
                    "pricing the band gives under-prices the exits' disagreement. Its maximum "
                    "over the family is edge.control 'shift_factor' (edgecloud.control.shifts).")
    f.add_argument("bundle", help="bundle name in the repository, or a bundle folder")
    f.add_argument("--profile", required=True, help="the profile JSON the controller uses")
    f.add_argument("--dataset", choices=sorted(DATASETS), help="data set (default: the bundle's)")
    f.add_argument("--data-root", help="data folder (default: the data set's default folder)")
    f.add_argument("--part", type=_part, help="only part of the validation split (as for profile)")
    f.add_argument("--limit", type=int, help="only the first N images of the validation split")
    f.add_argument("--target", type=float, default=0.97,
                   help="the agreement budget whose hindsight threshold is measured at (default 0.97)")
    f.add_argument("--band", type=int, default=250, help="the controller's profile_band (default 250)")
    f.add_argument("--window", type=int, default=4000, help="the controller's window (default 4000)")
    f.add_argument("--seed", type=int, default=0, help="seed of the random corruptions")
    f.add_argument("--no-trace", action="store_true",
                   help="skip the drift trace's own corruptions (measured beside the family as its check)")
    f.add_argument("--repository", help="model repository folder (for a bundle given by name)")
    f.add_argument("--json", action="store_true", help="print one JSON object last")
    f.set_defaults(func=run_shift_family)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _part(text: str) -> str:
    from edgecloud.control.trace import is_val_part

    if not is_val_part(f"val-{text}"):
        raise argparse.ArgumentTypeError(f"{text!r}: use a, b, KfI (fold I of K) or KfIc (all but it)")
    return text


def _validation_images(args: argparse.Namespace):
    """The bundle and its validation images (all, or ``--part``), as uint8 [N, C, H, W]."""
    from edgecloud.control.trace import val_part_rows
    from edgecloud.evaluate import load_eval_data, resolve_bundle
    from edgecloud.evaluate.source import training_dataset

    bundle = resolve_bundle(args.bundle, args.repository)
    dataset = args.dataset or training_dataset(bundle.manifest)
    if dataset not in DATASETS:
        raise ValueError(f"--dataset is needed: bundle {bundle.name!r}'s manifest names no known data set")
    data, info = load_eval_data(dataset, "val", bundle.manifest, args.data_root, limit=args.limit)
    split = "val" if args.part is None else f"val-{args.part}"
    rows = val_part_rows(len(data), split)
    return bundle, dataset, data.images.numpy()[rows], {**info, "split": split, "samples": int(rows.size)}


def run_shift_family(args: argparse.Namespace) -> int:
    if not 0.0 < args.target < 1.0:
        raise ValueError(f"--target must lie in (0, 1), got {args.target}")
    if args.band < 1 or args.window < args.band:
        raise ValueError(f"--band must be >= 1 and <= --window, got {args.band} and {args.window}")
    import sys

    from tqdm import tqdm

    from edgecloud.control.profile import DisagreementProfile
    from edgecloud.control.shifts import SHIFT_FAMILY, TRACE_SHIFTS, measure_family

    profile = DisagreementProfile.load(args.profile)
    bundle, dataset, images, info = _validation_images(args)
    shifts = {**SHIFT_FAMILY, **({} if args.no_trace else TRACE_SHIFTS)}
    with tqdm(total=len(shifts) + 1, desc="shifts", unit="shift", file=sys.stderr,
              disable=args.json) as bar:
        rows = measure_family(bundle, images, profile, shifts, seed=args.seed, target=1.0 - args.target,
                              band_share=args.band / args.window, window=args.window,
                              progress=lambda name: (bar.set_postfix_str(name), bar.update(1)))
    family = [r for r in rows if r.name in SHIFT_FAMILY and np.isfinite(r.kappa)]
    factor = max((r.kappa for r in family), default=float("nan"))
    summary = {"bundle": bundle.name, "profile": str(args.profile), **info, "target": args.target,
               "band": args.band, "window": args.window, "seed": args.seed,
               "shifts": [{k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                           for k, v in r.to_dict().items()} for r in rows],
               "shift_factor": factor if np.isfinite(factor) else None,
               "family": list(SHIFT_FAMILY), "trace": [] if args.no_trace else list(TRACE_SHIFTS)}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{'shift':22s} {'shift p':>9s} {'threshold':>9s} {'exits':>6s} {'r_band':>6s} "
          f"{'r_exit':>6s} {'kappa':>6s}")
    for r in rows:
        print(f"{r.name:22s} {r.shift_p:9.2g} {r.threshold:9.3f} {r.exit_share:6.1%} {r.r_band:6.2f} "
              f"{r.r_exit:6.2f} {r.kappa:6.2f}")
    print(f"shift_factor (largest kappa of the family, trace shifts left out): {factor:.2f}")
    return 0


def run_profile(args: argparse.Namespace) -> int:
    if args.bins < 2:
        raise ValueError(f"--bins must be >= 2, got {args.bins}")
    from edgecloud.control.profile import DisagreementProfile
    from edgecloud.control.trace import compute_reference

    bundle, dataset, images, info = _validation_images(args)
    split = info["split"]
    ref = compute_reference(bundle, images)
    fit = f"{args.fit} {args.level:g}" if args.fit == "upper" else args.fit
    profile = DisagreementProfile.fit(ref.policy, ref.score, (~ref.edge_agrees).astype(float), bins=args.bins,
                                      source=f"{bundle.name} {dataset} {split} ({len(images)} images, {fit})",
                                      method=args.fit, level=args.level)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    profile.save(args.out)
    summary = {"out": str(args.out), "bundle": bundle.name, **info, "policy": profile.kind,
               "bins": len(profile.rates), "disagreement": float((~ref.edge_agrees).mean())}
    print(json.dumps(summary) if args.json else
          f"profile: {args.out} ({summary['samples']} validation images, {summary['bins']} bins, "
          f"overall disagreement {summary['disagreement']:.2%})")
    return 0
