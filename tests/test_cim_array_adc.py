"""Per-array ADC resolution (D.U.B.) and per-layer crossbar sizes (NAX) on the crossbar backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgecloud.cim.adc import lossless_adc_bits
from edgecloud.cim.backend import create_backend
from edgecloud.cim.crossbar import CrossbarBackend
from edgecloud.cim.events import EventLog, recording
from edgecloud.nn.quant import QuantLinear


def xbar(**options) -> CrossbarBackend:
    be = create_backend("crossbar", options, seed=0)
    assert isinstance(be, CrossbarBackend)
    return be


def crafted(nnz: list[int], k: int = 16) -> torch.Tensor:
    """(O, K) integer weights: output o has nnz[o] non-zero weights (level 3, alternating sign)."""
    w = torch.zeros(len(nnz), k)
    for o, n in enumerate(nnz):
        w[o, :n] = torch.tensor([3.0 if i % 2 else -3.0 for i in range(n)])
    return w


def layer(k: int = 16, o: int = 4) -> QuantLinear:
    return QuantLinear(k, o, bias=False, weight_bits=3, act_bits=1).eval()  # 1 slice of 2-bit cells, 1 cycle


def test_an_arrays_adc_bits_follow_its_densest_column() -> None:
    # 16 rows, 2 pairs per array: outputs (0, 1) share array 0, (2, 3) array 1
    full = lossless_adc_bits(16, 2, 1)  # ceil(log2(16 * 3 + 1)) = 6
    cases = {(16, 1): full, (4, 3): full - 2, (5, 2): full - 1, (8, 8): full - 1, (1, 0): full - 4, (0, 0): 1}
    for (a, b), bits in cases.items():
        be = xbar(rows=16, cols=4, adc_reduce="sparsity")
        with torch.no_grad():
            be.mvm(layer(), torch.ones(1, 16), crafted([16, 16, a, b]))
        assert be.array_bits["layer0"].tolist() == [[full, bits]], (a, b)


def test_reduced_adc_is_exact_where_lossless_and_not_where_it_is_cut() -> None:
    torch.manual_seed(0)
    w = crafted([16, 9, 4, 3])
    x = torch.randint(0, 2, (64, 16)).float()
    full = lossless_adc_bits(16, 2, 1)
    ref = layer().integer_mvm(x, w)
    be = xbar(rows=16, cols=4, adc_bits=full, adc_reduce="sparsity")  # max range: lossless by construction
    with torch.no_grad():
        out = be.mvm(layer(), x, w)
    assert be.array_bits["layer0"].tolist() == [[full, full - 2]]
    assert torch.equal(out, ref)
    # one bit fewer than the densest column needs: the second array is no longer exact, the first still is
    cut = xbar(rows=16, cols=4, layers={"layer0": {"adc_bits": [[full, full - 3]]}})
    with torch.no_grad():
        lossy = cut.mvm(layer(), x, w)
    assert torch.equal(lossy[:, :2], ref[:, :2])
    assert not torch.equal(lossy[:, 2:], ref[:, 2:])


def test_events_price_each_array_at_its_own_resolution() -> None:
    full = lossless_adc_bits(16, 2, 1)
    lin = layer()
    with torch.no_grad():
        lin.weight.copy_(crafted([16, 1, 4, 3]) / 3.0)  # the layer's own weights: quantized to these levels
    be = xbar(rows=16, cols=4, adc_reduce="sparsity")
    be.prepare(lin)
    log = EventLog(1)
    with torch.no_grad(), recording(log):
        lin(torch.ones(1, 16))
    assert be.array_bits[next(iter(be.array_bits))].tolist() == [[full, full - 2]]
    assert float(log.counts[("adc", f"adc_conversion_{full}b")][0]) == 2
    assert float(log.counts[("adc", f"adc_conversion_{full - 2}b")][0]) == 2


def test_reach_never_needs_more_bits_than_sparsity() -> None:
    torch.manual_seed(1)
    w = torch.randint(-3, 4, (8, 32)).float() * (torch.rand(8, 32) < 0.3)
    bits = {}
    for mode in ("none", "sparsity", "reach"):
        be = xbar(rows=16, cols=8, adc_reduce=mode)
        with torch.no_grad():
            be.mvm(layer(32, 8), torch.ones(1, 32), w)
        bits[mode] = be.array_bits["layer0"]
    assert (bits["reach"] <= bits["sparsity"]).all() and (bits["sparsity"] <= bits["none"]).all()
    assert (bits["sparsity"] < bits["none"]).any()


def test_per_layer_crossbar_size_and_unknown_layer_names() -> None:
    net = nn.Sequential(QuantLinear(64, 8, weight_bits=3, act_bits=1), QuantLinear(8, 4, weight_bits=3, act_bits=1)).eval()
    be = xbar(rows=64, cols=64, layers={"0": {"rows": 16, "cols": 8}})
    be.prepare(net)
    log = EventLog(1)
    with torch.no_grad(), recording(log):
        net(torch.rand(1, 64))
    assert be.array_bits["0"].shape == (4, 2)  # 64 rows / 16; 8 pairs / 4 per array
    assert be.array_bits["1"].shape == (1, 1)
    # layer 0: 4 row tiles x 8 pairs conversions; layer 1: 1 x 4
    assert sum(float(v[0]) for (c, e), v in log.counts.items() if e.startswith("adc_conversion")) == 4 * 8 + 4
    with pytest.raises(ValueError, match="no quantized layer named nope"):
        xbar(layers={"nope": {"rows": 8}}).prepare(net)
    with pytest.raises(ValueError, match="needs 4 lists"):
        bad = xbar(rows=16, cols=8, layers={"0": {"adc_bits": [[4, 4]]}})
        bad.prepare(net)
    with pytest.raises(ValueError, match="even"):
        xbar(layers={"0": {"cols": 7}})


def test_mixed_resolutions_calibrate_and_clip_per_array() -> None:
    torch.manual_seed(2)
    w = crafted([16, 16, 2, 2])
    x = torch.randint(0, 2, (128, 16)).float()
    be = xbar(rows=16, cols=4, adc_bits=6, adc_range="calibrated", adc_percentile=100.0,
              layers={"layer0": {"adc_bits": [[6, 2]]}})
    with torch.no_grad():
        out = be.mvm(layer(), x, w)
    ref = layer().integer_mvm(x, w)
    assert torch.equal(out[:, :2], ref[:, :2])  # 6 bits cover the calibrated range of 16-cell columns
    # a 2-bit ADC has 4 codes for a column that reaches -3..3 in 7 steps: not exact
    assert not torch.equal(out[:, 2:], ref[:, 2:])


def test_cost_model_reads_the_positions_each_layer_saw() -> None:
    from edgecloud.cim.cost import CostModel, layouts_from_backend
    from edgecloud.nn.quant import QuantConv2d

    conv = QuantConv2d(3, 4, 3, padding=1, weight_bits=4, act_bits=2).eval()
    be = xbar(rows=16, cols=8, adc_reduce="sparsity")
    be.prepare(conv)
    with pytest.raises(KeyError, match="run one batch"):
        layouts_from_backend(be)
    with torch.no_grad():
        conv(torch.rand(2, 3, 5, 5))
    (layout,) = layouts_from_backend(be)
    assert layout.positions == 25
    cost = CostModel().cost([layout])
    assert cost.latency_s > 0 and cost.area_mm2 > 0 and cost.edap == pytest.approx(cost.energy_j * cost.latency_s * cost.area_mm2)
