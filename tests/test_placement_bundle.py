"""``edgecloud placement bundle``: a bundle's edge layers as GEMMs, placed on the WWW architectures."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgecloud.bundle import ModelRepository
from edgecloud.cim.backend import create_backend
from edgecloud.cim.events import EventLog, recording
from edgecloud.exits import ExitPolicy
from edgecloud.placement.bundle import LayerGemm, edge_gemms, place_bundle, place_gemms

BUNDLE = "fmnist-lenet5-4bit"


@pytest.fixture(scope="module")
def bundle():
    return ModelRepository().get(BUNDLE)


def test_edge_gemms_count_every_mac_the_digital_backend_counts(bundle):
    """The GEMMs' MACs equal the MACs the digital backend records for one sample through the whole
    edge (quantized layers by precision, full-precision layers as mac_fp32)."""
    model = bundle.build_model()
    shape = tuple(bundle.manifest.input.shape)
    gemms = edge_gemms(model, shape, len(bundle.manifest.exits))
    assert all(g.M >= 1 and g.N >= 1 and g.K >= 1 for g in gemms)
    digital = create_backend("digital").prepare(bundle.build_model())
    log = EventLog(1)
    with torch.inference_mode(), recording(log):
        digital.route(torch.zeros(1, *shape), ExitPolicy("entropy", [0.0] * len(bundle.manifest.exits)))
    counted = sum(float(v[0]) for (_, event), v in log.counts.items() if event.startswith("mac_"))
    assert sum(g.macs for g in gemms) == counted
    # quantized layers carry their bit widths
    assert any(g.weight_bits == 4 for g in gemms)


def test_conv_as_im2col_and_groups():
    """A grouped conv is `groups` GEMMs of (output pixels, Cout/g, Cin/g x kernel area)."""
    class Edge(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 12, 3, padding=1, stride=2, groups=4)
            self.fc = torch.nn.Linear(12 * 4 * 4, 5)

        def route(self, x, policy):
            return self.fc(self.conv(x).flatten(1))

    gemms = edge_gemms(Edge(), (8, 8, 8), 1)
    assert gemms[0] == LayerGemm("conv", "conv", 16, 3, 18, 4)
    assert gemms[1] == LayerGemm("fc", "linear", 1, 5, 192, 1)
    one, four = place_gemms([LayerGemm("a", "conv", 16, 3, 18, 1), gemms[0]])
    for p1, p4 in zip(one.options, four.options):
        assert p4.energy_uj == pytest.approx(4 * p1.energy_uj)
        assert p4.cycles_with_cim_latency == 4 * p1.cycles_with_cim_latency


def test_whole_edge_totals_and_per_layer_bound(bundle):
    result = place_bundle(bundle)
    totals = result.totals()
    assert [t.label for t in totals][0] == "baseline" and len(totals) == 9
    for i, t in enumerate(totals):
        assert t.energy_uj == pytest.approx(sum(lp.options[i].energy_uj for lp in result.layers))
    bound = result.per_layer_best("energy")["energy_uj"]
    assert bound <= min(t.energy_uj for t in totals) + 1e-9
    s = result.summary()
    assert s["macs"] == sum(lp.gemm.macs for lp in result.layers)
    assert s["whole_edge"][0]["energy_vs_baseline"] == 1.0
    assert s["best_energy"] == min(totals, key=lambda t: t.energy_uj).label


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecloud", "placement", "bundle", *argv],
                          capture_output=True, text=True, timeout=300)


def test_cli_bundle(tmp_path):
    r = _cli(BUNDLE, "--backends", "digital,crossbar", "--samples", "2", "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["backends"]) == {"digital", "crossbar"}
    assert out["backends"]["crossbar"]["energy_uj"] > 0 and out["backends"]["crossbar"]["latency_s"] > 0
    assert out["backends"]["digital"]["samples"] == 2
    rows = list(csv.DictReader(open(tmp_path / "placement_bundle.csv")))
    assert len(rows) == 9 * (len(out["layers"]) + 1)
    whole = [r for r in rows if r["layer"] == "(whole edge)"]
    assert float(whole[0]["energy_uj"]) == pytest.approx(out["whole_edge"][0]["energy_uj"], rel=1e-5)
    assert (tmp_path / "placement_bundle.png").stat().st_size > 0
    # the same seed gives the same numbers
    again = json.loads(_cli(BUNDLE, "--backends", "crossbar", "--samples", "2", "--out", str(tmp_path),
                            "--json").stdout.strip().splitlines()[-1])
    assert again["backends"]["crossbar"]["energy_uj"] == out["backends"]["crossbar"]["energy_uj"]


@pytest.mark.parametrize("argv, flag", [(["--backends", "quantum"], "--backends"), (["--mapping", "x"], "--mapping"),
                                        (["--samples", "0"], "--samples")])
def test_cli_bundle_errors(argv, flag, tmp_path):
    r = _cli(BUNDLE, *argv, "--out", str(tmp_path))
    assert r.returncode != 0 and flag in r.stderr


def test_cli_unknown_bundle(tmp_path):
    r = _cli("no-such-bundle", "--out", str(tmp_path))
    assert r.returncode != 0 and "no-such-bundle" in r.stderr
