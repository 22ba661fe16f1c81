"""Write a trained :class:`SplitModel` as a model bundle (see :mod:`edgecloud.bundle`).

``export_bundle`` writes ``edge.pt`` (the whole state_dict), ``cloud.onnx`` (the cloud part,
full precision, dynamic batch, weights embedded), the model card ``README.md`` and, last, the
``manifest.yaml`` — so a folder without a manifest is never mistaken for a finished bundle. The
ONNX file is checked against torch with ONNX Runtime before the manifest is written.

With an offload ``encoding`` other than fp32 (see :mod:`edgecloud.offload`), ``cloud.onnx`` is
the cloud part behind its decoder (:func:`edgecloud.offload.export_wire_onnx`): it takes the wire
datatype (FP16, or UINT8 with the calibrated ``scale``/``zero_point`` the manifest records).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from edgecloud import offload
from edgecloud.bundle import CLOUD_ONNX, EDGE_WEIGHTS, MANIFEST, CloudSpec, ExitSpec, InputSpec, Manifest
from edgecloud.exits import ExitPolicy
from edgecloud.nets.base import SplitModel
from edgecloud.nets.layers import count_macs, reference_macs

ONNX_OPSET = 17
OUTPUT_NAME = "LOGITS"


def input_spec_of(model: nn.Module) -> InputSpec:
    """The input spec a family's model implies (shape and the normalisation inside it)."""
    c, s = int(model.in_channels), int(model.image_size)  # type: ignore[arg-type]
    norm = getattr(model, "normalize", None)
    mean = norm.mean.flatten().tolist() if norm is not None else []
    std = norm.std.flatten().tolist() if norm is not None else []
    return InputSpec(shape=[c, s, s], mean=[round(v, 6) for v in mean], std=[round(v, 6) for v in std])


def resolve_arch(family: str, arch: Mapping[str, Any] | None) -> dict[str, Any]:
    """``arch`` with every omitted constructor default filled in (YAML-safe), so a bundle keeps
    building the same network even if a family's defaults change later."""
    import inspect

    from edgecloud.nets.registry import _REGISTRY, _load_families

    _load_families()
    out: dict[str, Any] = {}
    fn = _REGISTRY.get(family)
    if fn is not None:
        for name, param in inspect.signature(fn).parameters.items():
            if param.default is not inspect.Parameter.empty:
                out[name] = param.default
    out.update(arch or {})

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) for k, v in out.items()}


def export_onnx(module: nn.Module, path: Path, sample_shape: Sequence[int], input_name: str) -> None:
    """Export ``module`` (full precision) with a dynamic batch dimension, weights in one file."""
    module = copy.deepcopy(module).float().eval().to(memory_format=torch.contiguous_format)
    dummy = torch.rand(2, *sample_shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            module, (dummy,), str(path),
            input_names=[input_name], output_names=[OUTPUT_NAME],
            dynamic_axes={input_name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=ONNX_OPSET, dynamo=False,
        )


def verify_onnx(module: nn.Module, path: Path, sample_shape: Sequence[int], input_name: str,
                atol: float = 1e-4, batch: int = 3) -> float:
    """Max |ORT - torch| over a random batch; raises if above ``atol`` (relative to the logit scale)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = torch.randn(batch, *sample_shape, generator=torch.Generator().manual_seed(1))
    module = copy.deepcopy(module).float().eval()
    with torch.no_grad():
        expected = module(x).numpy()
    got = session.run([OUTPUT_NAME], {input_name: x.numpy()})[0]
    err = float(np.abs(got - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    if err > atol * scale:
        raise RuntimeError(f"ONNX export of the cloud part differs from torch by {err:.3g} (> {atol * scale:.3g})")
    return err


def _exit_specs(model: SplitModel, exits: Sequence[Any] | None) -> list[ExitSpec]:
    names = list(model.exit_names)
    if exits is None:
        exits = [None] * len(names)
    if len(exits) != len(names):
        raise ValueError(f"model has {len(names)} edge exits {names}, got {len(exits)} exit specs")
    specs = []
    for name, e in zip(names, exits):
        if isinstance(e, ExitSpec):
            specs.append(e)
        elif isinstance(e, Mapping):
            specs.append(ExitSpec(**{"name": name, **e}))
        else:
            specs.append(ExitSpec(name=name, threshold=None if e is None else float(e)))
    return specs


def export_bundle(
    model: SplitModel,
    out_dir: str | Path,
    *,
    name: str,
    family: str,
    arch: Mapping[str, Any] | None = None,
    input_spec: InputSpec | Mapping[str, Any] | None = None,
    classes: Sequence[str],
    exits: Sequence[Any] | None = None,
    policy: str = "entropy",
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    verify: bool = True,
    encoding: offload.Encoding | None = None,
    calibration: Any = None,
    percentile: float = offload.DEFAULT_PERCENTILE,
    cloud: CloudSpec | None = None,
    baseline: tuple[str, int] | None = None,
    hardware: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write the bundle folder ``out_dir`` and return its path.

    ``exits``: one threshold (or ``None``/ExitSpec/dict) per edge exit, in ``model.exit_names``
    order. ``input_spec`` defaults to the model's own shape and normalisation. ``training`` and
    ``metrics`` go to the manifest and the model card as given — when the encoding is lossy they
    should be measured on encoded features (``finalize`` does), since that is what is served.

    Offload encoding: ``encoding`` (default fp32); uint8 is calibrated on ``calibration`` (the
    edge's offloaded features, e.g. :func:`edgecloud.offload.offload_features` of VALIDATION
    data, never test) at ``percentile``. Or pass ``cloud``, a ready :class:`CloudSpec` whose
    ``encoding``/``scale``/``zero_point`` are used as they are (its shape must match the model).

    ``baseline``: (name, MACs per sample) of the full-precision network the energy is compared
    to, when it is not this network at full precision.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    if input_spec is None:
        spec = input_spec_of(model)
    elif isinstance(input_spec, InputSpec):
        spec = input_spec
    else:
        spec = InputSpec(**input_spec)
    sample_shape = tuple(spec.shape)
    classes = [str(c) for c in classes]
    if len(classes) != getattr(model, "num_classes", len(classes)):
        raise ValueError(f"{len(classes)} class names for a {model.num_classes}-class model")

    offload_shape = tuple(int(v) for v in model.offload_shape())
    input_name = "FEATURES" if model.offload_kind == "features" else "INPUT"
    cloud_part = model.cloud_module()
    cloud_macs = int(count_macs(cloud_part, offload_shape))  # type: ignore[arg-type]
    edge_macs = count_macs(model, sample_shape, lambda m, x: m.route(x, _never_exit(m)), by_precision=True)
    cloud_spec = _cloud_spec(
        CloudSpec(offload=model.offload_kind, input_name=input_name, input_shape=list(offload_shape),
                  output_name=OUTPUT_NAME, macs=cloud_macs),
        encoding, calibration, percentile, cloud)
    manifest = Manifest(
        name=name,
        family=family,
        arch=dict(arch or {}),
        input=spec,
        classes=classes,
        reference_macs=baseline[1] if baseline else reference_macs(model, sample_shape),
        reference_network=baseline[0] if baseline else "",
        policy=policy,  # type: ignore[arg-type]
        exits=_exit_specs(model, exits),
        cloud=cloud_spec,
        training=dict(training or {}),
        metrics=dict(metrics or {}),
        hardware={k: dict(v) for k, v in (hardware or {}).items()},
    )

    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest_path.unlink()  # the folder is not a valid bundle until the new manifest lands
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out / EDGE_WEIGHTS)
    if cloud_spec.encoding == "fp32":
        export_onnx(cloud_part, out / CLOUD_ONNX, offload_shape, input_name)
    else:  # the cloud part behind the offload decoder: takes the wire datatype
        offload.export_wire_onnx(cloud_part, out / CLOUD_ONNX, cloud_spec, opset=ONNX_OPSET)
    onnx_err = verify_cloud_onnx(cloud_part, out / CLOUD_ONNX, cloud_spec) if verify else None
    (out / "README.md").write_text(model_card(manifest, edge_macs, onnx_err))
    _atomic_write(manifest_path, yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False))
    return out


def verify_cloud_onnx(cloud_part: nn.Module, path: Path, spec: CloudSpec) -> float:
    """Max |ONNX Runtime - torch| of ``cloud.onnx`` as exported for ``spec`` (behind its decoder
    when the offload encoding is not fp32)."""
    if spec.encoding == "fp32":
        return verify_onnx(cloud_part, path, tuple(spec.input_shape), spec.input_name)
    return offload.verify_wire_onnx(cloud_part, path, spec)


def _cloud_spec(base: CloudSpec, encoding: str | None, calibration: Any, percentile: float,
                ready: CloudSpec | None) -> CloudSpec:
    """``base`` (shape, names, MACs from the model) with the offload encoding applied."""
    if ready is None:
        return offload.with_encoding(base, encoding or "fp32", calibration, percentile)  # type: ignore[arg-type]
    if calibration is not None:
        raise ValueError("pass calibration features or a ready CloudSpec (cloud=...), not both")
    if encoding is not None and encoding != ready.encoding:
        raise ValueError(f"encoding={encoding!r} contradicts cloud.encoding={ready.encoding!r}")
    if list(ready.input_shape) != list(base.input_shape):
        raise ValueError(f"cloud spec is for input shape {list(ready.input_shape)}, the model offloads "
                         f"{list(base.input_shape)}")
    return CloudSpec.model_validate({**base.model_dump(), "encoding": ready.encoding, "scale": ready.scale,
                                     "zero_point": ready.zero_point})


def _offload_lines(c: CloudSpec) -> list[str]:
    """The model card's lines on what ``cloud.onnx`` takes and what one offloaded sample costs."""
    head = (f"- **Cloud** (`cloud.onnx`, FP32, opset {ONNX_OPSET}): input `{c.input_name}` "
            f"{c.input_shape} ({c.offload}), output `{c.output_name}`, {c.macs:,} MACs per sample.")
    if c.encoding == "fp32":
        return [head, f"- Offload per sample: {offload.bytes_per_sample(c):,} bytes as FP32."]
    if c.encoding not in ("fp16", "uint8"):  # packed / entropy coded: a BYTES payload per sample
        level = {"tensor(uint8)": "UINT8", "tensor(float16)": "FP16"}.get(offload.onnx_input_type(c), "FP32")
        head = (f"- **Cloud** (`cloud.onnx`, FP32 compute, opset {ONNX_OPSET}): input `{c.input_name}` "
                f"{level} levels {c.input_shape} ({c.offload}; the cloud unpacks the BYTES payloads into them, "
                f"the graph decodes them), output `{c.output_name}`, {c.macs:,} MACs per sample.")
        return [head, f"- Offload per sample: {offload.describe(c)}"]
    dtype = offload.wire_datatype(c)
    head = (f"- **Cloud** (`cloud.onnx`, FP32 compute, opset {ONNX_OPSET}): input `{c.input_name}` "
            f"{dtype} {c.input_shape} ({c.offload}, decoded inside the graph), output `{c.output_name}`, "
            f"{c.macs:,} MACs per sample.")
    line = f"- Offload per sample: {offload.bytes_per_sample(c):,} bytes as {dtype}"
    if c.encoding == "uint8":
        lo, hi = offload.uint8_range(c)
        line += (f" (affine: x ≈ (q − {c.zero_point}) × {c.scale:.6g}, float range "
                 f"[{lo:.6g}, {hi:.6g}]; FP32 would be {offload.bytes_per_sample(c) * 4:,} bytes).")
    else:
        line += f" (FP32 would be {offload.bytes_per_sample(c) * 2:,} bytes)."
    return [head, line]


class _NeverExit(ExitPolicy):
    """A policy under which every edge exit declines, so route() runs the whole edge part."""

    def confident(self, probs: torch.Tensor, exit_index: int) -> torch.Tensor:
        return torch.zeros(probs.shape[0], dtype=torch.bool)


def _never_exit(model: SplitModel) -> ExitPolicy:
    return _NeverExit("max_prob", [None] * len(model.exit_names))


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a bundle is meant to be read by servers
    os.replace(tmp, path)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)



def training_section(t: Mapping[str, Any]) -> list[str]:
    """The model card's training lines: the reproducing command, facts, nested settings, history."""
    if not t:
        return ["Untrained (weights are the seeded initialisation)."]
    lines: list[str] = []
    if "command" in t:
        lines += ["Reproduce with:", "", "```bash", str(t["command"]), "```", ""]
    nested = {k: v for k, v in t.items() if isinstance(v, (dict, list)) and k != "history"}
    lines += [f"- {k}: {_fmt(v)}" for k, v in t.items() if k not in nested and k not in ("command", "history")]
    if nested:
        lines += ["", "```yaml", yaml.safe_dump(nested, sort_keys=False).strip(), "```"]
    history = t.get("history")
    if history:
        lines += ["", "| epoch | train loss | val accuracy per output | cumulative wall time (s) |",
                  "|---|---|---|---|"]
        lines += [f"| {h.get('stage', '')} {h.get('epoch', '')} | {_fmt(h.get('loss', ''))} | "
                  f"{', '.join(f'{a:.4f}' for a in h.get('val_accuracy', []))} | {h.get('wall_time_s', '')} |"
                  for h in history]
    return lines


def hardware_lines(manifest: Manifest) -> list[str]:
    """The card's note of the manifest's backend defaults (what `eval` and the daemon apply)."""
    return [f"- Hardware defaults (manifest `hardware`, applied under any `--backend-option`), `{backend}`: "
            + json.dumps(options, sort_keys=True) for backend, options in manifest.hardware.items()]


def model_card(manifest: Manifest, edge_macs: Mapping[str, int] | int, onnx_err: float | None) -> str:
    """The bundle's README: what it is, how it was made, what was measured."""
    m = manifest
    t = m.training
    lines = [
        f"# {m.name}",
        "",
        f"Family `{m.family}` — an edge–cloud split network. Input: {m.input.datatype} "
        f"{list(m.input.shape)} pixels in [0, 1] (tensor `{m.input.name}`); normalisation "
        f"(mean {m.input.mean}, std {m.input.std}) happens inside the model.",
        "",
        "## Where each part runs",
        "",
        f"- **Edge** (`edge.pt`, torch state_dict): MACs per sample by precision "
        f"{dict(edge_macs) if isinstance(edge_macs, Mapping) else edge_macs} "
        "(quantized layers run on the selected CiM backend).",
        f"- **Exits** ({m.policy} policy): "
        + ", ".join(f"`{e.name}` threshold {e.threshold}" for e in m.exits)
        + (" — none (every sample goes to the cloud)" if not m.exits else ""),
        *_offload_lines(m.cloud),
        f"- Reference ({'the baseline network `' + m.reference_network + '`' if m.reference_network else 'whole network'}"
        f" in full precision, everything in the cloud): {m.reference_macs:,} MACs per sample.",
        *hardware_lines(m),
    ]
    if onnx_err is not None:
        part = "cloud part" if m.cloud.encoding == "fp32" else "cloud part with its decoder, random wire input"
        lines.append(f"- ONNX Runtime vs torch ({part}): max |diff| = {onnx_err:.2e}.")
    lines += ["", "## Architecture", "", f"`create_model({m.family!r}, **arch)` with arch:", "", "```yaml",
              yaml.safe_dump(m.arch or {}, sort_keys=False).strip(), "```", "",
              "Classes (label order): " + ", ".join(m.classes), "", "## Training", ""]
    lines += training_section(t)
    lines += ["", "## Measured metrics", ""]
    if m.metrics:
        lines += _metrics_table(m)
        lines += [f"- {k}: {_fmt(v)}" for k, v in m.metrics.items() if not _is_exit_metric(m, k)]
    else:
        lines.append("None recorded.")
    lines.append("")
    return "\n".join(lines)


def _exit_names(m: Manifest) -> list[str]:
    return [e.name for e in m.exits] + [m.metrics.get("final_name", "cloud")]


def _is_exit_metric(m: Manifest, key: str) -> bool:
    return any(key in (f"test_accuracy_{n}_alone", f"test_exit_share_{n}", f"test_accuracy_at_{n}")
               for n in _exit_names(m))


def _metrics_table(m: Manifest) -> list[str]:
    """Per-exit rows of the test metrics (if present)."""
    rows = []
    for n in _exit_names(m):
        keys = (f"test_accuracy_{n}_alone", f"test_exit_share_{n}", f"test_accuracy_at_{n}")
        if any(k in m.metrics for k in keys):
            rows.append(f"| {n} | " + " | ".join(_fmt(m.metrics.get(k, "")) for k in keys) + " |")
    if not rows:
        return []
    return ["Test split, at the bundle's threshold:", "",
            "| exit | accuracy of this exit alone (all samples) | share of samples answered here "
            "| accuracy on the samples answered here |", "|---|---|---|---|", *rows, ""]


def rewrite_card(bundle_dir: str | Path) -> Path:
    """Re-render ``README.md`` of an existing bundle from its manifest and weights."""
    from edgecloud.bundle import Bundle

    bundle = Bundle(Path(bundle_dir))
    model = bundle.build_model()
    shape = tuple(bundle.manifest.input.shape)
    edge_macs = count_macs(model, shape, lambda mm, x: mm.route(x, _never_exit(mm)), by_precision=True)
    err = verify_cloud_onnx(model.cloud_module(), bundle.cloud_onnx, bundle.manifest.cloud)
    path = bundle.path / "README.md"
    path.write_text(model_card(bundle.manifest, edge_macs, err))
    return path
