"""The simulated backends on a CUDA device (``device`` option).

Everywhere: the option is validated (CUDA asked for without CUDA is a clear error naming it), it
flows from the edge configuration, and the accelerator variant of the torch path (float GEMMs, no
``torch._int_mm``, device-side reductions, float64 GEMMs under TF32) is run on the CPU and equals
the normal path. With CUDA: ideal settings equal digital exactly, and with noise on the device
uses the CPU's noise samples in the same places, so it equals the CPU torch path up to float
rounding (a rare ADC code one step apart where a value sits on a code boundary), with the same
noise statistics and the same events.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgecloud.cim import engine
from cim_nets import mixed_precision_net
from edgecloud.cim.backend import create_backend
from edgecloud.cim.crossbar import CrossbarOptions
from edgecloud.cim.events import EventLog, recording
from edgecloud.cim.noise import ReadNoise
from edgecloud.cim.simulated import SimulatedBackend
from edgecloud.cim.tiling import layer_source
from edgecloud.nn.quant import QuantConv2d, QuantLinear

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here (torch.cuda.is_available() is False)")

WIDTHS = [(1, 1), (2, 8), (4, 3), (8, 8), (1, 4)]  # (weight_bits, act_bits)
IDEAL = {
    "crossbar": [
        {"rows": 16, "cols": 8},
        {"rows": 7, "cell_bits": 1, "dac_bits": 2},
        {"rows": 128, "cell_bits": 3, "gemm": "float32"},
        {"rows": 10, "on_off_ratio": 5.0, "adc_bits": 12},  # finite on/off cancels; lossless ADC
        {"rows": 32, "dac_bits": 8},
        {"rows": 64, "dac_bits": 4},  # two cycles of 4-bit planes: partial sums above 2^11 (TF32's reach)
    ],
    "sram": [
        {},
        {"group_size": 7, "xnor_group_size": 13},
        {"adc_bits": 12, "xnor_group_size": 20},
        {"xnor_binary": False, "dac_bits": 2},
    ],
}
NOISY = [
    ("crossbar", {"preset": "typical", "rows": 64}),
    ("crossbar", {"adc_bits": 7, "adc_noise_lsb": 0.7, "dac_bits": 2}),
    ("crossbar", {"preset": "typical", "rows": 50, "dac_bits": 2}),
    ("crossbar", {"preset": "typical", "gemm": "float32"}),
    ("crossbar", {"preset": "typical", "fresh_noise": True}),
    ("crossbar", {"preset": "typical", "block_kib": 16}),  # many blocks, each at its own pool offset
    ("sram", {"preset": "typical"}),  # calibrated ADC, exp saturation, fixed errors, read noise
    ("sram", {"preset": "typical", "saturation": "tanh"}),
    ("sram", {"preset": "typical", "xnor_binary": False, "dac_bits": 3}),
]


def _ideal_cases() -> list[tuple[str, dict, int, int]]:
    return [(name, opts, wb, ab) for name, all_opts in IDEAL.items() for opts in all_opts for wb, ab in WIDTHS]


def _layers(weight_bits: int, act_bits: int) -> tuple[QuantConv2d, QuantLinear]:
    torch.manual_seed(weight_bits * 10 + act_bits)
    conv = QuantConv2d(5, 7, 3, stride=2, padding=1, weight_bits=weight_bits, act_bits=act_bits).eval()
    lin = QuantLinear(40, 9, weight_bits=weight_bits, act_bits=act_bits).eval()
    return conv, lin


def _integer_inputs(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return layer.quantize_input(x), layer.quantize_weight()[0]


def _noisy_conv(shape: tuple[int, int, int, int]) -> tuple[QuantConv2d, torch.Tensor, torch.Tensor]:
    cin, cout, stride, bits = shape
    torch.manual_seed(0)
    conv = QuantConv2d(cin, cout, 3, stride=stride, padding=1, weight_bits=bits, act_bits=bits).eval()
    x = torch.rand(3, cin, 9, 9) * 0.4 if bits > 1 else torch.randn(3, cin, 9, 9)
    xi, wi = _integer_inputs(conv, x)
    return conv, xi, wi


def _run(backend: str, opts: dict, layer: nn.Module, xi: torch.Tensor, wi: torch.Tensor, seed: int = 5
         ) -> tuple[torch.Tensor, dict, SimulatedBackend]:
    be = create_backend(backend, opts, seed=seed)
    assert isinstance(be, SimulatedBackend)
    log = EventLog(xi.shape[0])
    with torch.no_grad(), recording(log):
        out = be.mvm(layer, xi, wi)
    return out, {key: float(v.sum()) for key, v in log.counts.items()}, be


# ---- option validation and configuration (everywhere) ------------------------------------------
@pytest.mark.parametrize("backend", ["crossbar", "sram"])
def test_cuda_without_cuda_is_a_clear_error(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=rf"(?s)invalid {backend} backend options.*device='{device}' needs CUDA.*"
                                             r"torch\.cuda\.is_available\(\) is False"):
            create_backend(backend, {"device": device})


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda0", "cpu:0", ""])
def test_unknown_devices_are_rejected(device: str) -> None:
    with pytest.raises(ValueError, match=r"device=.*choose 'cpu', 'cuda' or 'cuda:N'"):
        create_backend("crossbar", {"device": device})


def test_device_index_and_cpu_kernels_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert CrossbarOptions(device=" CUDA:1 ").device == "cuda:1"
    with pytest.raises(ValueError, match=r"device='cuda:2': this machine has 2 CUDA device\(s\)"):
        CrossbarOptions(device="cuda:2")
    with pytest.raises(ValueError, match=r"kernel='vnni' is a CPU kernel; with device='cuda'"):
        CrossbarOptions(device="cuda", kernel="vnni")
    assert CrossbarOptions(device="cuda", kernel="torch").kernel == "torch"
    assert CrossbarOptions().device == "cpu" and CrossbarOptions(device="CPU").device == "cpu"


def test_device_flows_from_the_edge_configuration(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``edge.backend.options`` (YAML or ``--backend-option device=cuda``) reach the backend as given."""
    from edgecloud.bundle import ModelRepository
    from edgecloud.commands.edge import parse_backend_options
    from edgecloud.config import load_settings
    from edgecloud.edge.runner import EdgeRunner

    assert parse_backend_options(["device=cuda:0"]) == {"device": "cuda:0"}
    settings = load_settings(None, {"edge": {"backend": {"name": "crossbar", "options": {"device": "cuda"}}}})
    assert settings.edge.backend.options == {"device": "cuda"}
    bundle = ModelRepository(tiny_repo).get("tiny")
    runner = EdgeRunner(bundle, "crossbar", backend_options={"device": "cpu"})
    assert isinstance(runner.backend, SimulatedBackend) and runner.backend.device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda' needs CUDA"):
        EdgeRunner(bundle, "crossbar", backend_options=dict(settings.edge.backend.options))


# ---- the device-generic path on the CPU (everywhere) -------------------------------------------
def _as_if_moved(be: SimulatedBackend) -> None:
    """Push each programmed layer through :meth:`MappedLayer.to` as a device move would."""
    for _, mapped in be._chips.values():
        mapped.device = torch.device("meta")  # pretend it lives elsewhere, so to(cpu) moves it
        mapped.to(torch.device("cpu"))
        assert all(w.dtype == torch.float32 for w in mapped.weights)


@pytest.mark.parametrize("backend,options,weight_bits,act_bits", _ideal_cases())
def test_explicit_cpu_device_and_accelerator_variant_are_exact(
    backend: str, options: dict, weight_bits: int, act_bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    conv, lin = _layers(weight_bits, act_bits)
    for layer, x in ((conv, torch.rand(3, 5, 7, 7)), (lin, torch.rand(4, 40))):
        xi, wi = _integer_inputs(layer, x)
        ref = layer.integer_mvm(xi, wi)
        assert torch.equal(_run(backend, {**options, "device": "cpu"}, layer, xi, wi)[0], ref)
        with monkeypatch.context() as patch:
            patch.setattr(engine, "_on_accelerator", lambda device: True)
            be = create_backend(backend, {**options, "device": "cpu", "kernel": "torch"}, seed=5)
            assert isinstance(be, SimulatedBackend)
            be.prepare(layer)
            _as_if_moved(be)
            with torch.no_grad():
                assert torch.equal(be.mvm(layer, xi, wi), ref), "accelerator variant"
            patch.setattr(engine, "_tf32_matmul", lambda device: True)  # float64 GEMMs
            with torch.no_grad():
                assert torch.equal(be.mvm(layer, xi, wi), ref), "float64 GEMMs"


@pytest.mark.parametrize("backend,opts", NOISY)
@pytest.mark.parametrize("shape", [(16, 8, 1, 8), (20, 9, 1, 1)])  # (in, out, stride, bits)
def test_accelerator_variant_uses_the_same_noise(backend: str, opts: dict, shape: tuple,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    conv, xi, wi = _noisy_conv(shape)
    ref, ref_events, _ = _run(backend, {**opts, "kernel": "torch"}, conv, xi, wi)
    cpu, cpu_events, _ = _run(backend, {**opts, "device": "cpu"}, conv, xi, wi)  # the default (C kernel) path
    assert torch.allclose(cpu, ref, rtol=0, atol=1e-5 * float(ref.abs().max())) and cpu_events == ref_events
    monkeypatch.setattr(engine, "_on_accelerator", lambda device: True)
    out, events, _ = _run(backend, {**opts, "kernel": "torch"}, conv, xi, wi)
    # the same samples in the same places; integer partial sums and codes: equal here
    assert torch.allclose(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max())), (backend, opts)
    assert events == ref_events
    assert not torch.equal(out, conv.integer_mvm(xi, wi))


def test_patch_sources_and_noise_draws_move_between_devices() -> None:
    torch.manual_seed(0)
    conv = QuantConv2d(4, 3, 3, stride=2, padding=1, weight_bits=4, act_bits=4).eval()
    xi, _ = _integer_inputs(conv, torch.rand(2, 4, 8, 8))
    source, _ = layer_source(conv, xi)
    cpu = torch.device("cpu")
    assert source.to(cpu) is source
    moved = source.to(torch.device("meta"))  # a conv source moves its uint8 input, not the patches
    assert moved.patches is None and moved.nhwc is not None and moved._view is not None and source._view is not None
    assert moved.nhwc.device.type == "meta" and moved.nhwc.dtype == torch.uint8
    assert moved._view.shape == source._view.shape and moved._view.stride() == source._view.stride()
    a, b = ReadNoise(3, pool_size=1 << 12), ReadNoise(3, pool_size=1 << 12)
    for n in (100, 1500, 5000):  # pooled, pooled, fresh
        assert torch.equal(a.draw(n), b.draw(n, cpu))


# ---- on a CUDA device -----------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("backend,options,weight_bits,act_bits", _ideal_cases())
def test_cuda_ideal_equals_digital_exactly(backend: str, options: dict, weight_bits: int, act_bits: int) -> None:
    conv, lin = _layers(weight_bits, act_bits)
    for layer, x in ((conv, torch.rand(3, 5, 7, 7)), (lin, torch.rand(4, 40))):
        xi, wi = _integer_inputs(layer, x)
        ref = layer.integer_mvm(xi, wi)
        out, events, be = _run(backend, {**options, "device": "cuda"}, layer, xi, wi)
        assert be.kernel is None and all(m.device.type == "cuda" for _, m in be._chips.values())
        assert out.device.type == "cpu"  # CPU in, CPU out
        assert torch.equal(out, ref)
        assert events == _run(backend, options, layer, xi, wi)[1]
        # a layer living on the GPU: the result stays there
        with torch.no_grad():
            on_gpu = be.mvm(layer, xi.cuda(), wi.cuda())
        assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), ref)


@needs_cuda
def test_cuda_stays_exact_with_tf32_enabled() -> None:
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(torch.backends, "fp32_precision")
    saved = matmul.fp32_precision if new_api else matmul.allow_tf32
    try:
        if new_api:
            matmul.fp32_precision = "tf32"
        else:
            matmul.allow_tf32 = True
        assert engine._tf32_matmul(torch.device("cuda"))
        for options in ({"rows": 64, "dac_bits": 4}, {"rows": 128, "cell_bits": 3, "gemm": "float32"}):
            conv, _ = _layers(8, 8)
            xi, wi = _integer_inputs(conv, torch.rand(3, 5, 7, 7))
            out = _run("crossbar", {**options, "device": "cuda"}, conv, xi, wi)[0]
            assert torch.equal(out, conv.integer_mvm(xi, wi)), options
    finally:
        if new_api:
            matmul.fp32_precision = saved
        else:
            matmul.allow_tf32 = saved


@needs_cuda
@pytest.mark.parametrize("backend,opts", NOISY)
@pytest.mark.parametrize("shape", [(16, 8, 1, 8), (12, 7, 2, 8), (20, 9, 1, 1)])
def test_cuda_noise_matches_the_cpu(backend: str, opts: dict, shape: tuple) -> None:
    conv, xi, wi = _noisy_conv(shape)
    ideal = conv.integer_mvm(xi, wi)
    ref, ref_events, ref_be = _run(backend, {**opts, "kernel": "torch"}, conv, xi, wi)
    out, events, be = _run(backend, {**opts, "device": "cuda"}, conv, xi, wi)
    assert out.device.type == "cpu" and events == ref_events
    # same samples, same places: equal up to float rounding, except (rarely) an ADC code one step
    # apart where the device rounds a value on a code boundary the other way (fused multiply-adds)
    close = torch.isclose(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert float(close.float().mean()) >= 0.99, (backend, opts, int((~close).sum()))
    err_ref, err = (ref - ideal).double(), (out - ideal).double()
    assert float(err_ref.std()) > 0
    assert abs(float(err.mean() - err_ref.mean())) <= 0.02 * float(err_ref.std())
    assert abs(float(err.std() / err_ref.std()) - 1.0) <= 0.02
    for (_, m_cpu), (_, m_gpu) in zip(ref_be._chips.values(), be._chips.values()):
        if m_cpu.ranges is not None:  # the same ADC ranges (calibrated: the same percentiles)
            assert m_gpu.ranges is not None
            assert torch.allclose(m_gpu.ranges.lo.cpu(), m_cpu.ranges.lo, rtol=1e-6, atol=1e-9)
            assert torch.allclose(m_gpu.ranges.step.cpu(), m_cpu.ranges.step, rtol=1e-6, atol=1e-9)


@needs_cuda
def test_cuda_whole_network_on_cpu_and_on_gpu() -> None:
    """A CPU model with its arrays on the GPU equals the CPU run; a GPU model keeps GPU tensors."""
    net = mixed_precision_net()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
    for name in ("crossbar", "sram"):
        create_backend(name, {"device": "cuda"}, seed=1).prepare(net)
        with torch.no_grad():
            assert torch.equal(net(x), ref), name
    net.cuda()
    create_backend("crossbar", {"device": "cuda"}, seed=1).prepare(net)
    with torch.no_grad():
        out = net(x.cuda())
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), ref, rtol=1e-5, atol=1e-5)  # BatchNorm and scaling on the GPU: float rounding
