"""``benchmarks/train_compute_curve.py``: binary hybrid and FP control trained budget by budget, both
operating points chosen on validation, the trend fitted; on a tiny ResNet and a tiny binary hybrid
over the synthetic CIFAR-10 of tests/synthetic_cifar.py."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from synthetic_cifar import write_cifar_pickles

REPO_ROOT = Path(__file__).resolve().parents[1]
OPTIM = {"batch_size": 16, "optimizer": "sgd", "lr": 0.05, "schedule": "constant", "channels_last": False,
         "precision": "fp32"}
DATA = {"dataset": "cifar10", "val_fraction": 0.2, "hflip": True}


def _bench():
    if "train_compute_curve" in sys.modules:
        return sys.modules["train_compute_curve"]
    spec = importlib.util.spec_from_file_location("train_compute_curve",
                                                  REPO_ROOT / "benchmarks" / "train_compute_curve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_compute_curve"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("curve")
    root = write_cifar_pickles(folder / "cifar")
    control = {"name": "tiny-control", "family": "resnet", "arch": {"depth": 8, "num_classes": 10}, "seed": 0,
               "data": {**DATA, "root": str(root)}, "optim": {"epochs": 1, **OPTIM}}
    binary = {"name": "tiny-binary", "family": "cifar_hybrid", "seed": 0, "data": {**DATA, "root": str(root)},
              "arch": {"depth": 8, "edge_blocks": 2, "weight_bits": 1, "act_bits": 1, "num_classes": 10},
              "optim": {"epochs": 1, **OPTIM}, "exits": {"policy": "entropy", "threshold": "auto"},
              "offload": {"encoding": "uint8"}}
    paths = folder / "control.yaml", folder / "binary.yaml"
    for path, recipe in zip(paths, (control, binary)):
        path.write_text(yaml.safe_dump(recipe))
    return paths


def test_threshold_for_share_and_trend_fit() -> None:
    bench = _bench()
    h = np.array([0.5, 0.1, 0.3, 0.2, 0.4])
    t = bench.threshold_for_share(h, 0.6)  # 3 of 5 must exit: entropies 0.1, 0.2, 0.3 (strictly below t)
    assert (h < t).sum() == 3 and t - 0.3 < 1e-12
    assert (h < bench.threshold_for_share(h, 1.0)).all()
    assert bench.parse_budgets("4, 1,2") == [1, 2, 4]
    for bad in ("0,1", "a", ""):
        with pytest.raises(ValueError):
            bench.parse_budgets(bad)
    fit = bench.fit_log2([1, 2, 4], [7.0, 5.0, 3.0], target=1.0, falling=True)  # -2 points per doubling
    assert fit["slope_per_doubling"] == -2.0 and fit["needs_epochs"] == 8.0
    assert bench.fit_log2([1, 2], [3.0, 4.0], target=1.0, falling=True)["needs_epochs"] is None  # moving away
    assert bench.fit_log2([1, 2], [0.5, 0.6], target=0.65, falling=False)["needs_epochs"] == pytest.approx(2.83, abs=0.05)
    assert bench.fit_log2([4], [2.0], target=1.0, falling=True) is None
    power = bench.fit_power([1, 2, 4], [16.0, 8.0, 4.0], target=1.0)  # halves per doubling: 1 point at 16
    assert power["gap_kept_per_doubling"] == 0.5 and power["needs_epochs"] == 16.0
    assert bench.fit_power([1, 2], [3.0, -1.0], target=1.0) is None


def test_curve_trains_measures_and_reuses(recipes, tmp_path, capsys) -> None:
    bench = _bench()
    control, binary = recipes
    out = tmp_path / "curve"
    argv = ["--binary", str(binary), "--control", str(control), "--budgets", "1,2", "--threads", "1",
            "--out", str(out), "--json"]
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["benchmark"] == "train_compute_curve" and summary["cpu"] and summary["budgets"] == [1, 2]
    rows = summary["rows"]
    assert [r["budget_epochs"] for r in rows] == [1, 2] and summary["test_samples"] == 40
    for r in rows:
        b = r["binary"]
        assert 0 <= r["control"]["test_accuracy"] <= 1
        assert b["val_edge_share_at_exits"] >= 0.65  # the at-exits threshold is chosen on validation
        assert b["at_exits"]["compute_energy_reduction"] > 0 and 0 <= b["within"]["edge_exit_share"] <= 1
        assert r["gap_at_exits_points"] == round(100 * (r["control"]["test_accuracy"] - b["at_exits"]["accuracy"]), 2)
    for b in (1, 2):  # each budget trained for its own epochs; the binary exported with the control as reference
        manifest = yaml.safe_load((out / f"binary-e{b}" / "bundle" / "manifest.yaml").read_text())
        assert manifest["training"]["epochs"] == b
        assert f"control-e{b}" in (out / f"binary-e{b}" / "bundle" / "manifest.yaml").read_text()
    assert summary["gap_fit"]["slope_per_doubling"] is not None and "gap_power_fit" in summary
    with (out / "curve.csv").open() as fh:
        assert [int(r["budget_epochs"]) for r in csv.DictReader(fh)] == [1, 2]
    assert (out / "curve.png").stat().st_size > 0
    assert bench.main(argv) == 2 and "--resume" in capsys.readouterr().err  # no silent overwrite
    assert bench.main(argv + ["--resume"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert all(r["control"]["status"] == "reused" and r["binary"]["status"] == "reused" for r in again)
    assert [r["binary"]["at_exits"] for r in again] == [r["binary"]["at_exits"] for r in rows]


def test_curve_rejects_bad_flags(recipes, tmp_path, capsys) -> None:
    bench = _bench()
    control, binary = recipes
    base = ["--binary", str(binary), "--control", str(control), "--out", str(tmp_path / "x"), "--json"]
    assert bench.main(base + ["--budgets", "0"]) == 2 and "--budgets" in capsys.readouterr().err
    assert bench.main(base + ["--exit-share", "1.5"]) == 2 and "--exit-share" in capsys.readouterr().err
    assert bench.main(base + ["--control-set", "seed=3"]) == 2 and "validation split" in capsys.readouterr().err
    assert bench.main(base + ["--two-step", "0.5", "--budgets", "1,2"]) == 2 and ">= 2 epochs" in capsys.readouterr().err
    assert bench.main(base + ["--two-step", "1.0", "--budgets", "2"]) == 2 and "--two-step" in capsys.readouterr().err


def test_two_step_switches_to_binary_weights_at_the_same_share_of_every_budget(recipes, tmp_path, capsys) -> None:
    bench = _bench()
    control, binary = recipes
    out = tmp_path / "two-step"
    assert bench.main(["--binary", str(binary), "--control", str(control), "--budgets", "2,4", "--two-step", "0.5",
                       "--threads", "1", "--limit", "80", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["two_step"] == 0.5
    for budget, switch in ((2, 1), (4, 2)):
        command = (out / f"binary-e{budget}" / "command.txt").read_text()
        assert f"optim.binary_weights_from_epoch={switch}" in command
        assert "binary_weights_from_epoch" not in (out / f"control-e{budget}" / "command.txt").read_text()
