"""What to offload, per link: the candidate payloads for a bundle's cloud, measured, and the cheapest.

For every sample the edge's exit policy sends to the cloud (``edgecloud offload plan``), each
candidate is a payload and the cloud computation it implies:

- ``features/ENC`` — the edge's feature map in the offload encoding ``ENC`` (every name in
  :data:`edgecloud.offload.ENCODINGS` by default: fp32, fp16, uint8, uint4, uint2, each also
  ``+zstd``); the cloud runs the bundle's cloud part (``cloud.macs`` MACs).
- ``raw/uint8`` and ``raw/uint8+zstd`` — the input image as uint8 (the pixels as they were
  captured; ``x = q / 255``), plain or entropy coded, sent to a cloud that runs the bundle's whole
  network at full precision (the family's ``reference_forward``: here the edge's layers too, so
  its MACs are ``reference_macs`` of this network). Only for families that define it.

Measured on the VALIDATION split (the hold-out of train the threshold was chosen on; never
test), every candidate encoded by the one definition in :mod:`edgecloud.offload` (what the edge
would send) and decoded from its actual payloads (what the cloud would do):

- ``bytes_mean`` (and min / max): the payload bytes per offloaded sample (``wire_bytes``);
- ``agreement``: the share of offloaded samples on which the cloud's answer (arg max) equals the
  answer of the cloud part on the FP32 features (the lossless reference); ``accuracy`` against
  the labels, for context;
- the radio energy per offload (``bytes_mean`` x 8 x ``radio_bit``), the cloud's MACs and energy
  per offload, and per inference (x the offload share) next to the edge's own compute.

The plan picks the candidate with the fewest mean bytes whose agreement is at least the
required one (ties: the order above, plain before entropy coded). Affine encodings reuse the
bundle's scale and zero point when the bundle already uses that base; others are calibrated as
``uint8`` always was (:func:`edgecloud.offload.calibrate`: the validation split's offloaded
features of every sample, no exit taken), once per calibration percentile asked for (one:
``features/uint4``; several: ``features/uint4@p99.9``, ... — fewer bits lose less by clipping a
longer tail).

The edge runs on the ``digital`` backend by default (what decides which samples are offloaded
and the features they send); the cloud parts run in torch, FP32.
"""

from __future__ import annotations

import csv
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from edgecloud import offload
from edgecloud.bundle import MANIFEST, Bundle, CloudSpec
from edgecloud.cim.energy import EnergyMeter, EnergyTable
from edgecloud.data.dataset import ImageDataset
from edgecloud.edge.runner import EdgeRunner, policy_from_manifest

RAW_ENCODINGS = ("uint8", "uint8+zstd")
CLOUD_BATCH = 256


@dataclass
class Candidate:
    """One payload the edge could send for an offloaded sample."""

    name: str          # "features/uint4+zstd", "raw/uint8"
    send: str          # "features" | "raw"
    spec: CloudSpec    # the encoding with its scale / zero point (raw: uint8, scale 1/255)


def raw_spec(input_shape: list[int], encoding: str) -> CloudSpec:
    """The raw input as uint8 pixels (``x ≈ q / 255``), as a raw-offload bundle would send it."""
    return CloudSpec(offload="raw", input_name="INPUT", input_shape=list(input_shape), encoding=encoding,
                     scale=float(np.float32(1.0 / 255.0)), zero_point=0)


def _check_encodings(encodings: list[str] | None) -> list[str]:
    if encodings is None:
        return list(offload.ENCODINGS)
    unknown = [e for e in encodings if e not in offload.ENCODINGS]
    if unknown or not encodings:
        raise ValueError(f"--encodings {','.join(encodings)!r}: unknown encoding(s) {unknown}; "
                         f"known: {', '.join(offload.ENCODINGS)}")
    return list(dict.fromkeys(encodings))


def _batched(fn: Any, x: np.ndarray, batch: int = CLOUD_BATCH) -> np.ndarray:
    outs = [fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def plan_offload(
    bundle: Bundle,
    data: ImageDataset,
    *,
    agreement: float = 0.995,
    encodings: list[str] | None = None,
    raw: bool = True,
    percentile: float | list[float] = offload.DEFAULT_PERCENTILE,
    backend: str = "digital",
    energy_table: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, Any], list[Candidate]]:
    """Measure every candidate on ``data`` (the validation split) and pick the cheapest one
    that agrees with the FP32-features answer on at least ``agreement`` of the offloaded
    samples. Returns (the report, the candidates in report order)."""
    if not 0.0 < agreement <= 1.0:
        raise ValueError(f"--agreement must lie in (0, 1], got {agreement}")
    feature_encodings = _check_encodings(encodings)
    percentiles = [float(percentile)] if isinstance(percentile, (int, float)) else [float(p) for p in percentile]
    bad = [p for p in percentiles if not 50.0 < p <= 100.0]
    if bad or not percentiles:
        raise ValueError(f"--percentile must lie in (50, 100], got {bad or 'none'}")
    m = bundle.manifest
    if m.edge_only:
        raise ValueError(f"bundle {m.name!r} is edge-only (cloud.offload 'none'): nothing is offloaded")
    if m.cloud.offload != "features":
        raise ValueError(f"bundle {m.name!r} offloads {m.cloud.offload!r}; the plan compares feature "
                         "encodings with the raw input, for cloud.offload 'features' bundles")
    table = EnergyTable.load(energy_table)
    meter = EnergyMeter(table)
    radio_bit, mac_j = table.per_event("radio_bit"), table.per_event("mac_fp32")
    runner = EdgeRunner(bundle, backend, policy_from_manifest(bundle), meter, seed=seed)
    model = bundle.build_model()
    cloud = model.cloud_module().float().eval()
    reference = getattr(model, "reference_forward", None) if raw else None

    # ---- the edge over the split: who is offloaded, their features and raw pixels -------------
    feats, pixels, labels, calib = [], [], [], []
    edge_j = 0.0
    n = len(data)
    for start in tqdm(range(0, n, batch_size), desc="edge", disable=not progress, leave=False, file=sys.stderr):
        images = data.images[start:start + batch_size]
        x = images.float().div_(255.0)
        edge = runner.run(x.numpy())
        edge_j += float(sum(float(v.sum()) for v in edge.energy.values()))
        rows = edge.offload_index
        feats.append(edge.offload)
        pixels.append(images.numpy()[rows])
        labels.append(data.labels.numpy()[start:start + batch_size][rows])
        calib.append(offload.offload_features(model, x).numpy())  # every sample, no exit (calibration)
    features = np.concatenate(feats).astype(np.float32)
    raw_pixels = np.concatenate(pixels)
    y = np.concatenate(labels)
    k = int(features.shape[0])
    if k == 0:
        raise ValueError(f"bundle {m.name!r}: no sample of the {n} was offloaded at the manifest's thresholds; "
                         "nothing to plan")
    calibration = np.concatenate(calib)
    share = k / n

    def cloud_logits(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return cloud(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float().numpy()

    ref_pred = _batched(cloud_logits, features).argmax(axis=1)

    # ---- the candidates -----------------------------------------------------------------------
    candidates: list[Candidate] = []
    bundle_spec = m.cloud
    calibrated: dict[str, float | None] = {}  # candidate -> its calibration percentile
    for enc in feature_encodings:
        same_base = offload.base_of(enc) == offload.base_of(bundle_spec)
        if offload.uint_bits(enc) is None or same_base:  # float, or the bundle's own scale / zero point
            spec = CloudSpec.model_validate({**bundle_spec.model_dump(), "encoding": enc, "scale": 1.0,
                                             "zero_point": 0} if offload.uint_bits(enc) is None else
                                            {**bundle_spec.model_dump(), "encoding": enc})
            candidates.append(Candidate(f"features/{enc}", "features", spec))
            calibrated[candidates[-1].name] = None
            continue
        for p in percentiles:  # calibrated as uint8 is, at each percentile asked for
            spec = offload.with_encoding(bundle_spec, enc, calibration, p)  # type: ignore[arg-type]
            name = f"features/{enc}" if len(percentiles) == 1 else f"features/{enc}@p{p:g}"
            candidates.append(Candidate(name, "features", spec))
            calibrated[name] = p
    input_shape = list(m.input.shape)
    if reference is not None:
        for enc in RAW_ENCODINGS:
            candidates.append(Candidate(f"raw/{enc}", "raw", raw_spec(input_shape, enc)))
    raw_macs = 0
    if reference is not None:
        from edgecloud.nets.layers import reference_macs

        raw_macs = int(reference_macs(model, tuple(input_shape)))

    def raw_logits(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return reference(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float().numpy()

    rows_out: list[dict[str, Any]] = []
    preds: dict[tuple[str, str, float, int], np.ndarray] = {}  # (send, base, scale, zp) -> answers
    for cand in tqdm(candidates, desc="candidates", disable=not progress, leave=False, file=sys.stderr):
        spec = cand.spec
        source = features if cand.send == "features" else raw_pixels.astype(np.float32) / np.float32(255.0)
        t0 = time.perf_counter()
        wire = offload.encode(source, spec)
        encode_s = time.perf_counter() - t0
        sent = offload.wire_bytes(wire, spec)
        t0 = time.perf_counter()
        levels = offload.unpack(wire, spec)  # the cloud's side: from the actual payloads
        decode_s = time.perf_counter() - t0
        key = (cand.send, offload.base_of(spec), float(spec.scale), int(spec.zero_point))
        if cand.send == "raw" and not np.array_equal(levels, raw_pixels):
            raise RuntimeError(f"{cand.name}: the uint8 image did not survive its own encoding")
        if key in preds:  # the same base levels: a lossless layer must give them back exactly
            if not np.array_equal(levels, offload.quantize(source, spec)):
                raise RuntimeError(f"{cand.name}: the lossless layer changed the levels")
            pred = preds[key]
        else:
            # raw: exactly the pixels the edge saw (q / 255, as the data loader makes them)
            decoded = (offload.dequantize(levels, spec) if cand.send == "features"
                       else levels.astype(np.float32) / np.float32(255.0))
            pred = _batched(cloud_logits if cand.send == "features" else raw_logits, decoded).argmax(axis=1)
            preds[key] = pred
        macs = int(m.cloud.macs) if cand.send == "features" else raw_macs
        bytes_mean = float(sent.mean())
        radio = bytes_mean * 8.0 * radio_bit
        rows_out.append({
            "candidate": cand.name,
            "send": cand.send,
            "encoding": spec.encoding,
            "scale": spec.scale if offload.uint_bits(spec) is not None else None,
            "zero_point": spec.zero_point if offload.uint_bits(spec) is not None else None,
            "percentile": calibrated.get(cand.name),
            "wire_datatype": offload.wire_datatype(spec),
            "bytes_mean": bytes_mean,
            "bytes_min": int(sent.min()),
            "bytes_max": int(sent.max()),
            "agreement": float((pred == ref_pred).mean()),
            "accuracy": float((pred == y).mean()),
            "radio_j_per_offload": radio,
            "cloud_macs": macs,
            "cloud_j_per_offload": macs * mac_j,
            "radio_j_per_inference": share * radio,
            "energy_j_per_inference": edge_j / n + share * (radio + macs * mac_j),
            "encode_us_per_sample": 1e6 * encode_s / k,
            "decode_us_per_sample": 1e6 * decode_s / k,
        })
    for row in rows_out:
        row["meets"] = row["agreement"] >= agreement
    meeting = [r for r in rows_out if r["meets"]]
    chosen = min(meeting, key=lambda r: r["bytes_mean"]) if meeting else None  # min keeps the first on ties
    current = next((r for r in rows_out if r["candidate"] == f"features/{bundle_spec.encoding}"), None)
    report = {
        "bundle": m.name,
        "samples": n,
        "offloaded": k,
        "offload_share": share,
        "thresholds": {e.name: e.threshold for e in m.exits},
        "backend": backend,
        "agreement_required": agreement,
        "agreement_reference": "the cloud part on the FP32 features (arg max), same offloaded samples",
        "percentiles": percentiles,
        "radio_bit_j": radio_bit,
        "mac_fp32_j": mac_j,
        "edge_compute_j_per_inference": edge_j / n,
        "current_encoding": bundle_spec.encoding,
        "current": current,
        "raw_candidates": (f"the whole network ({m.family} reference_forward) at full precision in the cloud, "
                           f"{raw_macs:,} MACs" if reference is not None else
                           f"none: family {m.family!r} has no reference_forward"),
        "candidates": rows_out,
        "chosen": chosen["candidate"] if chosen else None,
        "chosen_candidate": chosen,
    }
    return report, candidates


# ---- output -------------------------------------------------------------------------------------
CSV_FIELDS = ("candidate", "send", "encoding", "scale", "zero_point", "percentile", "wire_datatype", "bytes_mean", "bytes_min",
              "bytes_max", "agreement", "accuracy", "meets", "radio_j_per_offload", "cloud_macs",
              "cloud_j_per_offload", "radio_j_per_inference", "energy_j_per_inference",
              "encode_us_per_sample", "decode_us_per_sample")


def write_csv(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        for row in report["candidates"]:
            writer.writerow({k: row.get(k) for k in CSV_FIELDS})
    return path


def plan_table(report: dict[str, Any]) -> str:
    where = f"{report.get('dataset', '?')}/{report.get('split', '?')}"
    lines = [
        f"offload plan for {report['bundle']}  data {where} ({report['samples']} samples, {report['offloaded']} "
        f"offloaded = {100 * report['offload_share']:.1f} % at thresholds "
        + ", ".join(f"{k}={v}" for k, v in report["thresholds"].items()) + f")  backend {report['backend']}",
        f"agreement: with {report['agreement_reference']}; required >= {report['agreement_required']}",
        f"radio {report['radio_bit_j']:.3g} J/bit, cloud {report['mac_fp32_j']:.3g} J/MAC; edge compute "
        f"{report['edge_compute_j_per_inference']:.4g} J per inference (every candidate); raw candidates: "
        f"{report['raw_candidates']}",
        "",
        f"{'candidate':<28}{'bytes/offload':>14}{'min..max':>14}{'agree %':>9}{'acc %':>8}{'radio J/off':>13}"
        f"{'cloud MACs':>13}{'J/inference':>13}{'enc us':>8}  ",
    ]
    for r in report["candidates"]:
        span = f"{r['bytes_min']}..{r['bytes_max']}"
        mark = "  <- chosen" if r["candidate"] == report["chosen"] else ("" if r["meets"] else "  (below)")
        if r["candidate"] == f"features/{report['current_encoding']}":
            mark += "  (current)"
        lines.append(
            f"{r['candidate']:<28}{r['bytes_mean']:>14.1f}{span:>14}"
            f"{100 * r['agreement']:>9.2f}{100 * r['accuracy']:>8.2f}{r['radio_j_per_offload']:>13.4g}"
            f"{r['cloud_macs']:>13,}{r['energy_j_per_inference']:>13.4g}{r['encode_us_per_sample']:>8.0f}{mark}")
    chosen = report["chosen_candidate"]
    if chosen:
        cur = report.get("current")
        line = (f"chosen: {chosen['candidate']}: {chosen['bytes_mean']:.1f} bytes per offload, agreement "
                f"{100 * chosen['agreement']:.2f} %, radio {chosen['radio_j_per_inference']:.4g} J per inference")
        if cur:
            line += (f" (current {cur['candidate']}: {cur['bytes_mean']:.1f} bytes, radio "
                     f"{cur['radio_j_per_inference']:.4g} J per inference)")
        lines += ["", line]
    else:
        lines += ["", f"no candidate reaches agreement {report['agreement_required']}"]
    return "\n".join(lines)


# ---- writing the choice into a bundle -----------------------------------------------------------
def write_bundle(bundle: Bundle, candidate: Candidate, out_dir: str | Path, *, section: str = "") -> Path:
    """A copy of ``bundle`` at ``out_dir`` (named after the folder) with ``candidate``'s encoding in
    its manifest; ``cloud.onnx`` is re-exported behind the new decoder when the decoder changes
    (another base, scale or zero point; a lossless layer alone keeps it) and checked against
    torch; the model card is re-rendered (evaluations made with the old encoding are dropped)
    and ``section`` (the plan) appended."""
    if candidate.send != "features":
        raise ValueError(f"--write-bundle: the plan chose {candidate.name}: sending the raw input needs a bundle "
                         "whose cloud runs the whole network and an edge that offloads its input, which a copy "
                         "of this bundle is not; lower --agreement or restrict --encodings to a feature encoding")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--write-bundle {out}: exists and is not an empty folder")
    if out.exists():
        out.rmdir()
    shutil.copytree(bundle.path, out)
    old, new = bundle.manifest.cloud, candidate.spec
    new = CloudSpec.model_validate({**old.model_dump(), "encoding": new.encoding, "scale": new.scale,
                                    "zero_point": new.zero_point})
    decoder_changed = (offload.base_of(old) != offload.base_of(new) or old.scale != new.scale
                       or old.zero_point != new.zero_point)
    manifest = bundle.manifest.model_copy(update={"name": out.name, "cloud": new})
    (out / MANIFEST).unlink()  # not a bundle until the new manifest lands
    if decoder_changed:
        cloud_part = bundle.build_model().cloud_module()
        offload.export_wire_onnx(cloud_part, out / "cloud.onnx", new)
        offload.verify_wire_onnx(cloud_part, out / "cloud.onnx", new)
    (out / MANIFEST).write_text(yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False))
    from edgecloud.export import rewrite_card

    card = rewrite_card(out)
    if section:
        card.write_text(card.read_text().rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n")
    return out


__all__ = ["Candidate", "plan_offload", "plan_table", "raw_spec", "write_bundle", "write_csv"]
