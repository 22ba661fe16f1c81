"""edgecloud.control.shifts: the corruption family and kappa, how far the band under-prices the
exits under a shift; and the `edgecloud control shift-family` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecloud.control.profile import DisagreementProfile
from edgecloud.control.shifts import SHIFT_FAMILY, TRACE_SHIFTS, shift_excess
from edgecloud.control.trace import Reference
from tests.control_data import BUNDLE, CIFAR, needs_cifar_bundle


def _curve(score: np.ndarray) -> np.ndarray:
    return np.clip(0.02 + 0.3 * score, 0.0, 0.9)


def _reference(score: np.ndarray, p: np.ndarray, rng) -> Reference:
    n = score.size
    disagree = rng.random(n) < p
    return Reference("entropy", score, np.where(disagree, 1, 0).astype(np.int64), np.zeros(n, dtype=np.int64),
                     np.full(n, 1e-6), np.full(n, 0.02), np.full(n, 8192.0))


def test_kappa_is_one_on_the_profiles_curve_and_sees_a_rise_among_confident_samples():
    """kappa = r_exit / r_band: about 1 when the shifted set follows the profile's curve, whatever
    the score distribution; well above 1 when the most confident samples (below the hindsight
    threshold) disagree four times as often and the band does not; and a rise everywhere goes
    into r, not kappa. (An isotonic profile of many bins: an envelope's lift and coarse bins
    bias kappa by themselves, which is why the command measures it with the controller's own
    profile.)"""
    rng = np.random.default_rng(0)
    val = rng.uniform(0, 1.5, 40000)
    prof = DisagreementProfile.fit("entropy", val, (rng.random(val.size) < _curve(val)).astype(float),
                                   bins=60, method="isotonic")
    score = rng.gamma(1.5, 0.3, 40000)
    same = shift_excess("same", _reference(score, _curve(score), rng), prof, window=4000)
    assert 0.8 < same.kappa < 1.2 and 0.8 < same.r_band < 1.2
    assert same.shift_p < 1e-6             # the scores did move
    assert 0.0 < same.exit_share < 1.0
    # the disagreement share at the threshold is the target's
    low = score < same.threshold
    assert abs(float(_curve(score[low]).sum() / score.size) - 0.03) < 0.003
    doubled = shift_excess("doubled", _reference(score, 2 * _curve(score), rng), prof)
    assert 1.7 < doubled.r_band < 2.4 and 0.8 < doubled.kappa < 1.25
    confident = np.where(score < 0.12, 4.0, 1.0) * _curve(score)
    rose = shift_excess("rose", _reference(score, confident, rng), prof)
    assert rose.kappa > 1.8 and 0.8 < rose.r_band < 1.2
    assert set(rose.to_dict()) == {"name", "shift_p", "threshold", "exit_share", "r_band", "r_exit", "kappa"}
    with pytest.raises(ValueError, match="policy"):
        shift_excess("mp", Reference("max_prob", score[:10], np.zeros(10, np.int64), np.zeros(10, np.int64),
                                     np.zeros(10), np.zeros(10), np.zeros(10)), prof)


def test_family_corruptions_keep_the_images_shape_change_them_and_repeat_under_a_seed():
    """Every corruption returns uint8 images of the same shape, changes them, and gives the same
    bytes for the same seed; the family leaves out the drift trace's own corruptions."""
    images = np.random.default_rng(1).integers(30, 220, (6, 3, 32, 32), dtype=np.uint8)
    for name, corrupt in {**SHIFT_FAMILY, **TRACE_SHIFTS}.items():
        a = corrupt(images, np.random.default_rng(5))
        b = corrupt(images, np.random.default_rng(5))
        assert a.dtype == np.uint8 and a.shape == images.shape, name
        assert not np.array_equal(a, images), name
        assert np.array_equal(a, b), name
    assert not set(SHIFT_FAMILY) & set(TRACE_SHIFTS)
    assert not any("noise" in n or "blur" in n for n in SHIFT_FAMILY)




@needs_cifar_bundle
def test_cli_measures_the_family_and_names_the_largest_kappa(tmp_path, capsys):
    from edgecloud.cli import main

    prof = tmp_path / "p.json"
    assert main(["control", "profile", str(BUNDLE), "--data-root", str(CIFAR), "--limit", "300",
                 "--bins", "8", "--out", str(prof), "--json"]) == 0
    capsys.readouterr()
    assert main(["control", "shift-family", str(BUNDLE), "--profile", str(prof), "--data-root", str(CIFAR),
                 "--limit", "300", "--no-trace", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = [s["name"] for s in summary["shifts"]]
    assert names == ["clean", *SHIFT_FAMILY] and summary["trace"] == []
    kappas = [s["kappa"] for s in summary["shifts"][1:] if s["kappa"] is not None]
    assert summary["shift_factor"] == max(kappas)
    assert summary["samples"] == 300 and summary["band"] == 250 and summary["window"] == 4000
    assert main(["control", "shift-family", str(BUNDLE), "--profile", str(prof), "--band", "0"]) == 2
    assert "--band must be >= 1" in capsys.readouterr().err
