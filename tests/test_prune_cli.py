"""``edgecloud prune``: regularise, prune, fine-tune and export a bundle whose crossbar ADCs shrink
(a tiny quantized ResNet bundle and a tiny synthetic CIFAR-10 folder, as tests/test_robust.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgecloud.cli import main
from synthetic_cifar import synthetic_images, write_cifar_pickles

ARCH = {"depth": 8, "num_classes": 10, "weight_bits": 8, "act_bits": 8, "widths": [8, 16, 16]}
ROWS = 16  # 16-row arrays of 16 columns (8 outputs each): several arrays per layer of the tiny net
TRAINING = {"seed": 0, "data": {"dataset": "cifar10", "val_fraction": 0.1},
            "optim": {"batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                      "schedule": "constant", "channels_last": False, "precision": "fp32"}}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """A CIFAR-10 pickle folder: 100 training and 40 test images of a learnable synthetic task."""
    return write_cifar_pickles(tmp_path_factory.mktemp("cifar"))


def _export(net: torch.nn.Module, out: Path, family: str, arch: dict) -> Path:
    from edgecloud.data.classes import CIFAR10_CLASSES
    from edgecloud.export_edge import export_edge_bundle

    return export_edge_bundle(net.eval(), out, name=out.name, family=family, arch=arch, classes=CIFAR10_CLASSES,
                              training=TRAINING)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A tiny all-8-bit ResNet bundle (briefly trained, so its BN statistics and clip ranges are real)."""
    import torch.nn.functional as F

    from edgecloud.nets import create_model

    torch.manual_seed(0)
    net = create_model("resnet_q", **ARCH)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = synthetic_images(64, seed=1)
    net.train()
    for step in range(4):
        idx = torch.arange(step * 16, step * 16 + 16)
        loss = F.cross_entropy(net(x[idx])[0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _export(net, tmp_path_factory.mktemp("src") / "tiny-q", "resnet_q", ARCH)


def _prune(bundle: Path, root: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(bundle), "--data-root", str(root), "--rows", str(ROWS), "--json", "--out", str(out), *extra]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _column_counts(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """(row tiles, outputs) non-zero weights of each column segment (the arrays' row order)."""
    from edgecloud.codesign.dub import column_segments, weight_as_matrix

    return (column_segments(weight_as_matrix(weight), rows) != 0).sum(dim=1)


def test_dub_prunes_balanced_and_the_crossbar_reads_the_cheaper_adcs(bundle, cifar_root, tmp_path, capsys,
                                                                      monkeypatch) -> None:
    monkeypatch.setenv("EDGECLOUD_CACHE", str(tmp_path / "cache"))  # a fresh chip cache
    from edgecloud.bundle import Bundle, bundle_backend_options
    from edgecloud.cim.adc import lossless_adc_bits
    from edgecloud.cim.backend import create_backend

    out = tmp_path / "tiny-q-dub"
    # --tol 0.03: the tiny net's small weights count as zero, so the D.U.B. step has levels to reach
    argv = _prune(bundle, cifar_root, out, "--method", "dub", "--regularize-epochs", "1", "--finetune-epochs", "1",
                  "--tol", "0.03", "--crossbar-chips", "1")
    assert main(argv) == 0
    report = _last_json(capsys)
    m = report["measured"]
    assert report["bundle"] == str(out) and report["phases"]["regularize"]["epochs"] == 1
    assert report["command"] == "edgecloud " + " ".join(argv)
    assert 0.0 < m["sparsity"]["sparsity"] < 1.0
    # every law prices the pruned bundle's ADCs below the dense source's on the same arrays
    for law in ("walden", "schreier", "linear"):
        e = m["adc_energy"][law]
        assert e["pruned_j"] < e["source_j"] and e["ratio"] > 1.0
        assert e["pruned_j"] <= e["source_sparsity_adc_j"] <= e["source_j"]
    assert set(m["accuracy"]["digital"]) == {"source", "pruned"} and m["accuracy"]["test_samples"] == 40
    assert len(m["accuracy"]["crossbar"]["pruned"]["per_chip"]) == 1
    assert m["accuracy"]["crossbar"]["cached_chips"] == 0  # source and pruned differ: two chips measured

    loaded = Bundle(out)
    net = loaded.build_model().net
    opa = ROWS // 2
    for name, layer in m["sparsity"]["layers"].items():
        counts = _column_counts(net.get_submodule(name).weight.detach(), ROWS)  # (tiles, O)
        for t in range(counts.shape[0]):
            for g in range(0, counts.shape[1], opa):
                assert counts[t, g:g + opa].unique().numel() == 1, (name, t, g)  # balanced: one count per array
        assert layer["sparsity"] == pytest.approx(float((net.get_submodule(name).weight == 0).float().mean()), abs=1e-6)
    # the manifest's hardware section is what the crossbar backend runs: some arrays convert at fewer bits
    assert loaded.manifest.hardware["crossbar"] == {"rows": ROWS, "cols": ROWS, "adc_reduce": "sparsity"}
    backend = create_backend("crossbar", bundle_backend_options(loaded.manifest, "crossbar", {}))
    chip = loaded.build_model()
    backend.prepare(chip)
    full = lossless_adc_bits(ROWS, 2, 1)
    bits = backend.array_bits
    assert all(int(b.max()) <= full for b in bits.values())
    assert any(int(b.min()) < full for name, b in bits.items() if name.removeprefix("net.") in m["sparsity"]["layers"])
    assert loaded.manifest.metrics["codesign"]["measured"]["adc_energy"]["walden"]["ratio"] == \
        m["adc_energy"]["walden"]["ratio"]
    card = (out / "README.md").read_text()
    assert "Crossbar co-design" in card and report["command"] in card and "schreier" in card

    # the same command again resumes from the finished checkpoints: nothing retrained, same bundle
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert main(argv) == 0
    again = _last_json(capsys)
    assert again["phases"] == report["phases"] and again["measured"]["sparsity"] == m["sparsity"]
    after = Bundle(out).build_model().net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ... and its chips come from the cache (same weights, options, images, simulator), with the same numbers
    assert again["measured"]["accuracy"]["crossbar"]["cached_chips"] == 2
    assert again["measured"]["accuracy"]["crossbar"]["source"] == m["accuracy"]["crossbar"]["source"]
    assert again["measured"]["accuracy"]["crossbar"]["pruned"] == m["accuracy"]["crossbar"]["pruned"]
    assert main([*argv, "--no-cache"]) == 0
    assert _last_json(capsys)["measured"]["accuracy"]["crossbar"]["cached_chips"] == 0


def test_magnitude_hits_its_ratio(bundle, cifar_root, tmp_path, capsys) -> None:
    out = tmp_path / "mag"
    assert main(_prune(bundle, cifar_root, out, "--method", "magnitude", "--ratio", "0.5",
                       "--regularize-epochs", "0", "--finetune-epochs", "1")) == 0
    report = _last_json(capsys)
    assert "regularize" not in report["phases"]
    layers = report["measured"]["sparsity"]["layers"]
    assert layers and all(layer["sparsity"] == pytest.approx(round(0.5 * layer["weights"]) / layer["weights"])
                          for layer in layers.values())
    assert report["measured"]["sparsity"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_baselines_at_the_sparsity_of_a_dub_bundle(bundle, cifar_root, tmp_path, capsys) -> None:
    """--match-sparsity: magnitude and group lasso reach each layer's D.U.B. sparsity, so the
    comparison isolates where the zeros sit (balanced per array, or not)."""
    dub = tmp_path / "dub"
    common = ("--regularize-epochs", "0", "--finetune-epochs", "0")
    assert main(_prune(bundle, cifar_root, dub, "--method", "dub", "--tol", "0.03", *common)) == 0
    target = {k: v["sparsity"] for k, v in _last_json(capsys)["measured"]["sparsity"]["layers"].items()}
    assert len(set(target.values())) > 1  # the layers differ: a single ratio would not match them
    for method in ("magnitude", "group-lasso"):
        assert main(_prune(bundle, cifar_root, tmp_path / method, "--method", method, "--match-sparsity", str(dub),
                           *common)) == 0
        report = _last_json(capsys)
        got = {k: v["sparsity"] for k, v in report["measured"]["sparsity"]["layers"].items()}
        assert got.keys() == target.keys()
        for name, layer in report["measured"]["sparsity"]["layers"].items():
            # group lasso's dead segments may already exceed the ratio; magnitude hits it exactly
            want = round(target[name] * layer["weights"]) / layer["weights"]
            assert (got[name] == pytest.approx(want, abs=1e-6) if method == "magnitude"
                    else got[name] >= want - 1e-6), (method, name)
        assert report["settings"]["match_sparsity"] == str(dub)
        assert f"sparsity it has in `{dub}`" in (tmp_path / method / "README.md").read_text()
    # a bundle prune did not write has no sparsities to match
    assert main(_prune(bundle, cifar_root, tmp_path / "x", "--method", "magnitude", "--match-sparsity",
                       str(bundle), *common)) == 2
    assert "--match-sparsity" in capsys.readouterr().err


def test_bad_flags_and_sources_are_clear_errors(bundle, cifar_root, tmp_path, capsys) -> None:
    from edgecloud.nets import create_model

    for extra, message in [
        (["--method", "random"], "--method"),
        (["--method", "magnitude"], "--ratio"),
        (["--method", "dub", "--ratio", "0.5"], "--ratio"),
        (["--method", "dub", "--match-sparsity", str(bundle)], "--match-sparsity"),
        (["--method", "magnitude", "--ratio", "0.5", "--match-sparsity", str(bundle)], "not both"),
        (["--method", "magnitude", "--ratio", "1.5"], "--ratio"),
        (["--method", "magnitude", "--ratio", "0.5", "--lambda-var", "1e-3"], "--lambda-var"),
        (["--lambda-group", "1e-3"], "--lambda-group"),
        (["--rows", "1"], "--rows"),
        (["--finetune-epochs", "-1"], "--finetune-epochs"),
        (["--crossbar-chips", "-2"], "--crossbar-chips"),
        (["--layers", "fc"], "--layers"),
        (["--lr", "0"], "--lr"),
        (["--out", str(bundle)], "--out"),
    ]:
        assert main(_prune(bundle, cifar_root, tmp_path / "x", *extra)) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert main(_prune(tmp_path / "nowhere", cifar_root, tmp_path / "x")) == 2
    assert "no bundle" in capsys.readouterr().err
    arch = {"weight_bits": 1, "act_bits": 4, "in_channels": 3, "image_size": 32}  # binary weights: nothing to prune
    binary = _export(create_model("lenet5", **arch), tmp_path / "binary", "lenet5", arch)
    assert main(_prune(binary, cifar_root, tmp_path / "x")) == 2
    assert "no quantized conv layer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written for a refused command
