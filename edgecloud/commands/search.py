"""``edgecloud search nax SUPERNET``: architecture x crossbar co-design searches.

``nax`` (:mod:`edgecloud.codesign.nax`; Negi et al., DAC'22): per block conv a kernel size and per
layer a crossbar size, sampled by a seeded NSGA-II (Optuna) from a trained ``resnet_q_elastic``
supernet (bundle folder or run folder), scored by the validation accuracy on the non-ideal
crossbar backend and the EDAP of the cost model. Writes OUT/trials.csv, OUT/pareto.csv,
OUT/nax.png, OUT/choice.yaml, the chosen and reference sub-networks as bundles (OUT/chosen,
OUT/reference) and recipes that fine-tune them (OUT/retrain-chosen.yaml,
OUT/retrain-reference.yaml). A rerun with the same settings reuses OUT/cache.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from exc
    if not values:
        raise ValueError(f"{what}: give at least one value")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("search", help="architecture / crossbar co-design searches (nax)",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    sub = p.add_subparsers(dest="search", metavar="METHOD")
    n = sub.add_parser(
        "nax", help="per-layer kernel size x crossbar size on a trained supernet (NAX)",
        description="NAX co-design search (edgecloud.codesign.nax): per block conv a kernel size, per layer a "
                    "square crossbar size; maximise validation accuracy on the crossbar backend (mean over "
                    "chips), minimise EDAP (cost model). Seeded NSGA-II; evaluations cached in OUT/cache.jsonl.")
    n.add_argument("supernet", help="a resnet_q_elastic bundle folder or training run folder (a resnet_q: "
                                    "crossbar sizes only, with --kernels set to its kernel)")
    n.add_argument("--trials", type=int, default=100, help="NSGA-II trials (default 100)")
    n.add_argument("--population", type=int, default=20, help="NSGA-II population per generation (default 20)")
    n.add_argument("--no-warm-start", action="store_true",
                   help="a purely random first generation (default: the first trials are the uniform 3x3 "
                        "networks at every --xbars size)")
    n.add_argument("--chips", type=int, default=2, help="simulated chips per candidate (seeds SEED..; default 2)")
    n.add_argument("--val-limit", type=int, default=1000,
                   help="class-balanced validation images per evaluation (default 1000; 0: the whole split)")
    n.add_argument("--xbars", default="32,64,128,256", help="square crossbar sizes (default 32,64,128,256)")
    n.add_argument("--kernels", default="1,3,5", help="kernel sizes of the block convs (default 1,3,5)")
    n.add_argument("--ref-xbars", default="64,128",
                   help="crossbar sizes of the uniform ResNet-20 references (default 64,128; the first is the "
                        "EDAP bound of --pick constrained)")
    n.add_argument("--pick", choices=["constrained", "score"], default="constrained",
                   help="constrained: most accurate trial with EDAP <= the reference's (never a reference "
                        "itself); score: max accuracy - LAM ln(EDAP / EDAP_ref)")
    n.add_argument("--lam", type=float, default=0.01, help="weight of ln(EDAP / EDAP_ref) in the score (default 0.01)")
    n.add_argument("--backend-option", action="append", metavar="K=V", default=[],
                   help="crossbar backend option (repeatable; YAML values; default preset=typical)")
    n.add_argument("--bn-images", type=int, default=500,
                   help="training images that re-estimate each sub-network's BN statistics (default 500)")
    n.add_argument("--calib-images", type=int, default=200,
                   help="training images (one batch) that calibrate each chip's ADC ranges (default 200)")
    n.add_argument("--batch-size", type=int, default=250)
    n.add_argument("--seed", type=int, default=0, help="seed of the sampler and of the first chip (default 0)")
    n.add_argument("--data-root", help="data folder (default: the supernet's training data root)")
    n.add_argument("--cost-table", help="cost table YAML (default: the packaged one)")
    n.add_argument("--energy-table", help="energy table YAML (default: the packaged one)")
    n.add_argument("--threads", type=int, help="torch intra-op threads")
    n.add_argument("--out", help="output folder (default runs/nax/<supernet folder name>)")
    n.add_argument("--no-cache", action="store_true", help="measure every candidate anew")
    n.add_argument("--no-export", action="store_true",
                   help="do not write the chosen / reference bundles and their retraining recipes")
    n.add_argument("--no-progress", action="store_true", help="no progress bar")
    n.add_argument("--json", action="store_true",
                   help="print one JSON object as the last line (the progress bar stays on stderr)")
    n.set_defaults(func=run_nax)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_nax(args: argparse.Namespace) -> int:
    import torch

    from edgecloud.codesign.nax import NaxConfig, result_json, run_search, versus_references, write_outputs
    from edgecloud.commands.edge import parse_backend_options

    if args.threads:
        torch.set_num_threads(args.threads)
    options = parse_backend_options(args.backend_option)
    options.setdefault("preset", "typical")
    if "layers" in options or "rows" in options or "cols" in options:
        raise ValueError("--backend-option: rows, cols and layers are what the search chooses")
    out = Path(args.out) if args.out else Path("runs") / "nax" / Path(args.supernet).name
    config = NaxConfig(
        supernet=args.supernet, out=str(out), trials=args.trials, chips=args.chips,
        val_limit=args.val_limit or None, xbars=_ints(args.xbars, "--xbars"), kernels=_ints(args.kernels, "--kernels"),
        reference_xbars=_ints(args.ref_xbars, "--ref-xbars"), options=options, seed=args.seed,
        population=args.population, warm_start=not args.no_warm_start, bn_images=args.bn_images,
        calib_images=args.calib_images,
        batch_size=args.batch_size, pick=args.pick, lam=args.lam, data_root=args.data_root,
        cache=not args.no_cache, cost_table=args.cost_table, energy_table=args.energy_table,
    )
    result = run_search(config, progress=not args.no_progress)
    paths = write_outputs(result, out, export=not args.no_export)
    summary = result_json(result, paths)
    summary["command"] = "edgecloud " + " ".join(getattr(args, "argv", sys.argv[1:]))
    (out / "nax.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary))
        return 0
    c = result.chosen
    print(f"NAX on {result.source.name}: {len(result.rows)} trials, {result.data.info['val_samples']} validation "
          f"images x {config.chips} chip(s), {result.info['wall_time_s']:.0f} s")
    for r in result.references:
        print(f"  {r.label:<18} accuracy {100 * r.accuracy_mean:6.2f} % +- {100 * r.accuracy_std:.2f}  "
              f"EDAP {r.edap:.4g} ({r.edap_vs_reference:.3f}x)")
    print(f"  chosen (trial {c.trial:>3}) accuracy {100 * c.accuracy_mean:6.2f} % +- {100 * c.accuracy_std:.2f}  "
          f"EDAP {c.edap:.4g} ({c.edap_vs_reference:.3f}x)  [{result.info['why']}]")
    for label, v in versus_references(result, c).items():
        print(f"    vs {label}: {v['accuracy_points']:+.2f} points, EDAP x{v['edap_ratio']:.3f}")
    print(f"  kernels {list(c.kernels)}")
    print(f"  crossbars {list(c.xbars)}")
    print("wrote " + ", ".join(str(v) for k, v in paths.items()))
    return 0
