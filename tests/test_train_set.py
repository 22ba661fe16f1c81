"""``edgecloud train --set KEY=VALUE`` (recipe overrides before validation, recorded, checked on
resume) and ``benchmarks/train_ablation.py`` (variants side by side, reused on rerun), on a tiny
ResNet and the synthetic CIFAR-10 of tests/synthetic_cifar.py."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from synthetic_cifar import write_cifar_pickles

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """100 training and 40 test images of a learnable synthetic CIFAR-10."""
    return write_cifar_pickles(tmp_path_factory.mktemp("cifar"))


def _tiny_yaml(folder: Path, root: Path, epochs: int = 1) -> Path:
    """A ResNet-8 recipe that trains an epoch of the synthetic set in well under a second."""
    recipe = {
        "name": "tiny-resnet", "family": "resnet", "arch": {"depth": 8, "num_classes": 10}, "seed": 0,
        "data": {"dataset": "cifar10", "root": str(root), "val_fraction": 0.2, "hflip": True},
        "optim": {"epochs": epochs, "batch_size": 16, "optimizer": "sgd", "lr": 0.05, "schedule": "constant",
                  "channels_last": False, "precision": "fp32"},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _bench():
    """benchmarks/train_ablation.py as a module (registered first: its dataclasses look themselves up)."""
    if "train_ablation" in sys.modules:
        return sys.modules["train_ablation"]
    spec = importlib.util.spec_from_file_location("train_ablation", REPO_ROOT / "benchmarks" / "train_ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_ablation"] = module
    spec.loader.exec_module(module)
    return module


# ---- the override helper -------------------------------------------------------------------------

def test_apply_overrides_paths_yaml_values_and_flip() -> None:
    from edgecloud.train.recipe import apply_overrides

    data = {"data": {"dataset": "cifar10", "hflip": True}, "optim": {"ema": None, "exit_weights": [1.0, 1.0]}}
    out = apply_overrides(data, ["optim.ema.decay=0.9", "optim.lookahead={k: 3, alpha: 0.5}",
                                 "optim.exit_weights.0=0.5", "data.flip=alternating", "arch.whiten_stem=true",
                                 "name=renamed"])
    assert out["optim"]["ema"] == {"decay": 0.9} and out["optim"]["lookahead"] == {"k": 3, "alpha": 0.5}
    assert out["optim"]["exit_weights"] == [0.5, 1.0] and out["arch"] == {"whiten_stem": True}
    assert out["data"] == {"dataset": "cifar10", "flip": "alternating"}  # flip decides: hflip dropped with it
    assert out["name"] == "renamed"
    assert data["optim"]["ema"] is None and data["data"]["hflip"] is True  # the input is not changed
    # hflip set explicitly stays (and the recipe's validator then names the contradiction)
    assert apply_overrides(data, ["data.flip=alternating", "data.hflip=true"])["data"]["hflip"] is True


@pytest.mark.parametrize("item, message", [
    ("optim.lr", "expected KEY=VALUE"),
    ("=3", "empty key"),
    ("optim..lr=3", "empty key"),
    ("data.dataset.x=1", "not a mapping"),
    ("optim.exit_weights.5=1", "not an index"),
    ("optim.lr=[1", "not valid YAML"),
])
def test_apply_overrides_rejects_bad_items(item: str, message: str) -> None:
    from edgecloud.train.recipe import apply_overrides

    with pytest.raises(ValueError, match="--set") as info:
        apply_overrides({"data": {"dataset": "cifar10"}, "optim": {"exit_weights": [1.0]}}, [item])
    assert message in str(info.value)


def test_load_recipe_with_sets_validates_and_names_the_key() -> None:
    from edgecloud.train.recipe import load_recipe

    r = load_recipe("cifar10-resnet20", ["optim.ema.decay=0.99", "data.flip=alternating",
                                         "optim.label_smoothing=0.2", "arch.whiten_stem=true",
                                         "optim.lookahead={k: 5, alpha: 0.5}"])
    assert r.optim.ema.decay == 0.99 and r.optim.ema.every == 1 and r.data.flip_mode == "alternating"
    assert r.optim.label_smoothing == 0.2 and r.arch["whiten_stem"] is True and r.optim.lookahead.k == 5
    assert load_recipe("cifar10-resnet20", []) == load_recipe("cifar10-resnet20")
    with pytest.raises(ValueError, match=r"(?s)--set optim\.emaa\.decay: .*Extra inputs are not permitted"):
        load_recipe("cifar10-resnet20", ["optim.emaa.decay=0.9"])
    with pytest.raises(ValueError, match=r"(?s)--set optim\.ema\.decay: .*less than 1"):
        load_recipe("cifar10-resnet20", ["optim.ema.decay=1.5"])
    # a section-level check names every override in that section (not the data.* one)
    with pytest.raises(ValueError, match=r"(?s)--set optim\.label_smoothing, optim\.binary_weights_from_epoch: "
                                         r".*must be below epochs"):
        load_recipe("cifar10-resnet20", ["optim.label_smoothing=0.1", "data.crop_padding=2",
                                         "optim.binary_weights_from_epoch=40"])
    with pytest.raises(ValueError, match=r"--set arch\.whiten_stem: family cifar_hybrid has no argument"):
        load_recipe("cifar10-hybrid-resnet20-binary", ["arch.whiten_stem=true"])


# ---- the CLI -------------------------------------------------------------------------------------

def test_cli_train_set_is_recorded_and_checked_on_resume(cifar_root, tmp_path, capsys) -> None:
    from edgecloud.bundle import Bundle
    from edgecloud.cli import main

    path = _tiny_yaml(tmp_path, cifar_root)
    run, bundle = tmp_path / "run", tmp_path / "models" / "tiny"
    sets = ["--set", "optim.label_smoothing=0.2", "--set", "data.flip=alternating",
            "--set", "optim.ema={decay: 0.9, every: 1}", "--set", "arch.whiten_stem=true"]
    rc = main(["train", str(path), "--out", str(run), "--export", str(bundle), "--no-progress", *sets])
    assert rc == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    rec = ckpt["recipe"]
    assert rec["optim"]["label_smoothing"] == 0.2 and rec["optim"]["ema"] == {"decay": 0.9, "every": 1}
    assert rec["data"]["flip"] == "alternating" and rec["data"]["hflip"] is False
    assert rec["arch"]["whiten_stem"] is True
    m = Bundle(bundle).manifest
    assert m.training["optim"]["label_smoothing"] == 0.2 and m.training["optim"]["ema"]["decay"] == 0.9
    assert m.training["data"]["flip"] == "alternating"
    assert "--set 'optim.ema={decay: 0.9, every: 1}'" in m.training["command"]
    capsys.readouterr()
    # a resume with other overrides is refused by the recipe check
    rc = main(["train", str(path), "--out", str(run), "--export", str(bundle), "--no-progress", "--resume",
               *sets[:-2]])
    assert rc == 2 and "different recipe" in capsys.readouterr().err
    # bad --set: one clear line naming --set and the key
    rc = main(["train", str(path), "--out", str(tmp_path / "bad"), "--set", "optim.emaa=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--set optim.emaa" in err and "Extra inputs are not permitted" in err
    rc = main(["train", str(path), "--out", str(tmp_path / "bad"), "--set", "optim.lr"])
    assert rc == 2 and "--set 'optim.lr': expected KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ---- benchmarks/train_ablation.py ----------------------------------------------------------------

def test_airbench_variants_fit_the_family() -> None:
    from edgecloud.train.recipe import load_recipe

    bench = _bench()
    resnet = load_recipe("cifar10-resnet20")
    names = [v.name for v in bench.airbench_variants(resnet)]
    assert names == ["label_smoothing", "alternating_flip", "ema", "lookahead", "whiten_stem", "flip_tta", "all"]
    hybrid = load_recipe("cifar10-hybrid-resnet20-binary")
    variants = bench.airbench_variants(hybrid)
    assert "whiten_stem" not in [v.name for v in variants]
    assert not any("whiten" in s for s in variants[-1].sets)
    for recipe_name, recipe in (("cifar10-resnet20", resnet), ("cifar10-hybrid-resnet20-binary", hybrid)):
        for v in bench.airbench_variants(recipe):
            load_recipe(recipe_name, v.sets)  # every built-in variant is a valid recipe
    v = bench.parse_variant("ema2:optim.ema={decay: 0.9, every: 2},optim.label_smoothing=0.1")
    assert v.name == "ema2" and v.sets == ["optim.ema={decay: 0.9, every: 2}", "optim.label_smoothing=0.1"]
    for bad in ("noname", "a b:x=1", "x:optim.lr"):
        with pytest.raises(ValueError):
            bench.parse_variant(bad)


def test_ablation_trains_reports_and_reuses(cifar_root, tmp_path, capsys) -> None:
    bench = _bench()
    path = _tiny_yaml(tmp_path, cifar_root)
    out = tmp_path / "abl"
    argv = [str(path), "--out", str(out), "--epochs", "1", "--threads", "1", "--json",
            "--variant", "ls:optim.label_smoothing=0.2", "--variant", "tta:eval.tta_flip=true"]
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --json: no progress
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["benchmark"] == "train_ablation" and summary["recipe"] == "tiny-resnet" and summary["cpu"]
    variants = summary["variants"]
    assert [v["name"] for v in variants] == ["base", "ls", "tta"]
    for v in variants:
        assert {"name", "sets", "val_accuracy", "test_accuracy", "wall_s", "delta_vs_base"} <= set(v)
        assert len(v["val_accuracy"]) == 1 and 0 <= v["test_accuracy"] <= 1 and v["test_samples"] == 40
    base, ls, tta = variants
    assert base["delta_vs_base"] == 0 and ls["sets"] == ["optim.label_smoothing=0.2"]
    # flip TTA is reporting-only: it shares the base's training and adds the TTA accuracies
    assert tta["trained_in"] == "base" and tta["val_accuracy"] == base["val_accuracy"]
    assert "val_accuracy_tta" in tta and "val_accuracy_tta" not in base
    assert tta["delta_vs_base"] == round(tta["val_accuracy_tta"][-1] - base["val_accuracy"][-1], 4)
    assert not (out / "tta" / "checkpoint.pt").exists() and (out / "tta" / "variant.json").is_file()
    with (out / "ablation.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == ["base", "ls", "tta"] and rows[1]["sets"] == "optim.label_smoothing=0.2"
    assert float(rows[1]["val_accuracy"]) == ls["val_accuracy"][-1] and rows[2]["trained_in"] == "base"
    assert (out / "ablation.png").stat().st_size > 0
    assert "--set optim.label_smoothing=0.2" in (out / "ls" / "command.txt").read_text()
    mtimes = {n: (out / n / "checkpoint.pt").stat().st_mtime_ns for n in ("base", "ls")}
    # without --resume an existing run is not overwritten
    assert bench.main(argv) == 2 and "--resume" in capsys.readouterr().err
    # with --resume the finished runs are reused, not retrained
    assert bench.main(argv + ["--resume"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["variants"]
    assert [v["status"] for v in again] == ["reused", "reused", "shared with base"]
    assert {n: (out / n / "checkpoint.pt").stat().st_mtime_ns for n in ("base", "ls")} == mtimes
    assert [(v["val_accuracy"], v["test_accuracy"], v["wall_s"]) for v in again] == \
        [(v["val_accuracy"], v["test_accuracy"], v["wall_s"]) for v in variants]


def test_ablation_resumes_a_partial_run(cifar_root, tmp_path, capsys) -> None:
    from edgecloud.train.loop import run_training
    from edgecloud.train.recipe import load_recipe

    bench = _bench()
    path = _tiny_yaml(tmp_path, cifar_root, epochs=2)
    out = tmp_path / "abl"
    run_training(load_recipe(path), out / "base", progress=False, stop_after=1)  # an interrupted base run
    assert bench.main([str(path), "--out", str(out), "--json", "--resume", "--variant", "ls:optim.label_smoothing=0.2"]) == 0
    variants = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["variants"]
    assert [v["status"] for v in variants] == ["resumed", "trained"]
    assert torch.load(out / "base" / "checkpoint.pt", weights_only=False)["epoch"] == 2
    # a run folder trained with other settings is refused, not silently reused or overwritten
    assert bench.main([str(path), "--out", str(out), "--json", "--resume", "--epochs", "1",
                       "--variant", "ls:optim.label_smoothing=0.2"]) == 2
    assert "other settings" in capsys.readouterr().err
