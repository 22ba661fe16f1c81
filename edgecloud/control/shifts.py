"""How a distribution shift raises the disagreement curve where the controller cannot see it.

The profile estimator (:mod:`edgecloud.control.profile`) prices the exits with the validation
curve times one factor ``r``, measured on the labelled band next to the threshold (the most
confident offloaded samples). A shift that raises the curve more among the confident exits than
in that band is under-priced, and the shadows are far too few to see it (a few labels per window
where 2-6 % disagree). So the controller takes a *model* of that excess: ``shift_factor``, the
exits' rates are this many times ``r`` times the profile while the score-shift test rejects.

This module measures the excess over a **family of corruptions** applied to the validation
images: per corruption, ``kappa = r_exit / r_band`` at the threshold where the exits disagree
with the cloud on 3 % of samples. Its maximum over the family is the factor to use. The family
leaves out the corruptions of the benchmark's drift trace (Gaussian noise, Gaussian blur), so
the trace checks the model out of sample; :data:`TRACE_SHIFTS` are measured beside it for that.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgecloud.control.profile import DisagreementProfile, score_shift_pvalue
from edgecloud.control.trace import Reference, gaussian_blur

Corruption = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _unit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) / 255.0


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _contrast(factor: float) -> Corruption:
    def apply(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        f = _unit(x)
        mean = f.mean(axis=(1, 2, 3), keepdims=True)
        return _uint8(mean + factor * (f - mean))
    return apply


def _jpeg(quality: int) -> Corruption:
    def apply(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from PIL import Image

        out = []
        for img in x:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(buf, "JPEG", quality=quality)
            out.append(np.asarray(Image.open(buf).convert("RGB")).transpose(2, 0, 1))
        return np.stack(out).astype(np.uint8)
    return apply


def _pixelate(k: int) -> Corruption:
    def apply(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n, c, h, w = x.shape
        if h % k or w % k:
            raise ValueError(f"pixelate {k}: image size {h}x{w} is not a multiple of {k}")
        y = _unit(x).reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5))
        return _uint8(np.repeat(np.repeat(y, k, axis=2), k, axis=3))
    return apply


def _motion(length: int) -> Corruption:
    def apply(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        f = _unit(x)
        acc = np.zeros_like(f)
        for shift in range(length):
            acc += np.roll(f, shift - length // 2, axis=3)
        return _uint8(acc / length)
    return apply


def _salt_pepper(share: float) -> Corruption:
    def apply(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        shape = (x.shape[0], 1) + x.shape[2:]
        hit = rng.random(shape) < share
        salt = rng.random(shape) < 0.5
        return np.where(hit, np.where(salt, 255, 0), x).astype(np.uint8)
    return apply


SHIFT_FAMILY: dict[str, Corruption] = {
    "contrast 0.5": _contrast(0.5),
    "contrast 0.7": _contrast(0.7),
    "dark x0.6": lambda x, rng: _uint8(_unit(x) * 0.6),
    "bright +0.2": lambda x, rng: _uint8(_unit(x) + 0.2),
    "jpeg q15": _jpeg(15),
    "jpeg q30": _jpeg(30),
    "pixelate 2": _pixelate(2),
    "desaturate 0.3": lambda x, rng: _uint8(0.3 * _unit(x) + 0.7 * _unit(x).mean(axis=1, keepdims=True)),
    "speckle 0.2": lambda x, rng: _uint8(_unit(x) * (1.0 + 0.2 * rng.standard_normal(x.shape))),
    "motion 3px": _motion(3),
    "salt-pepper 2%": _salt_pepper(0.02),
}
"""The calibration family: photometric, compression, resampling and impulse shifts. None of them
is a corruption of the drift trace."""

TRACE_SHIFTS: dict[str, Corruption] = {
    "noise 0.08 (trace)": lambda x, rng: _uint8(_unit(x) + 0.08 * rng.standard_normal(x.shape)),
    "blur 1px (trace)": lambda x, rng: _uint8(gaussian_blur(_unit(x), 1.0)),
}
"""The drift trace's own corruptions, measured beside the family as its out-of-sample check."""


@dataclass(frozen=True)
class ShiftExcess:
    """One shift's disagreement in the exit region against the band's, at the 3 % threshold."""

    name: str
    shift_p: float      # the score-shift test's p-value (first ``window`` samples)
    threshold: float    # where the exits disagree with the cloud on ``target`` of all samples
    exit_share: float
    r_band: float       # observed / profile-predicted disagreements in the band
    r_exit: float       # ... among the exits
    kappa: float        # r_exit / r_band: how much the band under-prices the exits

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def shift_excess(name: str, ref: Reference, profile: DisagreementProfile, *, target: float = 0.03,
                 band_share: float = 250 / 4000, window: int = 4000) -> ShiftExcess:
    """``kappa`` of one shifted sample set (its reference: edge scores, edge and cloud classes).

    The threshold lets the most confident samples exit until their disagreements reach
    ``target`` of all samples (the hindsight threshold of a 1 - target agreement budget); the
    band is the next ``band_share`` of samples above it, as the controller's ``profile_band``
    of its ``window``."""
    if profile.kind != ref.policy:
        raise ValueError(f"profile is for policy {profile.kind!r}, the reference uses {ref.policy!r}")
    n = len(ref)
    if n == 0:
        raise ValueError(f"{name}: no samples")
    key = -ref.score if ref.policy == "entropy" else ref.score
    order = np.argsort(-key, kind="stable")          # most confident first
    disagree = (~ref.edge_agrees).astype(np.float64)[order]
    rate = profile(ref.score)[order]
    k = int(np.searchsorted(np.cumsum(disagree), target * n, side="right"))
    band = slice(k, min(n, k + max(1, int(round(band_share * n)))))

    def ratio(part: slice) -> float:
        mass = float(rate[part].sum())
        return float(disagree[part].sum() / mass) if mass > 0 else float("nan")

    r_band, r_exit = ratio(band), ratio(slice(0, k))
    return ShiftExcess(
        name=name, shift_p=score_shift_pvalue(profile, ref.score[:window]),
        threshold=float(ref.score[order[min(k, n - 1)]]), exit_share=k / n,
        r_band=r_band, r_exit=r_exit, kappa=r_exit / r_band if r_band > 0 else float("nan"))


def measure_family(bundle, images: np.ndarray, profile: DisagreementProfile,
                   shifts: dict[str, Corruption], *, seed: int = 0, target: float = 0.03,
                   band_share: float = 250 / 4000, window: int = 4000,
                   progress: Callable[[str], None] | None = None) -> list[ShiftExcess]:
    """:func:`shift_excess` of each shift applied to ``images`` (uint8 [N, C, H, W]; each shift
    draws from its own seeded generator), plus the unshifted images first as ``clean``."""
    from edgecloud.control.trace import compute_reference

    out = []
    for index, (name, corrupt) in enumerate({"clean": lambda x, rng: x, **shifts}.items()):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), index]))
        ref = compute_reference(bundle, corrupt(images, rng))
        out.append(shift_excess(name, ref, profile, target=target, band_share=band_share, window=window))
        if progress is not None:
            progress(name)
    return out


__all__ = ["SHIFT_FAMILY", "TRACE_SHIFTS", "ShiftExcess", "measure_family", "shift_excess"]
