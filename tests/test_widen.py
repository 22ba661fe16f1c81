"""Function-preserving widening (Net2WiderNet) of trained hybrids, and hybrid-to-hybrid init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgecloud.nets import create_model
from edgecloud.nets.widen import widen_into, widen_tensor

ARCH = dict(depth=8, edge_blocks=2, exit_blocks=[[16, 2]], exit_pool=1)


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights and non-trivial BN statistics, as a trained net has."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32))
    return model.eval()


def test_widened_input_channels_keep_a_convolution_unchanged() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    x = torch.randn(2, 4, 8, 8)
    wide = widen_tensor(w, torch.Size([9, 10, 3, 3]))  # uneven: some inputs copied 3x, some 2x
    x_wide = x.index_select(1, torch.arange(10) % 4)
    out, out_wide = F.conv2d(x, w, padding=1), F.conv2d(x_wide, wide, padding=1)
    torch.testing.assert_close(out_wide[:, :6], out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_wide[:, 6:], out[:, :3], rtol=1e-5, atol=1e-5)  # copied filters
    with pytest.raises(ValueError, match="narrow"):
        widen_tensor(w, torch.Size([3, 4, 3, 3]))
    with pytest.raises(ValueError, match="shape"):
        widen_tensor(w, torch.Size([6, 4, 1, 1]))


@pytest.mark.parametrize("bits", [1, 4])
def test_widening_a_hybrid_preserves_every_output(bits: int) -> None:
    narrow = _trained_like(create_model("cifar_hybrid", widths=(8, 16, 16), weight_bits=bits, act_bits=bits, **ARCH))
    wide = create_model("cifar_hybrid", widths=(16, 32, 16), weight_bits=bits, act_bits=bits, **ARCH)
    changed = widen_into(wide, narrow, noise=0.0)
    assert "stem.0.weight" in changed and "cloud.blocks.0.conv1.weight" in changed
    assert wide.edge[0].unit1.conv.weight.shape == (16, 16, 3, 3)
    wide.eval()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(narrow(x), wide(x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_init_from_a_hybrid_run_widens_with_symmetry_breaking_noise_or_copies() -> None:
    narrow = _trained_like(create_model("cifar_hybrid", widths=(8, 16, 16), **ARCH))
    wide = create_model("cifar_hybrid", widths=(16, 32, 16), **ARCH)
    assert wide.init_from(narrow) == []
    w = wide.edge[0].unit1.conv.weight
    assert not torch.equal(w[8:], w[:8])  # the copies differ, so they can learn apart
    torch.testing.assert_close(w[8:], w[:8], rtol=0.0, atol=0.2)
    wide.eval()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert (wide(x)[-1].argmax(1) == narrow(x)[-1].argmax(1)).float().mean() >= 0.75

    # same widths (staged quantization, e.g. 4-bit -> binary): an exact copy
    four_bit = _trained_like(create_model("cifar_hybrid", widths=(8, 16, 16), weight_bits=4, act_bits=4, **ARCH))
    binary = create_model("cifar_hybrid", widths=(8, 16, 16), **ARCH)
    binary.init_from(four_bit)
    for (name, a), b in zip(four_bit.state_dict().items(), binary.state_dict().values()):
        assert torch.equal(a, b), name


def test_widening_refuses_other_layer_graphs_and_pooled_exits() -> None:
    narrow = create_model("cifar_hybrid", widths=(8, 16, 16), **ARCH)
    other = create_model("cifar_hybrid", widths=(16, 32, 16), depth=8, edge_blocks=1, exit_pool=1)
    with pytest.raises(ValueError, match="differ in layers"):
        other.init_from(narrow)
    pooled = create_model("cifar_hybrid", widths=(16, 32, 16), depth=8, edge_blocks=2, exit_pool=2)
    with pytest.raises(ValueError, match="exit_pool 1"):
        pooled.init_from(create_model("cifar_hybrid", widths=(8, 16, 16), depth=8, edge_blocks=2, exit_pool=2))
    with pytest.raises(ValueError, match="widths"):
        create_model("cifar_hybrid", widths=(16, 32))


def test_stream_activations_start_as_identity_when_added_to_a_trained_hybrid() -> None:
    narrow = _trained_like(create_model("cifar_hybrid", widths=(8, 16, 16), **ARCH))
    acted = create_model("cifar_hybrid", widths=(8, 16, 16), stream_act=True, **ARCH)
    fresh = acted.init_from(narrow)
    assert "edge.0.act1" in fresh and "heads.0.blocks.0.act2" in fresh
    acted.eval()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(narrow(x), acted(x)):
            torch.testing.assert_close(b, a)
        acted.edge[0].act1.shift_in.fill_(0.3)
        acted.edge[0].act1.slope.fill_(0.25)
        assert not torch.allclose(acted(x)[-1], narrow(x)[-1])  # it is a real, learnable non-linearity
    again = create_model("cifar_hybrid", widths=(8, 16, 16), stream_act=True, **ARCH)
    assert again.init_from(acted) == []  # a run that has them: copied, nothing fresh
    assert again.edge[0].act1.slope.detach()[0].item() == 0.25
