"""A disagreement profile: P(edge answer != cloud answer | exit score), measured offline.

Why: ~100 shadow labels per window bound the exits' disagreement at 2-3x the truth, and no
causal controller can buy the labels a tight bound needs with an offload's radio energy per
label. But drift mostly moves the *score distribution* (known without labels, every sample)
and much less the *curve* P(disagree | score) (measured: clean, noise, blur, class mix on the
CIFAR-10 hybrids). So the profile is measured once on the bundle's validation split, where the
cloud's answer to every sample is known, and online the controller only (1) prices each
candidate threshold with the profile over the window's own scores and (2) rescales the profile
by a factor ``r`` estimated from every labelled sample it has (offloaded ones for free, shadowed
ones), with a one-sided Poisson bound on ``r``.

The model behind it: under drift, P(disagree | s) = r * profile(s) for one ``r`` per window.
A selection that depends only on the score (offloading above a threshold, shadowing at random)
then gives E[disagreements among labelled] = r * sum(profile(s_i)), so ``r`` is estimated
without weights. Where drift raises the curve unevenly (blur raises it most among confident
samples, which only shadows see), the model is wrong and the guarantee is not distribution-free;
the bound mode (:func:`edgecloud.control.estimate.estimate`) stays the default for that reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats
from scipy.optimize import isotonic_regression

from edgecloud.control.estimate import (
    Estimates,
    WindowData,
    as_threshold_array,
    confidence_key,
    empty_estimates,
    ranked,
)
from edgecloud.exits import PolicyKind


FIT_METHODS = ("envelope", "isotonic", "upper")


@dataclass(frozen=True)
class DisagreementProfile:
    """Disagreement rate per bin of the confidence key, non-increasing as confidence grows."""

    kind: PolicyKind
    edges: tuple[float, ...]   # ascending bin edges of confidence_key(kind, score)
    rates: tuple[float, ...]   # one rate per bin (len(edges) - 1)
    samples: int
    source: str = ""
    counts: tuple[int, ...] | None = None  # validation samples per bin (for the shift test)
    hits: tuple[int, ...] | None = None    # ... and their raw disagreements (pooled evidence on r)

    def __post_init__(self) -> None:
        if self.kind not in ("entropy", "max_prob"):
            raise ValueError(f"profile: unknown policy {self.kind!r}")
        if len(self.edges) < 2 or len(self.rates) != len(self.edges) - 1:
            raise ValueError("profile: need >= 2 edges and one rate per bin")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError("profile: edges must be strictly ascending")
        if any(not 0.0 <= r <= 1.0 for r in self.rates):
            raise ValueError("profile: rates must lie in [0, 1]")
        for name in ("counts", "hits"):
            v = getattr(self, name)
            if v is not None and (len(v) != len(self.rates) or any(x < 0 for x in v)):
                raise ValueError(f"profile: {name} needs one non-negative number per bin")
        if self.counts is not None and self.hits is not None and any(
                h > c for h, c in zip(self.hits, self.counts)):
            raise ValueError("profile: a bin has more disagreements (hits) than samples (counts)")

    def bin_of(self, score: np.ndarray) -> np.ndarray:
        """Each score's bin (outside the edges: the end bins)."""
        key = confidence_key(self.kind, np.asarray(score, dtype=np.float64))
        return np.clip(np.searchsorted(np.asarray(self.edges), key, side="right") - 1, 0, len(self.rates) - 1)

    def __call__(self, score: np.ndarray) -> np.ndarray:
        """The profile's disagreement probability of each score (outside the edges: the end bins)."""
        return np.asarray(self.rates)[self.bin_of(score)]

    @classmethod
    def fit(cls, kind: PolicyKind, score: np.ndarray, disagree: np.ndarray, bins: int = 40,
            source: str = "", method: str = "envelope", level: float = 0.8) -> "DisagreementProfile":
        """Equal-count bins of the confidence key, each bin's observed rate made non-increasing
        as confidence grows (a less confident bin never disagrees less). ``method``:
        ``envelope`` takes the upper monotone envelope (each bin at least every more confident
        bin: conservative where a bin is noisy, but a noisy high bin lifts all below it and bends
        the curve's shape); ``isotonic`` the count-weighted isotonic regression (adjacent bins
        that violate the order are pooled and averaged: the shape without the upward bias);
        ``upper`` each bin's one-sided Clopper-Pearson upper bound at ``level``, then the
        envelope: deliberately pessimistic where validation saw few disagreements (the confident
        bins, which only shadows label online), by a rule rather than by noise. The
        shape matters because ``r``, measured on the labelled bins next to the threshold, is
        applied to the confident bins below it."""
        if method not in FIT_METHODS:
            raise ValueError(f"profile: unknown fit method {method!r}; use {', '.join(FIT_METHODS)}")
        score = np.asarray(score, dtype=np.float64)
        disagree = np.asarray(disagree, dtype=np.float64)
        if score.shape != disagree.shape or score.size < bins:
            raise ValueError(f"profile: need matching score/disagree arrays of >= {bins} samples")
        key = confidence_key(kind, score)
        edges = np.unique(np.quantile(key, np.linspace(0.0, 1.0, bins + 1)))
        if edges.size < 2:
            raise ValueError("profile: every score is the same; nothing to bin")
        i = np.clip(np.searchsorted(edges, key, side="right") - 1, 0, edges.size - 2)
        counts = np.bincount(i, minlength=edges.size - 1)
        hits = np.bincount(i, weights=disagree, minlength=edges.size - 1)
        rates = np.where(counts > 0, hits / np.maximum(counts, 1), 0.0)
        if method == "upper":
            if not 0.0 < level < 1.0:
                raise ValueError(f"profile: level must lie in (0, 1), got {level}")
            upper = stats.beta.ppf(level, hits + 1.0, np.maximum(counts - hits, 1e-12))
            rates = np.where(counts == 0, 0.0, np.where(hits >= counts, 1.0, upper))  # empty bins: no evidence
        if method in ("envelope", "upper"):
            rates = np.maximum.accumulate(rates[::-1])[::-1]   # non-increasing with confidence
        else:
            used = counts > 0
            fitted = isotonic_regression(rates[used], weights=counts[used].astype(np.float64),
                                         increasing=False).x
            rates = np.interp(np.arange(rates.size), np.flatnonzero(used), fitted)
        return cls(kind, tuple(float(e) for e in edges), tuple(float(np.clip(r, 0.0, 1.0)) for r in rates),
                   int(score.size), source, tuple(int(c) for c in counts), tuple(int(round(h)) for h in hits))

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "edges": list(self.edges), "rates": list(self.rates),
             "samples": self.samples, "source": self.source}
        if self.counts is not None:
            d["counts"] = list(self.counts)
        if self.hits is not None:
            d["hits"] = list(self.hits)
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DisagreementProfile":
        try:
            d = json.loads(Path(path).read_text())
            return cls(d["kind"], tuple(d["edges"]), tuple(d["rates"]), int(d["samples"]), d.get("source", ""),
                       _ints(d.get("counts")), _ints(d.get("hits")))
        except FileNotFoundError as exc:
            raise ValueError(f"profile {path}: no such file (make one with `edgecloud control profile`)") from exc
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"profile {path}: not a disagreement profile ({exc})") from exc


def _ints(values) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(v) for v in values)


def score_shift_pvalue(profile: DisagreementProfile, score: np.ndarray) -> float:
    """p-value of a two-sample chi-square test: do the window's scores fall into the profile's
    bins as the validation scores did? Why: the profile's curve was measured on validation, so
    where the scores show no shift the validation labels are evidence on ``r`` too; where they
    do (noise, blur, a class mix all move the scores), only the window's own labels are. A
    profile without ``counts`` (older files) is taken as equal-count bins of ``samples``."""
    score = np.asarray(score, dtype=np.float64)
    k = len(profile.rates)
    if score.size == 0:
        return 1.0
    window = np.bincount(profile.bin_of(score), minlength=k).astype(np.float64)
    valid = (np.asarray(profile.counts, dtype=np.float64) if profile.counts is not None
             else np.full(k, profile.samples / k))
    both = window + valid
    used = both > 0
    n, m = window.sum(), valid.sum()
    if used.sum() < 2 or m <= 0:
        return 1.0
    e_w, e_v = both[used] * n / (n + m), both[used] * m / (n + m)
    stat = float((((window[used] - e_w) ** 2) / e_w).sum() + (((valid[used] - e_v) ** 2) / e_v).sum())
    return float(stats.chi2.sf(stat, int(used.sum()) - 1))


def validation_evidence(profile: DisagreementProfile) -> tuple[float, float]:
    """The validation labels as evidence on ``r``: (disagreements, the profile's expected count
    over the same samples). The monotone envelope makes the mass >= the hits, so pooled with
    them ``r`` leans low only as far as the envelope lifted noisy bins."""
    if profile.counts is None or profile.hits is None:
        raise ValueError("profile: no per-bin counts and hits (made by an older `edgecloud control "
                         "profile`); make it again to pool its validation labels")
    return float(sum(profile.hits)), float(np.dot(profile.counts, profile.rates))


def scale_upper(disagreements: float, mass: float, delta: float) -> float:
    """One-sided (1 - delta) upper bound on ``r`` when ``disagreements`` ~ Poisson(r * mass)
    (the exact Garwood bound; a sum of Bernoullis is less dispersed than the Poisson, so the
    bound is conservative). No labelled mass: unbounded."""
    if mass <= 0:
        return float("inf")
    return float(0.5 * stats.chi2.ppf(1.0 - delta, 2.0 * (disagreements + 1.0)) / mass)


def scale_upper_exact(disagree: np.ndarray, probs: np.ndarray, delta: float) -> float:
    """One-sided (1 - delta) upper bound on ``r`` when labelled sample i disagrees with
    probability min(1, r * probs[i]): the largest r under which the observed count or fewer is
    still at least delta likely (the Poisson-binomial tail, exact, by dynamic programming).
    Tighter than :func:`scale_upper` where the probabilities are large (samples next to the
    threshold disagree ~40 % of the time: a Bernoulli's variance p(1 - p), not the Poisson's p).
    A disagreement where the profile says 0 refutes the model: then the Poisson bound."""
    probs = np.asarray(probs, dtype=np.float64)
    hit = np.asarray(disagree, dtype=bool)
    k = int(hit.sum())
    if probs.sum() <= 0:
        return float("inf")
    if (hit & (probs <= 0)).any():
        return scale_upper(k, float(probs.sum()), delta)
    q = probs[probs > 0]
    if k >= q.size:
        return float("inf")  # every sample that could disagree did: nothing bounds r

    def cdf(r: np.ndarray) -> np.ndarray:  # P(X <= k | r) for each r
        p = np.clip(r[:, None] * q[None, :], 0.0, 1.0)
        pmf = np.zeros((r.size, k + 1))
        pmf[:, 0] = 1.0
        for j in range(q.size):   # add sample j; counts above k are never needed
            pj = p[:, j:j + 1]
            pmf[:, 1:] = pmf[:, 1:] * (1.0 - pj) + pmf[:, :-1] * pj
            pmf[:, 0] *= 1.0 - pj[:, 0]
        return pmf.sum(axis=1)

    lo, hi = 0.0, 1.0 / float(q.min())  # at 1 / min q every p is 1: P(X <= k) = 0
    start = min(hi, 4.0 * scale_upper(k, float(q.sum()), delta) + 1.0)  # the Poisson bound is wider
    if cdf(np.array([start]))[0] < delta:
        hi = start
    for _ in range(4):                   # four rounds of a 32-point grid
        grid = np.linspace(lo, hi, 33)
        inside = np.flatnonzero(cdf(grid) >= delta)
        top = int(inside.max()) if inside.size else 0
        lo, hi = float(grid[top]), float(grid[min(top + 1, 32)])
    return hi


def predictive_upper(mass_at: np.ndarray, square_at: np.ndarray, n: int, hits: float, mass: float,
                     delta: float, meet_window: int, draws: int = 256) -> np.ndarray:
    """(1 - delta) quantile of the disagreement share a window of ``meet_window`` samples will
    show, per threshold: the uncertainty about ``r`` and the window's sampling scatter in one
    predictive distribution, instead of a bound on each stacked (which asks both to go wrong
    at once before a window misses, i.e. far more than 1 - delta).

    ``r`` ~ Gamma(hits + 1, mass) (the flat-prior posterior of a Poisson rate, whose 1 - delta
    quantile is Garwood's bound); given r, the window's share ~ Normal(r m, (r m - r^2 s) / W)
    with m = ``mass_at`` / n and s = ``square_at`` / n (sums of the profile's rates and their
    squares over the window's exits). Mixed over ``draws`` quantiles of r; the quantile by
    bisection, every threshold at once."""
    mass_at = np.asarray(mass_at, dtype=np.float64)
    if mass <= 0:
        return np.where(mass_at > 0, 1.0, 0.0)
    r = stats.gamma.ppf((np.arange(draws) + 0.5) / draws, hits + 1.0) / mass   # [R]
    m = mass_at[:, None] / n
    s = np.asarray(square_at, dtype=np.float64)[:, None] / n
    mean = np.minimum(r[None, :] * m, 1.0)                                     # [T, R]
    sd = np.sqrt(np.maximum(r[None, :] * m - r[None, :] ** 2 * s, 0.0) / meet_window)
    lo = np.zeros(mass_at.shape)
    hi = np.ones(mass_at.shape)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (mid[:, None] - mean) / sd
        cdf = np.where(sd > 0, stats.norm.cdf(z), (mid[:, None] >= mean).astype(np.float64)).mean(axis=1)
        below = cdf < 1.0 - delta
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return np.where(mass_at > 0, hi, 0.0)


def profile_estimate(window: WindowData, kind: PolicyKind, thresholds, profile: DisagreementProfile,
                     *, delta: float = 0.05, band: int = 0, exact: bool = False,
                     prior: tuple[float, float] | None = None, predict: int = 0,
                     exit_factor: float = 1.0) -> Estimates:
    """D(t) at every threshold from the profile over the window's scores, rescaled by ``r``:
    the estimate with r's point estimate, the bound with its (1 - delta) upper bound. The bound
    is on the EXPECTED share given the window's scores; the window's realised share scatters
    around it by sampling (``meet_window`` in the controller keeps a margin for that).

    ``band`` > 0: ``r`` from the shadowed samples and only the ``band`` most confident offloaded
    ones (those next to the threshold), where a drift that raises the curve unevenly shows first;
    0: from every labelled sample. ``exact``: r's bound from :func:`scale_upper_exact` (the
    labelled samples' own Poisson-binomial law) instead of Garwood's Poisson bound. ``prior``:
    (disagreements, mass) of earlier evidence on the same ``r`` (the profile's validation labels,
    :func:`validation_evidence`), pooled with the window's; Poisson bound only. ``predict`` > 0:
    the bound is instead :func:`predictive_upper` for windows of that many samples (it then
    holds the sampling margin too). ``exit_factor``: the exits' rates are this many times what
    ``r`` times the profile says (a shift that raises the confident part of the curve more than
    the labelled band, where ``r`` is measured)."""
    if exact and (prior is not None or predict > 0):
        raise ValueError("profile_estimate: the exact bound takes neither prior evidence nor predict")
    if profile.kind != kind:
        raise ValueError(f"profile is for policy {profile.kind!r}, the exit uses {kind!r}")
    t = as_threshold_array(thresholds)
    n = window.n
    if n == 0:
        return empty_estimates(t)
    key, order, k = ranked(window, kind, t)
    c = profile(window.score)
    # expected disagreeing exits at r = 1 (times the shift's excess on the exits)
    mass_at = exit_factor * np.concatenate([[0.0], np.cumsum(c[order])])[k]
    labelled = ~np.isnan(window.disagree)
    if band > 0:
        off = labelled & ~window.exited
        if off.sum() > band:
            nearest = np.flatnonzero(off)[np.argsort(-key[off], kind="stable")]
            labelled = labelled & window.exited
            labelled[nearest[:band]] = True
    hits = float((window.disagree[labelled] > 0.5).sum())
    mass = float(c[labelled].sum())
    if prior is not None:
        hits, mass = hits + prior[0], mass + prior[1]
    r_hat = hits / mass if mass > 0 else 1.0
    if predict > 0:
        square_at = exit_factor ** 2 * np.concatenate([[0.0], np.cumsum(c[order] ** 2)])[k]
        upper = predictive_upper(mass_at, square_at, n, hits, mass, delta, predict)
    else:
        if exact:
            r_up = scale_upper_exact(window.disagree[labelled] > 0.5, c[labelled], delta)
        else:
            r_up = scale_upper(hits, mass, delta)
        with np.errstate(invalid="ignore"):
            upper = np.where(mass_at > 0, np.minimum(r_up * mass_at / n, 1.0), 0.0)
    q = np.clip(r_hat * exit_factor * c[order], 0.0, 1.0)
    var_at = np.concatenate([[0.0], np.cumsum(q * (1.0 - q))])[k] / n
    return Estimates(t, n, k, r_hat * mass_at / n, upper, sample_var=var_at, predictive=predict > 0)


def sampling_margin(agreement: float, meet_window: int, delta: float,
                    sample_var: np.ndarray | None = None) -> np.ndarray | float:
    """How far above the target a window's *expected* agreement must sit for a window of
    ``meet_window`` samples to meet the target with probability ~(1 - delta): the normal
    quantile times the standard deviation of a window's disagreement share. Without a model,
    the binomial at the target (the most a share near it can scatter); with the per-sample
    variance the profile knows at each threshold (sum of p(1 - p) over the exits, smaller: most
    exits are near-certain), that."""
    if meet_window <= 0:
        return 0.0
    z = float(stats.norm.ppf(1.0 - delta))
    if sample_var is not None:
        return z * np.sqrt(np.maximum(np.asarray(sample_var, dtype=np.float64), 0.0) / meet_window)
    eps = max(0.0, 1.0 - agreement)
    return float(z * np.sqrt(eps * (1.0 - eps) / meet_window))


__all__ = ["DisagreementProfile", "predictive_upper", "profile_estimate", "sampling_margin", "scale_upper",
           "scale_upper_exact", "score_shift_pvalue", "validation_evidence"]
