"""MEANet with k-bit edge blocks: the network, its warm start from a full-precision MEANet, and a
CiM backend that maps its whole edge (tiny widths, random inputs)."""

from __future__ import annotations

import pytest
import torch

from edgecloud.cim.backend import create_backend
from edgecloud.exits import ExitPolicy
from edgecloud.nets import create_model
from edgecloud.nn.quant import QuantLayerMixin

TINY = {"main_depth": 8, "cloud_depth": 8, "width": 4, "hard_classes": [1, 3, 5, 7, 9]}


def _quant_layers(module: torch.nn.Module) -> list[QuantLayerMixin]:
    return [m for m in module.modules() if isinstance(m, QuantLayerMixin)]


@torch.no_grad()
def _calibrate_ranges(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Set every learned activation range from a batch (as the first training step would), with
    BN left in eval mode, so the k-bit network computes what its full-precision source does."""
    model.eval()
    for layer in _quant_layers(model):
        layer.train()
    model(x)
    model.eval()


def test_edge_bits_quantize_every_edge_block_and_keep_the_cloud_full_precision() -> None:
    fp = create_model("meanet", **TINY)
    q = create_model("meanet", **TINY, edge_bits=4)
    assert not _quant_layers(fp)
    for part in ("main", "adaptive", "extension", "extension_head"):
        assert _quant_layers(getattr(q, part)), part
    assert not _quant_layers(q.cloud)
    x = torch.rand(6, 3, 32, 32)
    outs = q.eval()(x)
    assert [tuple(o.shape) for o in outs] == [(6, 10)] * 3
    d = q.route(x, ExitPolicy("entropy", [10.0, None]))  # every sample confident at the main block
    assert (d.exit_index >= 0).all()
    with pytest.raises(ValueError, match="edge_bits must be in"):
        create_model("meanet", **TINY, edge_bits=1)


def test_warm_start_from_a_full_precision_meanet_computes_what_it_does() -> None:
    torch.manual_seed(0)
    fp = create_model("meanet", **TINY).eval()
    for m in fp.modules():  # non-trivial BN statistics, so the folding of the normalisation shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    q = create_model("meanet", **{**TINY, "hard_classes": None, "num_hard": 5}, edge_bits=8)
    assert q.init_from(fp) == []
    assert q.hard_classes.tolist() == fp.hard_classes.tolist()
    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _calibrate_ranges(q, x)
    with torch.no_grad():
        for a, b in zip(q(x)[:2], fp(x)[:2]):
            corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
            assert corr > 0.97
        assert torch.equal(q(x)[2], fp(x)[2])  # the cloud, copied
    four = create_model("meanet", **TINY, edge_bits=4)
    four.init_from(q.__class__(**{**TINY, "edge_bits": 4}))  # same bits: every weight
    with pytest.raises(ValueError, match="full-precision one or one of its own bits"):
        four.init_from(q)
    with pytest.raises(ValueError, match="hard classes"):
        create_model("meanet", **{**TINY, "hard_classes": [1, 2]}, edge_bits=4).init_from(fp)


def test_a_crossbar_maps_the_whole_quantized_edge_and_equals_digital_at_ideal_settings() -> None:
    torch.manual_seed(0)
    q = create_model("meanet", **TINY, edge_bits=4).eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    _calibrate_ranges(q, x)
    with torch.no_grad():
        digital = q(x)
    backend = create_backend("crossbar", {"rows": 64, "cell_bits": 1, "dac_bits": 1})
    backend.prepare(q)
    edge_layers = [m for p in ("main", "adaptive", "extension", "extension_head") for m in _quant_layers(getattr(q, p))]
    assert edge_layers and all(m.mvm_fn is not None for m in edge_layers)
    with torch.no_grad():
        mapped = q(x)
    for a, b in zip(mapped, digital):
        assert torch.equal(a, b)
