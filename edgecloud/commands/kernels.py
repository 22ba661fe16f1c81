"""``edgecloud kernels``: which compiled CiM kernel runs on this machine, and why."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="the CPU, its SIMD features and the CiM kernel path the simulator uses")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgecloud.cim import kernel

    info = kernel.describe()
    chosen = kernel.choose(info["requested"])  # raises (a clear error) for a forced path that cannot run
    info["chosen"] = chosen
    info["libraries"] = {p: str(kernel.library_file(p)) if kernel.library_file(p) else None for p in kernel.COMPILED}
    if args.json:
        print(json.dumps(info))
        return 0
    cpu = info["cpu"]
    print(f"CPU:        {cpu['model']} ({cpu['machine']}, {cpu['cores']} cores; torch uses {cpu['torch_capability']})")
    print(f"SIMD:       {' '.join(cpu['simd']) or 'none detected'}")
    print(f"requested:  {info['requested']}  ({kernel.ENV}; a backend's `kernel` option overrides it)")
    print(f"runs:       {chosen}")
    print(f"available:  {', '.join(info['available'])}")
    for path, why in info["unavailable"].items():
        print(f"  not {path}: {why}")
    for path, file in info["libraries"].items():
        print(f"  {path:9s} {file or '(not built)'}")
    return 0
