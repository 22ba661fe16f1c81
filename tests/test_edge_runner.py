"""EdgeRunner: inputs, exit decisions against thresholds, per-sample energy, rows for batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgecloud.bundle import ModelRepository
from edgecloud.cim.energy import EnergyTable
from edgecloud.edge.runner import CLOUD, RADIO, EdgeRunner, policy_from_manifest, softmax_np
from edgecloud.edge.server import resolve_thresholds
from edgecloud.exits import ExitPolicy

N = 12


@pytest.fixture(scope="module")
def bundle(tiny_repo: Path):
    return ModelRepository(tiny_repo).get("tiny")


@pytest.fixture()
def runner(bundle):
    return EdgeRunner(bundle, "digital")


def pixels(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def test_policy_comes_from_the_manifest_and_can_be_overridden(bundle):
    policy = policy_from_manifest(bundle)
    assert policy.kind == bundle.manifest.policy
    assert policy.thresholds == [e.threshold for e in bundle.manifest.exits]
    assert policy_from_manifest(bundle, [0.5]).thresholds == [0.5]
    with pytest.raises(ValueError, match="1 exits"):
        policy_from_manifest(bundle, [0.5, 0.7])
    with pytest.raises(ValueError, match="tiny"):
        policy_from_manifest(bundle, [-1.0])
    assert resolve_thresholds(bundle, [0.5], {0: 0.25}) == [0.25]  # flag pins beat the file
    assert resolve_thresholds(bundle, None, {0: None}) == [None]
    with pytest.raises(ValueError, match="exits 0..0"):
        resolve_thresholds(bundle, None, {3: 0.1})


def test_mixed_exits_and_offload_shape(runner):
    result = runner.run(pixels())
    exits = result.exit_index
    assert result.probs.shape == (N, 10) and result.probs.dtype == np.float32
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, rtol=1e-5)
    assert set(exits.tolist()) <= {-1, 0}
    # the seeded threshold is the median entropy on uniform noise: both outcomes occur
    assert 0 < (exits == -1).sum() < N
    np.testing.assert_array_equal(result.offload_index, np.flatnonzero(exits == -1))
    assert result.offload.shape == (int((exits == -1).sum()), *runner.offload_shape)
    assert (result.best_exit == 0).all()  # one edge exit: the fallback is exit 0
    edge_energy = sum(result.energy.values())
    assert (edge_energy > 0).all()


def test_threshold_extremes_and_per_call_override(runner):
    x = pixels()
    runner.set_threshold(0, 0.0)  # entropy < 0 never holds: everything needs the cloud
    assert (runner.run(x).exit_index == -1).all()
    runner.set_threshold(0, 1e9)  # everything is confident enough
    result = runner.run(x)
    assert (result.exit_index == 0).all() and result.offload_index.size == 0
    assert result.offload.shape[0] == 0
    # a per-call override changes only that call
    assert (runner.run(x, exit0_threshold=0.0).exit_index == -1).all()
    assert runner.thresholds() == [1e9]
    assert (runner.run(x).exit_index == 0).all()
    with pytest.raises(ValueError):
        runner.set_thresholds([1.0, 2.0])
    assert runner.thresholds() == [1e9]  # a rejected bulk change leaves everything as it was


def test_uint8_input_is_scaled_to_unit_range(runner):
    raw = np.random.default_rng(3).integers(0, 256, (N, 1, 28, 28), dtype=np.uint8)
    as_u8 = runner.run(raw)
    as_fp = runner.run(raw.astype(np.float32) / 255.0)
    np.testing.assert_allclose(as_u8.probs, as_fp.probs, atol=1e-6)
    np.testing.assert_array_equal(as_u8.exit_index, as_fp.exit_index)


def test_rows_split_per_request_match_separate_runs(runner):
    a, b = pixels(5, seed=1), pixels(7, seed=2)
    rows = runner.run_rows(np.concatenate([a, b]))
    assert all(v.shape[0] == 12 for v in rows.values())
    for x, sl in ((a, slice(0, 5)), (b, slice(5, 12))):
        joint = runner.from_rows({k: v[sl] for k, v in rows.items()})
        alone = runner.run(x)
        np.testing.assert_allclose(joint.probs, alone.probs, atol=1e-5)
        np.testing.assert_array_equal(joint.exit_index, alone.exit_index)
        np.testing.assert_array_equal(joint.offload_index, alone.offload_index)
        np.testing.assert_allclose(joint.offload, alone.offload, atol=1e-5)
        for component, joules in alone.energy.items():
            np.testing.assert_allclose(joint.energy[component], joules, rtol=1e-9)


def test_energy_of_cloud_answered_degraded_and_edge_samples(runner, bundle):
    table = EnergyTable.load()
    edge = runner.run(pixels())
    rows = edge.offload_index
    k = rows.size
    assert k > 0
    edge_only = sum(edge.energy.values())
    radio = np.prod(runner.offload_shape) * 4 * 8 * table.per_event("radio_bit")
    cloud = bundle.manifest.cloud.macs * table.per_event("mac_fp32")
    assert cloud > 0

    cloud_probs = softmax_np(np.tile(np.arange(10, dtype=np.float32), (k, 1)))
    answered = runner.complete(edge, cloud_probs, transmitted=True)
    local = np.setdiff1d(np.arange(N), rows)
    assert (answered.exit_index[rows] == 1).all() and (answered.exit_index[local] == 0).all()
    assert answered.cloud[rows].all() and not answered.degraded.any()
    np.testing.assert_allclose(answered.probabilities[rows], cloud_probs)
    assert (answered.class_index[rows] == 9).all()
    np.testing.assert_allclose(answered.confidence, answered.probabilities.max(axis=1))
    np.testing.assert_allclose(answered.energy[RADIO][rows], radio)
    np.testing.assert_allclose(answered.energy[CLOUD][rows], cloud)
    np.testing.assert_allclose(answered.energy_joules[rows], edge_only[rows] + radio + cloud)
    np.testing.assert_allclose(answered.energy_joules[local], edge_only[local])
    assert answered.energy_joules[rows].min() > answered.energy_joules[local].max()

    sent_but_lost = runner.complete(edge, None, transmitted=True)  # e.g. deadline exceeded
    assert sent_but_lost.degraded[rows].all() and not sent_but_lost.cloud.any()
    assert (sent_but_lost.exit_index == 0).all()  # best edge exit
    np.testing.assert_allclose(sent_but_lost.probabilities, edge.probs)
    np.testing.assert_allclose(sent_but_lost.energy_joules[rows], edge_only[rows] + radio)

    never_sent = runner.complete(edge, None, transmitted=False)  # breaker open
    np.testing.assert_allclose(never_sent.energy_joules, edge_only)


def test_policy_object_is_shared_by_reference(bundle):
    policy = ExitPolicy(kind="entropy", thresholds=[1e9])
    runner = EdgeRunner(bundle, "digital", policy)
    policy.set_threshold(0, 0.0)  # whoever holds the policy changes the runner's decisions
    assert (runner.run(pixels(4)).exit_index == -1).all()


def test_run_checked_is_run_with_the_offload_shape_check(runner):
    x = pixels()
    checked, plain = runner.run_checked(x), runner.run(x)
    np.testing.assert_allclose(checked.probs, plain.probs, atol=1e-6)
    np.testing.assert_array_equal(checked.offload_index, plain.offload_index)
    assert plain.offload_index.size > 0
    runner.offload_shape = (1, 2, 3)  # a manifest that disagrees with the model
    for method in (runner.run_checked, runner.run_rows):
        with pytest.raises(RuntimeError, match="cloud.input_shape"):
            method(x)
