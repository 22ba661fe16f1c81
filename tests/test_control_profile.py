"""edgecloud.control.profile: the offline disagreement profile, its online rescaling and bound,
the sampling margin, and the controller and CLI that use them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgecloud.control.controller import ControlSettings, ExitController, Observations
from edgecloud.control.budgets import Budgets
from edgecloud.control.estimate import WindowData
from edgecloud.control.profile import (
    DisagreementProfile,
    predictive_upper,
    profile_estimate,
    sampling_margin,
    scale_upper,
    scale_upper_exact,
    score_shift_pvalue,
    validation_evidence,
)
from tests.control_data import BUNDLE, CIFAR, needs_cifar_bundle


def _curve(score: np.ndarray) -> np.ndarray:
    """True P(disagree | entropy): rises with entropy."""
    return np.clip(0.02 + 0.3 * score, 0.0, 0.9)


def _window(rng, n: int, r: float, threshold: float, shadow: float, profile_score_shift: float = 0.0):
    score = rng.uniform(0.0, 1.5, n) + profile_score_shift
    dis = (rng.random(n) < np.clip(r * _curve(score), 0, 1)).astype(float)
    exited = score < threshold
    shadowed = exited & (rng.random(n) < shadow)
    obs = np.where(~exited | shadowed, dis, np.nan)
    return WindowData.of(score, exited, shadowed, np.where(exited, shadow, 1.0), obs), dis


def _observe_and_step(ctl: ExitController, w: WindowData) -> None:
    """Hand a window to the controller as the data plane would (offloads cost radio), then step."""
    n = w.n
    ctl.observe(Observations(score=w.score, exited=w.exited, shadowed=w.shadowed,
                             shadow_prob=w.shadow_prob, disagree=w.disagree,
                             compute_j=np.full(n, 1e-6), radio_j=np.where(w.exited, 0.0, 0.02),
                             sent_bytes=np.where(w.exited, 0, 8192), latency_s=np.full(n, 0.01)))
    ctl.step()


def test_fit_is_monotone_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    score = rng.uniform(0, 1.5, 20000)
    dis = (rng.random(score.size) < _curve(score)).astype(float)
    prof = DisagreementProfile.fit("entropy", score, dis, bins=20)
    rates = np.asarray(prof.rates)
    assert np.all(np.diff(rates) <= 0)                  # bins run from least to most confident
    probe = np.linspace(0.05, 1.45, 15)
    assert np.max(np.abs(prof(probe) - _curve(probe))) < 0.06
    prof.save(tmp_path / "p.json")
    assert DisagreementProfile.load(tmp_path / "p.json") == prof
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "entropy"}))
    with pytest.raises(ValueError, match="not a disagreement profile"):
        DisagreementProfile.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="no such file"):
        DisagreementProfile.load(tmp_path / "missing.json")


def test_isotonic_fit_keeps_the_shape_without_the_envelopes_upward_bias():
    """Small validation sets make some bins noisy: the envelope lifts every bin below a noisy
    high one (never under the isotonic fit, and above the true curve on average), the isotonic
    fit averages violators (close to the true curve on average); both are monotone."""
    bias_env, bias_iso = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        score = rng.uniform(0, 1.5, 2500)
        dis = (rng.random(score.size) < _curve(score)).astype(float)
        env = DisagreementProfile.fit("entropy", score, dis, bins=40)
        iso = DisagreementProfile.fit("entropy", score, dis, bins=40, method="isotonic")
        assert np.all(np.diff(iso.rates) <= 1e-12) and np.all(np.asarray(env.rates) >= np.asarray(iso.rates) - 1e-12)
        probe = rng.uniform(0, 1.5, 5000)
        bias_env.append(float(np.mean(env(probe) - _curve(probe))))
        bias_iso.append(float(np.mean(iso(probe) - _curve(probe))))
    assert np.mean(bias_env) > 0.01 and abs(np.mean(bias_iso)) < 0.005
    upper = DisagreementProfile.fit("entropy", score, dis, bins=40, method="upper", level=0.8)
    assert np.all(np.diff(upper.rates) <= 1e-12) and np.all(np.asarray(upper.rates) >= np.asarray(env.rates))
    assert upper.rates[-1] > env.rates[-1]          # even 0 disagreements of n bound above 0
    with pytest.raises(ValueError, match="level must lie in"):
        DisagreementProfile.fit("entropy", score, dis, method="upper", level=1.0)
    with pytest.raises(ValueError, match="unknown fit method 'spline'"):
        DisagreementProfile.fit("entropy", score, dis, method="spline")


def test_rescaled_profile_estimates_and_bounds_a_raised_curve():
    """Drift raises the curve 1.5x: the point estimate of D(t) is close to the realised share on
    average, and the (1 - delta) bound covers the expected share given the window's scores
    (r x curve over its exits) at least at its rate over seeded windows. (A window's realised
    share scatters around that expectation: ``meet_window``'s margin is for that.)"""
    rng = np.random.default_rng(1)
    score = rng.uniform(0, 1.5, 40000)
    prof = DisagreementProfile.fit("entropy", score, (rng.random(score.size) < _curve(score)).astype(float))
    delta, t, r = 0.1, 0.6, 1.5
    est, covered = [], 0
    reps = 200
    for _ in range(reps):
        w, dis = _window(rng, 2000, r, t, 0.02)
        e = profile_estimate(w, "entropy", [t], prof, delta=delta)
        realised = float((dis * (w.score < t)).sum() / w.n)
        expected = float((r * _curve(w.score) * (w.score < t)).sum() / w.n)
        est.append(e.disagree[0] - realised)
        covered += e.disagree_upper[0] >= expected
    assert abs(np.mean(est)) < 0.002
    assert covered / reps >= 1 - delta


def test_band_uses_the_offloads_next_to_the_threshold():
    """A curve raised only near the threshold: the band sees it, all labels dilute it."""
    rng = np.random.default_rng(2)
    score = np.sort(rng.uniform(0, 1.5, 4000))
    prof = DisagreementProfile.fit("entropy", score, (rng.random(score.size) < _curve(score)).astype(float))
    raised = np.where((score > 0.5) & (score < 0.8), 3.0, 1.0) * _curve(score)
    dis = (rng.random(score.size) < raised).astype(float)
    exited = score < 0.5
    w = WindowData.of(score, exited, np.zeros_like(exited), np.where(exited, 0.01, 1.0),
                      np.where(exited, np.nan, dis))
    all_labels = profile_estimate(w, "entropy", [0.5], prof).disagree[0]
    band = profile_estimate(w, "entropy", [0.5], prof, band=300).disagree[0]
    assert band > 1.8 * all_labels


def test_scale_upper_and_sampling_margin():
    assert scale_upper(0, 0.0, 0.05) == math.inf
    assert scale_upper(10, 10.0, 0.05) == pytest.approx(1.6962, abs=1e-4)  # Garwood: 16.96 for 10 counts
    assert scale_upper(1000, 1000.0, 0.05) < 1.06            # many labels: tight
    assert sampling_margin(0.97, 0, 0.05) == 0.0
    assert sampling_margin(0.97, 1000, 0.05) == pytest.approx(1.6449 * math.sqrt(0.03 * 0.97 / 1000), rel=1e-3)
    # with the model's per-sample variance (most exits near-certain): a smaller margin
    m = sampling_margin(0.97, 1000, 0.05, np.array([0.01, 0.0]))
    assert m == pytest.approx([1.6449 * math.sqrt(0.01 / 1000), 0.0], rel=1e-3)


def test_exact_scale_bound_covers_at_its_rate_and_is_tighter_where_samples_often_disagree():
    """The Poisson-binomial bound on r covers the true r = 1 at >= 1 - delta over seeded
    repetitions (up to the repetitions' own scatter), and sits below Garwood's where the labelled
    samples disagree often (near the threshold), close to it where they rarely do."""
    delta, reps = 0.1, 400
    covered, tighter = 0, []
    for seed in range(reps):
        rng = np.random.default_rng(100 + seed)
        p = rng.uniform(0.2, 0.6, 250)
        hit = rng.random(p.size) < p
        exact = scale_upper_exact(hit, p, delta)
        covered += exact >= 1.0
        tighter.append(exact / scale_upper(int(hit.sum()), float(p.sum()), delta))
    assert covered / reps >= 1 - delta - 3 * math.sqrt(delta * (1 - delta) / reps)
    assert max(tighter) < 1.0 and np.mean(tighter) < 0.97
    rare = np.full(2000, 0.005)
    hits = np.zeros(rare.size, dtype=bool)
    hits[:10] = True
    assert scale_upper_exact(hits, rare, delta) == pytest.approx(scale_upper(10, float(rare.sum()), delta), rel=0.02)
    # a disagreement where the profile says 0 refutes the model: the Poisson bound instead
    p0 = np.array([0.0, 0.5, 0.5])
    assert scale_upper_exact(np.array([True, False, False]), p0, delta) == scale_upper(1, 1.0, delta)
    assert scale_upper_exact(np.array([True, True]), np.array([0.3, 0.4]), delta) == math.inf
    assert scale_upper_exact(np.array([], dtype=bool), np.array([]), delta) == math.inf


def test_controller_reads_the_profile_and_checks_it(tmp_path):
    budgets = Budgets(agreement=0.97, delta=0.05)
    kw = dict(bytes_per_offload=8192, radio_j_per_offload=0.02)
    with pytest.raises(ValueError, match="needs profile"):
        ExitController("entropy", 0.5, budgets, ControlSettings(estimator="profile"), **kw)
    with pytest.raises(ValueError, match="unknown profile_bound 'gauss'"):
        ExitController("entropy", 0.5, budgets, ControlSettings(estimator="profile", profile="p.json",
                                                                profile_bound="gauss"), **kw)
    rng = np.random.default_rng(3)
    score = rng.uniform(0, 1.5, 5000)
    prof = DisagreementProfile.fit("max_prob", score, (rng.random(score.size) < 0.1).astype(float))
    prof.save(tmp_path / "mp.json")
    with pytest.raises(ValueError, match="made for policy 'max_prob'"):
        ExitController("entropy", 0.5, budgets,
                       ControlSettings(estimator="profile", profile=str(tmp_path / "mp.json")), **kw)
    good = DisagreementProfile.fit("entropy", score, (rng.random(score.size) < _curve(score)).astype(float))
    good.save(tmp_path / "e.json")
    margin = ExitController("entropy", 0.5, budgets, ControlSettings(
        estimator="profile", profile=str(tmp_path / "e.json"), meet_window=1000, min_samples=10), **kw)
    plain = ExitController("entropy", 0.5, budgets, ControlSettings(
        estimator="profile", profile=str(tmp_path / "e.json"), min_samples=10), **kw)
    for ctl in (margin, plain):
        _observe_and_step(ctl, _window(np.random.default_rng(4), 3000, 1.0, 0.5, 0.05)[0])
    # the sampling margin keeps the threshold lower (fewer exits) than no margin
    assert margin.threshold < plain.threshold


def test_shift_test_holds_its_level_and_sees_a_moved_score_distribution():
    """Windows drawn like the validation scores are rejected at no more than about the test's
    level over seeded repetitions (validation drawn afresh each time: its equal-count bins make
    the test a little conservative); a window whose scores moved (as noise or blur moves them)
    is rejected."""
    rng = np.random.default_rng(7)
    p_same = []
    for _ in range(200):
        score = rng.gamma(1.2, 0.25, 5000)
        prof = DisagreementProfile.fit("entropy", score, (rng.random(score.size) < _curve(score)).astype(float))
        p_same.append(score_shift_pvalue(prof, rng.gamma(1.2, 0.25, 4000)))
    assert sum(prof.counts) == 5000
    assert 0.02 <= float((np.array(p_same) < 0.1).mean()) <= 0.15     # level 0.1
    assert score_shift_pvalue(prof, rng.gamma(1.2, 0.25, 4000) * 1.5) < 1e-6
    assert score_shift_pvalue(prof, np.zeros(0)) == 1.0


def test_validation_labels_pool_into_the_scale_when_the_curve_did_not_rise(tmp_path):
    """With the validation evidence pooled, r's bound is much tighter and still covers the truth
    (the window follows the profile's own curve); a profile file without per-bin counts (older
    files) loads but cannot pool, and says how to fix it."""
    rng = np.random.default_rng(11)
    score = rng.uniform(0, 1.5, 5000)
    prof = DisagreementProfile.fit("entropy", score, (rng.random(score.size) < _curve(score)).astype(float))
    hits, mass = validation_evidence(prof)
    assert hits == sum(prof.hits) and mass >= hits > 0            # the monotone envelope only lifts
    covered, tighter = 0, 0
    for seed in range(40):
        w, _ = _window(np.random.default_rng(100 + seed), 4000, 1.0, 0.6, 0.003)
        alone = profile_estimate(w, "entropy", [0.6], prof, band=250)
        pooled = profile_estimate(w, "entropy", [0.6], prof, band=250, prior=(hits, mass))
        truth = float(_curve(w.score[w.score < 0.6]).sum() / w.n)
        covered += pooled.disagree_upper[0] >= truth
        tighter += pooled.disagree_upper[0] < alone.disagree_upper[0]
    assert covered >= 36 and tighter >= 36
    with pytest.raises(ValueError, match="exact bound takes neither prior evidence nor predict"):
        profile_estimate(w, "entropy", [0.6], prof, exact=True, prior=(hits, mass))
    old = {k: v for k, v in prof.to_dict().items() if k not in ("counts", "hits")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    legacy = DisagreementProfile.load(tmp_path / "old.json")
    assert legacy.counts is None and 0.0 <= score_shift_pvalue(legacy, score[:4000]) <= 1.0
    with pytest.raises(ValueError, match="make it again"):
        validation_evidence(legacy)
    with pytest.raises(ValueError, match="hits"):
        DisagreementProfile("entropy", (0.0, 1.0), (0.5,), 10, counts=(3,), hits=(4,))


def _profile_controller_kit(tmp_path, **settings) -> tuple[Budgets, dict, dict]:
    """A seeded profile of the synthetic curve saved to ``tmp_path``; the controller's budgets,
    its constructor keywords and the profile-estimator settings (plus ``settings``)."""
    rng = np.random.default_rng(5)
    score = rng.uniform(0, 1.5, 5000)
    prof = DisagreementProfile.fit("entropy", score, (rng.random(score.size) < _curve(score)).astype(float))
    prof.save(tmp_path / "e.json")
    base = dict(estimator="profile", profile=str(tmp_path / "e.json"), min_samples=10, profile_band=250,
                **settings)
    return Budgets(agreement=0.97, delta=0.05), dict(bytes_per_offload=8192, radio_j_per_offload=0.02), base


def test_controller_pools_validation_labels_only_while_the_scores_have_not_moved(tmp_path):
    budgets, kw, base = _profile_controller_kit(tmp_path)
    with pytest.raises(ValueError, match="shift_alpha works with estimator='profile'"):
        ExitController("entropy", 0.5, budgets, ControlSettings(shift_alpha=0.05), **kw)
    with pytest.raises(ValueError, match="shift_alpha must lie in"):
        ExitController("entropy", 0.5, budgets, ControlSettings(**base, shift_alpha=1.5), **kw)

    def run(shift_alpha: float, moved: float) -> ExitController:
        ctl = ExitController("entropy", 0.5, budgets, ControlSettings(**base, shift_alpha=shift_alpha), **kw)
        _observe_and_step(ctl, _window(np.random.default_rng(6), 4000, 1.0, 0.5, 0.003,
                                       profile_score_shift=moved)[0])
        return ctl

    same_on, same_off = run(0.05, 0.0), run(0.0, 0.0)
    assert same_on.shift_p >= 0.05 and math.isnan(same_off.shift_p)
    assert same_on.threshold > same_off.threshold              # thousands of labels, not hundreds
    moved_on, moved_off = run(0.05, 0.1), run(0.0, 0.1)
    assert moved_on.shift_p < 0.05
    assert moved_on.threshold == moved_off.threshold           # moved scores: the window's labels alone


def test_predictive_bound_covers_the_next_window_at_its_rate_and_beats_stacking():
    """The predictive bound, from a window's band labels alone, covers the disagreement share of
    the NEXT 1,000 samples (fresh draws of the same stream) at about 1 - delta over seeded
    repetitions: it holds r's uncertainty and the sampling scatter in one distribution. Stacking
    r's bound and the sampling margin (both at delta) covers far more often, at a lower
    threshold."""
    delta, reps, t = 0.1, 300, 0.6
    rng = np.random.default_rng(21)
    prof_score = rng.uniform(0, 1.5, 5000)
    prof = DisagreementProfile.fit("entropy", prof_score,
                                   (rng.random(prof_score.size) < _curve(prof_score)).astype(float))
    cover_pred = cover_stack = 0
    wider = 0
    for seed in range(reps):
        r = np.random.default_rng(300 + seed)
        w, _ = _window(r, 4000, 1.0, t, 0.0)
        pred = profile_estimate(w, "entropy", [t], prof, delta=delta, band=250, predict=1000)
        plain = profile_estimate(w, "entropy", [t], prof, delta=delta, band=250)
        stacked = plain.disagree_upper + sampling_margin(0.97, 1000, delta, plain.sample_var)
        assert pred.predictive and not plain.predictive
        nxt, dis = _window(r, 1000, 1.0, t, 0.0)
        share = float(dis[nxt.score < t].sum() / 1000)
        cover_pred += share <= pred.disagree_upper[0]
        cover_stack += share <= stacked[0]
        wider += stacked[0] > pred.disagree_upper[0]
    se = math.sqrt(delta * (1 - delta) / reps)
    assert 1 - delta - 3 * se <= cover_pred / reps <= 1 - delta + 4 * se
    assert cover_stack / reps > cover_pred / reps and wider == reps
    # nothing exits: 0; no labelled mass: nothing bounds the share
    assert predictive_upper(np.array([0.0, 5.0]), np.array([0.0, 1.0]), 100, 3, 10.0, 0.05, 1000)[0] == 0.0
    assert predictive_upper(np.array([5.0]), np.array([1.0]), 100, 0, 0.0, 0.05, 1000)[0] == 1.0


def test_controller_predictive_bound_and_shift_factor(tmp_path):
    """``profile_bound: predictive`` exits more than the stacked bound on the same window and
    needs ``meet_window``; ``shift_factor`` lowers the threshold only while the shift test
    rejects, and needs the test."""
    budgets, kw, base = _profile_controller_kit(tmp_path, meet_window=1000)
    with pytest.raises(ValueError, match="needs meet_window > 0"):
        ExitController("entropy", 0.5, budgets, ControlSettings(**{**base, "meet_window": 0},
                                                                profile_bound="predictive"), **kw)
    with pytest.raises(ValueError, match="shift_factor needs shift_alpha"):
        ExitController("entropy", 0.5, budgets, ControlSettings(**base, shift_factor=1.2), **kw)
    with pytest.raises(ValueError, match="shift_factor must be >= 1"):
        ExitController("entropy", 0.5, budgets, ControlSettings(**base, shift_alpha=0.05, shift_factor=0.9), **kw)

    def run(moved: float, **settings) -> ExitController:
        ctl = ExitController("entropy", 0.5, budgets, ControlSettings(**base, **settings), **kw)
        _observe_and_step(ctl, _window(np.random.default_rng(6), 4000, 1.0, 0.5, 0.003,
                                       profile_score_shift=moved)[0])
        return ctl

    assert run(0.0, profile_bound="predictive").threshold > run(0.0).threshold
    same = [run(0.0, shift_alpha=0.05, profile_bound="predictive", shift_factor=f) for f in (1.0, 1.5)]
    assert same[0].shift_p >= 0.05 and same[0].threshold == same[1].threshold
    moved = [run(0.1, shift_alpha=0.05, profile_bound="predictive", shift_factor=f) for f in (1.0, 1.5)]
    assert moved[0].shift_p < 0.05 and moved[1].threshold < moved[0].threshold


def test_shifted_bound_applies_only_while_the_shift_test_rejects(tmp_path):
    """``shifted_bound: poisson`` under ``profile_bound: predictive``: stable scores keep the
    predictive threshold, moved ones get exactly the stacked bound's threshold."""
    budgets, kw, base = _profile_controller_kit(tmp_path, meet_window=1000)
    with pytest.raises(ValueError, match="shifted_bound needs shift_alpha"):
        ExitController("entropy", 0.5, budgets, ControlSettings(**base, shifted_bound="poisson"), **kw)
    with pytest.raises(ValueError, match="unknown shifted_bound"):
        ExitController("entropy", 0.5, budgets,
                       ControlSettings(**base, shift_alpha=0.05, shifted_bound="exact"), **kw)
    with pytest.raises(ValueError, match="shifted_bound 'predictive' needs meet_window"):
        ExitController("entropy", 0.5, budgets, ControlSettings(
            **{**base, "meet_window": 0}, shift_alpha=0.05, shifted_bound="predictive"), **kw)

    def run(moved: float, **settings) -> ExitController:
        ctl = ExitController("entropy", 0.5, budgets,
                             ControlSettings(**base, shift_alpha=0.05, **settings), **kw)
        _observe_and_step(ctl, _window(np.random.default_rng(6), 4000, 1.0, 0.5, 0.003,
                                       profile_score_shift=moved)[0])
        return ctl

    pred, stacked = {"profile_bound": "predictive"}, {"profile_bound": "poisson"}
    hybrid = {"profile_bound": "predictive", "shifted_bound": "poisson"}
    assert run(0.0, **hybrid).threshold == run(0.0, **pred).threshold != run(0.0, **stacked).threshold
    assert run(0.1, **hybrid).threshold == run(0.1, **stacked).threshold != run(0.1, **pred).threshold


@needs_cifar_bundle
def test_cli_writes_a_profile_from_validation_images(tmp_path, capsys):
    from edgecloud.cli import main

    out = tmp_path / "profile.json"
    assert main(["control", "profile", str(BUNDLE), "--data-root", str(CIFAR), "--limit", "400",
                 "--bins", "8", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["split"] == "val" and summary["samples"] == 400
    prof = DisagreementProfile.load(out)
    assert prof.kind == "entropy" and len(prof.rates) <= 8 and prof.samples == 400
    assert prof.rates[0] >= prof.rates[-1]         # the least confident bin disagrees most
    assert sum(prof.counts) == 400
    assert main(["control", "profile", str(BUNDLE), "--data-root", str(CIFAR), "--limit", "400",
                 "--bins", "8", "--part", "b", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["split"] == "val-b" and summary["samples"] == 200
    assert DisagreementProfile.load(out).samples == 200 and "val-b" in DisagreementProfile.load(out).source
    assert main(["control", "profile", str(BUNDLE), "--data-root", str(CIFAR), "--limit", "400",
                 "--bins", "8", "--part", "5f0c", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["split"] == "val-5f0c" and summary["samples"] == 320
    with pytest.raises(SystemExit):
        main(["control", "profile", str(BUNDLE), "--part", "5f7", "--out", str(out)])
    assert "'5f7'" in capsys.readouterr().err
