"""Disagreement with the cloud, estimated for every candidate threshold at once (pure numerics).

What is estimated. For a window of ``n`` samples and a candidate threshold ``t``, the system's
disagreement with the cloud is ``D(t) = (1/n) * #{samples that would exit at t AND whose edge
answer differs from the cloud's}`` (an offloaded sample agrees by definition). The samples that
would exit at ``t`` fall in two groups:

* **offloaded** then (they did not exit at the threshold in force) but on the exit side of ``t``:
  the cloud answered them, so their ``disagree`` is known exactly (weight 1);
* **exited** then and on the exit side of ``t``: a label exists only if the sample was shadowed,
  which happened with its own probability ``p_i`` (``Observations.shadow_prob``), so a shadowed
  one is weighted ``1/p_i`` (Horvitz–Thompson). ``E[S_i / p_i] = 1`` for every sample, whatever
  its score, so the sum is unbiased for any mix of shadow probabilities, including
  probabilities that change from step to step or depend on the score.

Target of inference. The bounds are *design-based*: the window's samples, their scores and their
true disagreements are held fixed, and the only randomness is our own shadow coin flips. So the
bound covers the disagreement **of the window itself**, with no assumption that the stream is
stationary or i.i.d. (drift inside the window is fine). Using it for the *next* samples assumes
the next samples look like the window: that part is not guaranteed.

Cloud failures (``disagree`` NaN where a label was due). Point estimate: the labelled samples of
a group (offloaded / shadowed) are re-weighted by the group's answer rate in the window (exact
Horvitz–Thompson when nothing failed; consistent, not exactly unbiased, if failures are missing
at random). Bounds: a failed label counts as a disagreement (worst case), so the bound stays
valid whatever the failures hide.

Bounds (upper bounds on ``D(t)``; ``1 - U`` is the agreement's lower bound):

``clopper-pearson`` (default). Offloaded part: known. Exited part: let ``K`` be the number of
disagreeing exited samples at ``t`` and ``x`` the shadowed ones among them. Each disagreeing
sample is shadowed independently with ``p_i >= p_min`` (the smallest shadow probability among the
exited samples at ``t``), so ``x`` is stochastically at least ``Binomial(K, p_min)``; the bound
is the largest ``K`` with ``P(Binomial(K, p_min) <= x) > delta`` (exact binomial tail inversion,
the Clopper–Pearson construction with the number of trials unknown and ``p`` known), capped at
the exited samples not known to agree. Exact when ``p`` is constant over the window; when it
varies, using ``p_min`` is conservative (never anti-conservative), which is why the controller
quantises its shadow rate to a few levels. Caveat: the argument treats which samples exited as
fixed; when the controller moves the threshold in response to the same window's shadow draws,
``K`` itself depends on those draws and the fixed-``K`` tail is only approximate. Use
``anytime`` when that matters.

``anytime``. ``Y_i = d_i (1 - S_i / p_i)`` summed over the exited samples is ``K - HT``, a
martingale in the shadow draws even when the exits adapt to earlier draws; ``Y_i <= 1`` and its
conditional variance is at most ``d_i (1 - p_min) / p_min``. Bennett's inequality makes
``exp(lam * sum Y - psi(lam) * c * K)`` (``psi(lam) = e^lam - 1 - lam``, ``c = (1-p_min)/p_min``) a
non-negative supermartingale, and Ville's inequality gives, for each fixed ``lam``,
``K <= (HT + log(1/d)/lam) / (1 - c psi(lam)/lam)`` at every time at once with probability
``>= 1 - d`` (Howard, Ramdas, McAuliffe & Sekhon, "Time-uniform Chernoff bounds via
non-negative supermartingales", Probability Surveys 17, 2020). We take the best of a fixed grid
of ``lam`` values (union bound over the grid) and, because a sliding window is a new martingale at
every look, spend ``delta`` over the controller's looks by geometric epochs: look ``k`` in epoch
``j = floor(log2 k)`` gets ``delta / (2^j (j+1) (j+2))`` (sums to ``delta`` over all looks; the
stitching schedule of Howard et al., Ann. Statist. 49(2), 2021). Valid simultaneously over every
step of the controller, and under adaptive exits; the price is a wider bound that keeps widening
like ``sqrt(log k)``: every step spends some ``delta``, so step no more often than needed. At the
measured operating point (4,000-sample window, 2,852 exits, 58 disagreeing, 200 shadows) the
disagreement bound is 3.2 % with ``clopper-pearson``, 7.0 % with ``anytime`` at the first look and
14 % at the 1,000th (true 1.44 %); 800 shadows per window give 2.0 %, 3.1 % and 4.8 %.

Curve memory (optional, ``estimate(..., memory=...)``). The exited part of the bound can use the
disagreement *rate* on the exit side of each threshold, bounded exactly on a longer memory and
applied to the window's exit count: tighter (several windows of labels), but model-based, see
:func:`memory_count_upper` (assumption) and :func:`curve_rose` (its check, which falls back to
the bound above).

Scanning thresholds. The candidates are ordered from the fewest exits to the most and tested in
that order, stopping at the first one whose bound fails (fixed-sequence testing, as in
Learn-then-Test, Angelopoulos et al. 2021, and "Fast yet Safe", Jazbec et al. 2024). Because
``D(t)`` only grows with more exits, the first false hypothesis is the only one that can cause an
error, so the chosen threshold meets the target with probability ``>= 1 - delta`` without any
multiplicity correction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import special, stats

from edgecloud.exits import PolicyKind

BoundKind = Literal["clopper-pearson", "anytime"]

#: Bennett/Ville bound: lam = 2^(-j/2), j = 1..16 (0.71 .. 0.0039), union-bounded.
ANYTIME_LAMBDAS = 2.0 ** (-np.arange(1, 17) / 2.0)


@dataclass(frozen=True)
class WindowData:
    """The window's samples (one row each), as :class:`~edgecloud.control.controller.Observations`
    reports them."""

    score: np.ndarray
    exited: np.ndarray
    shadowed: np.ndarray
    shadow_prob: np.ndarray
    disagree: np.ndarray

    @classmethod
    def of(cls, score, exited, shadowed, shadow_prob, disagree) -> "WindowData":
        exited = np.asarray(exited, dtype=bool)
        return cls(
            score=np.asarray(score, dtype=np.float64),
            exited=exited,
            shadowed=np.asarray(shadowed, dtype=bool) & exited,
            shadow_prob=np.asarray(shadow_prob, dtype=np.float64),
            disagree=np.asarray(disagree, dtype=np.float64),
        )

    @property
    def n(self) -> int:
        return int(self.score.shape[0])


@dataclass(frozen=True)
class Estimates:
    """Per-candidate estimates; ``thresholds`` uses NaN for ``None`` (the exit answers all)."""

    thresholds: np.ndarray
    n: int
    exits: np.ndarray           # samples of the window that exit at each threshold
    disagree: np.ndarray        # D(t), unbiased estimate (share of all n)
    disagree_upper: np.ndarray  # (1 - delta) upper bound on D(t)
    sample_var: np.ndarray | None = None  # per-sample variance of the disagreement indicator at
    # each threshold, where a model knows it (the profile); None: the binomial at the target
    predictive: bool = False    # disagree_upper already holds a window's sampling scatter

    @property
    def exit_share(self) -> np.ndarray:
        return self.exits / self.n if self.n else np.full(self.exits.shape, np.nan)

    @property
    def agreement(self) -> np.ndarray:
        return 1.0 - self.disagree

    @property
    def agreement_lower(self) -> np.ndarray:
        return 1.0 - self.disagree_upper

    def _among_exits(self, share: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            out = 1.0 - share * self.n / self.exits
        return np.where(self.exits > 0, out, np.nan)

    @property
    def exit_agreement(self) -> np.ndarray:
        return self._among_exits(self.disagree)

    @property
    def exit_agreement_lower(self) -> np.ndarray:
        return self._among_exits(self.disagree_upper)


def confidence_key(kind: PolicyKind, score: np.ndarray) -> np.ndarray:
    """A key that grows with confidence (exits happen from the top of it)."""
    score = np.asarray(score, dtype=np.float64)
    return -score if kind == "entropy" else score


def as_threshold_array(thresholds) -> np.ndarray:
    """Thresholds as floats, ``None`` as NaN."""
    if np.isscalar(thresholds) or thresholds is None:
        thresholds = [thresholds]
    return np.array([np.nan if t is None else float(t) for t in thresholds], dtype=np.float64)


def exits_at(kind: PolicyKind, score: np.ndarray, threshold: float | None) -> np.ndarray:
    """The policy's own rule (mirrors :mod:`edgecloud.exits`)."""
    score = np.asarray(score, dtype=np.float64)
    if threshold is None or (isinstance(threshold, float) and math.isnan(threshold)):
        return np.ones(score.shape, dtype=bool)
    return score < threshold if kind == "entropy" else score >= threshold


def exit_counts(kind: PolicyKind, key_sorted: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many samples exit at each threshold, from the ascending confidence keys."""
    n = key_sorted.shape[0]
    t = np.nan_to_num(thresholds, nan=0.0)
    if kind == "entropy":   # H < t  <=>  -H > -t
        counts = n - np.searchsorted(key_sorted, -t, side="right")
    else:                   # p >= t
        counts = n - np.searchsorted(key_sorted, t, side="left")
    return np.where(np.isnan(thresholds), n, counts).astype(np.int64)


def most_conservative(kind: PolicyKind) -> float:
    """The threshold with (almost) no exits: H < 0 never holds; p >= 1 only at saturation."""
    return 0.0 if kind == "entropy" else 1.0


def candidate_thresholds(kind: PolicyKind, score: np.ndarray, max_candidates: int = 256) -> np.ndarray:
    """Distinct score quantiles as thresholds, from the fewest exits to the most.

    Element 0 is :func:`most_conservative`; then thresholds exiting about ``n/G, 2n/G, ..., n``
    of the window. Entropy thresholds sit half-way to the next distinct score so that a float32
    comparison in the data plane exits exactly the same samples as here.
    """
    key = np.sort(confidence_key(kind, score))[::-1]          # most confident first
    n = key.shape[0]
    out = [most_conservative(kind)]
    if n == 0:
        return np.array(out)
    g = min(max_candidates, n)
    ranks = np.unique(np.ceil(n * np.arange(1, g + 1) / g).astype(np.int64) - 1)
    values = np.unique(key[ranks])[::-1]                       # distinct, most confident first
    if kind == "max_prob":
        out += [float(v) for v in values if v < 1.0]
    else:
        distinct = np.unique(-key)                             # ascending entropies
        nxt = np.searchsorted(distinct, -values, side="right")
        for s, j in zip(-values, nxt):
            upper = distinct[j] if j < distinct.shape[0] else s + max(1e-6, 1e-6 * abs(s))
            out.append(float(0.5 * (s + upper)))
    return np.array(out, dtype=np.float64)


def _prefix(order: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sums over the k most confident samples, for k = 0..n."""
    return np.concatenate([[0.0], np.cumsum(values[order], dtype=np.float64)])


def _answer_rate(labelled: np.ndarray, group: np.ndarray) -> float:
    return float(labelled[group].mean()) if group.any() else 1.0


def binomial_count_upper(x: np.ndarray, cap: np.ndarray, p: np.ndarray, delta: float) -> np.ndarray:
    """Largest ``K`` in ``[x, cap]`` with ``P(Binomial(K, p) <= x) > delta`` (vectorised).

    The CDF falls as ``K`` grows, so a bisection over integers finds it; ``x`` itself always
    qualifies (the CDF is 1 there). ``scipy.special.bdtr`` is the binomial CDF through the
    regularised incomplete beta function, ``I_{1-p}(K - x, x + 1)``: the same beta tail the
    Clopper–Pearson interval inverts.
    """
    x = np.asarray(x, dtype=np.int64)
    lo = x.copy()
    hi = np.maximum(np.asarray(cap, dtype=np.int64), lo)
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    while np.any(lo < hi):
        mid = (lo + hi + 1) // 2
        ok = special.bdtr(x, mid, p) > delta
        ok |= lo >= hi
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid - 1)
        lo = np.minimum(lo, hi)
    return lo


def anytime_delta(delta: float, looks: int) -> float:
    """``delta`` spent on look ``k`` (1-based): ``delta / (2^j (j+1)(j+2))``, ``j = floor(log2 k)``."""
    j = int(math.floor(math.log2(max(1, looks))))
    return delta / (2.0 ** j * (j + 1) * (j + 2))


def bennett_count_upper(
    ht: np.ndarray, cap: np.ndarray, p_min: np.ndarray, delta: float,
    lambdas: np.ndarray = ANYTIME_LAMBDAS,
) -> np.ndarray:
    """Ville/Bennett upper bound on the disagreeing count from its HT estimate (see module doc)."""
    c = (1.0 - p_min) / np.maximum(p_min, 1e-300)
    log_term = math.log(len(lambdas) / delta)
    best = np.full(ht.shape, np.inf)
    for lam in lambdas:
        slope = c * math.expm1(lam) / lam - c          # c psi(lam) / lam
        denom = 1.0 - slope
        with np.errstate(divide="ignore", invalid="ignore"):
            bound = np.where(denom > 0, (ht + log_term / lam) / denom, np.inf)
        best = np.minimum(best, bound)
    return np.minimum(np.floor(best + 1e-9), cap)


def empty_estimates(t: np.ndarray) -> Estimates:
    """Estimates of an empty window: nothing known at any threshold."""
    nan = np.full(t.shape, np.nan)
    return Estimates(t, 0, np.zeros(t.shape, dtype=np.int64), nan, nan.copy())


def ranked(window: WindowData, kind: PolicyKind, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The window's confidence keys, its samples most confident first, and how many exit at each
    threshold: prefix sums over that order at those counts give any per-threshold total."""
    key = confidence_key(kind, window.score)
    order = np.argsort(-key, kind="stable")
    return key, order, exit_counts(kind, np.sort(key), t)


def estimate(
    window: WindowData,
    kind: PolicyKind,
    thresholds,
    *,
    delta: float = 0.05,
    bound: BoundKind | None = "clopper-pearson",
    looks: int = 1,
    memory: WindowData | None = None,
    check_level: float = 0.05,
) -> Estimates:
    """Estimate and (1 - delta) upper bound of ``D(t)`` at every threshold (vectorised).

    ``looks``: how many times the controller has looked so far (``anytime`` only).
    ``bound=None``: the point estimate only (upper bound NaN), for cheap look-ups.
    ``memory``: a longer stretch of the stream ending with this window (``clopper-pearson``
    only): unless :func:`curve_rose` (at ``check_level``) says the disagreement curve rose in
    this window, the exited part of the bound uses the memory's exit-side disagreement *rate*
    (:func:`memory_count_upper`: model-based, with a stated assumption). The check reads only
    offloaded samples' labels, not the shadow draws, so whichever bound it selects keeps its own
    level ``delta`` (no split). The point estimate is the window's own either way (unbiased).
    """
    t = as_threshold_array(thresholds)
    n = window.n
    if n == 0:
        return empty_estimates(t)
    key, order, k = ranked(window, kind, t)

    ex, sh = window.exited, window.shadowed
    off = ~ex
    labelled = ~np.isnan(window.disagree)
    d1 = labelled & (window.disagree > 0.5)
    p = np.where(ex, window.shadow_prob, 1.0)
    r_off, r_sh = _answer_rate(labelled, off), _answer_rate(labelled, sh)

    def at(values: np.ndarray) -> np.ndarray:
        return _prefix(order, values.astype(np.float64))[k]

    a_known = at(off & d1)
    a_failed = at(off & ~labelled)
    with np.errstate(divide="ignore", invalid="ignore"):
        ht = at(np.where(sh & d1, 1.0 / p, 0.0))
        ht_pess = at(np.where(sh & (d1 | ~labelled), 1.0 / p, 0.0))
    n_ex = at(ex)
    m = at(sh)
    x = at(sh & (d1 | ~labelled))

    a_hat = a_known / r_off if r_off > 0 else np.where(at(off) > 0, np.nan, 0.0)
    b_hat = ht / r_sh if r_sh > 0 else np.where(n_ex > 0, np.nan, 0.0)
    d_hat = (a_hat + b_hat) / n

    p_run = np.concatenate([[1.0], np.minimum.accumulate(np.where(ex, p, np.inf)[order])])
    p_min = np.where(np.isfinite(p_run[k]), p_run[k], 1.0)
    cap = (n_ex - (m - x)).astype(np.int64)
    if bound is None:
        return Estimates(t, n, k, d_hat, np.full(t.shape, np.nan))
    if bound == "clopper-pearson":
        if memory is not None and memory.n > n and not curve_rose(memory, n, kind, check_level):
            k_up = memory_count_upper(memory, kind, t, n_ex, x.astype(np.int64), cap, delta=delta)
        else:
            k_up = binomial_count_upper(x.astype(np.int64), cap, p_min, delta)
    elif bound == "anytime":
        k_up = bennett_count_upper(ht_pess, cap, p_min, anytime_delta(delta, looks))
    else:
        raise ValueError(f"unknown bound {bound!r}; use 'clopper-pearson' or 'anytime'")
    upper = (a_known + a_failed + k_up) / n
    return Estimates(t, n, k, d_hat, np.minimum(upper, 1.0))


def memory_count_upper(
    memory: WindowData, kind: PolicyKind, t: np.ndarray, n_ex: np.ndarray, x: np.ndarray,
    cap: np.ndarray, *, delta: float,
) -> np.ndarray:
    """Upper bound on the window's disagreeing exits at each threshold, from a longer memory.

    Why: ~100 shadows per window leave the exact bound 2-3x the truth, while the rate at which
    samples on the exit side of a threshold disagree changes more slowly than the window's
    score distribution. So that rate is bounded on the memory (``M`` samples, several windows:
    several times the shadows, and every offloaded sample of the memory is labelled for free) and
    applied to the window's own exit count.

    The memory part is exact and design-based: at threshold ``t`` the memory holds ``N_m``
    samples on the exit side of ``t``; the offloaded-then ones among them are labelled (``A_m``
    disagree; a failed label counts as a disagreement), and the exited-then ones' disagreeing
    count is bounded by the same Clopper-Pearson construction as the window's (``K_m``, level
    ``delta``, smallest shadow probability among them). So ``rho = (A_m + K_m) / N_m`` bounds the
    memory's exit-side disagreement rate at ``t`` with probability ``>= 1 - delta`` over the
    memory's shadow draws.

    ASSUMPTION (not guaranteed): the window's exited samples on the exit side of ``t`` disagree at
    a rate no higher than the memory's samples on the exit side of ``t`` (the curve did not rise
    over the memory's span and the window's exits are not less confident than the memory's exit
    side). Then the window's count is at most ``floor(n_ex * rho)``, returned capped at ``cap``
    and at least ``x`` (the disagreements seen). :func:`estimate` checks the first half of the
    assumption with :func:`curve_rose` and otherwise uses the window's own bound.
    """
    key = confidence_key(kind, memory.score)
    order = np.argsort(-key, kind="stable")
    k = exit_counts(kind, np.sort(key), t)
    ex, sh = memory.exited, memory.shadowed
    labelled = ~np.isnan(memory.disagree)
    d1 = labelled & (memory.disagree > 0.5)
    p = np.where(ex, memory.shadow_prob, 1.0)

    def at(values: np.ndarray) -> np.ndarray:
        return _prefix(order, values.astype(np.float64))[k]

    n_ex_m = at(ex)
    m_m = at(sh)
    x_m = at(sh & (d1 | ~labelled))
    cap_m = (n_ex_m - (m_m - x_m)).astype(np.int64)
    p_run = np.concatenate([[1.0], np.minimum.accumulate(np.where(ex, p, np.inf)[order])])
    p_min = np.where(np.isfinite(p_run[k]), p_run[k], 1.0)
    k_m = binomial_count_upper(x_m.astype(np.int64), cap_m, p_min, delta)
    a_m = at(~ex & (d1 | ~labelled))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(k > 0, (a_m + k_m) / k, 1.0)
    k_model = np.floor(n_ex * rho + 1e-9).astype(np.int64)
    return np.maximum(np.minimum(k_model, np.asarray(cap, np.int64)), np.asarray(x, np.int64))


def curve_rose(memory: WindowData, n_recent: int, kind: PolicyKind, level: float = 0.05,
               bins: int = 16) -> bool:
    """Did the disagreement-by-score curve rise in the last ``n_recent`` samples of ``memory``?

    Uses the free labels only: offloaded samples (the cloud answered them all). The older part
    of the memory gives a disagreement rate per score bin (``bins`` quantile bins of its
    offloaded scores); the recent offloaded samples' expected disagreeing count under those
    rates is ``E = sum r_b(i)`` (post-stratified, so a shift of the score distribution alone
    does not trigger it), with variance ``V = sum r (1 - r)``; the curve "rose" when the observed
    count exceeds ``E`` by more than the one-sided normal quantile at ``level`` times ``sqrt(V)``
    (``V`` adds the older rates' own sampling variance). Bins: 16 (a rate that varies inside a
    bin lets a pure score shift raise false alarms; a false alarm only falls back to the
    window's own exact bound, so it costs energy, never coverage).

    What it can see: the curve above the threshold (where labels are free). The assumption it
    supports is that a rise of the curve below the threshold shows above it too.
    """
    old, new = slice(0, memory.n - n_recent), slice(memory.n - n_recent, memory.n)
    lab = ~memory.exited & ~np.isnan(memory.disagree)
    key = confidence_key(kind, memory.score)
    k_old, d_old = key[old][lab[old]], memory.disagree[old][lab[old]]
    k_new, d_new = key[new][lab[new]], memory.disagree[new][lab[new]]
    if k_old.size < bins or k_new.size == 0:
        return False
    edges = np.quantile(k_old, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    b_old, b_new = np.searchsorted(edges, k_old), np.searchsorted(edges, k_new)
    n_old = np.maximum(np.bincount(b_old, minlength=bins), 1)
    rate = np.bincount(b_old, weights=d_old, minlength=bins) / n_old
    r = rate[b_new]
    n_new = np.bincount(b_new, minlength=bins)
    e = float(r.sum())
    # Var(observed) + Var(expected): the older rates are estimates too
    v = float((r * (1.0 - r)).sum() + (n_new ** 2 * rate * (1.0 - rate) / n_old).sum())
    z = stats.norm.isf(level)
    return float(d_new.sum()) > e + z * math.sqrt(max(v, 1e-12))


def fixed_sequence(passes: np.ndarray) -> int:
    """Index of the last candidate before the first failure (-1: the first one fails)."""
    passes = np.asarray(passes, dtype=bool)
    fails = np.flatnonzero(~passes)
    return int(fails[0]) - 1 if fails.size else int(passes.shape[0]) - 1


def mixture_quantile(
    lat_exit: np.ndarray, lat_off: np.ndarray, offload_share: np.ndarray, q: float = 0.99
) -> np.ndarray:
    """The ``q`` quantile of latency if a share ``f`` of samples were offloaded: the mixture
    ``(1-f) F_exit + f F_offload`` of the window's two empirical distributions (NaN where a
    group with positive weight has no data)."""
    f = np.asarray(offload_share, dtype=np.float64)
    e, o = np.sort(np.asarray(lat_exit, float)), np.sort(np.asarray(lat_off, float))
    values = np.unique(np.concatenate([e, o]))
    if values.size == 0:
        return np.full(f.shape, np.nan)
    fe = np.searchsorted(e, values, side="right") / e.size if e.size else np.zeros(values.shape)
    fo = np.searchsorted(o, values, side="right") / o.size if o.size else np.zeros(values.shape)
    mix = (1.0 - f)[:, None] * fe[None, :] + f[:, None] * fo[None, :]
    idx = np.argmax(mix >= q - 1e-12, axis=1)
    out = values[idx]
    missing = ((f < 1.0) & (e.size == 0)) | ((f > 0.0) & (o.size == 0))
    return np.where(missing, np.nan, out)


__all__ = [
    "ANYTIME_LAMBDAS", "BoundKind", "Estimates", "WindowData", "anytime_delta",
    "bennett_count_upper", "binomial_count_upper", "candidate_thresholds", "confidence_key",
    "curve_rose",
    "estimate", "exit_counts", "exits_at", "fixed_sequence", "memory_count_upper", "mixture_quantile",
    "most_conservative",
]
