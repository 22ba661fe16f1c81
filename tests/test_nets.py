"""Model families: build, train a few steps, route() semantics, MAC counting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgecloud.cim.events import EventLog, recording
from edgecloud.exits import ExitPolicy
from edgecloud.nets import create_model, list_models
from edgecloud.nets.layers import count_macs, reference_macs
from edgecloud.nn.quant import quant_layers

# Small configurations of every family, with their input shape.
SMALL = {
    "fmnist_hybrid": ({"width": 8, "cloud_width": 16, "cloud_blocks": 1}, (1, 28, 28)),
    "cifar_hybrid": ({"depth": 8, "edge_blocks": 2, "exits": [1, 2]}, (3, 32, 32)),
    "resnet": ({"depth": 8}, (3, 32, 32)),
    "lenet5": ({"weight_bits": 4, "act_bits": 4}, (1, 28, 28)),
    "vgg_small": ({"width": 8}, (3, 32, 32)),
    "meanet": ({"main_depth": 8, "cloud_depth": 8, "width": 8, "hard_classes": [2, 3, 4, 5, 6]}, (3, 32, 32)),
}


def test_every_family_is_registered() -> None:
    assert set(SMALL) <= set(list_models())


@pytest.mark.parametrize("family", sorted(SMALL))
def test_family_trains_a_few_steps(family: str) -> None:
    torch.manual_seed(0)
    kwargs, shape = SMALL[family]
    model = create_model(family, **kwargs)
    x = torch.rand(16, *shape)
    y = torch.randint(0, 10, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        outs = model(x)
        outs = outs if isinstance(outs, list) else [outs]
        loss = sum(F.cross_entropy(o, y) for o in outs if o.shape[1] == 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], f"{family} did not fit a tiny batch: {losses}"


def _route(model, x, kind, thresholds):
    model.eval()
    return model.route(x, ExitPolicy(kind, list(thresholds)))


@pytest.mark.parametrize("family", ["fmnist_hybrid", "cifar_hybrid"])
def test_route_threshold_extremes(family: str) -> None:
    torch.manual_seed(0)
    kwargs, shape = SMALL[family]
    model = create_model(family, **kwargs).eval()
    n_exits = len(model.exit_names)
    x = torch.rand(12, *shape)
    none = _route(model, x, "entropy", [0.0] * n_exits)  # H < 0 never holds
    assert (none.exit_index == -1).all()
    assert none.offload_index.tolist() == list(range(12))
    assert none.offload.shape == (12, *model.offload_shape())
    # The offloaded features are exactly what the cloud part needs for the full network.
    with torch.no_grad():
        torch.testing.assert_close(model.cloud_module()(none.offload), model(x)[-1])
    assert torch.allclose(none.probs.sum(1), torch.ones(12))

    every = _route(model, x, "entropy", [100.0] * n_exits)
    assert (every.exit_index == 0).all()
    assert every.offload.shape == (0, *model.offload_shape())
    with torch.no_grad():
        torch.testing.assert_close(every.probs, torch.softmax(model(x)[0], 1))


def test_route_per_exit_counts_and_energy_rows() -> None:
    """With two exits, the second edge exit and later blocks run only on undecided rows."""
    torch.manual_seed(0)
    model = create_model("cifar_hybrid", depth=8, edge_blocks=2, exits=[1, 2]).eval()
    x = torch.rand(10, 3, 32, 32)
    with torch.no_grad():
        outs = model(x)
    p0 = torch.softmax(outs[0], 1).max(1).values
    p1 = torch.softmax(outs[1], 1).max(1).values
    t0 = float(p0.sort().values[6])            # rows with p0 >= t0 exit at exit 0 (4 rows)
    early = p0 >= t0
    t1 = float(p1[~early].sort().values[3])    # of the other 6, those with p1 >= t1 exit at exit 1
    log = EventLog(10)
    with recording(log):
        d = _route(model, x, "max_prob", [t0, t1])
    assert (d.exit_index == 0).sum() == 4
    assert torch.equal(d.exit_index == 0, early)
    second = (~early) & (p1 >= t1)
    assert torch.equal(d.exit_index == 1, second)
    rest = ~(early | second)
    assert d.offload_index.tolist() == torch.nonzero(rest).flatten().tolist()
    # Binary MACs: rows leaving at exit 0 only paid for block 1; the others for both blocks.
    binary = log.counts[("digital", "mac_binary")]
    macs = count_macs(model, (3, 32, 32), by_precision=True)["mac_binary"]
    assert np.allclose(binary[~early.numpy()], macs)
    assert np.all(binary[early.numpy()] < macs) and np.all(binary[early.numpy()] > 0)
    # Rows sent to the cloud carry the probabilities of their more confident edge exit.
    both = torch.stack([torch.softmax(outs[0], 1), torch.softmax(outs[1], 1)])
    best = both.max(2).values.argmax(0)
    for r in torch.nonzero(rest).flatten().tolist():
        torch.testing.assert_close(d.probs[r], both[best[r], r])


def test_cdhn_quantized_edge_fp_cloud() -> None:
    model = create_model("cifar_hybrid", depth=20, edge_blocks=4, weight_bits=4, act_bits=4)
    edge_q = [n for n, _ in quant_layers(model)]
    assert len(edge_q) == 8 and all(n.startswith("edge.") for n in edge_q)
    assert not list(quant_layers(model.cloud_module()))
    assert model.offload_shape() == (32, 16, 16)
    with pytest.raises(ValueError):
        create_model("cifar_hybrid", depth=21)
    with pytest.raises(ValueError):
        create_model("cifar_hybrid", depth=20, edge_blocks=4, exits=[2, 3])


def test_count_macs_matches_hand_count() -> None:
    model = create_model("fmnist_hybrid")
    by = count_macs(model.cloud_module(), model.offload_shape(), by_precision=True)
    # cloud: 32->64 3x3 + 1x1 shortcut, 64->64 3x3, then a 64->64 block, all at 7x7, + fc 64x10
    expect = 49 * (64 * 32 * 9 + 64 * 32 + 64 * 64 * 9 + 2 * 64 * 64 * 9) + 640
    assert by == {"fp32": expect}
    ref = reference_macs(model, (1, 28, 28))
    stem = 784 * 16 * 9
    edge = 196 * (32 * 16 * 9 + 32 * 16 + 32 * 32 * 9) + 49 * (32 * 32 * 9 + 32 * 32 + 32 * 32 * 9)
    assert ref == stem + edge + expect


def test_resnet_is_cloud_only() -> None:
    torch.manual_seed(0)
    model = create_model("resnet", depth=8).eval()
    x = torch.rand(5, 3, 32, 32)
    d = _route(model, x, "entropy", [])
    assert (d.exit_index == -1).all() and torch.equal(d.offload, x)
    with torch.no_grad():
        torch.testing.assert_close(model.cloud_module()(d.offload), model(x)[0])
    assert reference_macs(model, (3, 32, 32)) == count_macs(model.cloud_module(), (3, 32, 32))


def test_meanet_routing_extremes_and_hard_class_buffer() -> None:
    torch.manual_seed(0)
    kwargs, shape = SMALL["meanet"]
    model = create_model("meanet", **kwargs).eval()
    assert model.hard_classes.tolist() == [2, 3, 4, 5, 6]
    assert "hard_classes" in model.state_dict()
    x = torch.rand(16, *shape)
    none = _route(model, x, "entropy", [0.0, None])
    assert (none.exit_index == -1).all() and torch.equal(none.offload, x)
    every = _route(model, x, "entropy", [100.0, None])
    with torch.no_grad():
        pred = model(x)[0].argmax(1)
    hard = torch.isin(pred, model.hard_classes)
    assert torch.equal(every.exit_index, hard.long())  # easy -> 0 (main), hard -> 1 (extension)
    assert every.offload.shape == (0, *shape)
    # The extension answers only with hard classes.
    if hard.any():
        assert torch.isin(every.probs[hard].argmax(1), model.hard_classes).all()
    other = create_model("meanet", **{**kwargs, "hard_classes": None, "num_hard": 5})
    other.load_state_dict(model.state_dict())  # the buffer carries the set
    assert other.hard_classes.tolist() == [2, 3, 4, 5, 6]
    with pytest.raises(ValueError):
        model.set_hard_classes([1, 1, 2, 3, 4])
