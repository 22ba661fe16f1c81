"""``edgecloud eval BUNDLE --dataset ...``: accuracy, exit shares and energy of a bundle on a backend.

Runs the edge daemon's own path (route on the chosen CiM backend, the bundle's cloud.onnx in
ONNX Runtime for offloaded samples, the daemon's energy accounting) over a data set, optionally
over several simulated chips (``--chips N``: seeds ``seed .. seed+N-1``, mean ± std).
``--baseline von-neumann`` (sram backend, edge-only bundles) adds the energy and delay per
inference of a von Neumann processor at the same precision, and the ratios, from the backend's
event counts (:mod:`edgecloud.cim.baseline`; machine options with ``--baseline-option K=V``).

The backend runs with the bundle's manifest ``hardware`` defaults under ``--backend-option``
(``--no-bundle-hardware``: without them). ``--adc-law walden|schreier|linear`` prices ADC
conversions under that law (default: the energy table's, walden); the report names it. On the
crossbar backend the report adds latency, area and EDAP per inference from the analytic cost
model (:func:`edgecloud.evaluate.evaluator.crossbar_cost`), with a per-layer breakdown in the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_BATCH = 256  # = edgecloud.evaluate.evaluator.DEFAULT_BATCH (not imported: keeps --help fast)


def add_common_args(p: argparse.ArgumentParser, split_default: str) -> None:
    """Flags shared by ``eval`` and ``sweep``."""
    p.add_argument("bundle", help="bundle name in the repository, or a bundle folder")
    p.add_argument("--dataset", required=True, choices=["fashion-mnist", "mnist", "cifar10"])
    p.add_argument("--data-root", help="data folder (default: the data set's default folder / env var)")
    p.add_argument("--split", choices=["test", "val"], default=split_default,
                   help="test split, or the validation hold-out of train the threshold was chosen on "
                        f"(default {split_default})")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.add_argument("--sample", type=int, metavar="N",
                   help="evaluate a class-balanced subset: the first N/C samples of each of the C classes, "
                        "interleaved by class so every batch (and the ADC calibration batch) mixes classes; "
                        "for splits stored class by class, e.g. the CIFAR-10 image folders (N = 10000: all of it)")
    p.add_argument("--backend", default="digital", help="CiM backend: digital, crossbar, sram")
    p.add_argument("--backend-option", action="append", metavar="K=V", default=[],
                   help="backend option (repeatable), value parsed as YAML, e.g. noise_sigma=0.02")
    p.add_argument("--seed", type=int, default=0, help="chip seed (first chip with --chips)")
    p.add_argument("--input-bits", type=int, metavar="B",
                   help="discretise input pixels to 2^B levels first (the defence the edge daemon's "
                        "--input-bits applies; default: the bundle's input.bits, usually off)")
    p.add_argument("--energy-table", help="energy table YAML (default: the packaged one)")
    p.add_argument("--adc-law", metavar="LAW",
                   help="how ADC conversion energy scales with bits, anchored at 8 bits: walden (x2 per bit), "
                        "schreier (x4 per bit) or linear (default: the energy table's adc_law, walden)")
    p.add_argument("--no-bundle-hardware", dest="bundle_hardware", action="store_false",
                   help="ignore the bundle's manifest hardware defaults for the backend (by default they apply "
                        "under --backend-option)")
    p.add_argument("--repository", help="model repository folder (for a bundle given by name)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--cloud", choices=["onnx", "torch"], default=None,
                   help="cloud part runtime (default: the bundle's cloud.onnx in ONNX Runtime, as served)")
    p.add_argument("--json", action="store_true", help="no progress bars; print one JSON object last")


def parse_threshold_overrides(items: list[str] | None, exit_names: list[str]) -> dict[int, float | None]:
    """``EXIT=VALUE`` (EXIT an index or exit name; VALUE a number or ``none``) -> {exit: value}."""
    out: dict[int, float | None] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--threshold {item!r}: expected EXIT=VALUE, e.g. 0=0.5 or edge=0.5")
        if key in exit_names:
            index = exit_names.index(key)
        else:
            try:
                index = int(key)
            except ValueError as exc:
                raise ValueError(f"--threshold {item!r}: no exit {key!r}; exits: {', '.join(exit_names)}") from exc
            if not 0 <= index < len(exit_names):
                raise ValueError(f"--threshold {item!r}: exit {index} does not exist; exits are "
                                 f"0..{len(exit_names) - 1} ({', '.join(exit_names)})")
        if value.strip().lower() in ("none", "null", "off"):
            out[index] = None
        else:
            try:
                out[index] = float(value)
            except ValueError as exc:
                raise ValueError(f"--threshold {item!r}: {value!r} is not a number") from exc
    return out


def prepare(args: argparse.Namespace, thresholds: list[float | None] | None = None) -> tuple[Any, Any, dict, Any]:
    """(bundle, data, data info, EvalConfig) from the shared flags."""
    from edgecloud.commands.edge import parse_backend_options
    from edgecloud.distributed import ray_address
    from edgecloud.evaluate import EvalConfig, load_eval_data, resolve_bundle

    check_adc_law(getattr(args, "adc_law", None))
    bundle = resolve_bundle(args.bundle, args.repository)
    if args.energy_table and not Path(args.energy_table).is_file():
        raise FileNotFoundError(f"energy table {args.energy_table} does not exist")
    data, info = load_eval_data(args.dataset, args.split, bundle.manifest, args.data_root, args.limit,
                                getattr(args, "sample", None))
    config = EvalConfig(
        backend=args.backend, backend_options=parse_backend_options(args.backend_option),
        seed=args.seed, chips=getattr(args, "chips", 1), thresholds=thresholds,
        energy_table=args.energy_table, cloud=args.cloud, batch_size=args.batch_size,
        progress=not args.json, input_bits=getattr(args, "input_bits", None),
        adc_law=getattr(args, "adc_law", None), bundle_hardware=getattr(args, "bundle_hardware", True),
        workers=getattr(args, "workers", 1), ray=ray_address(getattr(args, "ray", None)),
    )
    return bundle, data, info, config


def check_adc_law(name: str | None) -> None:
    """A clear error naming ``--adc-law`` for a law that does not exist."""
    if name is None:
        return
    from edgecloud.cim.energy import ADC_LAWS

    if name not in ADC_LAWS:
        raise ValueError(f"--adc-law {name!r}: unknown ADC law; choose one of {', '.join(sorted(ADC_LAWS))}")


CARD_EVENTS = {
    "digital": ["mac_fp32", "mac_int8", "mac_int4", "mac_int2", "mac_binary", "radio_bit"],
    "crossbar": ["crossbar_cell_read", "dac_row_cycle_1b", "adc_fom_per_step", "sample_hold", "shift_add"],
    "sram": ["sram_cim_binary_op", "sram_cim_4b_op", "sram_wl_dac_1b", "adc_fom_per_step", "shift_add"],
}


def energy_constants_line(table_path: str | None, backend: str, adc_law: str | None = None) -> str:
    """The energy-table constants an evaluation's energies rest on (named in model cards)."""
    from edgecloud.cim.energy import EnergyTable

    table = EnergyTable.load(table_path).with_adc_law(adc_law)
    parts = []
    events = CARD_EVENTS["digital"] + (CARD_EVENTS.get(backend, []) if backend != "digital" else [])
    for event in events:
        try:
            parts.append(f"{event} {table.per_event(event):.3g} J")
        except (KeyError, ValueError):
            continue
    if backend != "digital":
        parts.append(f"ADC law {table.adc_law}")
    return f"energy table {table_path or 'edgecloud/cim/energy_table.yaml (packaged)'}: " + ", ".join(parts)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="accuracy, exit shares and energy of a bundle on a data set",
        description="Evaluate a bundle as the edge daemon runs it: edge blocks on a CiM backend, exit "
                    "policy, cloud part (ONNX) for offloaded samples; accuracy overall and per exit, "
                    "share per exit, energy per sample by component and vs the full-precision network.",
    )
    add_common_args(p, "test")
    p.add_argument("--chips", type=int, default=1, help="Monte-Carlo chip instances (mean ± std)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes running the chips side by side (default 1: one after another)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run each chip as a task on this Ray cluster (or set RAY_ADDRESS; 'auto': a running "
                        "cluster, 'local': a private one); the same numbers as a local run")
    p.add_argument("--threshold", action="append", metavar="EXIT=VALUE", default=[],
                   help="override one exit's threshold (repeatable); EXIT an index or name, VALUE a number or none")
    p.add_argument("--baseline", choices=["von-neumann"],
                   help="also compare energy and delay per inference with a von Neumann processor at the same "
                        "precision (sram backend, edge-only bundles; constants from --energy-table)")
    p.add_argument("--baseline-option", action="append", metavar="K=V", default=[],
                   help="machine assumption (repeatable): banks, cols, io_bits, multipliers, "
                        "accumulate=bitline|sequential, replicate=true|false, memory=auto|sram_8kb|sram_32kb|"
                        "sram_1mb|dram (defaults: IMAC's System script, see edgecloud.cim.baseline)")
    p.add_argument("--card", action="store_true",
                   help="also write this evaluation (command and report) into the bundle's model card "
                        "(README.md; a repeated evaluation replaces its own section)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgecloud.evaluate import evaluate, resolve_bundle
    from edgecloud.evaluate.report import eval_table
    from edgecloud.evaluate.results import json_safe

    manifest = resolve_bundle(args.bundle, args.repository).manifest
    thresholds = None
    if args.threshold:
        thresholds = [e.threshold for e in manifest.exits]
        for index, value in parse_threshold_overrides(args.threshold, [e.name for e in manifest.exits]).items():
            thresholds[index] = value
    hardware = None
    if args.baseline or args.baseline_option:
        from edgecloud.cim.baseline import Hardware
        from edgecloud.commands.edge import parse_backend_options

        if not args.baseline:
            raise ValueError("--baseline-option needs --baseline von-neumann")
        if args.backend != "sram":
            raise ValueError(f"--baseline von-neumann compares the sram backend, not {args.backend!r}")
        if not manifest.edge_only:
            raise ValueError(f"--baseline von-neumann needs an edge-only bundle; {manifest.name!r} has a cloud part")
        try:
            hardware = Hardware(**parse_backend_options(args.baseline_option))
        except TypeError as exc:
            raise ValueError(f"--baseline-option: {exc}") from exc
    bundle, data, info, config = prepare(args, thresholds)
    report = evaluate(bundle, data, config)
    out = {**report.to_json(), **info, "samples": len(data)}
    print(eval_table(out))
    if hardware is not None:
        from edgecloud.cim.baseline import compare
        from edgecloud.evaluate.report import baseline_table

        base = compare(bundle, config.backend_options, seed=config.seed, table=config.energy_table,
                       hardware=hardware, adc_law=config.adc_law, bundle_hardware=config.bundle_hardware)
        measured = out["summary"]["energy_total_j"]["mean"]
        base["measured_cim_energy_j"] = measured  # the evaluation's own energy per sample
        base["model_vs_measured"] = base["cim"]["energy_total_j"] / measured - 1 if measured else None
        out["baseline"] = base
        print()
        print(baseline_table(base))
    if args.card:
        from edgecloud.evaluate.card import write_eval_section

        title = (f"{out.get('dataset', args.dataset)}/{args.split}, {len(data)} samples, backend {args.backend}"
                 + (f" ({', '.join(args.backend_option)})" if args.backend_option else "")
                 + (f", {config.chips} chips" if config.chips > 1 else ""))
        text = eval_table(out) + ("\n\n" + baseline_table(out["baseline"]) if "baseline" in out else "")
        text += "\n\n" + energy_constants_line(args.energy_table, args.backend, config.adc_law)
        card = write_eval_section(bundle.path, ["edgecloud", *args.argv], title, text)
        if not args.json:
            print(f"model card updated: {card}")
    if args.json:
        print(json.dumps(json_safe(out)))
    return 0
