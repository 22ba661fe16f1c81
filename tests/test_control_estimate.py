"""Shadow-sampling estimates and bounds (edgecloud.control.estimate): unbiased, covering, vectorised.

Synthetic populations with known truth: scores uniform on [0, 2] nats; a sample disagrees with
the cloud with probability ``level * (score / 2)^2`` (confident samples rarely disagree). The
threshold in force exits score < T0; exited samples are shadowed with their own probability.
Design-based checks hold the population fixed and redraw only the shadow coin flips, which is
exactly the randomness the bounds claim to cover.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from edgecloud.control.estimate import (
    WindowData,
    anytime_delta,
    binomial_count_upper,
    candidate_thresholds,
    curve_rose,
    estimate,
    exit_counts,
    exits_at,
    fixed_sequence,
    mixture_quantile,
)

T0 = 1.0
LEVEL = 0.3


def population(rng: np.random.Generator, n: int, level: float = LEVEL):
    s = rng.uniform(0.0, 2.0, n)
    d = (rng.random(n) < level * (s / 2.0) ** 2).astype(float)
    return s, d


def stratified_p(s: np.ndarray) -> np.ndarray:
    """Shadow probability higher near the threshold, lower far from it (varying p)."""
    return np.where(s > 0.7, 0.25, np.where(s > 0.3, 0.08, 0.03))


def shadow_window(rng, s, d, p, kind="entropy", t0=T0, fail=0.0):
    """One window: exits at t0, Bernoulli(p) shadows, labels where known (some may fail)."""
    score = s if kind == "entropy" else 1.0 - s / 2.0
    thr = t0 if kind == "entropy" else 1.0 - t0 / 2.0
    ex = exits_at(kind, score, thr)
    sh = ex & (rng.random(s.shape[0]) < p)
    known = ~ex | sh
    lost = rng.random(s.shape[0]) < fail
    obs = np.where(known & ~lost, d, np.nan)
    return WindowData.of(score, ex, sh, np.where(ex, p, 1.0), obs)


def to_kind(kind: str, t_entropy: np.ndarray) -> np.ndarray:
    return t_entropy if kind == "entropy" else 1.0 - t_entropy / 2.0


CANDS = np.array([0.4, 0.8, 1.0, 1.3, 1.7, 2.5])   # below, at and above T0 (entropy units)


def truth(s, d, t):
    return np.array([np.mean(d * (s < x)) for x in t])


@pytest.mark.parametrize("kind", ["entropy", "max_prob"])
def test_estimate_is_unbiased_with_varying_shadow_probabilities(kind):
    rng = np.random.default_rng(11)
    s, d = population(rng, 2000)
    p = stratified_p(s) * rng.choice([0.5, 1.0], s.shape[0])   # varies by score and at random
    target = truth(s, d, CANDS)
    reps = 900
    est = np.empty((reps, CANDS.size))
    naive = np.empty((reps, CANDS.size))
    for r in range(reps):
        w = shadow_window(rng, s, d, p, kind)
        est[r] = estimate(w, kind, to_kind(kind, CANDS), bound=None).disagree
        if r < 200:   # what forgetting the 1/p weights would give (shows the check has power)
            naive[r] = estimate(WindowData.of(w.score, w.exited, w.shadowed, np.ones_like(p),
                                              w.disagree), kind, to_kind(kind, CANDS),
                                bound=None).disagree
    naive = naive[:200]
    se = est.std(axis=0) / math.sqrt(reps) + 1e-12
    assert np.all(np.abs(est.mean(axis=0) - target) <= 4 * se), (est.mean(axis=0), target, se)
    # below and at T0 every exited sample needs its weight; the naive sum is far off there
    assert np.any(np.abs(naive.mean(axis=0) - target) > 10 * se)


def test_estimate_is_unbiased_for_the_population_disagreement():
    """Redrawing the population too: E[D_hat(t)] = level * t^3 / 24 (t <= 2)."""
    rng = np.random.default_rng(12)
    reps = 1500
    est = np.empty((reps, CANDS.size - 1))
    for r in range(reps):
        s, d = population(rng, 1000)
        w = shadow_window(rng, s, d, stratified_p(s))
        est[r] = estimate(w, "entropy", CANDS[:-1], bound=None).disagree
    expected = LEVEL * CANDS[:-1] ** 3 / 24.0
    se = est.std(axis=0) / math.sqrt(reps)
    assert np.all(np.abs(est.mean(axis=0) - expected) <= 4 * se)


def test_no_failures_and_all_shadowed_give_the_exact_value():
    rng = np.random.default_rng(13)
    s, d = population(rng, 500)
    w = shadow_window(rng, s, d, np.ones_like(s))
    e = estimate(w, "entropy", CANDS, delta=0.05)
    np.testing.assert_allclose(e.disagree, truth(s, d, CANDS))
    np.testing.assert_allclose(e.disagree_upper, truth(s, d, CANDS))   # nothing left unknown


def coverage(bound: str, p_of, delta: float, reps: int, fail: float = 0.0, looks: int = 1):
    """Per-candidate share of repetitions whose bound covers the window's truth (and the same
    for the point estimate). Level 1.0 gives ~100 disagreeing exited samples at T0, enough for an
    exact bound to sit near its level rather than being conservative through discreteness."""
    rng = np.random.default_rng(21)
    s, d = population(rng, 2500, level=1.0)
    p = p_of(s)
    target = truth(s, d, CANDS)
    hit = np.empty((reps, CANDS.size), dtype=bool)
    point = np.empty((reps, CANDS.size), dtype=bool)
    for r in range(reps):
        e = estimate(shadow_window(rng, s, d, p, fail=fail), "entropy", CANDS, delta=delta,
                     bound=bound, looks=looks)
        hit[r] = e.disagree_upper >= target - 1e-12
        point[r] = e.disagree >= target - 1e-12
    return hit.mean(axis=0), point.mean(axis=0)


@pytest.mark.parametrize("bound", ["clopper-pearson", "anytime"])
@pytest.mark.parametrize("design", ["constant", "stratified"])
def test_bound_covers_the_window_disagreement_at_its_rate(bound, design):
    delta, reps = 0.1, 600
    p_of = (lambda s: np.full(s.shape, 0.08)) if design == "constant" else stratified_p
    cov, point_cov = coverage(bound, p_of, delta, reps)
    slack = 3 * math.sqrt(delta * (1 - delta) / reps)
    assert np.all(cov >= 1 - delta - slack), cov
    # the point estimate is no bound: the same check fails for it where labels are needed
    assert np.any(point_cov[:3] < 1 - delta - slack)


def test_clopper_pearson_is_near_its_level_when_p_is_constant():
    """Exact for constant p: coverage is not just 1 (a bound that is always loose would be)."""
    delta, reps = 0.2, 600
    cov, _ = coverage("clopper-pearson", lambda s: np.full(s.shape, 0.1), delta, reps)
    assert cov[2] < 0.95   # at and beyond T0: about 1 - delta, not 1


def test_bound_stays_valid_when_cloud_answers_fail():
    delta, reps = 0.1, 400
    cov, _ = coverage("clopper-pearson", stratified_p, delta, reps, fail=0.2)
    assert np.all(cov >= 1 - delta - 3 * math.sqrt(delta * (1 - delta) / reps))


def joint_coverage(bound: str, reps: int, delta: float) -> float:
    """Share of repetitions in which ten looks at a growing window are all covered."""
    rng = np.random.default_rng(31)
    s, d = population(rng, 3000, level=1.0)
    p = np.full(s.shape, 0.08)
    sizes = np.linspace(300, 3000, 10).astype(int)
    truths = [truth(s[:m], d[:m], CANDS) for m in sizes]
    joint = 0
    for _ in range(reps):
        w = shadow_window(rng, s, d, p)
        ok = True
        for k, (m, target) in enumerate(zip(sizes, truths), start=1):
            part = WindowData.of(w.score[:m], w.exited[:m], w.shadowed[:m], w.shadow_prob[:m],
                                 w.disagree[:m])
            e = estimate(part, "entropy", CANDS, delta=delta, bound=bound, looks=k)
            ok &= bool(np.all(e.disagree_upper >= target - 1e-12))
        joint += ok
    return joint / reps


def test_anytime_bound_covers_every_look_at_once():
    """Looked at continuously, the fixed-time bound loses its level; the anytime one keeps it."""
    delta, reps = 0.1, 150
    slack = 3 * math.sqrt(delta * (1 - delta) / reps)
    assert joint_coverage("anytime", reps, delta) >= 1 - delta - slack
    assert joint_coverage("clopper-pearson", reps, delta) < 1 - delta - slack


def test_anytime_delta_spending_sums_to_delta():
    total = sum(anytime_delta(0.05, k) for k in range(1, 2 ** 16))
    assert total <= 0.05
    assert anytime_delta(0.05, 1) == pytest.approx(0.025)
    assert anytime_delta(0.05, 4) < anytime_delta(0.05, 3)


def test_binomial_count_upper_matches_brute_force():
    x = np.array([0, 1, 3, 5, 0])
    cap = np.array([100, 100, 100, 6, 0])
    p = np.array([0.1, 0.05, 0.2, 0.5, 0.3])
    got = binomial_count_upper(x, cap, p, 0.05)
    for xi, ci, pi, g in zip(x, cap, p, got):
        ok = [k for k in range(xi, ci + 1) if stats.binom.cdf(xi, k, pi) > 0.05]
        assert g == max(ok)


def test_fixed_sequence_stops_at_the_first_failure():
    assert fixed_sequence(np.array([True, True, False, True])) == 1
    assert fixed_sequence(np.array([False, True, True])) == -1
    assert fixed_sequence(np.array([True, True])) == 1


@pytest.mark.parametrize("kind", ["entropy", "max_prob"])
def test_candidates_exit_what_the_float32_policy_exits(kind):
    rng = np.random.default_rng(41)
    s = rng.uniform(0, 2, 2000).astype(np.float32)
    score = (s if kind == "entropy" else (1 - s / 2)).astype(np.float32)
    grid = candidate_thresholds(kind, score, max_candidates=64)
    counts = exit_counts(kind, np.sort(score.astype(np.float64) * (-1 if kind == "entropy" else 1)),
                         grid)
    assert counts[0] == 0 and counts[-1] == score.size and np.all(np.diff(counts) > 0)
    for t, c in zip(grid, counts):
        f32 = (score < np.float32(t)) if kind == "entropy" else (score >= np.float32(t))
        assert int(f32.sum()) == c
        assert int(exits_at(kind, score, float(t)).sum()) == c


def test_mixture_quantile_moves_between_the_two_groups():
    rng = np.random.default_rng(51)
    fast, slow = rng.uniform(0.005, 0.01, 900), rng.uniform(0.1, 0.2, 300)
    q = mixture_quantile(fast, slow, np.array([0.0, 0.005, 0.5, 1.0]))
    assert q[0] == pytest.approx(np.quantile(fast, 0.99), abs=1e-4)
    assert q[1] < 0.011            # 0.5 % slow samples still fit under the 1 % tail
    assert q[2] >= 0.19 and q[3] == pytest.approx(np.quantile(slow, 0.99), abs=1e-3)
    assert np.isnan(mixture_quantile(fast, np.array([]), np.array([0.2]))[0])


# ---- curve memory (estimate(..., memory=...), memory_count_upper, curve_rose) ----------------

def memory_window(rng, n_mem: int, n_win: int, *, level: float = 1.0, rise: float = 1.0,
                  shift: float = 0.0, p: float = 0.08, t_old: float = 0.8):
    """A memory of ``n_mem`` samples ending with a window of ``n_win``: the older part ran at
    threshold ``t_old`` (so its offloaded samples above it are labelled), the window at T0.
    The window's curve is ``rise`` x the older one's; its scores are shifted by ``shift``
    (a change of the score distribution alone)."""
    s = rng.uniform(0.0, 2.0, n_mem)
    s[-n_win:] = 2.0 * (s[-n_win:] / 2.0) ** (1.0 - shift)   # shift > 0: less confident
    q = level * (s / 2.0) ** 2
    q[-n_win:] = np.clip(q[-n_win:] * rise, 0.0, 1.0)
    d = (rng.random(n_mem) < q).astype(float)
    thr = np.full(n_mem, t_old)
    thr[-n_win:] = T0
    ex = s < thr
    sh = ex & (rng.random(n_mem) < p)
    obs = np.where(~ex | sh, d, np.nan)
    mem = WindowData.of(s, ex, sh, np.where(ex, p, 1.0), obs)
    win = WindowData.of(s[-n_win:], ex[-n_win:], sh[-n_win:], mem.shadow_prob[-n_win:],
                        obs[-n_win:])
    return mem, win, s[-n_win:], d[-n_win:]


def test_memory_bound_covers_the_window_when_the_curve_is_stable():
    """Stream i.i.d. (the stated assumption holds in distribution): redraw the stream and the
    shadows; the memory-based bound covers the window's true disagreement at >= 1 - delta."""
    rng = np.random.default_rng(41)
    delta, reps = 0.1, 500
    hit = np.empty((reps, CANDS.size), dtype=bool)
    width = np.zeros((2, CANDS.size))
    for r in range(reps):
        mem, win, s, d = memory_window(rng, 12000, 3000)
        target = truth(s, d, CANDS)
        e = estimate(win, "entropy", CANDS, delta=delta, memory=mem)
        own = estimate(win, "entropy", CANDS, delta=delta)
        hit[r] = e.disagree_upper >= target - 1e-12
        width += np.stack([e.disagree_upper - target, own.disagree_upper - target]) / reps
        np.testing.assert_allclose(e.disagree, own.disagree)   # the point estimate is the window's
    slack = 3 * math.sqrt(delta * (1 - delta) / reps)
    assert np.all(hit.mean(axis=0) >= 1 - delta - slack), hit.mean(axis=0)
    # and it is what the memory is for: a tighter bound below and at T0 (at T0 the memory's
    # exit side also holds older offloaded samples nearer the threshold: conservative there)
    assert np.all(width[0, :3] < width[1, :3]), width


def test_memory_count_upper_is_the_rate_bound_scaled_to_the_window():
    rng = np.random.default_rng(42)
    mem, win, s, d = memory_window(rng, 8000, 2000)
    e = estimate(win, "entropy", CANDS, delta=0.05, memory=mem)
    assert np.all(np.diff(e.disagree_upper) >= -1e-12)   # still grows with the exits
    assert np.all(e.disagree_upper <= 1.0)
    # a memory no longer than the window is ignored (today's bound)
    same = estimate(win, "entropy", CANDS, delta=0.05, memory=win)
    own = estimate(win, "entropy", CANDS, delta=0.05)
    np.testing.assert_array_equal(same.disagree_upper, own.disagree_upper)


def test_curve_rose_detects_a_rise_and_ignores_a_score_shift():
    rng = np.random.default_rng(43)
    reps, level = 200, 0.05
    alarms = {"stable": 0, "shift": 0, "rise": 0}
    for _ in range(reps):
        for case, kw in (("stable", {}), ("shift", {"shift": 0.3}), ("rise", {"rise": 1.5})):
            mem, _, _, _ = memory_window(rng, 12000, 3000, level=0.6, **kw)
            alarms[case] += curve_rose(mem, 3000, "entropy", level)
    slack = 3 * math.sqrt(level * (1 - level) / reps)
    assert alarms["stable"] / reps <= level + slack
    assert alarms["shift"] / reps <= level + slack   # post-stratified: the mix alone is no rise
    assert alarms["rise"] / reps >= 0.9


def test_a_rise_falls_back_to_the_window_bound():
    rng = np.random.default_rng(44)
    mem, win, s, d = memory_window(rng, 12000, 3000, level=0.6, rise=3.0)
    assert curve_rose(mem, 3000, "entropy")
    e = estimate(win, "entropy", CANDS, delta=0.05, memory=mem)
    own = estimate(win, "entropy", CANDS, delta=0.05)
    np.testing.assert_array_equal(e.disagree_upper, own.disagree_upper)
