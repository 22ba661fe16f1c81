"""IMAC reproduction plumbing: edge-only bundles, the von Neumann baseline (hand counts), eval --baseline.

Everything runs on tiny untrained models and a few random images (seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgecloud.bundle import Bundle, CloudSpec, ExitSpec, InputSpec, Manifest, ModelRepository
from edgecloud.cim.baseline import Hardware, Latency, compare, imac_system_script, inventory
from edgecloud.cim.backend import create_backend
from edgecloud.cim.energy import EnergyTable
from edgecloud.cli import main
from edgecloud.data.dataset import ImageDataset
from edgecloud.data.idx import write_idx
from edgecloud.evaluate import EvalConfig, InMemoryBundle, evaluate
from edgecloud.evaluate.source import balanced_subset
from edgecloud.export_edge import bundle_from_weights, export_edge_bundle
from edgecloud.nets import create_model
from edgecloud.nets.edge_only import EdgeOnlyModel
from edgecloud.nn.quant import QuantLinear

CLASSES = [str(i) for i in range(10)]


def random_images(n: int, seed: int, shape=(1, 28, 28)) -> ImageDataset:
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (n, *shape), dtype=np.uint8))
    return ImageDataset(images, torch.from_numpy(rng.integers(0, 10, n).astype(np.int64)), tuple(CLASSES))


@pytest.fixture(scope="module")
def lenet_bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("lenet5", weight_bits=4, act_bits=4).eval()
    return export_edge_bundle(model, tmp_path_factory.mktemp("repo") / "lenet", name="lenet", family="lenet5",
                              arch={"weight_bits": 4, "act_bits": 4}, classes=CLASSES,
                              training={"command": "untrained: tests/test_imac.py"})


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    for prefix, n, seed in (("train", 20, 1), ("t10k", 30, 2)):
        data = random_images(n, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", data.images[:, 0].numpy())
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))  # all classes
    return root


# ---- edge-only bundles ---------------------------------------------------------------------------

def test_edge_only_bundle_loads_and_evaluates_like_the_plain_classifier(lenet_bundle) -> None:
    bundle = Bundle(lenet_bundle)
    m = bundle.manifest
    assert m.edge_only and m.cloud.offload == "none" and [(e.name, e.threshold) for e in m.exits] == [("final", None)]
    assert not (lenet_bundle / "cloud.onnx").exists() and (lenet_bundle / "README.md").is_file()
    assert m.reference_macs == 416_520  # LeNet-5 on 28x28: 117600 + 240000 + 48000 + 10080 + 840
    assert "cloud:\n  offload: none\n" in (lenet_bundle / "manifest.yaml").read_text()
    data = random_images(24, seed=3)
    report = evaluate(bundle, data, EvalConfig(progress=False))
    plain = create_model("lenet5", weight_bits=4, act_bits=4)
    plain.load_state_dict(torch.load(lenet_bundle / "edge.pt", weights_only=True))
    with torch.no_grad():
        pred = plain.eval()(data.images.float() / 255.0)[0].argmax(1).numpy()
    assert np.array_equal(report.tables[0].pred, pred)
    s = report.per_chip[0]
    assert s["exit_share"] == {"final": 1.0, "cloud": 0.0} and report.info["cloud_runtime"] == "none"
    assert s["energy_j"]["radio"] == 0.0 and s["energy_j"]["cloud"] == 0.0
    assert s["energy_j"]["digital"] == pytest.approx(416_520 * EnergyTable.load().per_event("mac_int4"))


def test_edge_daemon_runner_serves_an_edge_only_bundle(lenet_bundle) -> None:
    from edgecloud.edge.runner import EdgeRunner

    runner = EdgeRunner(Bundle(lenet_bundle), "sram", backend_options={"preset": "imac", "group_size": 25})
    rows = runner.run_rows(random_images(5, seed=6).images.numpy())  # the servicer's micro-batch path
    assert rows["exit_index"].tolist() == [0] * 5 and not rows["need"].any()
    assert rows["probs"].shape == (5, 10) and rows["energy"].sum() > 0


def test_cloud_server_skips_edge_only_bundles(lenet_bundle, tiny_repo) -> None:
    from edgecloud.cloud.sessions import load_cloud_model
    from edgecloud.config import CloudConfig

    repo = ModelRepository(lenet_bundle.parent)
    assert repo.names() == ["lenet"] and repo.names(with_cloud=True) == []
    assert ModelRepository(tiny_repo).names(with_cloud=True) == ["tiny"]
    with pytest.raises(ValueError, match="edge-only"):
        load_cloud_model(Bundle(lenet_bundle), CloudConfig())


def test_edge_only_manifest_is_validated() -> None:
    base = dict(name="m", family="lenet5", input=InputSpec(shape=[1, 28, 28]), classes=CLASSES)
    with pytest.raises(ValueError, match="threshold null"):
        Manifest(**base, exits=[ExitSpec(name="final", threshold=0.5)], cloud=CloudSpec(offload="none"))
    with pytest.raises(ValueError, match="no input_shape"):
        CloudSpec(offload="none", input_shape=[4])
    with pytest.raises(ValueError, match="input_shape is required"):
        CloudSpec(offload="features")


def test_finalize_writes_an_edge_only_bundle(fmnist_root, tmp_path) -> None:
    from edgecloud.train.loop import finalize, load_splits
    from edgecloud.train.recipe import Recipe

    recipe = Recipe.model_validate({
        "name": "toy-lenet", "family": "lenet5", "arch": {"weight_bits": 4, "act_bits": 4}, "seed": 0,
        "data": {"dataset": "fashion-mnist", "root": str(fmnist_root), "val_fraction": 0.5},
        "optim": {"epochs": 1, "batch_size": 8},
    })
    torch.manual_seed(0)
    model = create_model("lenet5", weight_bits=4, act_bits=4)
    path, metrics = finalize(model, recipe, tmp_path / "out", splits=load_splits(recipe),
                             training={"command": "edgecloud train toy-lenet"})
    bundle = Bundle(path)
    assert bundle.manifest.edge_only and bundle.manifest.metrics["test_samples"] == 30
    assert bundle.manifest.training["command"] == "edgecloud train toy-lenet"
    assert isinstance(bundle.build_model(), EdgeOnlyModel)


def test_bundle_from_weights_keeps_the_training_record(fmnist_root, tmp_path) -> None:
    torch.manual_seed(1)
    model = create_model("lenet5", weight_bits=4, act_bits=4)
    out = tmp_path / "legacy"
    out.mkdir()
    torch.save(model.state_dict(), out / "weights.pt")
    training = {"recipe": "toy", "command": "edgecloud train toy --threads 2",
                "data": {"dataset": "fashion-mnist", "root": str(fmnist_root)}, "history": [{"epoch": 1, "loss": 0.5, "val_accuracy": [0.25], "wall_time_s": 3.0}]}
    (out / "metrics.json").write_text(json.dumps({"family": "lenet5", "arch": {"weight_bits": 4},
                                                  "training": training, "metrics": {"test_accuracy": 0.5}}))
    bundle = Bundle(bundle_from_weights(out))
    assert not (out / "weights.pt").exists() and not (out / "metrics.json").exists()
    m = bundle.manifest
    assert m.name == "toy" and m.training == training and m.metrics == {"test_accuracy": 0.5}
    assert m.arch["act_bits"] == 4 and m.arch["weight_bits"] == 4  # constructor defaults filled in
    assert "edgecloud train toy --threads 2" in (out / "README.md").read_text()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(bundle.build_model()(x)[0], model.eval()(x)[0])


def test_balanced_subset_takes_the_first_samples_of_every_class() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])  # stored class by class
    assert balanced_subset(labels, 6).tolist() == [0, 3, 6, 1, 4, 7]  # interleaved by class
    assert sorted(balanced_subset(labels, 9).tolist()) == list(range(9))
    with pytest.raises(ValueError, match="at least one sample per class"):
        balanced_subset(labels, 2)


# ---- the von Neumann baseline --------------------------------------------------------------------

class OneLinear(nn.Module):
    """20 inputs -> 3 outputs, 4-bit weights and inputs: one hand-countable SRAM layer."""

    num_classes, in_channels, image_size = 3, 1, 0

    def __init__(self) -> None:
        super().__init__()
        self.fc = QuantLinear(20, 3, bias=False, weight_bits=4, act_bits=4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.fc(x.flatten(1))]


def one_linear_source() -> InMemoryBundle:
    torch.manual_seed(0)
    manifest = Manifest(name="one", family="none", input=InputSpec(shape=[1, 4, 5]), classes=["a", "b", "c"],
                        exits=[ExitSpec(name="final")], cloud=CloudSpec(offload="none"))
    return InMemoryBundle(EdgeOnlyModel(OneLinear()).eval(), manifest)


def test_baseline_equals_a_hand_count_on_one_layer() -> None:
    t = EnergyTable.load()
    lat = Latency.load().seconds
    e = t.per_event
    r = compare(one_linear_source(), {"preset": "imac", "group_size": 10}, hardware=Hardware())
    (layer,) = r["layers"]
    # SRAM: K = 20 rows in 2 groups of 10; O = 3 words (sign + 4 cells = 5 cells each) -> 6 lines
    # per group (positive and negative): 2 x 6 = 12 conversions, 6 reads; 60 products; one macro,
    # so 20 word-line DAC conversions; one shift-add per conversion; 3 outputs rescaled.
    cim_j = (60 * e("sram_cim_4b_op") + 12 * e("adc_conversion_4b") + 20 * e("sram_wl_dac_4b")
             + 12 * e("shift_add") + 3 * e("mac_fp32"))
    assert r["cim"]["energy_total_j"] == pytest.approx(cim_j, rel=1e-12)
    words = 4 * 256 / 5  # banks x cells per word line / cells per word, all busy (replicate)
    cim_s = 6 * (lat["dac_settle"] + lat["cim_compute"] + lat["adc_conversion"]) / words
    assert r["cim"]["delay_s"] == pytest.approx(cim_s, rel=1e-12)
    # von Neumann: 60 4-bit weights = 240 bits from the 8 KB SRAM (30 bytes), 60 int4 MACs,
    # 3 output registers and the same 3 rescalings; 240 / (16 x 4) reads of 4 ns + 60 / 175 MAC slots.
    vn_j = 240 / 64 * e("sram_read_64b") + 60 * e("mac_int4") + 3 * e("register_access_16b") + 3 * e("mac_fp32")
    assert r["von_neumann"]["memory"] == "sram_read_64b"
    assert r["von_neumann"]["energy_total_j"] == pytest.approx(vn_j, rel=1e-12)
    vn_s = 240 / (16 * 4) * lat["sram_read"] + 60 / 175 * lat["mac"]
    assert r["von_neumann"]["delay_s"] == pytest.approx(vn_s, rel=1e-12)
    assert r["energy_ratio"] == pytest.approx(vn_j / cim_j) and r["delay_ratio"] == pytest.approx(vn_s / cim_s)
    assert layer["reads"] == 6 and layer["products"] == 60

    # one product per compute cycle (IMAC's script), and no replication: only the layer's 6 words work
    seq = compare(one_linear_source(), {"preset": "imac", "group_size": 10},
                  hardware=Hardware(accumulate="sequential", replicate=False))
    want = (60 * lat["cim_compute"] + 6 * (lat["dac_settle"] + lat["adc_conversion"])) / 6
    assert seq["cim"]["delay_s"] == pytest.approx(want, rel=1e-12)
    dram = compare(one_linear_source(), {"preset": "imac", "group_size": 10}, hardware=Hardware(memory="dram"))
    assert dram["von_neumann"]["energy_j"]["weight_fetch"] == pytest.approx(240 / 64 * e("dram_read_64b"))


def test_baseline_cim_energy_is_what_the_evaluation_measures(lenet_bundle) -> None:
    options = {"preset": "imac", "group_size": 25}
    r = compare(Bundle(lenet_bundle), options, seed=3)
    report = evaluate(Bundle(lenet_bundle), random_images(8, seed=4),
                      EvalConfig(backend="sram", backend_options=options, seed=3, progress=False))
    measured = report.per_chip[0]["energy_j"]
    for component, joules in r["cim"]["energy_j"].items():
        assert measured[component] == pytest.approx(joules, rel=1e-9)
    assert [lay["name"] for lay in r["layers"]] == ["net.conv1", "net.conv2", "net.fc1", "net.fc2", "net.fc3"]
    assert sum(lay["macs"] for lay in r["layers"]) == 416_520


def test_inventory_leaves_a_calibrated_adc_uncalibrated(lenet_bundle) -> None:
    backend = create_backend("sram", {"preset": "imac"}, 0)
    model = backend.prepare(Bundle(lenet_bundle).build_model())
    inventory(model, (1, 28, 28), backend)
    assert all(m.calib_seen == 0 for _, m in backend._chips.values())


def test_imac_closed_form_gives_the_published_delay_ratio_on_lenet5() -> None:
    # (weights, MACs, outputs) of LeNet-5 (conv 5x5x6 pad 2, conv 5x5x16, FC 400-120-84-10) as in
    # IMAC's System/result.py arch_soft
    lenet = [(150, 117_600, 4_704, 0), (2_400, 240_000, 1_600, 0), (48_000, 48_000, 120, 0),
             (10_080, 10_080, 84, 0), (840, 840, 10, 0)]
    r = imac_system_script(lenet)
    assert round(r["delay_ratio"], 2) == 9.42  # the published delay ratio
    assert r["energy_ratio"] == pytest.approx(4.555, abs=1e-3)  # the script's energy constants give 4.55x, not 6.24x


def test_cli_eval_baseline_json(lenet_bundle, fmnist_root, capsys) -> None:
    rc = main(["eval", str(lenet_bundle), "--dataset", "fashion-mnist", "--data-root", str(fmnist_root),
               "--backend", "sram", "--backend-option", "preset=imac", "--backend-option", "group_size=25",
               "--chips", "2", "--sample", "10", "--baseline", "von-neumann",
               "--baseline-option", "accumulate=sequential", "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and "von Neumann / SRAM-CiM: energy" in out
    report = json.loads(out.strip().splitlines()[-1])
    base = report["baseline"]
    assert report["samples"] == 10 and report["chips"] == 2 and "class-balanced" in report["sample"]
    assert base["hardware"]["accumulate"] == "sequential" and base["published"]["delay_ratio"] == 9.42
    assert abs(base["model_vs_measured"]) < 1e-9
    assert base["energy_ratio"] > 0 and base["delay_ratio"] > 0
    rc = main(["eval", str(lenet_bundle), "--dataset", "fashion-mnist", "--data-root", str(fmnist_root),
               "--limit", "4", "--baseline", "von-neumann"])
    assert rc == 2 and "sram backend" in capsys.readouterr().err


# ---- the sram backend's "imac" accuracy model (IMAC's add_variations) -----------------------------

def test_imac_accuracy_model_matches_a_hand_computation() -> None:
    from edgecloud.cim.events import EventLog, recording

    source = one_linear_source()
    x = torch.rand(6, 1, 4, 5, generator=torch.Generator().manual_seed(5))
    runs = []
    for model_name in ("imac", "arrays"):
        backend = create_backend("sram", {"group_size": 10, "accuracy_model": model_name, "vt_sigma_lsb": 0.6,
                                          "adc_bits": 4, "adc_range": "calibrated"}, 7)
        net = backend.prepare(source.build_model())
        layer = net.net.fc
        log = EventLog(6)
        with torch.no_grad(), recording(log):
            w_int, _ = layer.quantize_weight()
            x_int = layer.quantize_input(x.flatten(1))
            got = backend.mvm(layer, x_int, w_int)
            again = backend.mvm(layer, x_int[:2], w_int)  # the error map is fixed per chip
        runs.append((backend, layer, x_int, w_int, got, again, log.total()))
    backend, layer, x_int, w_int, got, again, events = runs[0]
    array_events = runs[1][-1]
    assert events == array_events  # same energy accounting as the simulated arrays
    y = x_int @ w_int.t()
    levels = 15 * 20 / 10
    top = float(y.abs().max())
    error = backend._imac[id(layer)]["error"]
    assert error.shape == (3,) and torch.equal(error, error.round()) and error.abs().max() > 0
    want = torch.sign(y) * (torch.round(y.abs() * levels / top) + error).clamp(0, levels) * top / levels
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, want[:2])
