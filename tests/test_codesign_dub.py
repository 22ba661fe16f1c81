"""D.U.B. crossbar-attuned pruning (edgecloud.codesign.dub) and its training-loop integration."""

from __future__ import annotations

import pytest
import torch

from edgecloud.codesign.dub import (
    apply_masks, array_levels, column_segments, dub_penalty, dub_prune, gradient_gate, group_lasso_penalty,
    group_lasso_prune, hoyer, magnitude_prune, matrix_as_weight, model_penalty, prune_model, save_masks,
    weight_as_matrix,
)
from edgecloud.nn.quant import QuantConv2d, QuantLinear


def _column_counts(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """(n_row_tiles, O) kept weights per column segment."""
    return column_segments(weight_as_matrix(mask.float()), rows).sum(dim=1).long()


# ---- mapping --------------------------------------------------------------------------------

def test_weight_as_matrix_matches_the_backend_row_order() -> None:
    from edgecloud.cim.tiling import weight_matrix

    g = torch.Generator().manual_seed(0)
    conv = QuantConv2d(3, 5, 3, weight_bits=4, act_bits=4)
    w_int = torch.randint(-7, 8, (5, 3, 3, 3), generator=g).float()
    assert torch.equal(weight_as_matrix(w_int).round().long(), weight_matrix(conv, w_int))
    assert torch.equal(matrix_as_weight(weight_as_matrix(w_int), w_int.shape), w_int)
    lin = QuantLinear(7, 4, weight_bits=4, act_bits=4)
    l_int = torch.randint(-7, 8, (4, 7), generator=g).float()
    assert torch.equal(weight_as_matrix(l_int).round().long(), weight_matrix(lin, l_int))
    seg = column_segments(weight_as_matrix(w_int), 8)  # K = 27 -> tiles of 8, 8, 8, 3 rows
    assert seg.shape == (4, 8, 5) and torch.equal(seg[3, 3:], torch.zeros(5, 5))
    assert torch.equal(seg[3, :3], weight_as_matrix(w_int)[24:])


def test_hoyer_is_one_for_one_hot_and_rows_for_constant() -> None:
    seg = torch.zeros(1, 8, 3)
    seg[0, 5, 0] = 0.7       # one-hot
    seg[0, :, 1] = -0.3      # constant
    h = hoyer(seg)
    assert h.shape == (1, 3)
    assert h[0, 0].item() == pytest.approx(1.0, rel=1e-4)
    assert h[0, 1].item() == pytest.approx(8.0, rel=1e-4)
    assert h[0, 2].item() == pytest.approx(0.0, abs=1e-6)  # all-zero column


# ---- the gated variance regulariser ---------------------------------------------------------

def test_gate_passes_only_positive_gradients() -> None:
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = gradient_gate(x)
    assert torch.equal(y, x)
    (y * torch.tensor([2.0, -1.0, 0.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([2.0, 0.0, 0.0]))


def _four_columns() -> torch.Tensor:
    """(O=4, K=8) linear weight, one array of 8 rows x 4 outputs: Hoyer ~7.6, 1.8, 4, 6."""
    g = torch.Generator().manual_seed(1)
    w = torch.zeros(4, 8)
    w[0] = 0.5 + torch.rand(8, generator=g)          # dense, not constant (a constant is a stationary point)
    w[1, :2] = torch.tensor([1.0, 0.5])               # sparse
    w[2, :4] = 0.5 + torch.rand(4, generator=g)
    w[3, :6] = 0.5 + torch.rand(6, generator=g)
    return w


def test_gated_variance_makes_dense_columns_sparser_and_leaves_sparse_ones() -> None:
    w = _four_columns().requires_grad_(True)
    h0 = hoyer(column_segments(weight_as_matrix(w.detach()), 8))[0]
    mean = h0.mean()
    assert (h0[[0, 3]] > mean).all() and (h0[[1, 2]] < mean).all()
    dub_penalty(w, rows=8, outputs_per_array=4, gate=True).backward()
    grad = w.grad.clone()
    assert grad[[1, 2]].abs().sum() == 0                # sparser than the mean: no gradient
    assert (grad[0].abs() > 0).any() and (grad[3].abs() > 0).any()
    h1 = hoyer(column_segments(weight_as_matrix(w.detach() - 1e-2 * grad), 8))[0]
    assert (h1[[0, 3]] < h0[[0, 3]]).all()              # a descent step makes the dense columns sparser
    # without the gate the sparse columns would be pushed denser
    w2 = _four_columns().requires_grad_(True)
    dub_penalty(w2, rows=8, outputs_per_array=4, gate=False).backward()
    assert w2.grad[1].abs().sum() > 0
    h2 = hoyer(column_segments(weight_as_matrix(w2.detach() - 1e-2 * w2.grad), 8))[0]
    assert h2[1] > h0[1]


def test_penalty_is_per_array_and_descent_lowers_it() -> None:
    w = _four_columns()
    both = torch.cat([w, w])  # 8 outputs, arrays of 4: twice the one-array penalty
    assert dub_penalty(both, 8, 4).item() == pytest.approx(2 * dub_penalty(w, 8, 4).item(), rel=1e-5)
    # a single-column array has no variance
    assert dub_penalty(w, 8, 1).item() == 0.0
    p = w.clone().requires_grad_(True)
    opt = torch.optim.SGD([p], lr=1e-3)
    start = dub_penalty(p, 8, 4).item()
    for _ in range(20):
        opt.zero_grad()
        dub_penalty(p, 8, 4).backward()
        opt.step()
    assert dub_penalty(p, 8, 4).item() < start


def test_group_lasso_penalty_and_prune() -> None:
    w = torch.zeros(4, 8)
    w[0] = 1.0
    w[1, :4] = 2.0
    # columns: norms 2.828 + 4 = 6.828; rows within the one array (8 x 4): 4 rows sqrt(5), 4 rows 1
    assert group_lasso_penalty(w, 8, 4).item() == pytest.approx(8**0.5 + 4 + 4 * 5**0.5 + 4, rel=1e-5)
    p = w.clone().requires_grad_(True)
    group_lasso_penalty(p, 8, 4).backward()
    assert torch.isfinite(p.grad).all() and p.grad[2:].abs().sum() == 0  # zero groups: zero, not NaN
    w[2, 0] = 1e-4  # a column segment whose norm fell below tol
    mask = group_lasso_prune(w, 8, 4, tol=1e-3)
    assert not mask[2].any() and not mask[3].any() and mask[0].all() and mask[1, :4].all()


# ---- prune steps ----------------------------------------------------------------------------

def test_dub_prune_balances_every_array_at_a_discrete_level() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, 3, 3, generator=g)  # K = 36: row tiles of 16, 16, 4; outputs in groups 4, 2
    w[w.abs() < 0.8] = 0.0
    mask, levels = dub_prune(w, rows=16, outputs_per_array=4, tol=1e-3)
    assert mask.shape == w.shape and mask.dtype == torch.bool and levels.shape == (3, 2)
    counts = _column_counts(mask, 16)
    r = torch.tensor([16, 16, 4]).unsqueeze(1)
    expected = (r >> levels).repeat_interleave(4, dim=1)[:, :6]
    assert torch.equal(counts, expected)  # every column of an array: floor(R / 2^k) weights
    assert (levels > 0).any()
    for t in range(3):
        for cols in (slice(0, 4), slice(4, 6)):
            assert counts[t, cols].unique().numel() == 1
    assert (levels >= array_levels(w, 16, 4, 1e-3)).all()     # never denser than before (rounded up or kept)
    assert (array_levels(w * mask, 16, 4) >= levels).all()   # the hardware gets at least the chosen level


@pytest.mark.parametrize("dense, expected", [(16, 0), (13, 0), (12, 1), (7, 1), (6, 2), (5, 2), (3, 3), (2, 3),
                                             (1, 4)])
def test_dub_prune_rounds_the_densest_column_to_the_nearest_level(dense: int, expected: int) -> None:
    """One array of 16 rows x 2 outputs; the densest column has n weights above tol, s = 1 - n/16.
    n=13: s=.1875 in [0, 1/2), below the midpoint .25 -> stays at k=0. n=12: s=.25, at the
    midpoint -> up to k=1 (>= as the reference code). n=7: s=.5625 in [1/2, 3/4), below .625 ->
    k=1 (keep 8). n=6 (.625, the midpoint) and n=5 (.6875) -> up to k=2 (keep 4). n=3: .8125,
    the midpoint of [3/4, 7/8) -> k=3. n=2: s=7/8 exactly -> k=3. n=1: s=15/16 -> k=4 (keep 1)."""
    w = torch.zeros(2, 16)
    w[0, :dense] = torch.linspace(1.0, 2.0, dense)        # the densest column, smallest first
    w[1] = 5e-4                                           # below tol everywhere: ties
    mask, levels = dub_prune(w, rows=16, outputs_per_array=2, tol=1e-3)
    assert levels.tolist() == [[expected]]
    keep = 16 >> expected
    assert mask.sum(dim=1).tolist() == [keep, keep]
    kept = min(dense, keep)
    assert mask[0, dense - kept:dense].all()                # the largest |w| survive
    assert not mask[0, :dense - kept].any()
    assert mask[1, :keep].all() and not mask[1, keep:].any()  # ties: the lower rows


def test_dub_prune_partial_tile_and_empty_array() -> None:
    w = torch.zeros(2, 20)  # row tiles of 16 and 4 rows
    w[:, 16] = 1.0           # tile 2: one non-zero of 4 -> s = 3/4 -> k = 2, keep 1
    w[0, :16] = 0.0          # tile 1 empty
    w[1, :16] = 0.0
    mask, levels = dub_prune(w, rows=16, outputs_per_array=2)
    assert levels.tolist() == [[5], [2]]   # 5 = bit_length(16): nothing left in the array
    assert not mask[:, :16].any() and mask[:, 16].all() and mask.sum() == 2


def test_magnitude_prune_hits_its_ratio() -> None:
    w = torch.randn(10, 20, generator=torch.Generator().manual_seed(0))
    mask = magnitude_prune(w, 0.3)
    assert int((~mask).sum()) == 60
    assert w[~mask].abs().max() <= w[mask].abs().min()
    assert magnitude_prune(w, 0.0).all() and not magnitude_prune(w, 1.0).any()


def test_prune_model_covers_the_prunable_quantized_layers() -> None:
    from edgecloud.nets import create_model

    torch.manual_seed(0)
    model = create_model("lenet5", weight_bits=4, act_bits=4)
    res = prune_model(model, "magnitude", rows=16, ratio=0.5)
    assert set(res.masks) == {"conv1", "conv2"}
    assert float((model.conv2.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert res.levels["conv2"].shape == (10, 2)  # K = 150 in 10 row tiles; 16 outputs in groups of 16 // 2
    res_all = prune_model(model, "dub", rows=16, layers="all", apply=False)
    assert set(res_all.masks) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    summary = res_all.summary()
    assert 0.0 <= summary["sparsity"] <= 1.0 and summary["layers"]["fc1"]["arrays"] == 25 * 15
    binary = create_model("lenet5", weight_bits=1, act_bits=1)
    assert prune_model(binary, "dub", rows=16).masks == {}  # binary weights cannot hold a zero
    assert model_penalty(binary).item() == 0.0


# ---- training loop --------------------------------------------------------------------------

def _splits(n: int = 64):
    from edgecloud.data.dataset import ImageDataset
    from edgecloud.train.loop import Splits

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 60, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 10
    for i in range(n):
        r, q = divmod(int(labels[i]), 4)
        images[i, 0, r * 7 + 3:r * 7 + 10, q * 7:q * 7 + 7] = 230
    ds = ImageDataset(images, labels, tuple("abcdefghij"))
    return Splits(ds, ds.subset(torch.arange(16)), None)


def _recipe(**extra):
    from edgecloud.train.recipe import Recipe

    return Recipe.model_validate({
        "name": "tiny-dub", "family": "lenet5", "arch": {"weight_bits": 4, "act_bits": 4}, "seed": 0,
        "data": {"dataset": "fashion-mnist"},
        "optim": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                  "weight_decay": 1e-3, "schedule": "constant", "channels_last": False},
        **extra,
    })


def test_recipe_sections_validate() -> None:
    from edgecloud.train.recipe import MaskSpec, PruneRegularizerSpec

    spec = PruneRegularizerSpec()
    assert (spec.method, spec.rows, spec.outputs_per_array, spec.gate, spec.layers) == ("dub", 64, 32, True, "conv")
    assert PruneRegularizerSpec(rows=128).outputs_per_array == 64
    with pytest.raises(ValueError):
        MaskSpec()
    with pytest.raises(ValueError):
        MaskSpec(method="dub", file="x.pt")
    with pytest.raises(ValueError):
        MaskSpec(method="magnitude")
    # recipes without the new sections resume checkpoints written before they existed
    r = _recipe()
    assert "masks" not in r.training_dump() and "prune_regularizer" not in r.training_dump()


def test_training_with_the_regulariser_lowers_the_penalty(tmp_path) -> None:
    from edgecloud.nets import create_model
    from edgecloud.train.loop import run_training

    kw = {"method": "dub", "lambda_var": 0.05, "lambda_l2": 0.0, "rows": 16, "outputs_per_array": 8}
    recipe = _recipe(prune_regularizer=kw)
    penalty = recipe.prune_regularizer.penalty_kwargs()
    torch.manual_seed(0)  # the recipe's seed: the run starts from these weights
    before = model_penalty(create_model("lenet5", weight_bits=4, act_bits=4), **penalty)
    res = run_training(recipe, tmp_path, splits=_splits(), progress=False)  # 2 steps
    after = model_penalty(res.model, **penalty)
    assert res.history[-1]["prune_penalty"] > 0
    # (with lambda_var 0 the same 2 steps raise the variance term: 22.2 -> 23.5, measured)
    assert after.item() < before.item()


def test_masks_stay_zero_through_training_and_export(tmp_path) -> None:
    from edgecloud.nets import create_model
    from edgecloud.train.loop import build_model, load_checkpoint, run_training

    recipe = _recipe()
    model = build_model(recipe)
    masks = prune_model(model, "magnitude", rows=16, ratio=0.5, layers="all", apply=False).masks
    save_masks(masks, tmp_path / "m.pt")
    recipe = _recipe(masks={"file": str(tmp_path / "m.pt")},
                     prune_regularizer={"rows": 16, "lambda_var": 1e-2})  # both: regularise the survivors
    recipe.optim.epochs = 2
    res = run_training(recipe, tmp_path / "run", splits=_splits(), progress=False, stop_after=1)
    res = run_training(recipe, tmp_path / "run", splits=_splits(), progress=False, resume=True)
    _, loaded, ckpt = load_checkpoint(tmp_path / "run")
    plain = create_model("lenet5", weight_bits=4, act_bits=4)
    assert set(loaded.state_dict()) == set(plain.state_dict())  # no weight_orig / weight_mask
    for name, mask in masks.items():
        for net in (res.model, loaded):
            w = net.get_submodule(name).weight
            assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
            assert (w[mask] != 0).float().mean() > 0.9
        assert torch.equal(ckpt["masks"][name], mask)
    assert (tmp_path / "run" / "pruning.json").is_file()
    from edgecloud.bundle import Bundle
    from edgecloud.train.loop import finalize

    bundle, _ = finalize(res.model, recipe, tmp_path / "bundle", splits=_splits())
    served = Bundle(bundle).build_model()
    for name, mask in masks.items():
        assert not served.get_submodule(f"net.{name}").weight[~mask].any()  # the bundle keeps the zeros
    # masks computed at the start of the run (the D.U.B. step on the starting weights)
    dub = _recipe(masks={"method": "dub", "rows": 16, "tol": 0.05})
    res = run_training(dub, tmp_path / "dub", splits=_splits(), progress=False)
    saved = torch.load(tmp_path / "dub" / "masks.pt")
    for name, mask in saved.items():
        w = res.model.get_submodule(name).weight
        assert not w[~mask].any()
        counts = _column_counts(mask, 16)
        for t in range(counts.shape[0]):
            assert counts[t, :8].unique().numel() == 1
    apply_masks(res.model, saved)  # idempotent
