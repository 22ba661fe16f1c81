"""Per-layer activation SNR on a simulated CiM backend (edgecloud.analyze.snr) and ``edgecloud analyze snr``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cim_nets import mixed_precision_net
from edgecloud.analyze.snr import analyze_snr, mean_std, snr_db
from edgecloud.cli import main
from edgecloud.data.idx import write_idx


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(24, 3, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g)


def run(batch, options, seeds=(0, 1)):
    x, y = batch
    return analyze_snr(mixed_precision_net(), x, y, "crossbar", options, seeds, batch_size=10)


def test_snr_db_and_chip_statistics_handle_zero_noise():
    assert snr_db(100.0, 1.0) == pytest.approx(20.0)
    assert snr_db(5.0, 0.0) == math.inf and snr_db(0.0, 0.0) == math.inf
    assert mean_std([10.0, 12.0]) == pytest.approx((11.0, math.sqrt(2.0)))
    assert mean_std([7.0]) == (7.0, 0.0)
    mean, std = mean_std([10.0, math.inf])
    assert mean == math.inf and math.isnan(std)


def test_an_ideal_crossbar_adds_no_noise(batch):
    report = run(batch, {"preset": "ideal"})
    assert [(layer.name, layer.kind) for layer in report.layers] == [("0", "conv"), ("3", "conv"), ("6", "linear")]
    assert all(layer.on_chip for layer in report.layers)
    for layer in report.layers:
        assert layer.propagated_db == [math.inf, math.inf] and layer.isolated_db == [math.inf, math.inf]
        row = layer.to_json()
        assert row["snr_propagated_db_mean"] is None and row["snr_isolated_db_mean"] is None  # JSON null
    assert report.accuracy_hardware == [report.accuracy_digital] * 2
    json.dumps(report.to_json(), allow_nan=False)


def test_noise_gives_finite_snr_and_more_read_noise_lowers_it(batch):
    typical = run(batch, {"preset": "typical"})
    noisier = run(batch, {"preset": "typical", "read_noise": 0.1})
    for low, high in zip(noisier.layers, typical.layers):
        assert all(math.isfinite(v) for v in high.propagated_db + high.isolated_db)
        assert max(low.propagated_db) < min(high.propagated_db)
        assert max(low.isolated_db) < min(high.isolated_db)
    assert typical.layers[0].macs == 8 * 8 * 8 * 3 * 9 and typical.layers[-1].macs == 128 * 10


def test_isolated_equals_propagated_at_the_first_layer_only(batch):
    report = run(batch, {"preset": "typical"})
    first, last = report.layers[0], report.layers[-1]
    assert first.isolated_db == first.propagated_db  # same input, same chip, same noise draws
    # deeper, the noise of earlier layers adds to the layer's own
    assert all(iso > prop for iso, prop in zip(last.isolated_db, last.propagated_db))


def test_seeded_runs_repeat_exactly_and_chips_differ(batch):
    a, b = run(batch, {"preset": "typical"}), run(batch, {"preset": "typical"})
    assert a.to_json() == b.to_json()
    assert a.layers[0].propagated_db[0] != a.layers[0].propagated_db[1]  # two chips, two draws
    other = run(batch, {"preset": "typical"}, seeds=(1,))
    assert other.layers[0].propagated_db == [a.layers[0].propagated_db[1]]  # chip 1 is chip 1 wherever it runs


def test_the_model_is_refused_when_there_is_nothing_to_measure(batch):
    x, y = batch
    with pytest.raises(ValueError, match="no noise"):
        analyze_snr(mixed_precision_net(), x, y, "digital", None, (0,))
    with pytest.raises(ValueError, match="unknown backend"):
        analyze_snr(mixed_precision_net(), x, y, "nope", None, (0,))
    with pytest.raises(ValueError, match="at least one chip"):
        analyze_snr(mixed_precision_net(), x, y, "crossbar", None, ())


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 10)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)
    return root


def cli(tiny_repo, fmnist_root, *extra: str) -> list[str]:
    return ["analyze", "snr", "tiny", "--repository", str(tiny_repo), "--dataset", "fashion-mnist",
            "--data-root", str(fmnist_root), "--batch-size", "4", *extra]


def test_cli_analyze_snr_on_a_bundle_with_compare(tiny_repo, fmnist_root, capsys):
    rc = main(cli(tiny_repo, fmnist_root, "--chips", "2", "--samples", "5", "--compare", "tiny", "--json"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["backend"] == "crossbar" and report["options"] == {"preset": "typical"}
    assert report["split"] == "val" and report["samples"] == 5 and report["chips"] == 2
    assert report["layers"] and all(layer["snr_propagated_db_mean"] is not None for layer in report["layers"])
    assert set(report["accuracy"]) >= {"digital", "hardware_mean", "hardware_std"}
    assert report["compare"]["layers"] == report["layers"]  # the same model, the same chips: repeats exactly
    assert all(d["snr_propagated_db"] == 0.0 and d["snr_isolated_db"] == 0.0 for d in report["delta"])
    assert "B - A" in captured.out and "top-1 digital" in captured.out


@pytest.mark.parametrize("extra,flag", [
    (["--chips", "0"], "--chips"),
    (["--backend", "digital"], "--backend digital"),
    (["--backend", "nope"], "--backend 'nope'"),
    (["--backend-option", "read_noise=-1"], "--backend-option"),
    (["--backend-option", "novalue"], "--backend-option"),
])
def test_cli_errors_name_the_flag(tiny_repo, fmnist_root, capsys, extra, flag):
    assert main(cli(tiny_repo, fmnist_root, *extra)) == 2
    assert flag in capsys.readouterr().err
