"""Function-preserving widening of a trained network (Net2WiderNet, Chen et al., ICLR 2016).

A binary edge can afford more channels (a binary MAC costs ~1/920 of an fp32 one) but a wide
binary net trained from scratch needs far more epochs than a CPU budget allows. Widening a
trained narrow net instead keeps what it learned: every new channel copies an old one
(channel ``c`` of a widened dimension copies channel ``c mod old``), and every layer reading a
widened input divides the copied weights by how many copies that input channel has, so the
sum is unchanged. This holds through BN, ReLU, residual additions and through the
binary / k-bit quantizers here, whose per-filter scales follow a uniform rescaling of the
latent weights. Small noise on the copied filters breaks the symmetry so the copies can learn
different features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _index(old: int, new: int) -> torch.Tensor:
    if new < old:
        raise ValueError(f"cannot narrow a dimension ({old} -> {new}); widening only")
    return torch.arange(new) % old


def widen_tensor(src: torch.Tensor, shape: torch.Size, *, noise: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``src`` widened to ``shape``: dim 0 (outputs / channels) copies, dim 1 (inputs) copies / count.

    Dims past the second (kernel sizes) must agree. ``noise`` (relative to ``src``'s std) is
    added to the copied output rows only, so an unwidened tensor comes back unchanged.
    """
    if src.dim() != len(shape) or tuple(src.shape[2:]) != tuple(shape[2:]):
        raise ValueError(f"cannot widen a tensor of shape {tuple(src.shape)} to {tuple(shape)}")
    if src.dim() == 0:
        return src.clone()
    out = src.index_select(0, _index(src.shape[0], shape[0]))
    if src.dim() >= 2:
        cols = _index(src.shape[1], shape[1])
        copies = torch.bincount(cols, minlength=src.shape[1]).to(out.dtype)
        out = out.index_select(1, cols) / copies[cols].view(1, -1, *([1] * (src.dim() - 2)))
    if noise > 0 and out.is_floating_point() and shape[0] > src.shape[0]:
        extra = out[src.shape[0]:]
        scale = float(src.float().std()) if src.numel() > 1 else 0.0
        extra.add_(torch.randn(extra.shape, generator=generator, dtype=extra.dtype) * noise * scale)
    return out.contiguous()


@torch.no_grad()
def widen_into(target: nn.Module, source: nn.Module, *, noise: float = 0.02, seed: int = 0,
               new_ok: Callable[[str], bool] | None = None) -> list[str]:
    """Load ``source``'s weights into ``target``, a copy of it with more channels somewhere.

    Both must have the same parameter / buffer names (the same layer graph), except target-only
    names for which ``new_ok(name)`` holds (layers that start as the identity, kept as built).
    BN running statistics widen with their channels, so the widened net in eval mode computes
    the same function as ``source`` up to ``noise``. Returns the names whose shapes changed.
    """
    src_state, dst_state = source.state_dict(), target.state_dict()
    new = {k for k in set(dst_state) - set(src_state) if new_ok is not None and new_ok(k)}
    missing = sorted((set(dst_state) - new) ^ set(src_state))
    if missing:
        shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise ValueError(f"widen: the two networks differ in layers, not only in widths ({shown})")
    generator = torch.Generator().manual_seed(seed)
    widened: list[str] = []
    new_state = {}
    for name, dst in dst_state.items():
        if name in new:
            new_state[name] = dst
            continue
        src = src_state[name]
        if src.shape == dst.shape:
            new_state[name] = src.clone()
            continue
        # only weights get noise: BN statistics must stay exact copies of their channels
        is_weight = name.endswith("weight") and src.dim() >= 2
        new_state[name] = widen_tensor(src, dst.shape, noise=noise if is_weight else 0.0, generator=generator)
        widened.append(name)
    target.load_state_dict(new_state)
    return widened
