"""6T-SRAM (IMAC-style) backend: each non-ideality alone, XNOR mode, events."""

from __future__ import annotations

import math

import pytest
import torch

from edgecloud.cim.adc import lossless_adc_bits
from edgecloud.cim.backend import create_backend
from edgecloud.cim.events import EventLog, recording
from edgecloud.cim.sram import SramBackend
from edgecloud.nn.quant import QuantConv2d, QuantLinear


def linear(k: int, o: int, weight_bits: int, act_bits: int) -> QuantLinear:
    return QuantLinear(k, o, bias=False, weight_bits=weight_bits, act_bits=act_bits).eval()


def sram(seed: int = 0, **options) -> SramBackend:
    be = create_backend("sram", options, seed=seed)
    assert isinstance(be, SramBackend)
    return be


def test_bitline_saturation_compresses_full_scale_by_the_configured_fraction() -> None:
    g = 10
    layer = linear(g, 1, weight_bits=5, act_bits=4)  # 4-bit magnitudes, 4-bit inputs: one read
    w = torch.full((1, g), 15.0)
    full, small = torch.full((1, g), 15.0), torch.zeros(1, g)
    small[0, 0] = 1.0
    for kind in ("exp", "tanh"):
        be = sram(group_size=g, saturation=kind, saturation_compression=0.2)
        with torch.no_grad():
            top, low = be.mvm(layer, full, w).item(), be.mvm(layer, small, w).item()
        assert top == pytest.approx(0.8 * g * 225, rel=1e-4)  # full scale G (2^4-1)^2 compressed 20 %
        assert low == pytest.approx(15.0, rel=0.01)  # small sums stay nearly linear
        assert low < 15.0


def test_cell_mismatch_from_vt_variation_has_the_derived_sigma() -> None:
    k, o = 64, 64
    layer = linear(k, o, weight_bits=5, act_bits=4)
    w = torch.ones(o, k)  # only the LSB cell of each word conducts
    be = sram(group_size=k, vt_sigma_mv=30.0, overdrive_mv=300.0)
    with torch.no_grad():
        d = be.mvm(layer, torch.eye(k), w)  # each cell read alone
        again = be.mvm(layer, torch.eye(k), w)
    assert torch.equal(d, again)  # fixed per chip instance
    assert (d - 1.0).std().item() == pytest.approx(1.3 * 30.0 / 300.0, rel=0.1)


def test_lumped_vt_error_in_lsb_is_fixed_per_read_site() -> None:
    k, o, sigma = 20, 1024, 1.5
    layer = linear(k, o, weight_bits=5, act_bits=4)
    w = torch.randint(-15, 16, (o, k)).float()
    x = torch.randint(0, 16, (3, k)).float()
    be = sram(group_size=k, vt_sigma_lsb=sigma)
    with torch.no_grad():
        err = be.mvm(layer, x, w) - layer.integer_mvm(x, w)
    assert torch.allclose(err[0], err[1], atol=1e-3) and torch.allclose(err[0], err[2], atol=1e-3)  # same site
    # one group: positive read minus negative read, each with its own fixed error (ideal ADC: 1 unit = 1 LSB)
    assert err[0].std().item() == pytest.approx(sigma * math.sqrt(2), rel=0.1)


def test_read_noise_in_lsb_is_drawn_per_read() -> None:
    k, o, sigma = 20, 64, 1.0
    layer = linear(k, o, weight_bits=5, act_bits=4)
    w = torch.randint(-15, 16, (o, k)).float()
    x = torch.randint(0, 16, (64, k)).float()
    be = sram(group_size=k, read_noise_lsb=sigma)
    with torch.no_grad():
        err = be.mvm(layer, x, w) - layer.integer_mvm(x, w)
    assert err.std().item() == pytest.approx(sigma * math.sqrt(2), rel=0.1)
    assert not torch.allclose(err[0], err[1])


@pytest.mark.parametrize("g", [5, 10])
def test_lossless_adc_bits_for_a_group(g: int) -> None:
    layer = linear(g, 2, weight_bits=5, act_bits=4)
    w = torch.stack([torch.full((g,), 15.0), torch.full((g,), -15.0)])
    x = torch.stack([torch.tensor([min(15, max(0, s - 15 * i)) for i in range(g)]) for s in range(15 * g + 1)]).float()
    bits = lossless_adc_bits(g, 4, 4)
    with torch.no_grad():
        ref = layer.integer_mvm(x, w)
        assert torch.equal(sram(group_size=g, adc_bits=bits).mvm(layer, x, w), ref)
        assert not torch.equal(sram(group_size=g, adc_bits=bits - 1).mvm(layer, x, w), ref)


def test_four_bit_adc_loses_precision_like_imac() -> None:
    torch.manual_seed(0)
    layer = linear(40, 16, weight_bits=5, act_bits=4)
    w = torch.randint(-15, 16, (16, 40)).float()
    x = torch.randint(0, 16, (32, 40)).float()
    with torch.no_grad():
        ref = layer.integer_mvm(x, w)
        out = sram(adc_bits=4, adc_range="calibrated").mvm(layer, x, w)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0.0 < rel < 0.3


def test_xnor_mode_is_exact_and_counts_binary_ops() -> None:
    torch.manual_seed(1)
    layer = QuantLinear(70, 4, weight_bits=1, act_bits=1).eval()
    x = torch.randn(5, 70)
    with torch.no_grad():
        ref = layer(x)
    be = sram(xnor_group_size=64)
    be.prepare(layer)
    log = EventLog(5)
    with torch.no_grad(), recording(log):
        out = layer(x)
    assert torch.equal(out, ref)
    per_sample = {key: float(v[0]) for key, v in log.counts.items()}
    assert per_sample == {
        ("adc", "adc_conversion_7b"): 4,  # 64-row group: popcount 0..64 -> 7 bits
        ("adc", "adc_conversion_3b"): 4,  # 6-row group: 0..6 -> 3 bits
        ("sram", "sram_cim_binary_op"): 70 * 4,
        ("dac", "sram_wl_dac_1b"): 70,
        ("digital", "shift_add"): 8,
        ("digital", "mac_fp32"): 4,
    }


def test_xnor_mode_with_mismatch_and_a_small_adc_changes_outputs() -> None:
    layer = linear(64, 32, weight_bits=1, act_bits=1)
    w = torch.randint(0, 2, (32, 64)).float() * 2 - 1
    x = torch.randint(0, 2, (16, 64)).float()
    with torch.no_grad():
        ref = layer.integer_mvm(x, w)
        assert not torch.equal(sram(vt_sigma_mv=30.0).mvm(layer, x, w), ref)
        assert not torch.equal(sram(adc_bits=4).mvm(layer, x, w), ref)
        assert torch.equal(sram(adc_bits=7).mvm(layer, x, w), ref)


def test_multibit_event_counts_equal_a_hand_count() -> None:
    # K = 23 rows in groups of 10, 10, 3; 5-bit weights = 4-bit magnitude words (1 slice);
    # 4-bit inputs through a 4-bit DAC (1 cycle); positive and negative columns: J = 2 x 3
    layer = QuantLinear(23, 3, weight_bits=5, act_bits=4).eval()
    be = sram(group_size=10)
    be.prepare(layer)
    log = EventLog(1)
    with torch.no_grad(), recording(log):
        layer(torch.rand(1, 23))
    assert {key: float(v[0]) for key, v in log.counts.items()} == {
        ("adc", "adc_conversion_12b"): 2 * 6,  # ceil(log2(10*15*15 + 1)) = 12
        ("adc", "adc_conversion_10b"): 6,  # ceil(log2(3*225 + 1)) = 10
        ("sram", "sram_cim_4b_op"): 23 * 3,
        ("dac", "sram_wl_dac_4b"): 23,  # one macro: 3 words x 5 cells <= 256
        ("digital", "shift_add"): 18,
        ("digital", "mac_fp32"): 3,
    }


def test_wide_inputs_take_several_dac_cycles() -> None:
    conv = QuantConv2d(2, 2, 1, weight_bits=8, act_bits=8).eval()  # 7-bit magnitudes: 2 slices
    be = sram(group_size=2, dac_bits=4)
    be.prepare(conv)
    log = EventLog(1)
    with torch.no_grad(), recording(log):
        conv(torch.rand(1, 2, 3, 3))
    assert float(log.counts[("sram", "sram_cim_4b_op")][0]) == 9 * 2 * 2 * 2 * 2  # pos x K x O x S x T


def test_same_seed_same_chip() -> None:
    layer = linear(30, 8, weight_bits=5, act_bits=4)
    w = torch.randint(-15, 16, (8, 30)).float()
    x = torch.randint(0, 16, (4, 30)).float()
    opts = {"vt_sigma_mv": 20.0, "vt_sigma_lsb": 0.6}
    with torch.no_grad():
        a, b, c = (sram(seed=s, **opts).mvm(layer, x, w) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="saturation"):
        create_backend("sram", {"saturation": "soft"})
    with pytest.raises(ValueError, match="group_size"):
        create_backend("sram", {"group_size": 0})
