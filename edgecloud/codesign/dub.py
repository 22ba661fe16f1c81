"""D.U.B. pruning: Discrete, Unstructured, Balanced sparsity that lowers crossbar ADC resolution.

Ibrayev, Garg, Chakraborty, Roy, "Pruning for Improved ADC Efficiency in Crossbar-based Analog
In-memory Accelerators", arXiv 2403.13082 (reference code: TimurIbrayev/DUB_Sparsity_for_XBars).

Why: on a crossbar the ADC, not the MAC, dominates the energy, and the resolution an array's ADC
needs is set by the largest partial sum a column can produce, i.e. by the number of non-zero
cells of the array's DENSEST column. Halving that count saves one bit; anything in between saves
nothing. So pruning should make the columns of one array equally sparse (balanced), at a
power-of-two fraction of the rows (discrete), while staying free within a column (unstructured).

Mapping (the same as the crossbar backend, :mod:`edgecloud.cim.tiling` / ``crossbar.py``):

- A layer's weights are a (K, O) matrix whose rows follow :func:`edgecloud.cim.tiling.weight_matrix`:
  (kh, kw, C) with the channels innermost for a conv, the input features for a linear layer.
- The K rows are cut into row tiles of ``rows`` rows (:func:`edgecloud.cim.tiling.row_tiles`; the
  last may hold fewer). A physical array = one row tile x a group of ``outputs_per_array``
  consecutive outputs. A "column" = one output's segment within a row tile (R weights, R = the
  rows present in the tile).
- ``outputs_per_array``: the crossbar holds a signed weight on a differential PAIR of physical
  columns, so a ``rows`` x ``cols`` array holds ``cols / 2`` outputs; the default ``rows // 2``
  is a square array. With bit slicing (cell_bits < weight bits) the backend orders the pairs
  slice-major (all outputs of slice 0, then of slice 1, ...), so an array still holds ``cols / 2``
  consecutive outputs of one slice when O is a multiple of ``cols / 2`` (with a single slice,
  always; otherwise one array straddles two slices), and a zero weight is a zero cell in every
  slice. ``levels`` are (row tiles, column groups), the layout of the backend's per-array bits.
- Sparsity level k: s_k = 1 - 2^-k, i.e. at most floor(R / 2^k) non-zeros per column; it saves k
  ADC bits. k = bit_length(R) (no non-zero left) is an empty array.

Masks are bool tensors of the weight's shape, True = kept. Binary-weight layers (weight_bits 1)
are never pruned or regularised: their sign quantizer maps a zero weight to +-1, so a zero cannot
be stored. Grouped convolutions are skipped too (the backends do not map them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.cim.tiling import row_tiles
from edgecloud.nn.quant import QuantConv2d, QuantLayerMixin, QuantLinear, quant_layers

Layers = Literal["conv", "all"]
GroupKind = Literal["column", "row", "tile"]
HOYER_EPS = 1e-6


# ---- mapping --------------------------------------------------------------------------------

def weight_as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A float (O, C, kh, kw) or (O, K) weight as the (K, O) matrix the arrays hold (differentiable).

    Same row order as :func:`edgecloud.cim.tiling.weight_matrix` (channels innermost), so that a
    "column" here is the column the crossbar backend programs.
    """
    if weight.dim() == 4:
        w = weight.permute(0, 2, 3, 1)
    elif weight.dim() == 2:
        w = weight
    else:
        raise ValueError(f"expected a (O, C, kh, kw) or (O, K) weight, got shape {tuple(weight.shape)}")
    return w.reshape(w.shape[0], -1).t()


def matrix_as_weight(matrix: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`weight_as_matrix`: a (K, O) matrix back to the weight's ``shape``."""
    if len(shape) == 4:
        o, c, kh, kw = shape
        return matrix.t().reshape(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()
    return matrix.t().reshape(tuple(shape)).contiguous()


def column_segments(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """(n_row_tiles, rows, O): the (K, O) matrix cut into row tiles, the last one zero-padded.

    Zero padding leaves every per-column statistic used here (L1, L2, Hoyer, non-zero count)
    unchanged, so partial tiles need no special case there.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    k, o = matrix.shape
    n = -(-k // rows)
    if n * rows != k:
        matrix = F.pad(matrix, (0, 0, 0, n * rows - k))
    return matrix.reshape(n, rows, o)


def tile_rows(k: int, rows: int) -> torch.Tensor:
    """(n_row_tiles,) int64: the rows R each row tile actually holds (the last may be shorter)."""
    return torch.tensor([b - a for a, b in row_tiles(k, rows)], dtype=torch.int64)


def _group_columns(x: torch.Tensor, outputs_per_array: int, fill: float = 0.0) -> torch.Tensor:
    """(..., O) -> (..., n_col_groups, outputs_per_array), the last group padded with ``fill``."""
    if outputs_per_array < 1:
        raise ValueError(f"outputs_per_array must be >= 1, got {outputs_per_array}")
    o = x.shape[-1]
    g = -(-o // outputs_per_array)
    if g * outputs_per_array != o:
        x = F.pad(x, (0, g * outputs_per_array - o), value=fill)
    return x.reshape(*x.shape[:-1], g, outputs_per_array)


# ---- regularisers ---------------------------------------------------------------------------

def hoyer(segments: torch.Tensor) -> torch.Tensor:
    """(n_row_tiles, O) Hoyer ratio (sum|w|)^2 / (sum w^2 + 1e-6) of each column segment.

    A differentiable proxy of the L0 norm: 1 for a one-hot column, R for a constant one
    (about 0 for an all-zero column, because of the epsilon).
    """
    return segments.abs().sum(dim=1).pow(2) / (segments.pow(2).sum(dim=1) + HOYER_EPS)


class _PositiveGradientGate(torch.autograd.Function):
    """Identity forward; backward keeps only positive gradients (the paper's ``gradient_gate``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.masked_fill(grad <= 0, 0.0)


def gradient_gate(x: torch.Tensor) -> torch.Tensor:
    """Pass ``x`` on unchanged but let only positive gradients flow back into it.

    On the Hoyer values under a variance penalty a positive gradient belongs to a column denser
    than its array's mean (descent makes it sparser); a sparser column's negative gradient would
    densify it and is dropped, so the penalty only ever pulls dense columns down.
    """
    return _PositiveGradientGate.apply(x)


def _array_variance(values: torch.Tensor, outputs_per_array: int) -> torch.Tensor:
    """(n_row_tiles, n_col_groups) unbiased variance over each array's columns (0 for one column).

    Unbiased as ``torch.var`` in the reference code; the last group averages only the outputs
    it holds.
    """
    o = values.shape[-1]
    grouped = _group_columns(values, outputs_per_array)
    valid = _group_columns(torch.ones(o, dtype=values.dtype, device=values.device), outputs_per_array)
    count = valid.sum(dim=-1)
    mean = (grouped * valid).sum(dim=-1) / count
    dev = (grouped - mean.unsqueeze(-1)) * valid
    return dev.pow(2).sum(dim=-1) / (count - 1).clamp_min(1)


def dub_penalty(weight: torch.Tensor, rows: int, outputs_per_array: int, gate: bool = True) -> torch.Tensor:
    """Sum over arrays of the variance of the (gated) Hoyer values of the array's columns.

    The D.U.B. regulariser ("GatedVarianceOverHoyer"): it balances the L0 proxies of columns
    that share an ADC, pushing dense columns towards the sparse ones (with ``gate``).
    """
    h = hoyer(column_segments(weight_as_matrix(weight), rows))
    if gate:
        h = gradient_gate(h)
    return _array_variance(h, outputs_per_array).sum()


def _safe_norm(x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """L2 norm with a zero (not NaN) gradient at an all-zero group (pruned or padding)."""
    sq = x.pow(2).sum(dim=dim)
    return torch.where(sq > 0, sq.clamp_min(1e-30).sqrt(), torch.zeros_like(sq))


def _group_norms(weight: torch.Tensor, rows: int, outputs_per_array: int,
                 groups: Iterable[GroupKind]) -> dict[str, torch.Tensor]:
    """Norms of the crossbar groups: column (n, O), row (n, R, G), tile (n, G) segments."""
    seg = column_segments(weight_as_matrix(weight), rows)  # (n, R, O)
    out: dict[str, torch.Tensor] = {}
    grouped = None
    for kind in groups:
        if kind == "column":
            out[kind] = _safe_norm(seg, dim=1)
        elif kind in ("row", "tile"):
            grouped = _group_columns(seg, outputs_per_array) if grouped is None else grouped  # (n, R, G, P)
            out[kind] = _safe_norm(grouped, dim=3) if kind == "row" else _safe_norm(grouped, dim=(1, 3))
        else:
            raise ValueError(f"unknown group kind {kind!r} (column, row, tile)")
    return out


def group_lasso_penalty(weight: torch.Tensor, rows: int, outputs_per_array: int,
                        groups: Iterable[GroupKind] = ("column", "row")) -> torch.Tensor:
    """Crossbar-aware group lasso (the paper's baseline): sum of the L2 norms of every column
    segment and every row segment within each array (``groups`` may add whole tiles).

    Structured: it empties whole columns / rows of an array (which also lowers the densest
    column's count, but costs more accuracy than unstructured sparsity)."""
    norms = _group_norms(weight, rows, outputs_per_array, groups)
    return sum((n.sum() for n in norms.values()), weight.new_zeros(()))


# ---- levels and prune steps -----------------------------------------------------------------

def _floor_levels(n_dense: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Largest k with n * 2^k <= R (the discrete level s_k <= s = 1 - n / R); bit_length(R)
    (floor(R / 2^k) = 0: an empty array) where n = 0. Exact integer arithmetic, no log2."""
    r = r.expand_as(n_dense)
    top = int(r.max()).bit_length() if r.numel() else 0
    k = torch.zeros_like(n_dense)
    for j in range(1, top + 1):
        k += ((n_dense > 0) & ((n_dense << j) <= r)).to(k.dtype)
    empty = torch.zeros_like(r)
    for j in range(top + 1):
        empty += ((r >> j) > 0).to(empty.dtype)  # bit_length(R)
    return torch.where(n_dense == 0, empty, k)


def densest_column_counts(weight: torch.Tensor, rows: int, outputs_per_array: int,
                          tol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_dense (n_row_tiles, n_col_groups), R (n_row_tiles, 1)): each array's densest column's
    count of weights with |w| > tol, and the rows each row tile holds."""
    matrix = weight_as_matrix(weight.detach())
    seg = column_segments(matrix.abs(), rows)
    nnz = (seg > tol).sum(dim=1)  # (n, O); padding rows are 0, never counted
    n_dense = _group_columns(nnz, outputs_per_array).amax(dim=-1)
    return n_dense, tile_rows(matrix.shape[0], rows).to(n_dense.device).unsqueeze(1)


def array_levels(weight: torch.Tensor, rows: int, outputs_per_array: int, tol: float = 0.0) -> torch.Tensor:
    """(n_row_tiles, n_col_groups) int64: the ADC bits each array saves as the weights stand.

    The discrete level k of the densest column (largest k with s_k <= s), no rounding: what any
    mask (magnitude, group lasso, D.U.B.) achieves on the hardware.
    """
    n_dense, r = densest_column_counts(weight, rows, outputs_per_array, tol)
    return _floor_levels(n_dense, r)


def dub_prune(weight: torch.Tensor, rows: int, outputs_per_array: int,
              tol: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, levels): the D.U.B. prune step of a trained (regularised) weight.

    Per array: s = the densest column's fraction of |w| <= tol among the rows present; k = the
    level with s_k <= s < s_{k+1}; if s >= (s_k + s_{k+1}) / 2 the array is forced UP to k + 1
    (``>=`` as in the reference code; never up to an empty array while a weight is above tol),
    else it stays at k. Then EVERY column keeps its floor(R / 2^k) largest |w| (ties: the lower
    row index), so all columns of an array hold the same number of weights and the densest
    column sits exactly at level k. ``levels`` (n_row_tiles, n_col_groups) int64 holds k.
    """
    w = weight.detach()
    n_dense, r = densest_column_counts(w, rows, outputs_per_array, tol)
    k = _floor_levels(n_dense, r)
    # s >= (s_k + s_k+1) / 2  <=>  n / R <= 3 / 2^(k+2)  <=>  n * 2^(k+2) <= 3 R
    up = (n_dense > 0) & ((n_dense << (k + 2)) <= 3 * r) & ((r >> (k + 1)) >= 1)
    levels = k + up.to(k.dtype)
    keep = r >> levels  # (n, G) weights kept per column

    matrix = weight_as_matrix(w).abs()
    seg = column_segments(matrix, rows)  # (n, R, O)
    n, rows_p, o = seg.shape
    pad = torch.arange(rows_p, device=seg.device).view(1, -1, 1) >= r.view(-1, 1, 1)
    score = seg.masked_fill(pad, -1.0)  # padding rows rank last
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(rows_p, device=seg.device).view(1, -1, 1).expand_as(order))
    keep_col = keep.repeat_interleave(outputs_per_array, dim=1)[:, :o]  # (n, O)
    kept = rank < keep_col.unsqueeze(1)
    mask = matrix_as_weight(kept.reshape(n * rows_p, o)[: matrix.shape[0]], w.shape)
    return mask, levels


def magnitude_prune(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Plain unstructured magnitude pruning (baseline): drop the round(ratio * N) smallest |w|
    of the layer (ties: the lower flat index goes first)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    flat = weight.detach().abs().flatten()
    n_drop = int(round(ratio * flat.numel()))
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[torch.sort(flat, stable=True).indices[:n_drop]] = False
    return mask.view_as(weight)


def group_lasso_prune(weight: torch.Tensor, rows: int, outputs_per_array: int, tol: float = 1e-3,
                      groups: Iterable[GroupKind] = ("column", "row")) -> torch.Tensor:
    """Mask of the group-lasso baseline: zero every crossbar group (column / row segment within
    an array, or whole tile) whose L2 norm fell to ``tol`` or below during regularised training."""
    w = weight.detach()
    matrix = weight_as_matrix(w)
    seg = column_segments(matrix, rows)  # (n, R, O)
    n, rows_p, o = seg.shape
    kept = torch.ones(seg.shape, dtype=torch.bool, device=w.device)
    for kind, norm in _group_norms(w, rows, outputs_per_array, groups).items():
        alive = norm > tol
        if kind == "column":
            kept &= alive.unsqueeze(1)
        else:
            if kind == "tile":
                alive = alive.unsqueeze(1)  # (n, 1, G)
            per_col = alive.unsqueeze(-1).expand(*alive.shape, outputs_per_array)
            kept &= per_col.reshape(*alive.shape[:-1], -1)[..., :o]
    return matrix_as_weight(kept.reshape(n * rows_p, o)[: matrix.shape[0]], w.shape)


# ---- models ---------------------------------------------------------------------------------

def prunable_layers(model: nn.Module, layers: Layers = "conv") -> list[tuple[str, QuantLayerMixin]]:
    """The quantized layers D.U.B. acts on: conv only (the paper) or conv and linear (``all``).

    Left out: binary-weight layers (a zero weight cannot be stored) and grouped convolutions
    (not mapped on arrays).
    """
    if layers not in ("conv", "all"):
        raise ValueError(f"layers must be 'conv' or 'all', got {layers!r}")
    kinds = (QuantConv2d,) if layers == "conv" else (QuantConv2d, QuantLinear)
    out = []
    for name, layer in quant_layers(model):
        if not isinstance(layer, kinds) or layer.weight_bits < 2:
            continue
        if isinstance(layer, QuantConv2d) and layer.groups != 1:
            continue
        out.append((name, layer))
    return out


def model_penalty(
    model: nn.Module,
    *,
    method: Literal["dub", "group-lasso"] = "dub",
    rows: int = 64,
    outputs_per_array: int = 32,
    lambda_var: float = 1e-3,
    lambda_l2: float = 1e-3,
    lambda_group: float = 1e-4,
    gate: bool = True,
    layers: Layers = "conv",
) -> torch.Tensor:
    """The regulariser added to each training step's loss, over the trainable prunable layers:
    lambda_l2 ||W||^2 + lambda_var dub_penalty (``dub``) or lambda_group group lasso."""
    total: torch.Tensor | None = None
    for _, layer in prunable_layers(model, layers):
        w = layer.weight
        if not w.requires_grad:
            continue
        term = lambda_l2 * w.pow(2).sum() if lambda_l2 else w.new_zeros(())
        if method == "dub":
            if lambda_var:
                term = term + lambda_var * dub_penalty(w, rows, outputs_per_array, gate)
        elif method == "group-lasso":
            if lambda_group:
                term = term + lambda_group * group_lasso_penalty(w, rows, outputs_per_array)
        else:
            raise ValueError(f"unknown regulariser {method!r} (dub, group-lasso)")
        total = term if total is None else total + term
    if total is None:
        return next(model.parameters()).new_zeros(())
    return total


@dataclass
class PruneResult:
    """Masks (True = kept) per layer name, with the sparsity and the array levels they give."""

    method: str
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    sparsity: dict[str, float] = field(default_factory=dict)  # fraction of the layer's weights pruned
    levels: dict[str, torch.Tensor] = field(default_factory=dict)  # (n_row_tiles, n_col_groups) bits saved

    def summary(self) -> dict[str, Any]:
        """JSON-friendly record: per layer sparsity and histogram of levels, and the totals."""
        total = sum(int(m.numel()) for m in self.masks.values())
        pruned = sum(int((~m).sum()) for m in self.masks.values())
        per_layer = {}
        for name, mask in self.masks.items():
            lv = self.levels[name]
            values, counts = torch.unique(lv, return_counts=True)
            per_layer[name] = {
                "weights": int(mask.numel()), "sparsity": round(self.sparsity[name], 6),
                "arrays": int(lv.numel()), "mean_bits_saved": round(float(lv.float().mean()), 4),
                "levels": {str(int(v)): int(c) for v, c in zip(values, counts)},
            }
        return {"method": self.method, "weights": total, "sparsity": pruned / total if total else 0.0,
                "layers": per_layer}


def layer_ratio(ratio: float | dict[str, float] | None, name: str) -> float | None:
    """The prune ratio of layer ``name``; a per-layer mapping must name every pruned layer."""
    if not isinstance(ratio, dict):
        return ratio
    if name not in ratio:
        raise ValueError(f"no prune ratio for layer {name!r} (the per-layer ratios name {', '.join(ratio) or 'none'})")
    return float(ratio[name])


def prune_model(
    model: nn.Module,
    method: Literal["dub", "magnitude", "group-lasso"],
    rows: int = 64,
    outputs_per_array: int | None = None,
    *,
    tol: float = 1e-3,
    ratio: float | dict[str, float] | None = None,
    layers: Layers = "conv",
    apply: bool = True,
) -> PruneResult:
    """Prune every prunable layer (see :func:`prunable_layers`) of ``model``; with ``apply`` the
    pruned weights are zeroed in place. ``levels`` are the bits each array saves: D.U.B.'s
    chosen levels, and for the baselines what their masks reach (:func:`array_levels`).

    ``ratio``: the fraction of each layer's weights removed, one for all layers or one per layer
    name (e.g. the sparsities a D.U.B. run reached, for baselines at equal sparsity). Magnitude
    pruning needs it; group lasso then also drops the smallest surviving weights up to it (the
    reference code's group lasso + layer-by-layer magnitude step).
    """
    opa = outputs_per_array or max(1, rows // 2)
    result = PruneResult(method)
    for name, layer in prunable_layers(model, layers):
        w = layer.weight.detach()
        r = layer_ratio(ratio, name)
        if method == "dub":
            mask, levels = dub_prune(w, rows, opa, tol)
        elif method == "magnitude":
            if r is None:
                raise ValueError("magnitude pruning needs a ratio")
            mask = magnitude_prune(w, r)
            levels = array_levels(w * mask, rows, opa)
        elif method == "group-lasso":
            mask = group_lasso_prune(w, rows, opa, tol)
            if r is not None:  # dead segments first: they rank lowest as zeros
                mask = mask & magnitude_prune(w * mask, r)
            levels = array_levels(w * mask, rows, opa)
        else:
            raise ValueError(f"unknown prune method {method!r} (dub, magnitude, group-lasso)")
        result.masks[name] = mask
        result.levels[name] = levels
        result.sparsity[name] = float((~mask).float().mean())
    if apply:
        apply_masks(model, result.masks)
    return result


# ---- fixed masks (fine-tuning) --------------------------------------------------------------

def check_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless every mask names a quantized layer with a weight of its shape."""
    named = dict(quant_layers(model))
    for name, mask in masks.items():
        if name not in named:
            raise ValueError(f"mask for {name!r}: the model has no quantized layer of that name")
        if tuple(mask.shape) != tuple(named[name].weight.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, "
                             f"the weight {tuple(named[name].weight.shape)}")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place (the parameters and state_dict keys stay as they are)."""
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        w.mul_(mask.to(device=w.device, dtype=w.dtype))


@torch.no_grad()
def mask_gradients(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the gradients of pruned weights, so no optimiser state (momentum, Adam moments)
    builds up on them and gradient clipping sees only the live weights."""
    for name, mask in masks.items():
        grad = model.get_submodule(name).weight.grad
        if grad is not None:
            grad.mul_(mask.to(device=grad.device, dtype=grad.dtype))


def save_masks(masks: dict[str, torch.Tensor], path: str | Path) -> None:
    torch.save({k: v.detach().to("cpu", torch.bool) for k, v in masks.items()}, path)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    masks = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(masks, dict):
        raise ValueError(f"{path}: expected a dict of layer name -> bool mask")
    return {str(k): torch.as_tensor(v).bool() for k, v in masks.items()}
