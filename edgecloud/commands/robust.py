"""``edgecloud robust BUNDLE``: adversarial accuracy on digital and simulated CiM hardware.

Attacks (FGSM, PGD L-inf / L2, Square, transfer) under threat models (non-adaptive,
hardware-in-loop, chip-transfer; :mod:`edgecloud.robust.threats`) over several chips, with
mean +- std, a CSV, a PNG of accuracy against eps and, with ``--json``, one JSON object last
(``results``: rows ``{backend, threat, attack, eps, chip, samples, accuracy}``, clean accuracy
at eps 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def parse_eps(text: str) -> list[float]:
    """``"0,1/255,2/255"`` -> [0.0, 0.0039.., 0.0078..] (fractions or plain numbers)."""
    from edgecloud.train.recipe import pixels

    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(float(pixels(item)))
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"--eps: {item!r} is not a number or a fraction such as 2/255") from exc
    if not out:
        raise ValueError("--eps: give at least one value, e.g. 1/255,2/255,4/255,8/255")
    return out


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("robust", help="adversarial robustness of a bundle on digital and simulated CiM hardware",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle name in the repository, or a bundle folder")
    p.add_argument("--dataset", choices=["fashion-mnist", "mnist", "cifar10"],
                   help="data set (default: the bundle's training data set)")
    p.add_argument("--data-root", help="data folder (default: the data set's default folder / env var)")
    p.add_argument("--repository", help="model repository folder (for a bundle given by name)")
    p.add_argument("--limit", type=int, default=1000,
                   help="test images: a class-balanced subset of N (default 1000)")
    p.add_argument("--attack", default="pgd",
                   help="comma list of fgsm, pgd (L-inf), pgd-l2, square (black-box), transfer (default pgd)")
    p.add_argument("--eps", default="1/255,2/255,4/255,8/255",
                   help="comma list of perturbation budgets in pixels, fractions allowed (default 1/255,2/255,4/255,8/255)")
    p.add_argument("--steps", type=int, default=30, help="PGD iterations (default 30)")
    p.add_argument("--step-size", type=float, help="PGD step (default 2.5 eps / steps)")
    p.add_argument("--queries", type=int, default=1000, help="Square: queries per image (default 1000)")
    p.add_argument("--square-p-init", type=float, default=0.8,
                   help="Square: share of the image the first squares cover, halved on the paper's schedule "
                        "(default 0.8, AutoAttack's CIFAR setting; the paper's ImageNet value is 0.05)")
    p.add_argument("--backend", default="digital,crossbar",
                   help="comma list of backends (default digital,crossbar); digital gives the white-box rows")
    p.add_argument("--backend-option", action="append", metavar="K=V", default=[],
                   help="option of the simulated backends (repeatable; value parsed as YAML). "
                        "Default preset=typical: an ideal array computes exactly the digital result")
    p.add_argument("--threat", default="non-adaptive,hardware-in-loop",
                   help="comma list of non-adaptive, hardware-in-loop, chip-transfer (default the first two)")
    p.add_argument("--chips", type=int, default=3, help="simulated chips (seeds 0..N-1; default 3)")
    p.add_argument("--eot-reads", type=int, default=1,
                   help="hardware-in-loop: forward passes (fresh read noise) averaged per attack step")
    p.add_argument("--eot-chips", type=int, default=1, help="chip-transfer: surrogate chips averaged per step")
    p.add_argument("--output", help="the output to attack: an exit name (e.g. edge) or final (default)")
    p.add_argument("--input-bits", type=int, help="discretise inputs to B bits first (a defence; BPDA through it)")
    p.add_argument("--transfer-from", help="attack transfer: the bundle the PGD images are crafted on (digital)")
    p.add_argument("--no-early-stop", action="store_true",
                   help="PGD: keep attacking images already misclassified (default: they leave the batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts and queries")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--workers", type=int, help="processes for the chip jobs (default: one per core)")
    p.add_argument("--ray", metavar="ADDRESS", help="run the chip jobs as tasks on this Ray cluster (or set "
                   "RAY_ADDRESS; 'auto': a running cluster, 'local': a private one); same rows as a local run")
    p.add_argument("--out", help="folder for robust.csv and robust.png (default: runs/robust/<bundle>)")
    p.add_argument("--no-cache", action="store_true",
                   help="measure everything anew (default: finished rows are kept under OUT/cache and a "
                        "rerun of the same command resumes where it stopped)")
    p.add_argument("--json", action="store_true", help="no progress bars; print one JSON object last")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    from edgecloud.commands.edge import parse_backend_options
    from edgecloud.distributed import ray_address
    from edgecloud.robust.runner import RobustConfig

    backends = _split(args.backend)
    if not backends:
        raise ValueError("--backend: give at least one backend, e.g. digital,crossbar")
    from edgecloud.cim.backend import available_backends

    unknown = [b for b in backends if b not in available_backends()]
    if unknown:
        raise ValueError(f"--backend: unknown {', '.join(unknown)}; available: {', '.join(available_backends())}")
    options = parse_backend_options(args.backend_option)
    options.setdefault("preset", "typical")
    per_backend = {b: dict(options) for b in backends if b != "digital"}
    return RobustConfig(
        bundle=args.bundle, repository=args.repository, dataset=args.dataset, data_root=args.data_root,
        limit=args.limit, attacks=_split(args.attack), eps=parse_eps(args.eps), steps=args.steps,
        step_size=args.step_size, queries=args.queries, square_p_init=args.square_p_init, backends=backends, backend_options=per_backend,
        threats=_split(args.threat), chips=args.chips, eot_reads=args.eot_reads, eot_chips=args.eot_chips,
        output=args.output, input_bits=args.input_bits, transfer_from=args.transfer_from,
        stop_on_success=not args.no_early_stop, batch_size=args.batch_size, seed=args.seed, workers=args.workers,
        ray=ray_address(args.ray),
        cache=None if args.no_cache else str(out_dir(args) / "cache"),
    )


def out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path("runs") / "robust" / Path(args.bundle).name


def run(args: argparse.Namespace) -> int:
    from edgecloud.robust.report import format_table, plot, write_csv
    from edgecloud.robust.runner import run_robustness

    config = config_from_args(args)
    rows, info = run_robustness(config, progress=not args.json)
    out = out_dir(args)
    csv_path = write_csv(rows, out / "robust.csv")
    title = f"{info['bundle']} ({len(rows) and rows[0].samples} images; " + \
        ", ".join(f"{b} {o.get('preset', '')}" for b, o in config.backend_options.items()) + ")"
    png_path = plot(rows, out / "robust.png", title=title)
    if args.json:
        print(json.dumps({"bundle": info["bundle"], "data": info["data"], "settings": info["settings"],
                          "bundle_hardware": info.get("bundle_hardware", {}),
                          "csv": str(csv_path), "png": str(png_path), "command": "edgecloud " + " ".join(
                              getattr(args, "argv", sys.argv[1:])),
                          "results": [r.__dict__ for r in rows]}))
        return 0
    print(format_table(rows))
    print(f"wrote {csv_path} and {png_path}")
    return 0
