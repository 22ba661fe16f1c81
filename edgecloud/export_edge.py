"""Write a trained edge-only classifier (``lenet5``, ``vgg_small``, ...) as an edge-only bundle.

An edge-only bundle is an ordinary bundle folder (:mod:`edgecloud.bundle`) without a cloud
part: ``manifest.yaml`` with ``cloud: {offload: none}`` and one exit (``final``, threshold
null), ``edge.pt`` (the classifier's state_dict) and the model card ``README.md``; no
``cloud.onnx``. ``edgecloud eval`` and the edge daemon load it by name or folder like any
bundle (:class:`~edgecloud.nets.edge_only.EdgeOnlyModel` answers every sample at the edge);
the cloud server skips it. The training loop's ``finalize`` writes one for every classifier
without a cloud part, so ``edgecloud train RECIPE --export DIR`` and ``edgecloud export
CHECKPOINT --out DIR`` produce it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from edgecloud.bundle import EDGE_WEIGHTS, MANIFEST, CloudSpec, ExitSpec, InputSpec, Manifest
from edgecloud.export import _atomic_write, _fmt, hardware_lines, training_section

FINAL_EXIT = "final"


def _input_spec(model: nn.Module) -> InputSpec:
    from edgecloud.export import input_spec_of

    return input_spec_of(model)


def export_edge_bundle(
    model: nn.Module,
    out_dir: str | Path,
    *,
    name: str,
    family: str,
    arch: Mapping[str, Any] | None = None,
    classes: Sequence[str],
    policy: str = "entropy",
    input_spec: InputSpec | Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    hardware: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write the edge-only bundle folder ``out_dir`` for a classifier and return its path.

    ``model``: the plain classifier (``forward`` returns ``[logits]``), not wrapped. The
    manifest is written last, so a folder without one is never mistaken for a finished bundle.
    """
    from edgecloud.nets.layers import count_macs

    if hasattr(model, "cloud_module"):
        raise ValueError("model has a cloud part: export it with edgecloud.export.export_bundle")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    if input_spec is None:
        spec = _input_spec(model)
    else:
        spec = input_spec if isinstance(input_spec, InputSpec) else InputSpec(**input_spec)
    shape = tuple(spec.shape)
    classes = [str(c) for c in classes]
    if len(classes) != getattr(model, "num_classes", len(classes)):
        raise ValueError(f"{len(classes)} class names for a {model.num_classes}-class model")
    manifest = Manifest(
        name=name, family=family, arch=dict(arch or {}), input=spec, classes=classes,
        reference_macs=int(count_macs(model, shape)),  # type: ignore[arg-type]
        policy=policy,  # type: ignore[arg-type]
        exits=[ExitSpec(name=getattr(model, "final_name", FINAL_EXIT) or FINAL_EXIT, threshold=None)],
        cloud=CloudSpec(offload="none"),
        training=dict(training or {}), metrics=dict(metrics or {}),
        hardware={k: dict(v) for k, v in (hardware or {}).items()},
    )
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest_path.unlink()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / EDGE_WEIGHTS)
    macs = count_macs(model, shape, by_precision=True)
    (out / "README.md").write_text(edge_model_card(manifest, macs))  # type: ignore[arg-type]
    _atomic_write(manifest_path, yaml.safe_dump(manifest_dump(manifest), sort_keys=False))
    return out


def manifest_dump(manifest: Manifest) -> dict[str, Any]:
    """The manifest as YAML-ready data; an edge-only cloud section is written as ``{offload: none}``."""
    data = manifest.model_dump(mode="json")
    if manifest.edge_only:
        data["cloud"] = {"offload": "none"}
    return data


def edge_model_card(manifest: Manifest, macs: Mapping[str, int]) -> str:
    """The README of an edge-only bundle (same sections as a split bundle's card)."""
    m, t = manifest, manifest.training
    lines = [
        f"# {m.name}",
        "",
        f"Family `{m.family}` — an **edge-only** classifier (no cloud part, no early exit): every "
        f"sample is answered on the edge by exit `{m.exits[-1].name}`. Input: {m.input.datatype} "
        f"{list(m.input.shape)} pixels in [0, 1] (tensor `{m.input.name}`); "
        + (f"normalisation (mean {m.input.mean}, std {m.input.std}) happens inside the model."
           if m.input.mean else "any normalisation is folded into the model's first layer."),
        "",
        "## Where it runs",
        "",
        f"- **Edge** (`edge.pt`, the classifier's torch state_dict): MACs per sample by precision "
        f"{dict(macs)} (quantized layers run on the selected CiM backend: digital, crossbar, sram).",
        "- **Cloud**: none (`cloud: {offload: none}` in the manifest; the cloud server skips this bundle).",
        f"- Whole network: {m.reference_macs:,} MACs per sample.",
        *hardware_lines(m),
        "- Run it: `edgecloud eval <this folder> --dataset ... --backend sram --chips 20` "
        "(see the README section \"IMAC reproduction\").",
        "",
        "## Architecture",
        "",
        f"`create_model({m.family!r}, **arch)` with arch:",
        "",
        "```yaml",
        yaml.safe_dump(m.arch or {}, sort_keys=False).strip(),
        "```",
        "",
        "Classes (label order): " + ", ".join(m.classes),
        "",
        "## Training",
        "",
    ]
    lines += training_section(t)
    lines += ["", "## Measured metrics (digital reference)", ""]
    if m.metrics:
        lines += [f"- {k}: {_fmt(v)}" for k, v in m.metrics.items()]
    else:
        lines.append("None recorded.")
    lines.append("")
    return "\n".join(lines)


# ---- from the earlier edge-only output (weights.pt + metrics.json) ------------------------------

LEGACY_WEIGHTS = "weights.pt"
LEGACY_METRICS = "metrics.json"


def bundle_from_weights(folder: str | Path, *, name: str | None = None, data_root: str | None = None,
                        keep: bool = False) -> Path:
    """Turn a folder written by the training loop before edge-only bundles existed
    (``weights.pt`` + ``metrics.json``: family, arch, training record, metrics) into an
    edge-only bundle in place, keeping the training record (command, history) and the metrics
    as they were. Class names come from the data set the model was trained on. The two old
    files are removed afterwards unless ``keep``.
    """
    import json

    from edgecloud.data.registry import load_dataset
    from edgecloud.export import resolve_arch
    from edgecloud.nets import create_model

    out = Path(folder)
    meta = json.loads((out / LEGACY_METRICS).read_text())
    family, arch = meta["family"], resolve_arch(meta["family"], meta.get("arch"))
    training = dict(meta.get("training") or {})
    data = training.get("data") or {}
    classes = load_dataset(data["dataset"], "test", data_root or data.get("root")).classes
    model = create_model(family, **arch)
    model.load_state_dict(torch.load(out / LEGACY_WEIGHTS, map_location="cpu", weights_only=True))
    path = export_edge_bundle(model, out, name=name or training.get("recipe") or out.name, family=family,
                              arch=arch, classes=classes, training=training, metrics=meta.get("metrics") or {})
    if not keep:
        (out / LEGACY_WEIGHTS).unlink()
        (out / LEGACY_METRICS).unlink()
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m edgecloud.export_edge",
        description="Turn an edge-only training output folder (weights.pt + metrics.json) into an edge-only bundle.")
    p.add_argument("folder", type=Path)
    p.add_argument("--name", help="bundle name (default: the recipe's)")
    p.add_argument("--data-root", help="data folder, for the class names (default: the one trained on)")
    p.add_argument("--keep", action="store_true", help="keep weights.pt and metrics.json")
    args = p.parse_args(argv)
    path = bundle_from_weights(args.folder, name=args.name, data_root=args.data_root, keep=args.keep)
    print(f"edge-only bundle written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
