"""``edgecloud sweep BUNDLE --dataset ...``: exit-threshold sweep from one pass of the network.

Caches every exit's outputs and every destination's energy once, then evaluates each threshold
from the cache; writes ``sweep.csv`` (one row per threshold) and ``sweep.png`` (accuracy and
energy vs the share of samples answered at the edge, the bundle's operating point marked).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgecloud.commands.eval import add_common_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep", help="exit-threshold sweep: sweep.csv + sweep.png",
        description="Run the bundle once over the data (all exits' outputs and energies cached), then "
                    "evaluate each exit threshold from the cache. Choose thresholds on --split val.",
    )
    add_common_args(p, "val")
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--thresholds", help="comma-separated threshold values, e.g. 0,0.1,0.2")
    grid.add_argument("--grid", type=int, default=21,
                      help="N evenly spaced thresholds over the policy's range (default 21)")
    p.add_argument("--exit", dest="exit_index", help="sweep only this exit (index or name); "
                   "default: every exit with a numeric manifest threshold, all set to the same value")
    p.add_argument("--out", type=Path, default=Path("sweep"), help="output folder (default ./sweep)")
    p.set_defaults(func=run)


def _exit_index(value: str | None, names: list[str]) -> int | None:
    if value is None:
        return None
    if value in names:
        return names.index(value)
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"--exit {value!r}: no such exit; exits: {', '.join(names)}") from exc


def run(args: argparse.Namespace) -> int:
    from edgecloud.commands.eval import prepare
    from edgecloud.evaluate import build_cache, default_grid, sweep, write_csv, write_plot
    from edgecloud.evaluate.report import sweep_table
    from edgecloud.evaluate.results import json_safe
    from edgecloud.evaluate.sweep import parse_thresholds

    bundle, data, info, config = prepare(args)
    m = bundle.manifest
    thresholds = (parse_thresholds(args.thresholds) if args.thresholds
                  else default_grid(m.policy, len(m.classes), args.grid))
    exit_index = _exit_index(args.exit_index, [e.name for e in m.exits])
    cache = build_cache(bundle, data, config)
    rows, operating = sweep(cache, thresholds, exit_index)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(rows, args.out / "sweep.csv")
    title = (f"{m.name} on {info['dataset']}/{info['split']} ({len(data)} samples), backend "
             f"{config.backend} seed {config.seed}, {m.policy} thresholds")
    png_path = write_plot(rows, operating, args.out / "sweep.png", title)
    print(sweep_table(rows, cache.exit_names, operating))
    print(f"wrote {csv_path} and {png_path}")
    if args.json:
        out = {"bundle": m.name, **info, "samples": len(data), "backend": config.backend,
               "backend_options": config.backend_options, "adc_law": config.meter().table.adc_law,
               "seed": config.seed, "policy": m.policy,
               "exits": cache.exit_names + ["cloud"], "rows": rows, "operating_point": operating,
               "csv": str(csv_path), "png": str(png_path)}
        print(json.dumps(json_safe(out)))
    return 0
