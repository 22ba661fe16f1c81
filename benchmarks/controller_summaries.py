"""One table from several ``benchmarks/controller.py`` outputs (their ``summary.json``).

Why: choosing a controller setting out of sample means one offline replay per fold and per
setting (``--split val-5fI`` with a profile from ``--part 5fIc``); this lines their acceptance
numbers up, with the mean and worst case over each setting's runs.

    python benchmarks/controller_summaries.py runs/folds/*/ [--json]

A row per folder: the stream's split, the profile, the settings that differ between the
folders, the settled windows meeting the target (all, and where the static threshold misses),
energy ÷ the per-window oracle's, and the shadow share of samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SKIP = {"agreement", "delta", "window", "step_samples", "min_samples", "interval_s", "profile"}


def load(folder: Path) -> dict[str, Any]:
    path = folder / "summary.json"
    if not path.is_file():
        raise SystemExit(f"{folder}: no summary.json (run benchmarks/controller.py --out {folder} first)")
    data = json.loads(path.read_text())
    if data.get("controlled_meet_share") is None:
        raise SystemExit(f"{path}: no controlled or offline run in it (--modes controlled or offline)")
    return data


def rows(folders: list[Path]) -> list[dict[str, Any]]:
    loaded = [(f, load(f)) for f in folders]
    keys = sorted({k for _, d in loaded for k in d.get("control", {})} - SKIP)
    varying = [k for k in keys if len({json.dumps(d.get("control", {}).get(k)) for _, d in loaded}) > 1]
    out = []
    for folder, d in loaded:
        control = d.get("control", {})
        out.append({
            "folder": str(folder), "split": d["stream"]["dataset"].split()[-1],
            "profile": control.get("profile"),
            "setting": ", ".join(f"{k}={control.get(k, 'default')}" for k in varying) or "-",
            "windows": d["settled_windows"], "static_miss_windows": d.get("static_miss_windows"),
            "meet_share": d["controlled_meet_share"],
            "meet_share_where_static_misses": d.get("controlled_meet_share_where_static_misses"),
            "energy_vs_oracle": d["energy_vs_oracle"], "shadow_share": d.get("shadow_share"),
            "source": d.get("controlled_source"),
        })
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="benchmarks/controller.py --out folders")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    table = rows(args.folders)
    by_setting: dict[str, list[dict]] = {}
    for r in table:
        by_setting.setdefault(r["setting"], []).append(r)
    summary = {
        setting: {"runs": len(rs),
                  "worst_meet_share_where_static_misses": min(r["meet_share_where_static_misses"] for r in rs),
                  "mean_energy_vs_oracle": sum(r["energy_vs_oracle"] for r in rs) / len(rs),
                  "worst_energy_vs_oracle": max(r["energy_vs_oracle"] for r in rs)}
        for setting, rs in by_setting.items()}
    if args.json:
        print(json.dumps({"rows": table, "settings": summary}))
        return 0
    print("| stream | setting | meets | where static misses | energy ÷ oracle | shadow share |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['split']} | {r['setting']} | {r['meet_share']:.1%} | "
              f"{r['meet_share_where_static_misses']:.1%} ({r['static_miss_windows']}) | "
              f"{r['energy_vs_oracle']:.3f} | {r['shadow_share']:.2%} |")
    for setting, s in summary.items():
        print(f"{setting}: {s['runs']} runs, worst where static misses {s['worst_meet_share_where_static_misses']:.1%}, "
              f"energy mean {s['mean_energy_vs_oracle']:.3f} / worst {s['worst_energy_vs_oracle']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
