"""``edgecloud placement gemm|sweep|bundle``: where to compute in memory (WWW, Sharma et al. arXiv 2312.15896).

``gemm`` models one INT8 GEMM (M, N, K) on the tensor-core-like baseline or with SRAM CiM at the
register-file (rf) or shared-memory (smem) level; ``sweep`` runs the paper's workload GEMMs and an
M sweep for every primitive at both levels (iso-area primitive counts) against the baseline and
writes a CSV and a PNG; ``bundle`` places every conv/linear layer of a bundle's edge part (as
GEMMs) and sets the result beside the bundle's energy on edgecloud's own backends. Model and conventions: :mod:`edgecloud.placement.model`.
"""

from __future__ import annotations

import argparse
import json

from edgecloud.placement.model import ARCHS, CIM_TYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("placement", help="which CiM, where in the memory hierarchy (WWW analytic model)")
    sub = p.add_subparsers(dest="placement_command", metavar="ACTION", required=True)
    g = sub.add_parser("gemm", help="energy, cycles and accesses of one INT8 GEMM",
                       description="Timeloop-exact analytic model of an INT8 GEMM A[M,K] x B[N,K] -> Z[M,N]. "
                                   "cycles exclude the CiM primitive latency (Timeloop's convention); "
                                   "cycles_with_cim_latency applies it once per MAC per CiM unit.")
    g.add_argument("--m", type=int, required=True, help="rows of A and Z (tokens / output pixels)")
    g.add_argument("--n", type=int, required=True, help="output features (weight rows)")
    g.add_argument("--k", type=int, required=True, help="reduction length")
    g.add_argument("--arch", default="rf", help=f"one of {', '.join(ARCHS)} (default rf)")
    g.add_argument("--cim", default="analog6T", help=f"CiM primitive: {', '.join(CIM_TYPES)} (default analog6T)")
    g.add_argument("--banks", type=int, help="CiM primitives (X=1, Y=banks; default 4 as in the committed runs)")
    g.add_argument("--iso-area", action="store_true", help="use the paper's iso-area primitive count for --banks")
    g.add_argument("--threshold", type=float, help="bank-split THRESHOLD (default 4 at rf, 32 at smem)")
    g.add_argument("--mapping", default="priority", help="CiM mapping: priority (the WWW repository's "
                   "algorithm, default) or search (best over bank splits, SMEM tiles, DRAM loop orders)")
    g.add_argument("--objective", default="edp", help="for --mapping search: edp (energy x cycles with the CiM "
                   "latency, default) or energy")
    g.add_argument("--constants", help="a constants YAML replacing edgecloud/placement/constants.yaml")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=run_gemm)
    register_sweep(sub)
    register_bundle(sub)


def _constants(path: str | None):
    from edgecloud.placement.model import load_constants

    try:
        return load_constants(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--constants: {exc}") from exc


def run_gemm(args: argparse.Namespace) -> int:
    from edgecloud.placement.model import gemm

    c = _constants(args.constants)
    banks = args.banks
    if args.iso_area:
        if args.arch == "baseline":
            raise ValueError("--iso-area applies to --arch rf or smem, not baseline")
        if args.arch not in ARCHS:
            raise ValueError(f"--arch {args.arch!r}: choose one of {', '.join(ARCHS)}")
        if args.cim not in c["iso_area_banks"][args.arch]:
            raise ValueError(f"--cim {args.cim!r}: choose one of {', '.join(c['cim'])}")
        banks = c["iso_area_banks"][args.arch][args.cim]
    if args.threshold is not None and args.threshold <= 0:
        raise ValueError(f"--threshold must be > 0, got {args.threshold}")
    if args.mapping not in ("priority", "search"):
        raise ValueError(f"--mapping {args.mapping!r}: choose priority or search")
    if args.objective not in ("edp", "energy"):
        raise ValueError(f"--objective {args.objective!r}: choose edp or energy")
    r = gemm(args.m, args.n, args.k, args.arch, args.cim, banks, c, args.threshold,
             search=args.mapping == "search", objective=args.objective)
    if args.json:
        print(json.dumps(r.to_json()))
        return 0
    what = "baseline (tensor-core-like)" if r.arch == "baseline" else f"{r.cim} CiM at {r.arch}, {r.banks} primitives"
    print(f"GEMM M={r.M} N={r.N} K={r.K} ({r.macs} MACs) on {what}")
    print(f"energy      {r.energy_uj:.3f} uJ  ({r.energy_per_mac_fj:.2f} fJ/MAC)")
    print(f"cycles      {r.cycles}  (Timeloop convention, CiM latency excluded; 1 GHz)")
    if r.arch != "baseline":
        print(f"            {r.cycles_with_cim_latency} with the primitive latency once per MAC; "
              f"{r.cycles_www_postprocess} by WWW get_stats.py")
    print(f"utilization {r.utilization:.4f}")
    for level, uj in r.breakdown_uj.items():
        print(f"  {level:<13} {uj:12.3f} uJ   {' | '.join(r.mapping.get(level, []))}")
    return 0


def register_sweep(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="M sweep and the paper's workload GEMMs, every CiM at RF and SMEM vs baseline",
                       description="Iso-area primitive counts (RF 3/2/3/4, SMEM 48/32/48/64 for analog6T/analog8T/"
                                   "digital6T/digital8T). Writes a CSV and a PNG; throughput includes the CiM latency.")
    s.add_argument("--m", default="16,32,64,128,256,512,1024,2048,4096,8192",
                   help="comma-separated M values (default 16..8192)")
    s.add_argument("--n", type=int, default=1024, help="N of the M sweep (default 1024)")
    s.add_argument("--k", type=int, default=1024, help="K of the M sweep (default 1024)")
    s.add_argument("--no-workloads", action="store_true", help="only the M sweep")
    s.add_argument("--mapping", default="priority", help="CiM mapping: priority (default) or search (EDP)")
    s.add_argument("--out", default="runs/placement", help="output folder (default runs/placement)")
    s.add_argument("--constants", help="a constants YAML replacing edgecloud/placement/constants.yaml")
    s.add_argument("--json", action="store_true", help="print one JSON object (the workload totals)")
    s.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgecloud.placement.sweep import plot, run_sweep as sweep, write_csv

    try:
        m_values = [int(x) for x in args.m.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"--m: comma-separated positive integers, got {args.m!r}") from exc
    if not m_values or min(m_values) < 1:
        raise ValueError(f"--m: comma-separated positive integers, got {args.m!r}")
    for flag in ("n", "k"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if args.mapping not in ("priority", "search"):
        raise ValueError(f"--mapping {args.mapping!r}: choose priority or search")
    rows = sweep(m_values, args.n, args.k, _constants(args.constants), workloads=not args.no_workloads,
                 search=args.mapping == "search")
    out = Path(args.out)
    write_csv(rows, out / "placement_sweep.csv")
    plot(rows, out / "placement_sweep.png", args.mapping)
    totals = [r for r in rows if r["workload"].endswith(" total")]
    if args.json:
        print(json.dumps({"csv": str(out / "placement_sweep.csv"), "png": str(out / "placement_sweep.png"),
                          "totals": totals}))
        return 0
    print(f"{'workload':<12} {'placement':<18} {'energy uJ':>12} {'E/base':>8} {'speedup':>8}")
    for r in totals:
        where = "baseline" if r["arch"] == "baseline" else f"{r['cim']}@{r['arch']}x{r['banks']}"
        print(f"{r['group']:<12} {where:<18} {r['energy_uj']:12.1f} {r['energy_vs_baseline']:8.3f} "
              f"{r['speedup_vs_baseline']:8.3f}")
    print(f"wrote {out / 'placement_sweep.csv'} and {out / 'placement_sweep.png'}")
    return 0


def register_bundle(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bundle", help="per-layer placement of a bundle's edge part (its layers as GEMMs)",
                       description="Every conv/linear layer of the bundle's edge (backbone and exit branches, one "
                                   "sample through the whole edge) as a batch-1 INT8 GEMM on the baseline and the 8 "
                                   "iso-area CiM configurations; the best placement per layer and for the whole edge, "
                                   "beside the same edge's energy on edgecloud's backends. Writes a CSV and a PNG.")
    b.add_argument("bundle", help="bundle name in the repository, or a bundle folder")
    b.add_argument("--repository", help="model repository folder (for a bundle given by name)")
    b.add_argument("--mapping", default="priority", help="CiM mapping: priority (default) or search (EDP)")
    b.add_argument("--backends", default="digital,crossbar,sram",
                   help="edgecloud backends to price the same edge on (comma list; 'none' to skip; "
                        "default digital,crossbar,sram)")
    b.add_argument("--samples", type=int, default=8, help="seeded random images run through each backend (default 8)")
    b.add_argument("--seed", type=int, default=0, help="seed of the images and the simulated chips (default 0)")
    b.add_argument("--out", help="output folder (default runs/placement/<bundle>)")
    b.add_argument("--constants", help="a constants YAML replacing edgecloud/placement/constants.yaml")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=run_bundle)


def run_bundle(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgecloud.cim.backend import available_backends
    from edgecloud.evaluate.source import resolve_bundle
    from edgecloud.placement.bundle import place_bundle, plot, report, write_csv

    if args.mapping not in ("priority", "search"):
        raise ValueError(f"--mapping {args.mapping!r}: choose priority or search")
    backends = [] if args.backends.strip() == "none" else [x.strip() for x in args.backends.split(",") if x.strip()]
    for name in backends:
        if name not in available_backends():
            raise ValueError(f"--backends: unknown backend {name!r}; choose from "
                             f"{', '.join(available_backends())} or none")
    if args.samples < 1:
        raise ValueError(f"--samples must be a positive integer, got {args.samples}")
    bundle = resolve_bundle(args.bundle, args.repository)
    result = place_bundle(bundle, _constants(args.constants), search=args.mapping == "search",
                          backends=backends, samples=args.samples, seed=args.seed)
    out = Path(args.out or f"runs/placement/{bundle.name}")
    write_csv(result, out / "placement_bundle.csv")
    plot(result, out / "placement_bundle.png")
    summary = result.summary()
    summary.update(csv=str(out / "placement_bundle.csv"), png=str(out / "placement_bundle.png"))
    if args.json:
        print(json.dumps(summary))
        return 0
    print(report(summary))
    print(f"wrote {out / 'placement_bundle.csv'} and {out / 'placement_bundle.png'}")
    return 0
