"""Bundle-stored hardware defaults, the event meter's ADC law, and eval's crossbar cost report.

On the untrained ``tiny`` bundle (four quantized convs, every one on the edge path of every
sample) with a handful of random images: a few seconds in all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from edgecloud.bundle import Bundle, Manifest, ModelRepository, bundle_backend_options
from edgecloud.cim.cost import ADC_LAWS as COST_LAWS
from edgecloud.cim.energy import ADC_LAWS, EnergyTable
from edgecloud.cli import main
from edgecloud.data.dataset import ImageDataset
from edgecloud.data.idx import write_idx
from edgecloud.evaluate import EvalConfig, evaluate

LAYER = "edge.0.unit1.conv"  # K = 16 * 3 * 3 = 144 rows: 2 row tiles of 128, 3 of 64, 5 of 32


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory) -> Path:
    """``tiny`` and ``tinyhw``: the same weights, ``tinyhw`` with hardware defaults in its manifest."""
    root = tmp_path_factory.mktemp("hw_repo")
    shutil.copytree(tiny_repo / "tiny", root / "tiny")
    shutil.copytree(tiny_repo / "tiny", root / "tinyhw")
    path = root / "tinyhw" / "manifest.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest["name"] = "tinyhw"
    manifest["hardware"] = {"crossbar": {"layers": {LAYER: {"rows": 64}}}}
    path.write_text(yaml.safe_dump(manifest))
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmnist_cost")
    for prefix, n, seed in (("train", 20, 1), ("t10k", 8, 2)):
        images, labels = _images(n, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[:, 0])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def data(repo) -> ImageDataset:
    images, labels = _images(8, seed=3)
    classes = tuple(ModelRepository(repo).get("tiny").manifest.classes)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes)


def run_cli(capsys, *argv: str) -> tuple[int, dict, str]:
    rc = main(["eval", *argv])
    out = capsys.readouterr().out
    return rc, json.loads(out.strip().splitlines()[-1]), out


def layer_cost(report: dict, name: str = LAYER) -> dict:
    return next(layer for layer in report["cost"]["layers"] if layer["name"] == name)


# ---- bundle hardware --------------------------------------------------------------------------

def test_bundle_options_merge_under_the_users_and_old_manifests_still_load(repo):
    hw = {"crossbar": {"adc_reduce": "sparsity", "rows": 256,
                       "layers": {"a": {"rows": 64, "adc_bits": [[6], [7]]}, "b": {"cols": 64}}}}
    m = Manifest.model_validate({**Bundle(repo / "tiny").manifest.model_dump(), "hardware": hw})
    user = {"rows": 128, "layers": {"a": {"rows": 32}, "c": {"rows": 16}}}
    out = bundle_backend_options(m, "crossbar", user)
    assert out == {"adc_reduce": "sparsity", "rows": 128,
                   # a: user's rows, the bundle's per-array bits (shaped for 64-row tiles) dropped
                   "layers": {"a": {"rows": 32}, "b": {"cols": 64}, "c": {"rows": 16}}}
    assert bundle_backend_options(m, "crossbar", {"layers": {"a": {"adc_reduce": "reach"}}})["layers"]["a"] == \
        {"rows": 64, "adc_bits": [[6], [7]], "adc_reduce": "reach"}  # field by field, the user's win
    assert hw["crossbar"]["layers"]["a"]["rows"] == 64 and user["layers"]["a"] == {"rows": 32}  # not modified
    assert bundle_backend_options(m, "sram", {"x": 1}) == {"x": 1}  # no defaults for that backend
    assert bundle_backend_options(m, "crossbar", {"x": 1}, use_bundle=False) == {"x": 1}
    assert Bundle(repo / "tiny").manifest.hardware == {}  # a manifest without the key loads
    with pytest.raises(ValueError):
        Manifest.model_validate({**m.model_dump(), "hardwar": {}})  # extra="forbid" stays


def test_bundle_hardware_sets_a_layers_tiling_in_eval_and_the_user_overrides_it(repo, data_root, capsys):
    common = ["--repository", str(repo), "--dataset", "fashion-mnist", "--data-root", str(data_root),
              "--backend", "crossbar", "--batch-size", "8", "--json"]
    rc, plain, _ = run_cli(capsys, "tiny", *common)
    assert rc == 0 and layer_cost(plain)["rows"] == 128 and layer_cost(plain)["arrays"] == 2
    rc, hw, out = run_cli(capsys, "tinyhw", *common)
    assert rc == 0 and hw["bundle_hardware"] == {"layers": {LAYER: {"rows": 64}}}
    assert layer_cost(hw)["rows"] == 64 and layer_cost(hw)["arrays"] == 3 and layer_cost(hw)["row_tiles"] == 3
    assert layer_cost(hw, "edge.0.unit2.conv")["rows"] == 128  # other layers keep the backend's size
    assert "bundle hardware defaults" in out
    rc, user, _ = run_cli(capsys, "tinyhw", *common, "--backend-option", f"layers={{{LAYER}: {{rows: 32}}}}")
    assert rc == 0 and layer_cost(user)["rows"] == 32 and layer_cost(user)["arrays"] == 5
    assert user["backend_options_effective"]["layers"][LAYER] == {"rows": 32}
    rc, off, _ = run_cli(capsys, "tinyhw", *common, "--no-bundle-hardware")
    assert rc == 0 and layer_cost(off)["rows"] == 128 and off["bundle_hardware"] == {}
    # same weights, same ideal chip: the tiling changes the cost, not the answers
    assert hw["summary"]["accuracy"] == plain["summary"]["accuracy"]
    assert hw["area_mm2"] != plain["area_mm2"]


def test_robust_cache_key_follows_the_bundles_hardware(repo):
    from edgecloud.robust.runner import RobustConfig

    def key(name: str) -> str:
        return RobustConfig(bundle=str(repo / name), backends=["crossbar"], eps=[0.0], chips=1).key()

    assert key("tiny") != key("tinyhw")


class _Captured(Exception):
    pass


def test_robust_and_analyze_snr_run_the_bundles_hardware_under_the_users(repo, data_root, tmp_path, monkeypatch):
    import argparse

    import edgecloud.analyze.snr as snr
    import edgecloud.robust.runner as robust
    from edgecloud.commands.analyze import _snr_report

    seen = []

    def capture(*args, **kwargs):
        seen.append(args[2])  # HardwareModel(net, backend, options, seeds, ...)
        raise _Captured

    monkeypatch.setattr(robust, "HardwareModel", capture)
    path = tmp_path / "data.pt"
    torch.save({"x": torch.zeros(1, 1, 28, 28), "y": torch.zeros(1, dtype=torch.long),
                "calib": torch.zeros(1, 1, 28, 28), "crafted": {}}, path)
    config = robust.RobustConfig(bundle=str(repo / "tinyhw"), backends=["crossbar"], eps=[0.0], chips=1,
                                 backend_options={"crossbar": {"adc_reduce": "reach"}})
    with pytest.raises(_Captured):
        robust.run_chip(robust.ChipJob(config, "crossbar", 0, str(path), 1, progress=False))
    assert seen[-1] == {"layers": {LAYER: {"rows": 64}}, "adc_reduce": "reach"}

    monkeypatch.setattr(snr, "analyze_snr", lambda model, x, y, backend, options, *a, **k: options)
    args = argparse.Namespace(model="tinyhw", repository=str(repo), dataset="fashion-mnist", split="test",
                              data_root=str(data_root), samples=4, chips=1, batch_size=4, json=True,
                              backend="crossbar")
    options, _ = _snr_report(args, "tinyhw", {"preset": "typical"})
    assert options == {"layers": {LAYER: {"rows": 64}}, "preset": "typical"}


# ---- ADC law ----------------------------------------------------------------------------------

def test_walden_is_todays_pricing_and_the_laws_scale_from_8_bits(tmp_path):
    table = EnergyTable.load()
    fom = table.joules["adc_fom_per_step"]
    assert table.adc_law == "walden" and ADC_LAWS is COST_LAWS  # one definition for meter and cost model
    for bits in range(1, 17):
        assert table.per_event(f"adc_conversion_{bits}b") == fom * 2**bits  # exactly the old numbers
    schreier, linear = table.with_adc_law("schreier"), table.with_adc_law("linear")
    e = lambda t, b: t.per_event(f"adc_conversion_{b}b")  # noqa: E731
    assert e(schreier, 8) == e(table, 8) == e(linear, 8)  # anchored at 8 bits
    assert e(schreier, 10) / e(table, 10) == pytest.approx(4.0)  # 4^2 / 2^2
    assert e(schreier, 6) / e(table, 6) == pytest.approx(0.25)
    assert e(linear, 4) == pytest.approx(fom * 2**8 * 4 / 8)
    data = yaml.safe_load((Path(__file__).parents[1] / "edgecloud/cim/energy_table.yaml").read_text())
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**data, "adc_law": "schreier"}))
    assert EnergyTable.load(tmp_path / "s.yaml").adc_law == "schreier"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**data, "adc_law": "cubic"}))
    with pytest.raises(ValueError, match="adc_law.*cubic"):
        EnergyTable.load(tmp_path / "bad.yaml")


def test_eval_adc_energy_follows_the_law_above_and_below_8_bits(repo, data):
    bundle = ModelRepository(repo).get("tiny")
    out = {}
    for law in ("walden", "schreier"):
        for bits in (10, 6):
            config = EvalConfig(backend="crossbar", backend_options={"adc_bits": bits}, adc_law=law,
                                progress=False, batch_size=8)
            out[law, bits] = evaluate(bundle, data, config).to_json()
    for (law, bits), r in out.items():
        assert r["adc_law"] == law and r["cost"]["adc_law"] == law
        c = r["cost"]["energy_breakdown_j"]  # every layer runs for every sample: meter == cost model
        assert r["summary"]["energy_j"]["adc"]["mean"] == pytest.approx(c["adc"] + c["sample_hold"], rel=1e-12)
    adc = lambda law, bits: out[law, bits]["cost"]["energy_breakdown_j"]["adc"]  # noqa: E731
    meter = lambda law, bits: out[law, bits]["summary"]["energy_j"]["adc"]["mean"]  # noqa: E731
    assert adc("schreier", 10) / adc("walden", 10) == pytest.approx(4.0)
    assert adc("schreier", 6) / adc("walden", 6) == pytest.approx(0.25)
    assert meter("schreier", 10) > meter("walden", 10) and meter("schreier", 6) < meter("walden", 6)


# ---- eval's cost report -----------------------------------------------------------------------

def test_cli_eval_crossbar_reports_latency_area_edap_and_the_law(repo, data_root, capsys):
    common = ["tiny", "--repository", str(repo), "--dataset", "fashion-mnist", "--data-root", str(data_root),
              "--batch-size", "8"]
    rc, r, out = run_cli(capsys, *common, "--backend", "crossbar", "--chips", "2", "--json")
    assert rc == 0 and r["adc_law"] == "walden"
    assert r["latency_s"] > 0 and r["area_mm2"] > 0 and r["edap"] > 0 and r["edap_energy_j"] > 0
    assert r["edap"] == pytest.approx(r["edap_energy_j"] * r["latency_s"] * r["area_mm2"])
    assert r["cost"]["energy_j"] == pytest.approx(r["edap_energy_j"]) and r["cost"]["edap_units"] == "J*s*mm^2"
    layers = r["cost"]["layers"]
    assert [la["name"] for la in layers] == ["edge.0.unit1.conv", "edge.0.unit2.conv", "edge.1.unit1.conv",
                                             "edge.1.unit2.conv"]
    assert sum(la["latency_s"] for la in layers) == pytest.approx(r["latency_s"])
    assert sum(la["area_mm2"] for la in layers) == pytest.approx(r["area_mm2"])
    assert all(sum(la["adc_bits_arrays"].values()) == la["arrays"] > 0 and la["energy_j"] > 0 for la in layers)
    assert "EDAP" in out and "ADC law walden" in out
    rc, r, out = run_cli(capsys, *common, "--backend", "crossbar", "--adc-law", "schreier", "--json")
    assert rc == 0 and r["adc_law"] == "schreier" and r["cost"]["adc_law"] == "schreier"
    rc, r, out = run_cli(capsys, *common, "--json")  # digital: no cost model
    assert rc == 0 and r["latency_s"] is None and r["edap"] is None and r["cost"] is None and "EDAP" not in out


def test_cli_eval_rejects_an_unknown_adc_law_naming_the_flag(repo, data_root, capsys):
    rc = main(["eval", "tiny", "--repository", str(repo), "--dataset", "fashion-mnist", "--data-root",
               str(data_root), "--backend", "crossbar", "--adc-law", "cubic"])
    err = capsys.readouterr().err
    assert rc == 2 and "--adc-law 'cubic'" in err and "schreier" in err
