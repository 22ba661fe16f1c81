"""Would a class-conditional exit score save offloads over the exit's entropy?

Why: one entropy threshold exits every class alike, while the edge's answer is more often wrong
for some classes (bird, cat) at the same entropy. Exiting on P(disagree | entropy, class) would
then reach the same agreement with fewer offloads. This measures the best case, in hindsight per
segment: for each fold I of the validation hold-out, a logistic model of P(edge != cloud) on
(class one-hot) x (1, entropy, log entropy) is fitted on the other four folds' clean images and
applied to fold I's drifting stream. Per segment, the offload share that just reaches the
target agreement, ranking samples by entropy and by the model.

    benchmarks/controller_folds.sh base --control shift_alpha=0.05   # makes the references
    python benchmarks/exit_ranking.py [--target 0.97] [--json]

The last line is one JSON object naming the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import cpu_info  # noqa: E402

from edgecloud.control import trace  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def class_features(score: np.ndarray, cls: np.ndarray, classes: int = 10) -> np.ndarray:
    """Per-class intercept, slope and log-slope, plus shared ones."""
    log_s = np.log(score + 1e-6)
    x = np.zeros((score.size, classes * 3))
    rows = np.arange(score.size)
    for k, f in enumerate((np.ones_like(score), score, log_s)):
        x[rows, cls * 3 + k] = f
    return np.c_[x, score, log_s]


def offload_needed(rank: np.ndarray, agrees: np.ndarray, target: float) -> float:
    """Smallest offload share reaching ``target`` agreement, exiting the lowest ``rank`` first:
    the hindsight oracle's cut with every offload costing the same."""
    return 1.0 - trace.oracle_threshold(rank, agrees, 0.0, 1.0, target).exit_share


def main(argv: list[str] | None = None) -> int:
    from sklearn.linear_model import LogisticRegression

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--references", default=str(ROOT / "runs" / "fold-references"),
                        help="folder holding 5f0/ ... 5f4/reference.npz (controller_folds.sh)")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--scale", type=float, default=2.0, help="the stream's --scale")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)

    paths = [Path(args.references) / f"5f{i}" / "reference.npz" for i in range(5)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"--references: missing {', '.join(missing)}; run "
                         "benchmarks/controller_folds.sh first")
    refs = [trace.Reference.load(str(p)) for p in paths]
    spec = trace.preset("drift", scale=args.scale)
    bounds = np.cumsum([0] + [s.length for s in spec.segments])
    if bounds[-1] != len(refs[0]):
        raise SystemExit(f"--scale: the preset gives {bounds[-1]} samples, the references hold {len(refs[0])}")
    rows = []
    for i, ref in enumerate(refs):
        # each fold's clean segment cycles through its images in permutations: its first
        # (number of distinct scores) samples are every image once
        train = [(r, np.unique(r.score[:bounds[1]]).size) for j, r in enumerate(refs) if j != i]
        score = np.concatenate([r.score[:n] for r, n in train])
        cls = np.concatenate([r.edge_class[:n] for r, n in train])
        wrong = np.concatenate([~r.edge_agrees[:n] for r, n in train])
        model = LogisticRegression(max_iter=2000).fit(class_features(score, cls), wrong)
        for seg, a, b in zip(spec.segments, bounds[:-1], bounds[1:]):
            s, c, ok = ref.score[a:b], ref.edge_class[a:b], ref.edge_agrees[a:b]
            p = model.predict_proba(class_features(s, c))[:, 1]
            rows.append({"fold": i, "segment": seg.kind, "entropy": offload_needed(s, ok, args.target),
                         "class_model": offload_needed(p, ok, args.target)})
    if not args.json:
        print(f"offload share reaching {args.target:.0%} agreement, hindsight per segment")
        print("fold  segment    entropy  class model")
        for r in rows:
            print(f"{r['fold']:4d}  {r['segment']:9s}  {r['entropy']:.3f}    {r['class_model']:.3f}")
    ent = float(np.mean([r["entropy"] for r in rows]))
    mod = float(np.mean([r["class_model"] for r in rows]))
    print(json.dumps({"benchmark": "exit_ranking", "target": args.target, "rows": rows,
                      "mean_offload_entropy": round(ent, 4), "mean_offload_class_model": round(mod, 4),
                      "class_model_vs_entropy": round(mod / ent, 4), "cpu": cpu_info()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
