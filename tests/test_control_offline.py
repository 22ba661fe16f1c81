"""The offline replay drives the real controller as the data plane does (no servers)."""

from __future__ import annotations

import numpy as np
import pytest

from edgecloud.config import ControlConfig
from edgecloud.control.budgets import Budgets
from edgecloud.control.controller import ControlSettings, from_config
from edgecloud.control.offline import replay_offline
from edgecloud.control.trace import Reference


def synthetic_reference(n: int = 12000, seed: int = 0, drift_at: int | None = None) -> Reference:
    """Entropy scores in [0, 2]; P(edge disagrees with cloud) grows with the score (and is 4x
    after ``drift_at``)."""
    rng = np.random.default_rng(seed)
    score = rng.gamma(1.2, 0.4, n)
    q = np.clip(0.02 + 0.3 * score ** 2, 0, 0.9) * 0.6
    if drift_at is not None:
        q[drift_at:] = np.clip(q[drift_at:] * 4.0, 0, 0.95)
    disagree = rng.random(n) < q
    edge = rng.integers(0, 10, n)
    cloud = np.where(disagree, (edge + 1) % 10, edge)
    return Reference("entropy", score, edge, cloud, np.full(n, 5e-6), np.full(n, 2e-2),
                     np.full(n, 8192.0), static_threshold=0.6)


def _settings(**kw) -> ControlSettings:
    base = dict(window=3000, min_samples=300, step_samples=250, interval_s=1e9, shadow_target=150)
    base.update(kw)
    return ControlSettings(**base)


def test_offline_replay_is_reproducible_and_shadows_only_exited_samples() -> None:
    ref = synthetic_reference()
    a = replay_offline(ref, Budgets(agreement=0.97), _settings(seed=3))
    b = replay_offline(ref, Budgets(agreement=0.97), _settings(seed=3))
    c = replay_offline(ref, Budgets(agreement=0.97), _settings(seed=4))
    assert np.array_equal(a.exited, b.exited) and np.array_equal(a.shadowed, b.shadowed)
    assert not np.array_equal(a.shadowed, c.shadowed)
    assert not (a.shadowed & ~a.exited).any()
    assert 0 < a.shadow_share < 0.2
    # energy: compute for everyone, the offload cost for offloaded and shadowed samples
    expected = ref.edge_j + np.where(~a.exited | a.shadowed, ref.offload_j, 0.0)
    np.testing.assert_allclose(a.energy_j, expected)


def test_offline_replay_holds_the_agreement_and_reacts_to_drift() -> None:
    n, drift = 16000, 8000
    ref = synthetic_reference(n, seed=1, drift_at=drift)
    run = replay_offline(ref, Budgets(agreement=0.97, delta=0.05), _settings())
    agrees = np.where(run.exited, ref.edge_agrees, True)
    settled = np.r_[4000:drift, drift + 4000:n]
    assert agrees[settled].mean() >= 0.97
    before = np.nanmean(run.threshold[drift - 1000:drift])
    after = np.nanmean(run.threshold[n - 1000:])
    assert after < before  # more disagreement: fewer exits
    static = ref.score < 0.6
    assert np.where(static, ref.edge_agrees, True)[drift + 4000:].mean() < 0.97  # static misses


def test_from_config_maps_the_daemon_config() -> None:
    budgets, settings = from_config(ControlConfig(agreement=0.98, delta=0.1, p99_latency_ms=250,
                                                  window=5000, act_on="estimate"), "edge.control.m")
    assert budgets.agreement == 0.98 and budgets.delta == 0.1 and budgets.p99_latency_s == 0.25
    assert settings.window == 5000 and settings.act_on == "estimate"


def test_offline_replay_rejects_a_bad_batch() -> None:
    with pytest.raises(ValueError, match="batch"):
        replay_offline(synthetic_reference(100), Budgets(agreement=0.97), _settings(), batch=0)


def test_offline_replay_with_curve_memory_holds_the_agreement_through_drift() -> None:
    n, drift = 16000, 8000
    ref = synthetic_reference(n, seed=1, drift_at=drift)
    run = replay_offline(ref, Budgets(agreement=0.97, delta=0.05), _settings(curve_memory=12000))
    agrees = np.where(run.exited, ref.edge_agrees, True)
    settled = np.r_[4000:drift, drift + 4000:n]
    assert agrees[settled].mean() >= 0.97
    assert np.nanmean(run.threshold[n - 1000:]) < np.nanmean(run.threshold[drift - 1000:drift])


def test_from_config_maps_curve_memory() -> None:
    _, settings = from_config(ControlConfig(agreement=0.97, curve_memory=16000), "edge.control.m")
    assert settings.curve_memory == 16000
    assert from_config(ControlConfig(agreement=0.97), "m")[1].curve_memory == 0


def test_from_config_maps_the_profile_settings() -> None:
    _, settings = from_config(ControlConfig(agreement=0.97, estimator="profile", profile="p.json",
                                            meet_window=1000, profile_bound="predictive",
                                            shift_alpha=0.05, shift_factor=1.2,
                                            shifted_bound="poisson"), "edge.control.m")
    assert (settings.profile_bound, settings.shift_factor, settings.shifted_bound) == (
        "predictive", 1.2, "poisson")
    assert from_config(ControlConfig(agreement=0.97), "m")[1].shifted_bound == ""
    with pytest.raises(ValueError, match="shifted_bound"):
        ControlConfig(agreement=0.97, shifted_bound="exact")
