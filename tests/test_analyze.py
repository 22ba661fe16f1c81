"""Hybrid-Net PCA significance (edgecloud.analyze.pca) and ``edgecloud analyze pca``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgecloud.analyze.pca import (
    LayerSignificance, analyze_layers, propose_bits, propose_block_bits, significant_dims,
)
from edgecloud.cli import main
from edgecloud.data.idx import write_idx
from edgecloud.nets import create_model


def test_significant_dims_counts_components_to_the_variance_share():
    values = torch.tensor([1.0, 5.0, 1.0, 3.0])  # order does not matter; shares .5 .8 .9 1.0
    assert significant_dims(values, 0.5) == 1
    assert significant_dims(values, 0.8) == 2
    assert significant_dims(values, 0.85) == 3
    assert significant_dims(values, 1.0) == 4
    assert significant_dims(torch.zeros(3), 0.99) == 0
    with pytest.raises(ValueError, match="variance"):
        significant_dims(values, 0.0)


def low_rank_conv(cin: int, cout: int, rank: int, seed: int, kernel: int = 3) -> nn.Conv2d:
    """A conv whose outputs span exactly ``rank`` directions in channel space."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
    mix = torch.randn(cout, rank, generator=g)
    basis = torch.randn(rank, cin * kernel * kernel, generator=g)
    with torch.no_grad():
        conv.weight.copy_((mix @ basis).view(cout, cin, kernel, kernel))
    return conv


def test_pca_finds_the_rank_of_each_layer_and_flags_jumps():
    net = nn.Sequential(
        low_rank_conv(3, 8, rank=2, seed=0),          # D = 2   (jump +2: significant)
        low_rank_conv(8, 12, rank=7, seed=1),         # D = 7   (+5: significant)
        low_rank_conv(12, 12, rank=8, seed=2),        # D = 8   (+1: not)
        nn.Conv2d(12, 4, 1),                          # 1x1: skipped (projection-shortcut shape)
        low_rank_conv(4, 6, rank=1, seed=3),          # D = 1   (-7: not)
    )
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 3, 12, 12, generator=g) for _ in range(3)]
    layers = analyze_layers(net, batches, variance=0.999999, delta=2)
    assert [layer.name for layer in layers] == ["0", "1", "2", "4"]
    assert [layer.dims for layer in layers] == [2, 7, 8, 1]
    assert [layer.jump for layer in layers] == [2, 5, 1, -7]
    assert [layer.significant for layer in layers] == [True, True, False, False]
    assert layers[0].positions == 3 * 8 * 12 * 12
    assert all(layer.precision == "fp32" for layer in layers)
    assert propose_bits(layers) == {}  # nothing quantized to raise


def test_block_bits_proposal_raises_blocks_with_a_significant_quantized_conv():
    model = create_model("fmnist_hybrid", width=8, cloud_width=8, cloud_blocks=1)

    def row(name: str, significant: bool, precision: str = "w1a1") -> LayerSignificance:
        return LayerSignificance(name, 8, precision, 100, 4, 2 if significant else 0, significant)

    layers = [row("stem.0", True, "fp32"), row("edge.0.unit1.conv", False), row("edge.0.unit2.conv", False),
              row("edge.1.unit1.conv", False), row("edge.1.unit2.conv", True), row("cloud.blocks.0.conv1", True,
                                                                                   "fp32")]
    assert propose_bits(layers, 2) == {"edge.1.unit2.conv": 2}
    assert propose_block_bits(model, layers, 2) == [[1, 1], [2, 2]]
    assert propose_block_bits(nn.Sequential(nn.Conv2d(1, 1, 3)), layers) is None


def test_cli_analyze_pca_on_a_bundle(tiny_repo, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 100), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)
    rc = main(["analyze", "pca", "tiny", "--repository", str(tiny_repo), "--dataset", "fashion-mnist",
               "--data-root", str(tmp_path), "--batch-size", "3", "--json"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, captured.err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["split"] == "val" and report["samples"] == 10  # 10% of 100 training images
    names = [layer["name"] for layer in report["layers"]]
    assert names[:3] == ["stem.0", "edge.0.unit1.conv", "edge.0.unit2.conv"]
    assert all(layer["positions"] > 0 for layer in report["layers"])
    assert len(report["block_bits"]) == 2
    assert "block_bits" in out and "significant" in out
    assert main(["analyze", "pca", "tiny", "--repository", str(tiny_repo), "--dataset", "fashion-mnist",
                 "--data-root", str(tmp_path), "--samples", "0"]) == 2


def test_exit_branch_bits_proposal_and_the_hybrid_it_builds():
    from edgecloud.analyze.pca import propose_exit_block_bits

    arch = {"depth": 8, "edge_blocks": 1, "exit_blocks": [[32, 2], [64, 2]], "exit_pool": 1}
    model = create_model("cifar_hybrid", **arch)
    layers = [LayerSignificance("heads.0.blocks.1.unit1.conv", 64, "w1a1", 100, 9, 5, True),
              LayerSignificance("heads.0.blocks.0.unit2.conv", 32, "w1a1", 100, 4, 0, False)]
    proposal = propose_exit_block_bits(model, layers, 2)
    assert proposal == [[1, 1], [2, 2]]
    assert propose_exit_block_bits(create_model("cifar_hybrid", depth=8, edge_blocks=1), layers) is None
    hybrid = create_model("cifar_hybrid", **arch, exit_block_bits=proposal)
    convs = [m for m in hybrid.heads[0].modules() if hasattr(m, "weight_bits")]
    assert [(c.weight_bits, c.act_bits) for c in convs] == [(1, 1), (1, 1), (2, 2), (2, 2)]
    with pytest.raises(ValueError, match="exit branch"):
        create_model("cifar_hybrid", **arch, exit_block_bits=[[2, 2]])
