"""At ideal settings every simulated backend equals the digital reference exactly, on every kernel
path this machine can run; with noise on, every compiled path agrees with the torch reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgecloud.cim import kernel
from cim_nets import mixed_precision_net
from edgecloud.cim.backend import create_backend
from edgecloud.cim.events import EventLog, recording
from edgecloud.nn.quant import QuantConv2d, QuantLinear

# (weight_bits, act_bits): binary, mixed and 8-bit, including > 4-bit SRAM words and inputs
WIDTHS = [(1, 1), (2, 8), (3, 1), (4, 3), (5, 4), (8, 8), (1, 4)]
IDEAL = {
    "crossbar": [
        {"rows": 16, "cols": 8},
        {"rows": 7, "cell_bits": 1, "dac_bits": 2},
        {"rows": 128, "cell_bits": 3, "gemm": "float32"},
        {"rows": 10, "on_off_ratio": 5.0, "adc_bits": 12},  # finite on/off cancels; lossless ADC
        {"rows": 32, "dac_bits": 8},  # whole 8-bit inputs in one cycle (float GEMM)
        {"rows": 16, "fused_kernel": False},
        {"rows": 128, "cell_bits": 7, "dac_bits": 7},  # 7-bit planes x 7-bit cells: int16 sums widened every 2 rows
        {"rows": 100, "cell_bits": 4, "dac_bits": 3, "cols": 40},  # 100 rows: a partial 4-row group
    ],
    "sram": [
        {},
        {"group_size": 7, "xnor_group_size": 13},
        {"adc_bits": 12, "xnor_group_size": 20},  # lossless for 10-row groups
        {"xnor_binary": False, "dac_bits": 2},
        {"group_size": 25, "fused_kernel": False},
    ],
}


def _layers(weight_bits: int, act_bits: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(weight_bits * 10 + act_bits)
    conv = QuantConv2d(5, 7, 3, stride=2, padding=1, weight_bits=weight_bits, act_bits=act_bits).eval()
    lin = QuantLinear(40, 9, weight_bits=weight_bits, act_bits=act_bits).eval()
    return conv, lin


PATHS = kernel.available_paths()  # every kernel path this machine can run, torch included
COMPILED = [p for p in PATHS if p != "torch"]


def _cases() -> list[tuple[str, dict, int, int]]:
    return [(name, {**opts, "kernel": path}, wb, ab) for name, all_opts in IDEAL.items() for opts in all_opts
            for path in (PATHS if opts.get("fused_kernel", True) else ["torch"]) for wb, ab in WIDTHS]


@pytest.mark.parametrize("backend,options,weight_bits,act_bits", _cases())
def test_ideal_backend_equals_digital_exactly(backend: str, options: dict, weight_bits: int, act_bits: int) -> None:
    conv, lin = _layers(weight_bits, act_bits)
    x, xl = torch.rand(3, 5, 7, 7), torch.rand(4, 40)
    with torch.no_grad():
        ref_conv, ref_lin = conv(x), lin(xl)
        xi, (wi, _) = conv.quantize_input(x), conv.quantize_weight()
        xli, (wli, _) = lin.quantize_input(xl), lin.quantize_weight()
        ref_mvm, ref_mvm_lin = conv.integer_mvm(xi, wi), lin.integer_mvm(xli, wli)
    be = create_backend(backend, options, seed=3)
    be.prepare(conv)
    be.prepare(lin)
    assert conv.mvm_fn is not None and lin.mvm_fn is not None
    with torch.no_grad():
        mvm, mvm_lin = be.mvm(conv, xi, wi), be.mvm(lin, xli, wli)
        out_conv, out_lin = conv(x), lin(xl)
    assert mvm.shape == ref_mvm.shape and mvm_lin.shape == ref_mvm_lin.shape
    assert torch.equal(mvm, ref_mvm) and torch.equal(mvm_lin, ref_mvm_lin)  # integer equality
    assert torch.equal(mvm, mvm.round())
    assert torch.equal(out_conv, ref_conv) and torch.equal(out_lin, ref_lin)


def test_exact_on_a_small_network_with_residuals_and_events() -> None:
    net = mixed_precision_net()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
    for name in ("crossbar", "sram"):
        create_backend(name, {}, seed=1).prepare(net)
        log = EventLog(2)
        with torch.no_grad(), recording(log):
            out = net(x)
        assert torch.equal(out, ref), name
        components = {c for c, _ in log.counts}
        assert "adc" in components and "digital" in components
        assert ("crossbar" if name == "crossbar" else "sram") in components


NOISY = [
    ("crossbar", {"preset": "typical", "rows": 64}),
    ("crossbar", {"adc_bits": 7, "adc_noise_lsb": 0.7, "dac_bits": 2}),
    ("crossbar", {"preset": "typical", "rows": 50, "dac_bits": 2}),  # read noise on 2-bit planes: sigma formula
    ("crossbar", {"preset": "typical", "gemm": "float32"}),  # float GEMM: the C ADC over partial sums
    ("crossbar", {"preset": "typical", "fresh_noise": True}),  # fresh samples: one kernel call per block
    ("crossbar", {"preset": "typical", "block_kib": 16}),  # many blocks, each at its own pool offset
    ("sram", {"preset": "typical"}),  # exp bit-line saturation
    ("sram", {"preset": "typical", "saturation": "tanh"}),
    ("sram", {"preset": "typical", "xnor_binary": False, "dac_bits": 3}),
]


def _noisy_run(backend: str, opts: dict, path: str, conv: QuantConv2d, xi: torch.Tensor, wi: torch.Tensor
               ) -> tuple[torch.Tensor, dict]:
    be = create_backend(backend, {**opts, "kernel": path}, seed=5)
    log = EventLog(xi.shape[0])
    with torch.no_grad(), recording(log):
        out = be.mvm(conv, xi, wi)
    return out, {key: float(v.sum()) for key, v in log.counts.items()}


@pytest.mark.parametrize("path", COMPILED)
@pytest.mark.parametrize("backend,opts", NOISY)
@pytest.mark.parametrize("shape", [(16, 8, 1, 8), (12, 7, 2, 8), (20, 9, 1, 1)])  # (in, out, stride, bits)
def test_noisy_kernels_agree_with_torch(path: str, backend: str, opts: dict, shape: tuple) -> None:
    cin, cout, stride, bits = shape  # 7 or 9 outputs: partly filled vectors; 1 bit: one cycle
    torch.manual_seed(0)
    conv = QuantConv2d(cin, cout, 3, stride=stride, padding=1, weight_bits=bits, act_bits=bits).eval()
    x = torch.rand(3, cin, 9, 9) * 0.4 if bits > 1 else torch.randn(3, cin, 9, 9)
    with torch.no_grad():
        xi, (wi, _) = conv.quantize_input(x), conv.quantize_weight()
    ref, ref_events = _noisy_run(backend, opts, "torch", conv, xi, wi)
    out, events = _noisy_run(backend, opts, path, conv, xi, wi)
    # same noise samples and arithmetic; only float rounding (summation order, fused multiply-adds,
    # expm1 for the bit-line saturation) differs, far below one ADC step
    assert torch.allclose(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max())), (path, backend, opts)
    assert events == ref_events  # the same conversions, reads and products
    assert not torch.equal(out, conv.integer_mvm(xi, wi))


@pytest.mark.parametrize("path", COMPILED)
def test_kernels_split_rows_over_threads_like_one_thread(path: str) -> None:
    """OpenMP splits a layer's rows between threads; each row's noise samples stay its own."""
    torch.manual_seed(2)
    conv = QuantConv2d(16, 24, 3, padding=1, weight_bits=8, act_bits=8).eval()
    with torch.no_grad():
        xi, (wi, _) = conv.quantize_input(torch.rand(5, 16, 10, 10)), conv.quantize_weight()
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(_noisy_run("crossbar", {"preset": "typical", "rows": 64}, path, conv, xi, wi)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("kernel_size,stride,padding,dilation", [
    (1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 0, 1), (5, 2, 2, 1), (3, 1, 2, 2),
])
def test_implicit_conv_patches_are_exact(kernel_size: int, stride: int, padding: int, dilation: int) -> None:
    """The fused kernel reads conv patches in place; arrays cut (kh, kw, c) rows mid-pixel."""
    torch.manual_seed(kernel_size * 7 + stride)
    conv = QuantConv2d(6, 5, kernel_size, stride=stride, padding=padding, weight_bits=8, act_bits=8).eval()
    conv.dilation = (dilation, dilation)
    x = torch.rand(2, 6, 11, 9)
    with torch.no_grad():
        xi, (wi, _) = conv.quantize_input(x), conv.quantize_weight()
        ref = conv.integer_mvm(xi, wi)
        for path in PATHS:
            for opts in ({"rows": 20}, {"rows": 128, "cell_bits": 1}, {"rows": 7, "dac_bits": 3}):
                out = create_backend("crossbar", {**opts, "kernel": path}, seed=0).mvm(conv, xi, wi)
                assert torch.equal(out, ref), (path, opts)


@pytest.mark.parametrize("scale", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("options", [{"rows": 16}, {"dac_bits": 2, "adc_bits": 12}])
def test_skipped_zero_planes_stay_exact(scale: float, options: dict, path: str) -> None:
    """Inputs below 2^k leave the top bit-planes empty: they are skipped, not mis-converted."""
    torch.manual_seed(1)
    conv = QuantConv2d(8, 6, 3, padding=1, weight_bits=8, act_bits=8).eval()
    x = torch.rand(2, 8, 6, 6) * scale
    with torch.no_grad():
        xi, (wi, _) = conv.quantize_input(x), conv.quantize_weight()
        out = create_backend("crossbar", {**options, "kernel": path}, seed=0).mvm(conv, xi, wi)
        assert torch.equal(out, conv.integer_mvm(xi, wi))


def test_layers_that_cannot_map_stay_digital() -> None:
    fp_input = QuantLinear(8, 4, weight_bits=4, act_bits=0)
    net = nn.Sequential(fp_input, QuantLinear(4, 2, weight_bits=2, act_bits=2))
    create_backend("crossbar", {}, seed=0).prepare(net)
    assert fp_input.mvm_fn is None and net[1].mvm_fn is not None
