"""``edgecloud offload plan BUNDLE --data-root ...``: what to send to the cloud, per link.

Measures every candidate payload for the samples the bundle's exits offload — the feature map in
each offload encoding (fp32, fp16, uint8, uint4, uint2, each also entropy coded with zstd) and
the raw uint8 input (plain or zstd) for a cloud that runs the whole network at full precision —
on the VALIDATION split: bytes per offloaded sample from the actual payloads, agreement with the
FP32-features answer, radio energy per offload and per inference. Picks the fewest bytes that
meets ``--agreement``; prints a table (``--csv PATH`` also writes it, ``--json`` prints one JSON
object last) and can write the chosen encoding into a copy of the bundle (``--write-bundle DIR``,
re-exporting ``cloud.onnx`` when the decoder changes). See :mod:`edgecloud.evaluate.plan`.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

DATASETS = ("fashion-mnist", "mnist", "cifar10")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("offload", help="what to offload: compare payloads for a bundle's cloud",
                              description="What the edge sends the cloud: measure candidate payloads.")
    sub = p.add_subparsers(dest="offload_command", metavar="ACTION")
    q = sub.add_parser(
        "plan", help="measure feature encodings and the raw input; pick the fewest bytes at the agreement",
        description="For the samples the bundle's exits offload on the validation split, measure each candidate "
                    "payload (features in every offload encoding, the raw uint8 input) - bytes per offload from "
                    "the actual payloads, agreement with the FP32-features answer, radio energy - and pick the "
                    "fewest bytes that meets --agreement.",
    )
    q.add_argument("bundle", help="bundle name in the repository, or a bundle folder")
    q.add_argument("--dataset", choices=DATASETS,
                   help="data set (default: the one the bundle was trained on, manifest training.data.dataset)")
    q.add_argument("--data-root", help="data folder (default: the data set's default folder / env var)")
    q.add_argument("--split", default="val",
                   help="only 'val': the validation hold-out of train the thresholds were chosen on (a choice "
                        "made on test would leak it)")
    q.add_argument("--agreement", type=float, default=0.995,
                   help="required share of offloaded samples on which the cloud answers as on FP32 features "
                        "(default 0.995)")
    q.add_argument("--encodings", metavar="E1,E2",
                   help="feature encodings to try (default: all: fp32, fp16, uint8, uint4, uint2 and each +zstd)")
    q.add_argument("--no-raw", dest="raw", action="store_false", help="leave out the raw-input candidates")
    q.add_argument("--percentile", default="99.99,99.9", metavar="P1,P2",
                   help="calibration percentile(s) of the affine encodings the bundle does not use yet; each gives "
                        "its own candidate (default 99.99,99.9)")
    q.add_argument("--limit", type=int, help="only the first N samples of the split")
    q.add_argument("--sample", type=int, metavar="N", help="a class-balanced subset of N samples")
    q.add_argument("--backend", default="digital", help="edge backend deciding the exits (default digital)")
    q.add_argument("--energy-table", help="energy table YAML (default: the packaged one)")
    q.add_argument("--repository", help="model repository folder (for a bundle given by name)")
    q.add_argument("--batch-size", type=int, default=256)
    q.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    q.add_argument("--write-bundle", metavar="DIR",
                   help="write a copy of the bundle with the chosen encoding to DIR (a new or empty folder)")
    q.add_argument("--json", action="store_true", help="no progress bars; print one JSON object last")
    q.set_defaults(func=run_plan)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _check(args: argparse.Namespace) -> list[str] | None:
    if args.split != "val":
        raise ValueError(f"--split {args.split!r}: the plan chooses an encoding, so it measures on the validation "
                         "split only ('val'), never on test")
    if not 0.0 < args.agreement <= 1.0:
        raise ValueError(f"--agreement must lie in (0, 1], got {args.agreement}")
    try:
        args.percentiles = [float(v) for v in str(args.percentile).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--percentile {args.percentile!r}: expected numbers, e.g. 99.99,99.9") from None
    if not args.percentiles or not all(50.0 < v <= 100.0 for v in args.percentiles):
        raise ValueError(f"--percentile {args.percentile!r}: every value must lie in (50, 100]")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.energy_table and not Path(args.energy_table).is_file():
        raise FileNotFoundError(f"--energy-table {args.energy_table} does not exist")
    if args.write_bundle:
        out = Path(args.write_bundle)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"--write-bundle {out}: exists and is not an empty folder")
    if args.encodings is None:
        return None
    from edgecloud.offload import ENCODINGS

    names = [e.strip() for e in args.encodings.split(",") if e.strip()]
    unknown = [e for e in names if e not in ENCODINGS]
    if unknown or not names:
        raise ValueError(f"--encodings {args.encodings!r}: unknown encoding(s) {unknown or '(none given)'}; "
                         f"known: {', '.join(ENCODINGS)}")
    return names


def run_plan(args: argparse.Namespace) -> int:
    encodings = _check(args)
    from edgecloud.evaluate import load_eval_data, resolve_bundle
    from edgecloud.evaluate.source import training_dataset
    from edgecloud.evaluate.plan import plan_offload, plan_table, write_bundle, write_csv
    from edgecloud.evaluate.results import json_safe

    bundle = resolve_bundle(args.bundle, args.repository)
    dataset = args.dataset or training_dataset(bundle.manifest)
    if dataset not in DATASETS:
        raise ValueError(f"--dataset is needed: bundle {bundle.name!r}'s manifest does not name a known data set "
                         f"(training.data.dataset = {dataset!r}); choose one of {', '.join(DATASETS)}")
    data, info = load_eval_data(dataset, "val", bundle.manifest, args.data_root, args.limit, args.sample)
    report, candidates = plan_offload(
        bundle, data, agreement=args.agreement, encodings=encodings, raw=args.raw, percentile=args.percentiles,
        backend=args.backend, energy_table=args.energy_table, batch_size=args.batch_size, progress=not args.json,
    )
    report = {**info, **report}
    text = plan_table(report)
    print(text)
    if args.csv:
        path = write_csv(report, args.csv)
        if not args.json:
            print(f"csv: {path}")
    if args.write_bundle:
        if report["chosen"] is None:
            raise ValueError(f"--write-bundle: no candidate reaches --agreement {args.agreement}; nothing written")
        chosen = next(c for c in candidates if c.name == report["chosen"])
        command = shlex.join(["edgecloud", *getattr(args, "argv", [])])
        section = (f"## Offload plan\n\nThis bundle is `{bundle.name}` with `cloud.encoding` "
                   f"`{chosen.spec.encoding}`, chosen by:\n\n```bash\n{command}\n```\n\n```text\n{text}\n```\n\n"
                   "The measured metrics above (manifest `metrics`) were measured with the original encoding "
                   f"(`{bundle.manifest.cloud.encoding}`); re-run `edgecloud eval` for this one.")
        out = write_bundle(bundle, chosen, args.write_bundle, section=section)
        report["written_bundle"] = str(out)
        if not args.json:
            print(f"bundle written: {out} (cloud.encoding {chosen.spec.encoding})")
    if args.json:
        print(json.dumps(json_safe(report)))
    return 0 if report["chosen"] is not None else 1
