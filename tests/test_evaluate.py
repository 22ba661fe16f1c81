"""Evaluation and threshold sweeps on the untrained ``tiny`` bundle (fast: tens of samples).

Samples are uniform-random images: the tiny bundle's threshold is the median exit entropy on
such inputs, so at its own threshold roughly half exit at the edge and half go to the cloud.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecloud.bundle import ModelRepository
from edgecloud.cim.backend import available_backends
from edgecloud.cim.energy import EnergyTable
from edgecloud.cli import main
from edgecloud.data.dataset import ImageDataset, train_val_split
from edgecloud.data.idx import write_idx
from edgecloud.evaluate import EvalConfig, InMemoryBundle, aggregate, build_cache, evaluate, sweep
from edgecloud.evaluate.source import check_data, load_eval_data
from edgecloud.evaluate.sweep import default_grid, parse_thresholds
from edgecloud.exits import ExitPolicy, softmax_entropy
from edgecloud.nets.layers import count_macs

N = 40
ALL_EDGE = 1e6  # an entropy threshold every sample is under


def random_images(n: int, seed: int, shape: tuple[int, ...] = (1, 28, 28)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


@pytest.fixture(scope="module")
def bundle(tiny_repo: Path):
    return ModelRepository(tiny_repo).get("tiny")


@pytest.fixture(scope="module")
def data(bundle) -> ImageDataset:
    images, labels = random_images(N, seed=7)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), tuple(bundle.manifest.classes))


@pytest.fixture(scope="module")
def reference(bundle, data):
    """Independent expectations from the plain torch model (no backend, no runner)."""
    model = bundle.build_model()
    with torch.no_grad():
        exit_logits, cloud_logits = model(data.images.float() / 255.0)
    probs = torch.softmax(exit_logits, dim=1)
    return {"entropy": softmax_entropy(probs).numpy(), "edge_pred": exit_logits.argmax(1).numpy(),
            "cloud_pred": cloud_logits.argmax(1).numpy(), "labels": data.labels.numpy()}


def run(bundle, data, thresholds=None, **kw):
    config = EvalConfig(progress=False, batch_size=16, thresholds=thresholds, **kw)
    return evaluate(bundle, data, config)


@pytest.fixture(scope="module")
def at_manifest(bundle, data):
    return run(bundle, data)


@pytest.fixture(scope="module")
def all_cloud(bundle, data):
    return run(bundle, data, [0.0])


@pytest.fixture(scope="module")
def all_edge(bundle, data):
    return run(bundle, data, [ALL_EDGE])


def test_shares_sum_to_one_and_routing_follows_the_exit_entropy(at_manifest, bundle, reference):
    chip = at_manifest.per_chip[0]
    shares = chip["exit_share"]
    assert set(shares) == {"edge", "cloud"}
    assert math.isclose(sum(shares.values()), 1.0)
    assert 0.0 < shares["edge"] < 1.0  # the fixture's threshold is the median: both outcomes occur
    table = at_manifest.tables[0]
    threshold = bundle.manifest.exits[0].threshold
    np.testing.assert_array_equal(table.exit_index, np.where(reference["entropy"] < threshold, 0, 1))
    want = np.where(table.exit_index == 0, reference["edge_pred"], reference["cloud_pred"])
    np.testing.assert_array_equal(table.pred, want)  # cloud answers come from cloud.onnx
    overall = sum(shares[k] * (chip["exit_accuracy"][k] or 0.0) for k in shares)
    assert math.isclose(chip["accuracy"], overall)
    assert math.isclose(chip["accuracy"], float((want == reference["labels"]).mean()))
    assert at_manifest.info["cloud_runtime"] == "onnx"


def test_threshold_zero_sends_everything_to_the_cloud(all_cloud, reference):
    chip = all_cloud.per_chip[0]
    assert chip["exit_share"] == {"edge": 0.0, "cloud": 1.0}
    assert chip["exit_accuracy"]["edge"] is None
    cloud_alone = float((reference["cloud_pred"] == reference["labels"]).mean())
    assert chip["accuracy"] == pytest.approx(cloud_alone)
    assert chip["exit_accuracy"]["cloud"] == pytest.approx(cloud_alone)


def test_huge_threshold_keeps_everything_at_the_edge(all_edge, reference):
    chip = all_edge.per_chip[0]
    assert chip["exit_share"] == {"edge": 1.0, "cloud": 0.0}
    assert chip["energy_j"]["radio"] == 0.0 and chip["energy_j"]["cloud"] == 0.0
    assert chip["accuracy"] == pytest.approx(float((reference["edge_pred"] == reference["labels"]).mean()))


def test_energy_grows_with_the_share_sent_to_the_cloud(all_edge, at_manifest, all_cloud):
    energies = [r.per_chip[0]["energy_total_j"] for r in (all_edge, at_manifest, all_cloud)]
    assert energies[0] < energies[1] < energies[2]
    per_sample_edge = all_edge.tables[0].total_energy()
    per_sample_cloud = all_cloud.tables[0].total_energy()
    assert (per_sample_cloud > per_sample_edge).all()
    assert (per_sample_edge > 0).all()


def test_all_cloud_energy_ratio_matches_a_hand_computation(all_cloud, bundle):
    m = bundle.manifest
    table = EnergyTable.load()
    fp = table.per_event("mac_fp32")
    never = ExitPolicy("entropy", [0.0])  # entropy < 0 never holds: the whole edge part runs
    macs = count_macs(bundle.build_model(), m.input.shape, lambda mod, x: mod.route(x, never), by_precision=True)
    edge_j = sum(n * table.per_event("mac_fp32" if k == "fp32" else k) for k, n in macs.items())
    assert m.cloud.encoding == "fp32"  # 4 bytes per offloaded element
    radio_j = int(np.prod(m.cloud.input_shape)) * 4 * 8 * table.per_event("radio_bit")
    cloud_j = m.cloud.macs * fp
    baseline = m.reference_macs * fp
    chip = all_cloud.per_chip[0]
    assert chip["baseline_fp_j"] == pytest.approx(baseline, rel=1e-12)
    assert chip["energy_j"]["radio"] == pytest.approx(radio_j, rel=1e-12)
    assert chip["energy_j"]["cloud"] == pytest.approx(cloud_j, rel=1e-12)
    assert chip["edge_compute_j"] == pytest.approx(edge_j, rel=1e-9)
    assert chip["energy_ratio"] == pytest.approx((edge_j + radio_j + cloud_j) / baseline, rel=1e-9)
    assert chip["compute_energy_ratio"] == pytest.approx((edge_j + cloud_j) / baseline, rel=1e-9)


def test_sweep_from_the_cache_equals_direct_evaluation(bundle, data, reference, at_manifest, all_cloud, all_edge):
    cache = build_cache(bundle, data, EvalConfig(progress=False, batch_size=16))
    np.testing.assert_allclose(cache.entropies(0), reference["entropy"], rtol=1e-5, atol=1e-6)
    threshold = bundle.manifest.exits[0].threshold
    for t, direct in ((threshold, at_manifest), (0.0, all_cloud), (ALL_EDGE, all_edge)):
        replay = cache.replay(ExitPolicy("entropy", [t]))
        want = direct.tables[0]
        np.testing.assert_array_equal(replay.exit_index, want.exit_index)
        np.testing.assert_array_equal(replay.pred, want.pred)
        assert set(replay.energy) == set(want.energy)
        for comp in want.energy:
            np.testing.assert_allclose(replay.energy[comp], want.energy[comp], rtol=1e-12, err_msg=comp)
        got_m = cache.metrics(ExitPolicy("entropy", [t]))
        want_m = {k: v for k, v in direct.per_chip[0].items() if k != "seed"}
        _close(got_m, want_m)
    rows, operating = sweep(cache, [0.0, threshold, ALL_EDGE])
    assert [r["share_cloud"] for r in rows] == [1.0, rows[1]["share_cloud"], 0.0]
    assert operating["threshold"] == threshold
    assert operating["accuracy"] == rows[1]["accuracy"] == at_manifest.per_chip[0]["accuracy"]


def _close(a, b) -> None:
    """Nested metrics dicts equal up to float rounding."""
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _close(a[k], b[k])
    elif a is None or b is None:
        assert a is b
    else:
        assert a == pytest.approx(b, rel=1e-12)


def test_in_memory_model_with_the_torch_cloud_gives_the_same_answers(bundle, data, at_manifest):
    source = InMemoryBundle(bundle.build_model(), bundle.manifest)
    report = evaluate(source, data, EvalConfig(progress=False, batch_size=16))
    assert report.info["cloud_runtime"] == "torch"
    np.testing.assert_array_equal(report.tables[0].exit_index, at_manifest.tables[0].exit_index)
    np.testing.assert_array_equal(report.tables[0].pred, at_manifest.tables[0].pred)


def test_monte_carlo_on_the_digital_backend_has_zero_spread(bundle, data):
    report = run(bundle, data, chips=2, seed=3)
    assert report.info["seeds"] == [3, 4] and [c["seed"] for c in report.per_chip] == [3, 4]
    s = report.summary
    assert s["accuracy"]["std"] == 0.0 and s["energy_total_j"]["std"] == 0.0
    assert s["accuracy"]["mean"] == report.per_chip[0]["accuracy"]
    assert s["exit_share"]["edge"]["std"] == 0.0


@pytest.mark.skipif("crossbar" not in available_backends(), reason="crossbar backend not built yet")
def test_monte_carlo_on_a_noisy_crossbar_has_spread(bundle, data):
    options = {"programming_noise": "proportional", "programming_sigma": 0.5, "read_noise": 0.05}
    report = run(bundle, data, chips=2, seed=0, backend="crossbar", backend_options=options)
    chips = report.per_chip
    assert report.summary["energy_total_j"]["mean"] > 0
    # different chips (programming variation) give different outputs: the edge decisions or
    # predictions differ, so some metric has a spread
    differs = (report.tables[0].pred != report.tables[1].pred).any() or \
        (report.tables[0].exit_index != report.tables[1].exit_index).any()
    assert differs
    spreads = [report.summary["accuracy"]["std"], report.summary["exit_share"]["edge"]["std"],
               report.summary["energy_total_j"]["std"]]
    assert max(spreads) > 0, chips


def test_aggregate_means_and_sample_std():
    out = aggregate([{"a": 1.0, "d": {"x": None, "y": 2.0}}, {"a": 3.0, "d": {"x": 4.0, "y": 2.0}}])
    assert out["a"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2))}
    assert out["d"]["x"] == {"mean": 4.0, "std": 0.0}  # averaged over the chips that have it
    assert out["d"]["y"] == {"mean": 2.0, "std": 0.0}


def test_data_that_does_not_fit_the_bundle_is_rejected(bundle):
    images, labels = random_images(4, seed=1, shape=(3, 32, 32))
    cifar_like = ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), tuple("abcdefghij"))
    with pytest.raises(ValueError, match=r"shape \[1, 28, 28\]"):
        check_data(cifar_like, bundle.manifest)
    assert default_grid("entropy", 10, 3) == [0.0, round(math.log(10) / 2, 6), round(math.log(10), 6)]
    assert default_grid("max_prob", 10, 2) == [0.0, 1.0]
    assert parse_thresholds("0, 0.5,1") == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="not a number"):
        parse_thresholds("0,x")


# ---- the CLI ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory) -> Path:
    """A Fashion-MNIST-shaped IDX folder: 60 train and 40 test random images."""
    root = tmp_path_factory.mktemp("fmnist")
    for split, prefix, n, seed in (("train", "train", 60, 11), ("test", "t10k", 40, 12)):
        images, labels = random_images(n, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[:, 0])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root


def test_eval_data_limit_and_val_split(bundle, fmnist_root):
    data, info = load_eval_data("fashion-mnist", "test", bundle.manifest, fmnist_root, limit=5)
    assert len(data) == 5 and info == {"dataset": "fashion-mnist", "split": "test", "samples": 5}
    val, info = load_eval_data("fashion-mnist", "val", bundle.manifest, fmnist_root)
    assert info["val_seed"] == bundle.manifest.training["seed"] and info["val_fraction"] == 0.1
    with pytest.raises(ValueError, match="--limit"):
        load_eval_data("fashion-mnist", "test", bundle.manifest, fmnist_root, limit=0)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_cli_eval_prints_a_table_and_json(tiny_repo, fmnist_root, capsys):
    rc = main(["eval", "tiny", "--repository", str(tiny_repo), "--dataset", "fashion-mnist",
               "--data-root", str(fmnist_root), "--limit", "30", "--chips", "2", "--batch-size", "8", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "overall" in out and "energy ratio vs full precision" in out
    report = last_json(out)
    assert report["samples"] == 30 and report["split"] == "test" and report["chips"] == 2
    assert report["summary"]["accuracy"]["std"] == 0.0
    assert len(report["per_chip"]) == 2
    rc = main(["eval", str(tiny_repo / "tiny"), "--dataset", "fashion-mnist", "--data-root", str(fmnist_root),
               "--limit", "10", "--threshold", "edge=0", "--json"])
    report = last_json(capsys.readouterr().out)
    assert rc == 0 and report["thresholds"] == {"edge": 0.0}
    assert report["summary"]["exit_share"]["cloud"]["mean"] == 1.0


def test_cli_eval_uses_a_user_energy_table(tiny_repo, fmnist_root, tmp_path, capsys):
    import yaml
    from importlib import resources

    table = yaml.safe_load(resources.files("edgecloud.cim").joinpath("energy_table.yaml").read_text())
    table["events"]["radio_bit"]["joules"] = 0.0  # e.g. a wired link whose energy is not counted
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(table))
    rc = main(["eval", "tiny", "--repository", str(tiny_repo), "--dataset", "fashion-mnist", "--data-root",
               str(fmnist_root), "--limit", "10", "--threshold", "0=0", "--energy-table", str(path), "--json"])
    report = last_json(capsys.readouterr().out)
    assert rc == 0 and report["energy_table"] == str(path)
    assert report["baseline_network"] == "this network"
    s = report["summary"]
    assert s["energy_j"]["radio"]["mean"] == 0.0
    assert s["energy_total_j"]["mean"] == pytest.approx(s["compute_energy_j"]["mean"])


def test_cli_eval_reports_bad_input_in_one_line(tiny_repo, fmnist_root, capsys):
    rc = main(["eval", "tiny", "--repository", str(tiny_repo), "--dataset", "fashion-mnist",
               "--data-root", str(fmnist_root), "--threshold", "7=0.5"])
    assert rc == 2 and "exit 7 does not exist" in capsys.readouterr().err
    rc = main(["eval", "nope", "--repository", str(tiny_repo), "--dataset", "fashion-mnist",
               "--data-root", str(fmnist_root)])
    assert rc == 2 and "no bundle 'nope'" in capsys.readouterr().err
    rc = main(["eval", "tiny", "--repository", str(tiny_repo), "--dataset", "fashion-mnist",
               "--data-root", str(fmnist_root), "--energy-table", str(fmnist_root / "missing.yaml")])
    assert rc == 2 and "missing.yaml" in capsys.readouterr().err
    rc = main(["eval", "tiny", "--repository", str(tiny_repo), "--dataset", "cifar10",
               "--data-root", str(fmnist_root)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_cli_sweep_writes_csv_and_png(tiny_repo, fmnist_root, tmp_path, capsys, bundle):
    out_dir = tmp_path / "sweep"
    rc = main(["sweep", "tiny", "--repository", str(tiny_repo), "--dataset", "fashion-mnist",
               "--data-root", str(fmnist_root), "--grid", "5", "--out", str(out_dir), "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    report = last_json(out)
    # default split: the validation hold-out of train, re-created from the manifest's seed
    assert report["split"] == "val"
    from edgecloud.data.fashion_mnist import load_fashion_mnist

    _, val = train_val_split(load_fashion_mnist("train", fmnist_root), 0.1, seed=bundle.manifest.training["seed"])
    assert report["samples"] == len(val) > 0
    with (out_dir / "sweep.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 == len(report["rows"])
    for column in ("threshold", "share_edge", "share_cloud", "accuracy", "energy_j", "energy_ratio"):
        assert column in rows[0]
    assert float(rows[0]["threshold"]) == 0.0 and float(rows[0]["share_cloud"]) == 1.0
    shares = [float(r["share_edge"]) for r in rows]
    assert shares == sorted(shares)  # a larger entropy threshold lets more samples exit
    energies = [float(r["energy_j"]) for r in rows]
    assert energies == sorted(energies, reverse=True)
    assert (out_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["operating_point"]["threshold"] == bundle.manifest.exits[0].threshold


def test_multi_exit_cache_replays_route_exactly():
    """Two edge exits (a small in-memory hybrid net, torch cloud): the cache must reproduce route's
    decisions, answers (route may answer with the most confident exit reached) and energies."""
    from edgecloud.bundle import CloudSpec, ExitSpec, InputSpec, Manifest
    from edgecloud.nets.cdhn import HybridNet
    from edgecloud.nets.layers import reference_macs

    torch.manual_seed(0)
    model = HybridNet(in_channels=1, image_size=28, num_classes=10, mean=[0.5], std=[0.5], stem_channels=8,
                      stem_stride=2, blocks=[(8, 2), (8, 1), (16, 1)], edge_blocks=2, exits=[1, 2],
                      exit_pool=3).eval()
    with torch.no_grad():  # make exit 1 less confident than exit 0, so route answers some samples
        model.heads[1].fc.weight.mul_(0.3)  # that exit at exit 1 with exit 0's prediction
        model.heads[1].fc.bias.mul_(0.3)
    images, labels = random_images(20, seed=5)
    data = ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), tuple("abcdefghij"))
    with torch.no_grad():
        outs = model(data.images.float() / 255.0)
    # thresholds halfway between the two middle entropies: no sample sits on a threshold (deeper
    # exits run on the surviving subset in route, on the whole batch in the cache, which may
    # change the last float bits)
    medians = [float(softmax_entropy(torch.softmax(o, 1)).sort().values[9:11].mean()) for o in outs[:2]]
    shape = (1, 28, 28)
    manifest = Manifest(
        name="two-exits", family="hybrid (in memory)", input=InputSpec(shape=list(shape)),
        classes=list("abcdefghij"), reference_macs=reference_macs(model, shape), policy="entropy",
        exits=[ExitSpec(name=n, threshold=t) for n, t in zip(model.exit_names, medians)],
        cloud=CloudSpec(input_shape=list(model.offload_shape()), macs=count_macs(model.cloud_module(),
                                                                              model.offload_shape())),
    )
    source = InMemoryBundle(model, manifest)
    config = EvalConfig(progress=False, batch_size=10)
    cache = build_cache(source, data, config)
    assert len(cache.exit_probs) == 2
    for thresholds in ([0.0, medians[1]], [medians[0], 0.0], [medians[0], ALL_EDGE]):
        direct = evaluate(source, data, EvalConfig(progress=False, batch_size=10, thresholds=thresholds))
        want = direct.tables[0]
        got = cache.replay(ExitPolicy("entropy", thresholds))
        np.testing.assert_array_equal(got.exit_index, want.exit_index, err_msg=str(thresholds))
        np.testing.assert_array_equal(got.pred, want.pred, err_msg=str(thresholds))
        for comp in want.energy:
            np.testing.assert_allclose(got.energy[comp], want.energy[comp], rtol=1e-12, err_msg=comp)
    at_exit1 = want.exit_index == 1  # the last case: answers from exit 0 for samples exiting at 1
    assert at_exit1.any() and (want.pred[at_exit1] != outs[1].argmax(1).numpy()[at_exit1]).any()
    direct = evaluate(source, data, config)  # the manifest's thresholds (the medians)
    got = cache.replay(ExitPolicy("entropy", medians))
    np.testing.assert_array_equal(got.exit_index, direct.tables[0].exit_index)
    np.testing.assert_array_equal(got.pred, direct.tables[0].pred)
    assert set(np.unique(direct.tables[0].exit_index)) == {0, 1, 2}  # all three destinations used
    e = [direct.tables[0].total_energy()[direct.tables[0].exit_index == i].mean() for i in range(3)]
    assert e[0] < e[1] < e[2]  # deeper exit, more blocks; the cloud adds radio and cloud MACs


def test_cli_eval_card_writes_and_replaces_its_section(tiny_repo, fmnist_root, tmp_path, capsys):
    import shutil

    bundle_dir = tmp_path / "tiny"
    shutil.copytree(tiny_repo / "tiny", bundle_dir)
    card = bundle_dir / "README.md"
    before = card.read_text()
    args = ["eval", str(bundle_dir), "--dataset", "fashion-mnist", "--data-root", str(fmnist_root),
            "--limit", "20", "--card"]
    assert main(args) == 0
    once = card.read_text()
    assert once.startswith(before.rstrip("\n")) and "## Evaluations" in once
    assert "edgecloud eval " + str(bundle_dir) in once and "overall" in once
    assert "mac_fp32 4.6e-12 J" in once and "radio_bit 3e-07 J" in once  # the constants, named
    assert once.count("mac_fp32 4.6e-12 J") == 1  # once each
    assert main(args + ["--json"]) == 0  # same settings: replaces its own section
    assert card.read_text().count("### fashion-mnist/test, 20 samples") == 1
    assert main(args[:-1] + ["--backend", "crossbar", "--card"]) == 0  # other settings: a second section
    text = card.read_text()
    assert text.count("<!-- /eval:") == 2 and "backend crossbar" in text
    capsys.readouterr()


def test_eval_table_names_a_baseline_network_other_than_the_model() -> None:
    from edgecloud.evaluate.report import eval_table

    stat = {"mean": 1.0, "std": 0.0}
    summary = {"exit_share": {"cloud": stat}, "exit_accuracy": {"cloud": stat}, "accuracy": stat,
               "energy_j": {"digital": stat}, "energy_total_j": stat, "compute_energy_j": stat,
               "baseline_fp_j": {"mean": 2.0, "std": 0.0}, "energy_ratio": stat,
               "compute_energy_ratio": stat, "compute_energy_reduction": stat}
    report = {"summary": summary, "chips": 1, "seeds": [0], "bundle": "b", "samples": 1, "backend": "digital",
              "backend_options": {}, "cloud_runtime": "onnx", "policy": "entropy", "thresholds": {},
              "exits": ["cloud"]}
    assert "(cifar10-resnet20)" in eval_table({**report, "baseline_network": "cifar10-resnet20"})
    assert "(this network)" not in eval_table({**report, "baseline_network": "this network"})
