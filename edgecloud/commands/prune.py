"""``edgecloud prune SOURCE --method dub|magnitude|group-lasso``: prune a bundle for crossbar ADC efficiency.

Three phases through the training loop, each checkpointed every epoch under WORK (a rerun of the
same command resumes): 1. fine-tune from SOURCE with the method's regulariser
(--regularize-epochs; D.U.B.: gated variance of the Hoyer L0 proxies of the columns sharing a
crossbar + L2; group lasso: crossbar column/row segments + L2; magnitude: L2 alone), 2. prune
(D.U.B.: every column of an array keeps the same number of weights, at a power-of-two fraction of
the rows; magnitude: --ratio of each layer; group lasso: segments whose norm fell to --tol),
3. fine-tune with the masks fixed (--finetune-epochs). The recipes come from SOURCE's manifest
(its training data, optimiser, schedule and seed), with the learning rate, epochs, batch size
and training subset given here.

The bundle written to --out carries ``hardware: {crossbar: {rows, cols, adc_reduce: sparsity}}``
(each crossbar array's ADC resolution set by its densest column) and a model card with the
command, the data, the seed, the wall time and what was measured: sparsity per layer, ADC bits
per array, ADC energy against SOURCE under the walden, schreier and linear laws (cost model, same
arrays), test accuracy digital and, with --crossbar-chips N, on the typical crossbar with an
ideal ADC (mean over N chips). --json prints the same numbers as one JSON object, last.
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a bundle for crossbar ADC efficiency (D.U.B., magnitude, group lasso)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="bundle to prune: a name in the repository, or a bundle folder")
    p.add_argument("--method", default="dub", help="dub (default), magnitude or group-lasso")
    p.add_argument("--repository", help="model repository folder (for a SOURCE given by name)")
    p.add_argument("--dataset", help="data set (default: SOURCE's training data set)")
    p.add_argument("--data-root", help="data folder (default: SOURCE's training data.root)")
    p.add_argument("--rows", type=int, default=64, help="crossbar rows per array = the D.U.B. tile (default 64)")
    p.add_argument("--outputs-per-array", type=int,
                   help="outputs sharing an array's ADC setting (default rows/2: a square array of rows x 2 "
                        "columns per output, differential pairs); the bundle's crossbar has cols = 2 x this")
    p.add_argument("--layers", default="conv", help="conv (default, the paper) or all (conv and linear)")
    p.add_argument("--regularize-epochs", type=int, default=1,
                   help="phase 1: epochs of fine-tuning from SOURCE with the method's regulariser (0 skips; "
                        "default 1)")
    p.add_argument("--finetune-epochs", type=int, default=1,
                   help="phase 3: epochs of fine-tuning with the masks fixed (0: export the pruned weights "
                        "as they are; default 1)")
    p.add_argument("--lambda-var", type=float, help="dub: weight of the variance-of-Hoyer term (default 1e-3)")
    p.add_argument("--lambda-l2", type=float, help="weight of the L2 term ||W||^2 (default 1e-3)")
    p.add_argument("--lambda-group", type=float, help="group-lasso: weight of the group norms (default 1e-4)")
    p.add_argument("--ratio", type=float,
                   help="magnitude (this or --match-sparsity required) / group-lasso (optional, after the dead "
                        "segments): fraction of each layer's weights removed, smallest |w| first")
    p.add_argument("--match-sparsity", metavar="BUNDLE",
                   help="magnitude / group-lasso: prune each layer to the sparsity it has in BUNDLE (a bundle "
                        "this command wrote, e.g. the D.U.B. one): the baselines at equal sparsity")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="dub / group-lasso: |w| (or a group's norm) at most this counts as zero (default 1e-3)")
    p.add_argument("--lr", type=float, help="learning rate of both phases (default 0.01; SOURCE's schedule)")
    p.add_argument("--batch-size", type=int, help="batch size (default: SOURCE's)")
    p.add_argument("--limit-train", type=int,
                   help="train on a seeded subset of N images (quick runs; validation and test shrink to "
                        "max(N/5, 100) images too)")
    p.add_argument("--seed", type=int, help="seed (default: SOURCE's training seed); crossbar chips are "
                   "seeds SEED..SEED+N-1")
    p.add_argument("--crossbar-chips", type=int, default=0,
                   help="also measure test accuracy on N typical crossbar chips with an ideal ADC (default 0)")
    p.add_argument("--no-cache", action="store_true",
                   help="measure every crossbar chip anew instead of reusing a chip already measured with the "
                        "same weights, options, images and simulator (cache: $EDGECLOUD_CACHE or ~/.cache/edgecloud)")
    p.add_argument("--out", help="bundle folder to write (default runs/prune/<source>-<method>)")
    p.add_argument("--work", help="run folders of the phases, with their checkpoints (default <out>.work)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="no progress bars; print one JSON object last")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from edgecloud.codesign.pipeline import PruneConfig, command_line

    return PruneConfig(
        source=args.source, method=args.method, repository=args.repository, dataset=args.dataset,
        data_root=args.data_root, rows=args.rows, outputs_per_array=args.outputs_per_array, layers=args.layers,
        regularize_epochs=args.regularize_epochs, finetune_epochs=args.finetune_epochs,
        lambda_var=args.lambda_var, lambda_l2=args.lambda_l2, lambda_group=args.lambda_group, ratio=args.ratio, match_sparsity=args.match_sparsity,
        tol=args.tol, lr=args.lr, batch_size=args.batch_size, limit_train=args.limit_train, seed=args.seed,
        out=args.out, work=args.work, crossbar_chips=args.crossbar_chips, cache=not args.no_cache,
        command=command_line(getattr(args, "argv", None) or ["prune", args.source]),
    ).validate()


def summary_lines(report: dict) -> list[str]:
    m = report["measured"]
    acc = m["accuracy"]
    lines = [f"bundle written to {report['bundle']}",
             f"  pruned: {m['sparsity']['sparsity']:.4f} of {m['sparsity']['weights']} weights "
             f"({report['method']}, {report['settings']['rows']}x{report['settings']['cols']} arrays)",
             f"  test accuracy (digital, {acc['test_samples']} images): source {acc['digital']['source']:.4f}, "
             f"pruned {acc['digital']['pruned']:.4f}"]
    if "crossbar" in acc:
        c = acc["crossbar"]
        lines.append(f"  test accuracy (crossbar typical, ideal ADC, {c['chips']} chips): "
                     f"source {c['source']['mean']:.4f}, pruned {c['pruned']['mean']:.4f}")
    for law, e in m["adc_energy"].items():
        lines.append(f"  ADC energy ({law}): source {e['source_j'] * 1e9:.4g} nJ, pruned {e['pruned_j'] * 1e9:.4g} nJ "
                     f"({e['ratio']}x less)")
    return lines


def run(args: argparse.Namespace) -> int:
    import torch

    from edgecloud.codesign.pipeline import run_prune
    from edgecloud.train.perf import tune_malloc

    config = config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_malloc()
    report = run_prune(config, progress=not (args.json or args.no_progress))
    if args.json:
        print(json.dumps(report))
    else:
        print("\n".join(summary_lines(report)))
    return 0
