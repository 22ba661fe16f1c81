"""Crossbar non-idealities: each one alone, with the statistics it was configured with."""

from __future__ import annotations

import math

import pytest
import torch

from edgecloud.cim.adc import lossless_adc_bits
from edgecloud.cim.backend import create_backend
from edgecloud.cim.crossbar import CrossbarBackend
from edgecloud.cim.energy import EnergyMeter
from edgecloud.cim.events import EventLog, recording
from edgecloud.cim.noise import pcm_state_sigma
from edgecloud.nn.quant import QuantConv2d, QuantLinear


def linear(k: int, o: int, weight_bits: int, act_bits: int) -> QuantLinear:
    return QuantLinear(k, o, bias=False, weight_bits=weight_bits, act_bits=act_bits).eval()


def xbar(seed: int = 0, **options) -> CrossbarBackend:
    be = create_backend("crossbar", options, seed=seed)
    assert isinstance(be, CrossbarBackend)
    return be


def cell_readout(be: CrossbarBackend, level: int, k: int = 64, o: int = 64, cell_bits: int = 2) -> torch.Tensor:
    """Every cell pair read on its own: one-hot inputs x = e_i, weights at +level, one slice."""
    layer = linear(k, o, weight_bits=cell_bits + 1, act_bits=1)
    w = torch.full((o, k), float(level))
    with torch.no_grad():
        return be.mvm(layer, torch.eye(k), w)  # (k, o): D_eff of each pair, in level units


# ---- programming variation ------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.03, 0.1])
def test_proportional_programming_variation_has_the_configured_sigma(sigma: float) -> None:
    d = cell_readout(xbar(programming_noise="proportional", programming_sigma=sigma), level=3)
    measured = (d / 3.0 - 1.0).std().item()  # G = G_max (1 + sigma xi), level 3 = G_max
    assert measured == pytest.approx(sigma, rel=0.1)


def test_lognormal_programming_variation_has_the_configured_sigma() -> None:
    d = cell_readout(xbar(programming_noise="lognormal", programming_sigma=0.2), level=3)
    assert torch.log(d / 3.0).std().item() == pytest.approx(0.2, rel=0.1)


@pytest.mark.parametrize("level", [1, 3])
def test_state_dependent_variation_follows_the_pcm_fit(level: int) -> None:
    d = cell_readout(xbar(programming_noise="state", programming_sigma=1.0), level=level)
    g = torch.tensor(level / 3.0)
    expected = float(pcm_state_sigma(g)) * 3.0  # sigma(g) / g_unit with g_unit = 1/3
    assert (d - level).std().item() == pytest.approx(expected, rel=0.1)
    assert abs((d - level).mean().item()) < 0.05


def test_finite_on_off_cancels_alone_but_not_under_variation() -> None:
    layer = linear(32, 32, weight_bits=3, act_bits=1)
    w = torch.zeros(32, 32)  # both cells at G_min
    x = torch.eye(32)
    assert torch.equal(xbar(on_off_ratio=4.0).mvm(layer, x, w), torch.zeros(32, 32))
    err_unlimited = xbar(programming_noise="proportional", programming_sigma=0.1).mvm(layer, x, w)
    err_finite = xbar(on_off_ratio=4.0, programming_noise="proportional", programming_sigma=0.1).mvm(layer, x, w)
    assert torch.equal(err_unlimited, torch.zeros(32, 32))  # proportional noise on G = 0 is 0
    # G_min = 1/4 on both cells, each with 10 % variation: sigma = 0.1 * 0.25 * sqrt(2) / g_unit
    g_unit = (1 - 0.25) / 3
    assert err_finite.std().item() == pytest.approx(0.1 * 0.25 * math.sqrt(2) / g_unit, rel=0.15)


# ---- faults -----------------------------------------------------------------------------------------
def test_stuck_on_faults_occur_at_the_configured_rate() -> None:
    p = 0.05
    d = cell_readout(xbar(p_stuck_on=p), level=0)  # both cells nominally G_min = 0
    rate = (d != 0).float().mean().item()  # exactly one cell of the pair stuck at G_max
    assert rate == pytest.approx(2 * p * (1 - p), rel=0.15)
    assert set(d.unique().tolist()) <= {-3.0, 0.0, 3.0}


def test_stuck_off_faults_occur_at_the_configured_rate() -> None:
    p = 0.08
    d = cell_readout(xbar(p_stuck_off=p), level=3)
    assert (d == 0).float().mean().item() == pytest.approx(p, rel=0.15)
    assert set(d.unique().tolist()) <= {0.0, 3.0}


# ---- per-read noise ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fresh", [False, True])
def test_read_noise_is_per_read_with_the_configured_sigma(fresh: bool) -> None:
    k, o, sigma = 64, 64, 0.01
    layer = linear(k, o, weight_bits=3, act_bits=1)
    w = torch.randint(-3, 4, (o, k)).float()
    x = torch.ones(64, k)
    be = xbar(read_noise=sigma, fresh_noise=fresh)
    with torch.no_grad():
        ref = layer.integer_mvm(x, w)
        first, second = be.mvm(layer, x, w), be.mvm(layer, x, w)
    # per cell sigma * G_max, two cells per pair, sum_i x_i^2 = k; in level units (g_unit = 1/3)
    expected = sigma * math.sqrt(2 * k) * 3.0
    assert (first - ref).std().item() == pytest.approx(expected, rel=0.1)
    assert not torch.equal(first, second)  # drawn per read, not per chip
    with torch.no_grad():
        assert torch.equal(be.mvm(layer, torch.zeros(4, k), w), torch.zeros(4, o))  # no current, no noise


def test_adc_noise_has_the_configured_sigma_in_lsb() -> None:
    k, o = 32, 64
    layer = linear(k, o, weight_bits=3, act_bits=1)
    w = torch.tensor([3.0, -3.0]).repeat(o, k // 2)  # sums stay mid-range: no clipping
    x = torch.ones(128, k)
    be = xbar(rows=k, adc_bits=lossless_adc_bits(k, 2, 1), adc_noise_lsb=2.0)
    with torch.no_grad():
        err = be.mvm(layer, x, w) - layer.integer_mvm(x, w)
    assert torch.equal(err, err.round())  # lossless ADC: outputs stay integers
    # Gaussian (2 LSB) then rounding to the 1-unit step: sqrt(4 + 1/12)
    assert err.std().item() == pytest.approx(math.sqrt(4 + 1 / 12), rel=0.1)


def test_read_and_adc_noise_add_as_independent_gaussians() -> None:
    k, o, sigma, adc_lsb = 32, 64, 0.05, 1.5
    layer = linear(k, o, weight_bits=3, act_bits=1)
    w = torch.tensor([3.0, -3.0]).repeat(o, k // 2)  # sums stay mid-range: no clipping
    x = torch.ones(128, k)
    be = xbar(rows=k, adc_bits=lossless_adc_bits(k, 2, 1), adc_noise_lsb=adc_lsb, read_noise=sigma)
    with torch.no_grad():
        err = be.mvm(layer, x, w) - layer.integer_mvm(x, w)
    read = sigma * math.sqrt(2 * k) * 3.0  # in units = LSB of the lossless ADC
    assert err.std().item() == pytest.approx(math.sqrt(read**2 + adc_lsb**2 + 1 / 12), rel=0.1)


# ---- IR drop ------------------------------------------------------------------------------------------
def _ir_error(rows: int, r: float = 1.0) -> float:
    layer = linear(rows, 1, weight_bits=3, act_bits=1)
    w = torch.full((1, rows), 3.0)
    be = xbar(rows=rows, cols=2, wire_resistance=r, gemm="float32")
    with torch.no_grad():
        y = be.mvm(layer, torch.ones(1, rows), w)
    return 1.0 - y.item() / (3.0 * rows)


def test_ir_drop_matches_the_distributed_load_model_and_grows_as_n_squared() -> None:
    rows, r, g_max = 64, 1.0, 25e-6
    # positive cells at G_max, negative cells at 0: mean conductance 0.5 G_max, all rows driven
    r_g = r * 0.5 * g_max
    p = torch.arange(1, rows + 1, dtype=torch.float64)
    h_col = p * rows - p * (p - 1) / 2
    h_row = 1.0 * 2 - 0.0  # the positive cell is column 1 of 2: p n - p (p - 1) / 2 = 2
    expected = float((r_g * (h_col + h_row)).mean())
    assert _ir_error(rows, r) == pytest.approx(expected, rel=1e-4)
    e32, e64, e128 = _ir_error(32), _ir_error(64), _ir_error(128)
    assert 0 < e32 < e64 < e128
    assert 3.5 < e128 / e64 < 4.5 and 3.5 < e64 / e32 < 4.5  # relative error ~ r G N^2 / 2


# ---- ADC resolution ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,cell_bits,dac_bits", [(5, 1, 2), (5, 2, 2), (12, 2, 1), (3, 3, 3)])
def test_lossless_adc_resolution_on_crafted_columns(n: int, cell_bits: int, dac_bits: int) -> None:
    """A column of n cells at full level sees every sum 0..n (2^k-1)(2^v-1) with inputs up to 2^v - 1."""
    top_w, top_x = 2**cell_bits - 1, 2**dac_bits - 1
    layer = linear(n, 2, weight_bits=cell_bits + 1, act_bits=dac_bits)
    w = torch.stack([torch.full((n,), float(top_w)), torch.full((n,), -float(top_w))])  # + and - columns
    # all input vectors whose sum covers 0 .. n * top_x
    x = torch.stack([torch.tensor([min(top_x, max(0, s - top_x * i)) for i in range(n)]) for s in range(n * top_x + 1)]).float()
    bits = lossless_adc_bits(n, cell_bits, dac_bits)
    assert bits == math.ceil(math.log2(n * top_w * top_x + 1))
    opts = {"rows": n, "cell_bits": cell_bits, "dac_bits": dac_bits}
    with torch.no_grad():
        ref = layer.integer_mvm(x, w)
        exact = xbar(adc_bits=bits, **opts).mvm(layer, x, w)
        short = xbar(adc_bits=bits - 1, **opts).mvm(layer, x, w)
    assert torch.equal(exact, ref)
    assert not torch.equal(short, ref)
    assert (short - ref).abs().max().item() <= 2  # one dropped LSB: steps of 2 units


def test_calibrated_range_is_set_on_the_first_batch_and_kept() -> None:
    torch.manual_seed(0)  # the test must not depend on what ran before
    layer = linear(16, 8, weight_bits=3, act_bits=2)
    w = torch.randint(-3, 4, (8, 16)).float()
    w[0] = 3.0  # one column the large inputs drive far beyond anything calibrated
    small, large = torch.randint(0, 2, (64, 16)).float(), torch.full((4, 16), 3.0)
    be = xbar(rows=16, cell_bits=2, dac_bits=2, adc_bits=10, adc_range="calibrated", adc_percentile=100.0)
    with torch.no_grad():
        assert torch.equal(be.mvm(layer, small, w), layer.integer_mvm(small, w))  # within range
        clipped = be.mvm(layer, large, w)  # beyond the calibrated range: clipped, not re-ranged
        assert not torch.equal(clipped, layer.integer_mvm(large, w))
        assert torch.equal(be.mvm(layer, small, w), layer.integer_mvm(small, w))
    narrow = xbar(rows=16, cell_bits=2, dac_bits=2, adc_bits=3, adc_range="calibrated", adc_percentile=99.0)
    with torch.no_grad():
        assert not torch.equal(narrow.mvm(layer, small, w), layer.integer_mvm(small, w))


# ---- chips and seeds --------------------------------------------------------------------------------------
def test_same_seed_same_chip_different_seed_different_chip() -> None:
    torch.manual_seed(0)
    conv = QuantConv2d(4, 6, 3, padding=1, weight_bits=4, act_bits=3).eval()
    x = torch.rand(2, 4, 5, 5)
    chip = {"programming_noise": "state", "programming_sigma": 1.0, "p_stuck_on": 0.02, "on_off_ratio": 20.0}
    outs = {}
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        create_backend("crossbar", chip, seed=seed).prepare(conv)
        with torch.no_grad():
            outs[name] = (conv(x), conv(x))  # programmed once, kept across requests
    assert torch.equal(outs["a"][0], outs["a"][1])
    assert torch.equal(outs["a"][0], outs["b"][0])
    assert not torch.equal(outs["a"][0], outs["c"][0])


def test_a_weight_change_reprograms_the_layer() -> None:
    layer = linear(8, 4, weight_bits=4, act_bits=2)
    be = xbar(rows=8)
    x = torch.randint(0, 4, (3, 8)).float()
    w1, w2 = torch.randint(-7, 8, (4, 8)).float(), torch.randint(-7, 8, (4, 8)).float()
    with torch.no_grad():
        assert torch.equal(be.mvm(layer, x, w1), layer.integer_mvm(x, w1))
        assert torch.equal(be.mvm(layer, x, w2), layer.integer_mvm(x, w2))


# ---- events ------------------------------------------------------------------------------------------------
def test_event_counts_equal_a_hand_count() -> None:
    # K = 20 rows in tiles of 8, 8, 4; 8-bit weights = 7 magnitude bits -> 4 slices of 2-bit cells;
    # 4-bit inputs bit-serial -> 4 cycles; 3 outputs -> J = 12 pairs = 24 columns = 3 tiles of 8.
    layer = QuantLinear(20, 3, weight_bits=8, act_bits=4).eval()
    be = xbar(rows=8, cols=8, cell_bits=2, dac_bits=1)
    be.prepare(layer)
    log = EventLog(2)
    with torch.no_grad(), recording(log):
        layer(torch.rand(2, 20))
    per_sample = {key: float(v[0]) for key, v in log.counts.items()}
    assert all(float(v[1]) == float(v[0]) for v in log.counts.values())
    assert per_sample == {
        ("adc", "adc_conversion_5b"): 4 * 2 * 12,  # 8-row tiles: ceil(log2(8*3*1 + 1)) = 5 bits
        ("adc", "adc_conversion_4b"): 4 * 1 * 12,  # 4-row tile: ceil(log2(13)) = 4 bits
        ("adc", "sample_hold"): 144,
        ("dac", "dac_row_cycle_1b"): 4 * 20 * 3,  # cycles x rows x column tiles
        ("crossbar", "crossbar_cell_read"): 4 * 20 * 24,  # cycles x rows x used columns
        ("digital", "shift_add"): 144,
        ("digital", "mac_fp32"): 3,
    }
    joules = EnergyMeter().per_component(log)
    assert set(joules) == {"adc", "dac", "crossbar", "digital"} and all((v > 0).all() for v in joules.values())


def test_conv_events_scale_with_output_positions_and_adc_bits() -> None:
    conv = QuantConv2d(2, 3, 3, padding=1, weight_bits=2, act_bits=1).eval()  # K = 18, 1 slice, 1 cycle
    be = xbar(rows=128, cols=128, cell_bits=1, adc_bits=6)
    be.prepare(conv)
    log = EventLog(1)
    with torch.no_grad(), recording(log):
        conv(torch.rand(1, 2, 4, 4))
    assert float(log.counts[("adc", "adc_conversion_6b")][0]) == 16 * 3  # 16 positions x 3 pairs
    assert float(log.counts[("crossbar", "crossbar_cell_read")][0]) == 16 * 18 * 6


# ---- options ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,word", [
    ({"rows_": 3}, "rows_"), ({"cols": 7}, "even"), ({"preset": "nope"}, "preset"),
    ({"programming_noise": "pink"}, "programming_noise"), ({"adc_bits": 0}, "adc_bits"),
    ({"p_stuck_on": 0.7, "p_stuck_off": 0.6}, "p_stuck"),
])
def test_bad_options_are_rejected_with_a_clear_error(options: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        create_backend("crossbar", options)


def test_typical_preset_fills_defaults_and_explicit_options_win() -> None:
    be = xbar(preset="typical", adc_bits=6)
    assert be.options.adc_bits == 6 and be.options.on_off_ratio == 10.0 and be.options.programming_noise == "state"
    assert xbar().options.adc_bits is None
