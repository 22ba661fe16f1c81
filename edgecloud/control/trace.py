"""Drifting streams and their deterministic replay (testing exit controllers).

Three parts, each usable alone:

- **The stream.** :class:`TraceSpec` is a list of :class:`Segment` (kind, length in samples,
  parameters) and a seed; :func:`build_stream` turns it into uint8 images drawn from a data set
  (e.g. the CIFAR-10 test split), bit for bit the same for the same spec, seed and data. Kinds:
  ``clean``; ``noise`` (additive Gaussian noise of ``sigma`` on pixels in [0, 1]); ``blur``
  (Gaussian blur of ``blur`` pixels); ``classes`` (only the listed classes); ``slowdown`` (clean
  data; the edge->cloud link gets ``delay_ms`` of added one-way delay, which the replayer applies
  through a delay relay at the segment boundary). Parameters combine (a ``noise`` segment may
  also list ``classes`` or a ``delay_ms``); ``ramp`` makes a corruption grow linearly from 0 to
  its full strength over the first ``ramp`` samples of its segment (an onset, not a step).
- **The replayer.** :class:`Replayer` sends a stream, in order, to an edge daemon in requests of
  ``batch`` samples (one request in flight; back to back or at a fixed rate), never letting a
  request straddle a window or segment boundary. It records per sample the answer (class, exit,
  confidence, energy, request latency) and per request the response parameters, and scrapes the
  daemon's ``/metrics`` at every window boundary, so per-window counter deltas (shadow samples,
  energy by component, the exit-threshold gauge, ...) are known (:func:`metric_delta`).
- **The offline reference.** :func:`compute_reference` runs every stream sample through the
  bundle's edge part and its cloud part (the ONNX model the cloud serves, on the encoded
  features the edge would send): the cloud's answer, the edge exit's class and score (policy
  units) and the per-sample energy and bytes of answering at the edge or offloading. With it,
  :func:`evaluate_threshold` gives per window, for ANY threshold, the agreement with the cloud,
  the exit share, the energy and the bytes; :func:`oracle_threshold` the threshold a hindsight
  oracle would pick in one window (the lowest energy whose agreement meets the target).

``benchmarks/controller.py`` uses all three against real servers.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

SegmentKind = Literal["clean", "noise", "blur", "classes", "slowdown"]
SEGMENT_KINDS: tuple[str, ...] = ("clean", "noise", "blur", "classes", "slowdown")


# ---- the stream ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """One stretch of the stream. ``kind`` names what changes; parameters say by how much."""

    kind: SegmentKind
    length: int                     # samples
    sigma: float = 0.0              # Gaussian noise std on pixels in [0, 1]
    blur: float = 0.0               # Gaussian blur std, pixels
    classes: tuple[int, ...] = ()   # only these labels (empty: all)
    delay_ms: float = 0.0           # added one-way delay on the edge->cloud link
    ramp: int = 0                   # corruption grows linearly over this many samples

    def __post_init__(self) -> None:
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"segment kind {self.kind!r} unknown; use one of {', '.join(SEGMENT_KINDS)}")
        if int(self.length) < 1:
            raise ValueError(f"segment length must be >= 1, got {self.length}")
        object.__setattr__(self, "length", int(self.length))
        object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        for name in ("sigma", "blur", "delay_ms"):
            if not float(getattr(self, name)) >= 0.0:
                raise ValueError(f"segment {name} must be >= 0, got {getattr(self, name)}")
        if self.ramp < 0:
            raise ValueError(f"segment ramp must be >= 0, got {self.ramp}")
        need = {"noise": ("sigma", self.sigma > 0), "blur": ("blur", self.blur > 0),
                "classes": ("classes", bool(self.classes)), "slowdown": ("delay_ms", self.delay_ms > 0)}
        if self.kind in need and not need[self.kind][1]:
            raise ValueError(f"a {self.kind!r} segment needs {need[self.kind][0]} > 0 / non-empty")

    @property
    def data_key(self) -> tuple:
        """What the data of this segment depends on (a change of it is a data drift onset)."""
        return (round(self.sigma, 9), round(self.blur, 9), self.classes, self.ramp)

    def describe(self) -> str:
        parts = [self.kind]
        if self.sigma:
            parts.append(f"sigma={self.sigma:g}")
        if self.blur:
            parts.append(f"{self.blur:g}px")
        if self.classes:
            parts.append(f"classes={list(self.classes)}")
        if self.delay_ms:
            parts.append(f"+{self.delay_ms:g}ms")
        if self.ramp:
            parts.append(f"ramp={self.ramp}")
        return " ".join(parts)


@dataclass(frozen=True)
class TraceSpec:
    segments: tuple[Segment, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(
            s if isinstance(s, Segment) else Segment(**s) for s in self.segments))
        if not self.segments:
            raise ValueError("a trace needs at least one segment")

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segments)

    def bounds(self) -> list[tuple[int, int]]:
        """[start, stop) of every segment in stream positions."""
        out, start = [], 0
        for s in self.segments:
            out.append((start, start + s.length))
            start += s.length
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "segments": [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()}
            for s in self.segments]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TraceSpec":
        return cls(tuple(Segment(**s) for s in data["segments"]), int(data.get("seed", 0)))


# Presets, in samples. "drift": clean, noise onset, blur onset (where the packaged 4-bit
# hybrid's manifest threshold falls below 97 % agreement with the cloud), a 4-class mix, then
# clean data again with a slow cloud link (+50 ms each way).
PRESETS: dict[str, list[dict[str, Any]]] = {
    "drift": [
        {"kind": "clean", "length": 5000},
        {"kind": "noise", "length": 4000, "sigma": 0.08},
        {"kind": "blur", "length": 8000, "blur": 1.0},
        {"kind": "classes", "length": 4000, "classes": [2, 3, 4, 5]},  # bird, cat, deer, dog
        {"kind": "slowdown", "length": 4000, "delay_ms": 50.0},
    ],
    "quick": [
        {"kind": "clean", "length": 400},
        {"kind": "blur", "length": 400, "blur": 1.0},
        {"kind": "slowdown", "length": 200, "delay_ms": 20.0},
    ],
}


def preset(name: str, seed: int = 0, scale: float = 1.0) -> TraceSpec:
    """A named preset; ``scale`` multiplies every segment length."""
    try:
        segments = PRESETS[name]
    except KeyError as exc:
        raise ValueError(f"unknown trace preset {name!r}; known: {', '.join(PRESETS)}") from exc
    return TraceSpec(tuple(Segment(**{**s, "length": max(1, int(round(s["length"] * scale)))})
                           for s in segments), seed)


def parse_segments(text: str, seed: int = 0) -> TraceSpec:
    """A preset name, a JSON list of segments, or ``kind:length[:key=value,...]`` items joined
    by ``;`` (e.g. ``clean:2000;noise:2000:sigma=0.08;classes:2000:classes=2/3/4``)."""
    text = text.strip()
    if text in PRESETS:
        return preset(text, seed)
    if text.startswith("["):
        return TraceSpec(tuple(Segment(**s) for s in json.loads(text)), seed)
    segments = []
    for item in filter(None, (p.strip() for p in text.split(";"))):
        kind, _, rest = item.partition(":")
        length, _, params = rest.partition(":")
        kw: dict[str, Any] = {}
        for pair in filter(None, params.split(",")):
            key, _, value = pair.partition("=")
            key = key.strip()
            if key == "classes":
                kw[key] = tuple(int(c) for c in value.split("/") if c)
            elif key == "ramp":
                kw[key] = int(value)
            else:
                kw[key] = float(value)
        segments.append(Segment(kind.strip(), int(length), **kw))  # type: ignore[arg-type]
    return TraceSpec(tuple(segments), seed)


@dataclass
class Stream:
    """The generated stream: ``images`` uint8 [N, C, H, W] in replay order."""

    spec: TraceSpec
    images: np.ndarray
    labels: np.ndarray        # int64 [N]
    source_index: np.ndarray  # int64 [N]: row of the data set each sample came from
    segment: np.ndarray       # int32 [N]: segment of each sample

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def segment_at(self, position: int) -> Segment:
        return self.spec.segments[int(self.segment[position])]


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of float images [N, C, H, W] (reflect padding), float64."""
    if sigma <= 0:
        return x
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    out = np.asarray(x, dtype=np.float64)
    for axis in (2, 3):
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="reflect")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for i, w in enumerate(k):  # fixed order of additions: the same bits on every run
            acc += w * np.take(padded, np.arange(i, i + n), axis=axis)
        out = acc
    return out


def _segment_rng(seed: int, index: int, part: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(part)]))


def _corrupt(images: np.ndarray, seg: Segment, rng: np.random.Generator) -> np.ndarray:
    """uint8 -> uint8, the segment's corruption (noise and blur; strength ramped per sample)."""
    if seg.sigma <= 0 and seg.blur <= 0:
        return images
    n = images.shape[0]
    strength = np.ones(n)
    if seg.ramp:
        strength = np.minimum(1.0, (np.arange(n, dtype=np.float64) + 1.0) / seg.ramp)
    x = images.astype(np.float64) / 255.0
    if seg.blur > 0:
        if seg.ramp:  # a ramped blur: blur each sample with its own sigma
            x = np.concatenate([gaussian_blur(x[i:i + 1], seg.blur * strength[i])
                                if strength[i] * seg.blur > 1e-3 else x[i:i + 1] for i in range(n)])
        else:
            x = gaussian_blur(x, seg.blur)
    if seg.sigma > 0:
        noise = rng.standard_normal(x.shape)
        x = x + noise * (seg.sigma * strength)[:, None, None, None]
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def build_stream(spec: TraceSpec, images: np.ndarray, labels: np.ndarray) -> Stream:
    """The stream of ``spec`` drawn from a data set (uint8 [N, C, H, W] images, int labels).

    Per segment, its own generator (seeded from the spec's seed and the segment's position)
    draws the rows without replacement from the eligible ones (every row, or those of the
    segment's classes; the pool is reshuffled when a segment is longer than it), then the
    corruption is applied. Same spec, seed and data: the same bytes.
    """
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {images.shape}")
    out_img, out_lab, out_src, out_seg = [], [], [], []
    for index, seg in enumerate(spec.segments):
        rng = _segment_rng(spec.seed, index, 0)
        pool = np.flatnonzero(np.isin(labels, seg.classes)) if seg.classes else np.arange(len(labels))
        if pool.size == 0:
            raise ValueError(f"segment {index} ({seg.describe()}): no samples of classes {list(seg.classes)}")
        rows = np.concatenate([rng.permutation(pool) for _ in range(-(-seg.length // pool.size))])
        rows = rows[: seg.length]
        out_img.append(_corrupt(images[rows], seg, _segment_rng(spec.seed, index, 1)))
        out_lab.append(labels[rows])
        out_src.append(rows.astype(np.int64))
        out_seg.append(np.full(seg.length, index, dtype=np.int32))
    return Stream(spec, np.ascontiguousarray(np.concatenate(out_img)), np.concatenate(out_lab),
                  np.concatenate(out_src), np.concatenate(out_seg))


VAL_PARTS = {"val": None, "val-a": 0, "val-b": 1}
"""The validation hold-out, whole or one of its two halves (even / odd rows). Why halves: a
disagreement profile measured on ``val-a`` and a stream drawn from ``val-b`` is out of sample, as
test is; a stream from the same images the profile was measured on flatters any setting that
trusts the profile. Folds too (:func:`val_part_rows`): ``val-5f0`` is fold 0 of 5 (rows
= 0 mod 5), ``val-5f0c`` the other four; a profile from ``5f0c`` has nearly the shipped one's
noise, and each of the five folds is an out-of-sample stream for it."""

_FOLD = re.compile(r"^val-(\d+)f(\d+)(c?)$")


def is_val_part(part: str) -> bool:
    """Whether ``part`` names the validation hold-out or a part of it (a half or a fold)."""
    try:
        val_part_rows(0, part)
    except ValueError:
        return False
    return True


def val_part_rows(n: int, part: str) -> np.ndarray:
    """The rows of an ``n``-image validation hold-out that ``part`` keeps: ``val``, ``val-a`` /
    ``val-b`` (even / odd rows), ``val-KfI`` (rows = I mod K) or ``val-KfIc`` (the rest)."""
    rows = np.arange(n)
    if part in VAL_PARTS:
        parity = VAL_PARTS[part]
        return rows if parity is None else rows[rows % 2 == parity]
    m = _FOLD.match(part)
    if m is None:
        raise ValueError(f"unknown validation part {part!r}; use {', '.join(VAL_PARTS)}, val-KfI "
                         "(fold I of K) or val-KfIc (all but that fold)")
    k, i, rest = int(m.group(1)), int(m.group(2)), bool(m.group(3))
    if k < 2 or i >= k:
        raise ValueError(f"validation part {part!r}: needs K >= 2 folds and 0 <= I < K")
    inside = rows % k == i
    return rows[~inside if rest else inside]


def load_stream(spec: TraceSpec, data_root: str, dataset: str = "cifar10", split: str = "test",
                manifest: Any = None) -> Stream:
    """The stream drawn from ``split``: ``test``, or ``val`` = the bundle's validation hold-out of
    the train split (needs ``manifest``), so settings can be chosen without touching test images;
    ``val-a`` / ``val-b``: one half of it (:data:`VAL_PARTS`); ``val-KfI`` / ``val-KfIc``: fold I
    of K, or all but it (:func:`val_part_rows`)."""
    if is_val_part(split):
        if manifest is None:
            raise ValueError(f"split {split!r} needs the bundle's manifest (its hold-out seed and fraction)")
        from edgecloud.evaluate.source import load_eval_data

        ds, _ = load_eval_data(dataset, "val", manifest, data_root)
        rows = val_part_rows(len(ds.labels), split)
        return build_stream(spec, ds.images.numpy()[rows], ds.labels.numpy()[rows])
    if split == "test":
        from edgecloud.data.registry import load_dataset

        ds = load_dataset(dataset, "test", data_root)
        return build_stream(spec, ds.images.numpy(), ds.labels.numpy())
    raise ValueError(f"split must be 'test', {', '.join(repr(v) for v in VAL_PARTS)} or a fold "
                     f"(val-KfI, val-KfIc), got {split!r}")


# ---- windows ---------------------------------------------------------------------------------
def window_slices(n: int, window: int) -> list[slice]:
    """Consecutive windows of ``window`` samples (the last one may be shorter)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return [slice(s, min(s + window, n)) for s in range(0, n, window)]


def window_means(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of ``values`` over every window (NaN-free input)."""
    values = np.asarray(values, dtype=np.float64)
    return np.array([values[s].mean() for s in window_slices(len(values), window)])


def onset_windows(spec: TraceSpec, window: int) -> list[int]:
    """Windows in which the data distribution changes: window 0 (the start) and the window of
    every segment boundary whose data parameters (noise, blur, classes, ramp) change."""
    out = [0]
    for (start, _), prev, seg in zip(spec.bounds()[1:], spec.segments, spec.segments[1:]):
        if seg.data_key != prev.data_key:
            out.append(start // window)
    return sorted(set(out))


def settled_mask(spec: TraceSpec, window: int, settle_windows: int) -> np.ndarray:
    """True for windows outside the settling period: the ``settle_windows`` windows starting at
    every data-drift onset (including the start of the stream) are not settled."""
    n_windows = len(window_slices(spec.length, window))
    mask = np.ones(n_windows, dtype=bool)
    for w in onset_windows(spec, window):
        mask[w: w + settle_windows] = False
    return mask


# ---- the offline reference -------------------------------------------------------------------
@dataclass
class Reference:
    """Per stream sample, what the edge exit and the cloud would answer, and what it costs."""

    policy: str                  # entropy | max_prob: the units of ``score`` and thresholds
    score: np.ndarray            # float64 [N]: the edge exit's score
    edge_class: np.ndarray       # int64 [N]
    cloud_class: np.ndarray      # int64 [N]
    edge_j: np.ndarray           # float64 [N]: edge compute energy (every sample pays it)
    offload_j: np.ndarray        # float64 [N]: radio + cloud compute if offloaded
    offload_bytes: np.ndarray    # float64 [N]: bytes sent if offloaded
    static_threshold: float | None = None

    def __len__(self) -> int:
        return int(self.score.shape[0])

    @property
    def edge_agrees(self) -> np.ndarray:
        return self.edge_class == self.cloud_class

    def save(self, path: str) -> None:
        np.savez_compressed(path, policy=np.array(self.policy), score=self.score,
                            edge_class=self.edge_class, cloud_class=self.cloud_class,
                            edge_j=self.edge_j, offload_j=self.offload_j,
                            offload_bytes=self.offload_bytes,
                            static_threshold=np.array(np.nan if self.static_threshold is None
                                                      else self.static_threshold))

    @classmethod
    def load(cls, path: str) -> "Reference":
        z = np.load(path)
        st = float(z["static_threshold"])
        return cls(str(z["policy"]), z["score"], z["edge_class"], z["cloud_class"], z["edge_j"],
                   z["offload_j"], z["offload_bytes"], None if math.isnan(st) else st)


def exits_at(score: np.ndarray, threshold: float | None, policy: str) -> np.ndarray:
    """Which samples the exit answers at ``threshold`` (entropy: score < t; max_prob: >= t)."""
    score = np.asarray(score, dtype=np.float64)
    if threshold is None:
        return np.ones(score.shape, dtype=bool)
    if policy == "entropy":
        return score < threshold
    if policy == "max_prob":
        return score >= threshold
    raise ValueError(f"unknown policy {policy!r}")


def compute_reference(bundle: Any, images: np.ndarray, *, batch: int = 256,
                      progress: Callable[[int], None] | None = None) -> Reference:
    """Every sample through the bundle's edge part (digital backend, nothing exits) and the
    cloud part the cloud server runs (its ONNX model on the encoded features): the reference
    a served run is compared with. Bundles with one edge exit (the controlled one)."""
    import torch

    from edgecloud.cloud.sessions import load_cloud_model
    from edgecloud.config import CloudConfig
    from edgecloud.edge.runner import EdgeRunner
    from edgecloud.exits import ExitPolicy, softmax_entropy

    manifest = bundle.manifest
    if len(manifest.exits) != 1 or manifest.edge_only:
        raise ValueError(f"{manifest.name}: the reference needs one edge exit and a cloud part "
                         f"(it has {len(manifest.exits)} exits, cloud {manifest.cloud.offload})")

    class _NeverExit(ExitPolicy):
        def confident(self, probs: torch.Tensor, exit_index: int) -> torch.Tensor:
            return torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)

    runner = EdgeRunner(bundle, "digital",
                        policy=_NeverExit(kind=manifest.policy, thresholds=[manifest.exits[0].threshold]))
    cloud = load_cloud_model(bundle, CloudConfig(allow_spinning=False, intra_op_threads=1))
    n = images.shape[0]
    score = np.empty(n)
    edge_class = np.empty(n, dtype=np.int64)
    cloud_class = np.empty(n, dtype=np.int64)
    edge_j = np.empty(n)
    for start in range(0, n, batch):
        x = images[start: start + batch]
        out = runner.run(x)
        probs = torch.from_numpy(out.probs)
        s = softmax_entropy(probs) if manifest.policy == "entropy" else probs.max(dim=1).values
        rows = slice(start, start + x.shape[0])
        score[rows] = s.double().numpy()
        edge_class[rows] = out.probs.argmax(axis=1)
        edge_j[rows] = sum(out.energy.values())
        if out.offload_index.size != x.shape[0]:
            raise RuntimeError("the reference expected every sample to be offloaded")
        cloud_probs = cloud.run(runner.encode_offload(out.offload))["probabilities"]
        cloud_class[rows] = np.asarray(cloud_probs).argmax(axis=1)
        if progress is not None:
            progress(x.shape[0])
    bytes_per = float(runner.offload_bytes_per_sample)
    offload_j = bytes_per * 8.0 * runner.radio_joules_per_bit + runner.cloud_joules_per_sample
    return Reference(manifest.policy, score, edge_class, cloud_class, edge_j,
                     np.full(n, offload_j), np.full(n, bytes_per), manifest.exits[0].threshold)


@dataclass
class WindowStats:
    """Per-window values of one threshold (or one served run): arrays of one row per window."""

    agreement: np.ndarray
    exit_share: np.ndarray
    energy_j: np.ndarray      # mean per inference
    bytes: np.ndarray         # mean per inference
    threshold: np.ndarray


def per_sample_outcome(ref: Reference, exited: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(agrees, energy_j, bytes) per sample when ``exited`` samples answer at the edge and the
    others are answered by the cloud."""
    exited = np.asarray(exited, dtype=bool)
    agrees = np.where(exited, ref.edge_agrees, True)
    energy = ref.edge_j + np.where(exited, 0.0, ref.offload_j)
    sent = np.where(exited, 0.0, ref.offload_bytes)
    return agrees, energy, sent


def evaluate_threshold(ref: Reference, thresholds: float | None | Sequence[float | None],
                       window: int) -> WindowStats:
    """Per window: agreement with the cloud, exit share, energy and bytes per inference, if the
    exit used ``thresholds`` (one value, or one per window)."""
    slices = window_slices(len(ref), window)
    if thresholds is None or np.isscalar(thresholds):
        per_window = [thresholds] * len(slices)
    else:
        per_window = list(thresholds)  # type: ignore[arg-type]
        if len(per_window) != len(slices):
            raise ValueError(f"{len(per_window)} thresholds for {len(slices)} windows")
    rows = []
    for s, t in zip(slices, per_window):
        exited = np.zeros(len(ref), dtype=bool)
        exited[s] = exits_at(ref.score[s], t, ref.policy)
        agrees, energy, sent = (v[s] for v in per_sample_outcome(ref, exited))
        exited = exited[s]
        rows.append((agrees.mean(), exited.mean(), energy.mean(), sent.mean(),
                     np.nan if t is None else float(t)))
    a = np.array(rows, dtype=np.float64).reshape(-1, 5)
    return WindowStats(a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4])


@dataclass
class OracleChoice:
    threshold: float
    agreement: float
    exit_share: float
    energy_j: float


def oracle_threshold(score: np.ndarray, edge_agrees: np.ndarray, exit_j: np.ndarray,
                     offload_j: np.ndarray, target: float, policy: str = "entropy") -> OracleChoice:
    """The threshold with the lowest mean energy whose agreement with the cloud is >= ``target``
    on these samples (hindsight), exactly: every distinct cut of the samples ordered by score
    is a candidate (exiting none of them — agreement 1 — is always feasible). Ties in energy go
    to the larger exit share. ``exit_j``/``offload_j``: per-sample energy if answered at the
    edge / if offloaded."""
    score = np.asarray(score, dtype=np.float64)
    n = score.size
    if n == 0:
        raise ValueError("no samples")
    agrees = np.asarray(edge_agrees, dtype=bool)
    exit_j = np.broadcast_to(np.asarray(exit_j, dtype=np.float64), (n,))
    offload_j = np.broadcast_to(np.asarray(offload_j, dtype=np.float64), (n,))
    # order: most confident first (entropy ascending, max-prob descending)
    order = np.argsort(score if policy == "entropy" else -score, kind="stable")
    s = score[order]
    # k = number of samples that exit (the first k in order); k = 0 .. n
    disagree_cum = np.concatenate([[0.0], np.cumsum(~agrees[order])])
    saved_cum = np.concatenate([[0.0], np.cumsum(offload_j[order] - exit_j[order])])
    agreement = 1.0 - disagree_cum / n
    energy = (offload_j.sum() - saved_cum) / n
    # a cut is realisable only between distinct scores
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[1:] != s[:-1]
    feasible = valid & (agreement >= target - 1e-12)
    ks = np.flatnonzero(feasible)
    best = ks[np.lexsort((-ks, energy[ks]))[0]]  # lowest energy, then the most exits
    if policy == "entropy":  # exit when score < t
        if best == 0:
            t = 0.0  # H < 0: nothing exits
        elif best == n:
            t = float(np.nextafter(s[-1], np.inf))
        else:
            t = float((s[best - 1] + s[best]) / 2.0)
    else:  # exit when score >= t
        if best == 0:
            t = 1.0 if s[0] < 1.0 else float(np.nextafter(1.0, 2.0))
        elif best == n:
            t = float(s[-1])
        else:
            t = float((s[best - 1] + s[best]) / 2.0)
    return OracleChoice(t, float(agreement[best]), best / n, float(energy[best]))


def oracle_windows(ref: Reference, window: int, target: float) -> WindowStats:
    """The hindsight oracle per window (see :func:`oracle_threshold`)."""
    thresholds = []
    for s in window_slices(len(ref), window):
        choice = oracle_threshold(ref.score[s], ref.edge_agrees[s], ref.edge_j[s],
                                  ref.edge_j[s] + ref.offload_j[s], target, ref.policy)
        thresholds.append(choice.threshold)
    return evaluate_threshold(ref, thresholds, window)



def segment_oracle_windows(ref: Reference, spec: TraceSpec, window: int, target: float,
                           settled: np.ndarray, meet_share: float = 0.95,
                           candidates: int = 1024) -> WindowStats:
    """One threshold per stretch of stationary data, chosen in hindsight over the whole stretch.

    Why: the per-window oracle needs no safety margin (it sees each window's own answers), so
    no causal controller can match it. A controller that knew each stretch's true disagreement
    curve exactly, but not which samples the next window draws, can do no better than one
    threshold per stretch; this is that controller: per stretch (segments with the same data
    parameters, split where they change), the lowest-energy threshold among ``candidates``
    score quantiles whose agreement meets ``target`` in at least ``meet_share`` of the
    stretch's ``settled`` windows (all of its windows where none is settled). Its distance from
    the per-window oracle is the margin that window-to-window sampling alone costs.
    """
    slices = window_slices(len(ref), window)
    settled = np.asarray(settled, dtype=bool)
    if settled.shape != (len(slices),):
        raise ValueError(f"settled: one value per window ({len(slices)}), got {settled.shape}")
    onsets = onset_windows(spec, window) + [len(slices)]
    grid = np.unique(np.quantile(ref.score, np.linspace(0.0, 1.0, candidates + 1)))
    grid = np.concatenate([grid, [np.nextafter(grid[-1], np.inf)]])
    if ref.policy == "max_prob":
        grid = np.concatenate([[np.nextafter(1.0, 2.0)], grid])
    # per window and candidate: agreement and mean energy (exits counted by sorting once)
    agree = np.empty((len(slices), grid.size))
    energy = np.empty_like(agree)
    for w, sl in enumerate(slices):
        score = ref.score[sl]
        disagree = (~ref.edge_agrees[sl]).astype(np.float64)
        offload_j = ref.offload_j[sl]
        n, edge_total, offload_total = score.size, ref.edge_j[sl].sum(), offload_j.sum()
        for j, t in enumerate(grid):
            ex = exits_at(score, float(t), ref.policy)
            agree[w, j] = 1.0 - disagree[ex].sum() / n
            energy[w, j] = (edge_total + offload_total - offload_j[ex].sum()) / n
    thresholds = np.empty(len(slices))
    for start, stop in zip(onsets[:-1], onsets[1:]):
        rows = np.arange(start, stop)
        judged = rows[settled[rows]] if settled[rows].any() else rows
        ok = (agree[judged] >= target - 1e-12).mean(axis=0) >= meet_share - 1e-12
        cost = np.where(ok, energy[judged].mean(axis=0), np.inf)
        j = int(np.argmin(cost)) if np.isfinite(cost).any() else 0  # grid[0]: nothing exits
        thresholds[rows] = grid[j]
    return evaluate_threshold(ref, thresholds.tolist(), window)

# ---- metrics ---------------------------------------------------------------------------------
MetricSnapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout: float = 10.0) -> MetricSnapshot:
    """Every sample of a Prometheus endpoint: {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=timeout).read().decode()
    out: MetricSnapshot = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metric_value(snapshot: MetricSnapshot, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in snapshot.items() if n == name and want <= set(lab))


def metric_names(snapshot: MetricSnapshot, contains: str = "") -> list[str]:
    return sorted({n for n, _ in snapshot if contains in n})


def metric_delta(before: MetricSnapshot, after: MetricSnapshot, name: str, **labels: str) -> float:
    return metric_value(after, name, **labels) - metric_value(before, name, **labels)


def label_values(snapshot: MetricSnapshot, name: str, label: str, **labels: str) -> list[str]:
    want = set(labels.items())
    return sorted({dict(lab)[label] for (n, lab), _ in snapshot.items()
                   if n == name and want <= set(lab) and label in dict(lab)})


# ---- the replayer ----------------------------------------------------------------------------
@dataclass
class ReplayResult:
    """Everything a replay recorded (arrays: one row per stream sample)."""

    class_index: np.ndarray
    exit_index: np.ndarray
    confidence: np.ndarray
    energy_j: np.ndarray
    latency_s: np.ndarray      # latency of the request the sample came in
    request: np.ndarray        # int: request number of each sample
    parameters: list[dict[str, Any]] = field(default_factory=list)  # per request
    snapshots: list[MetricSnapshot] = field(default_factory=list)   # before window 0, after each
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def parameter(self, name: str, default: float = 0.0) -> np.ndarray:
        """A numeric response parameter, per request."""
        return np.array([float(p.get(name, default) or 0.0) for p in self.parameters])


class Replayer:
    """Sends a :class:`Stream` in order to an edge daemon and records what came back.

    One request in flight at a time (deterministic order); ``rate`` (samples/s) paces request
    starts, else requests go back to back. Requests never straddle a window or segment
    boundary. ``on_segment(index, segment)`` is called before the first request of every
    segment (e.g. to change a delay relay); ``metrics_url`` is scraped before the first window
    and after each one.
    """

    def __init__(self, address: str, model: str, input_name: str, stream: Stream, *,
                 batch: int = 32, window: int = 1000, rate: float | None = None,
                 metrics_url: str | None = None,
                 on_segment: Callable[[int, Segment], None] | None = None,
                 on_window: Callable[[int], None] | None = None,
                 timeout_s: float = 60.0, max_attempts: int = 5) -> None:
        if batch < 1 or window < 1:
            raise ValueError("batch and window must be >= 1")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0 samples/s")
        self.address, self.model, self.input_name, self.stream = address, model, input_name, stream
        self.batch, self.window, self.rate = batch, window, rate
        self.metrics_url, self.on_segment, self.on_window = metrics_url, on_segment, on_window
        self.timeout_s, self.max_attempts = timeout_s, max_attempts

    def requests(self) -> list[tuple[int, int]]:
        """[start, stop) of every request, in order."""
        n = len(self.stream)
        cuts = set(range(0, n, self.window)) | {b[0] for b in self.stream.spec.bounds()} | {n}
        cuts = sorted(c for c in cuts if c <= n)
        out = []
        for a, b in zip(cuts, cuts[1:]):
            out.extend((s, min(s + self.batch, b)) for s in range(a, b, self.batch))
        return out

    def run(self, progress: Callable[[int], None] | None = None) -> ReplayResult:
        import grpc

        from edgecloud.serving.client import InferenceClient

        n = len(self.stream)
        res = ReplayResult(np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.full(n, np.nan),
                           np.full(n, np.nan), np.full(n, np.nan), np.full(n, -1, np.int64))
        bounds = {b[0]: i for i, b in enumerate(self.stream.spec.bounds())}
        if self.metrics_url:
            res.snapshots.append(scrape(self.metrics_url))
        start_wall = time.perf_counter()
        with InferenceClient(self.address) as client:
            for k, (a, b) in enumerate(self.requests()):
                if a in bounds and self.on_segment is not None:
                    self.on_segment(bounds[a], self.stream.spec.segments[bounds[a]])
                if self.rate is not None:
                    due = start_wall + a / self.rate
                    while (wait := due - time.perf_counter()) > 0:
                        time.sleep(wait)
                x = self.stream.images[a:b]
                for attempt in range(self.max_attempts):
                    try:
                        reply = client.infer(self.model, {self.input_name: x}, timeout_s=self.timeout_s)
                        break
                    except grpc.RpcError as exc:  # e.g. RESOURCE_EXHAUSTED: retry the same request
                        res.errors.append(f"request {k}: {exc.code().name}")
                        if attempt == self.max_attempts - 1:
                            raise
                        time.sleep(0.2 * (attempt + 1))
                out = reply.outputs
                res.class_index[a:b] = out["class_index"]
                res.exit_index[a:b] = out["exit_index"]
                res.confidence[a:b] = out["confidence"]
                res.energy_j[a:b] = out["energy_joules"]
                res.latency_s[a:b] = reply.latency_s
                res.request[a:b] = k
                res.parameters.append(dict(reply.parameters))
                if progress is not None:
                    progress(b - a)
                if b % self.window == 0 or b == n:
                    if self.metrics_url:
                        res.snapshots.append(scrape(self.metrics_url))
                    if self.on_window is not None:
                        self.on_window((b - 1) // self.window)
        res.wall_s = time.perf_counter() - start_wall
        return res


__all__ = [
    "PRESETS", "SEGMENT_KINDS", "OracleChoice", "Reference", "ReplayResult", "Replayer",
    "Segment", "Stream", "TraceSpec", "WindowStats", "build_stream", "compute_reference",
    "evaluate_threshold", "exits_at", "gaussian_blur", "label_values", "load_stream",
    "metric_delta", "metric_names", "metric_value", "onset_windows", "oracle_threshold",
    "oracle_windows", "parse_segments", "per_sample_outcome", "preset", "scrape",
    "settled_mask", "window_means", "window_slices",
]
