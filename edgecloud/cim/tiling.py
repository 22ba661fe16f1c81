"""Layer geometry for the in-memory backends: how a layer's integer product is laid out on arrays.

A quantized layer's MVM is ``patches (M, K) @ weights (K, O)`` with one patch row per output
position. The backends map the K weight rows onto arrays of a fixed number of rows (crossbar
tiles, SRAM groups), split each weight into slices of a few bits, and stream each input in
cycles of a few bits. This module only does that bookkeeping, with no physics:

- :func:`layer_patches`: the integer input as uint8 patch rows, built with a strided view of the
  NHWC input (one copy, no float im2col, and no padding rows beyond K: a 27-row first conv
  uses 27 rows, not 128). :func:`layer_source` gives the same rows without the copy for a
  conv (:class:`PatchSource`: the zero-padded NHWC input plus the conv geometry, an implicit
  im2col the fused kernel reads directly); the rows are materialised only on demand.
- Rows are ordered (kh, kw, C), channels innermost (the natural NHWC im2col order);
  :func:`weight_matrix` flattens weights the same way. Row order is a mapping choice: it only
  decides which inputs share an array (and, for IR drop, where each row sits).
- :func:`row_tiles`: the K rows cut into arrays of ``rows`` rows; the last one may be partial.
- :func:`magnitude_slices`: |w| split into ``cell_bits``-bit slices (LSB slice first).
- :func:`bit_planes`: an input chunk split into ``cycles`` planes of ``bits_per_cycle`` bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edgecloud.nn.quant import QuantConv2d, QuantLayerMixin, QuantLinear


@dataclass(frozen=True)
class Geometry:
    """Shape facts of one layer call: M patch rows (N * L), K rows, O outputs."""

    batch: int
    positions: int  # L: output positions per sample (oh * ow for a conv)
    k: int
    out_features: int
    out_shape: tuple[int, ...]  # shape the digital integer_mvm returns
    conv_hw: tuple[int, int] | None  # (oh, ow) for a conv, None for a linear layer


def check_supported(layer: QuantLayerMixin) -> str | None:
    """Why a layer cannot run on an in-memory array (None when it can)."""
    if not isinstance(layer, (QuantConv2d, QuantLinear)):
        return f"unsupported layer type {type(layer).__name__}"
    if not 1 <= layer.act_bits <= 8:
        return f"act_bits={layer.act_bits}: arrays take 1..8-bit integer inputs"
    if not 1 <= layer.weight_bits <= 8:
        return f"weight_bits={layer.weight_bits}: arrays hold 1..8-bit weights"
    if isinstance(layer, QuantConv2d):
        if layer.groups != 1:
            return f"groups={layer.groups}: grouped convolutions are not mapped"
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return "only explicit zero padding is mapped"
    return None


def weight_matrix(layer: QuantLayerMixin, w_int: torch.Tensor) -> torch.Tensor:
    """Integer weights as a (K, O) int64 matrix whose rows match :func:`layer_patches`."""
    w = w_int.detach()
    if w.dim() == 4:  # (O, C, kh, kw) -> (O, kh, kw, C)
        w = w.permute(0, 2, 3, 1)
    return w.reshape(w.shape[0], -1).t().round().to(torch.int64).contiguous()


def layer_patches(layer: QuantLayerMixin, x_int: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
    """(patches, geometry): uint8 patch rows (M, K), channels innermost, and the call's shape."""
    if isinstance(layer, QuantConv2d):
        _, view, geo = _conv_view(layer, x_int)
        return view.reshape(geo.batch * geo.positions, geo.k), geo
    lead = tuple(x_int.shape[:-1])
    k = x_int.shape[-1]
    patches = x_int.detach().reshape(-1, k).to(torch.uint8).contiguous()
    batch = lead[0] if lead else 1
    positions = math.prod(lead[1:]) if len(lead) > 1 else 1
    geo = Geometry(batch, positions, k, layer.out_features, (*lead, layer.out_features), None)
    return patches, geo


@dataclass
class PatchSource:
    """The (M, K) uint8 patch rows of one layer call: materialised, or an implicit conv im2col.

    ``nhwc`` is the zero-padded uint8 input (N, Hp, Wp, C) and ``conv`` the int64 geometry
    (OH, OW, KH, KW, C, SH, SW, DH, DW, Hp, Wp) of the fused kernel; :meth:`rows` copies the
    rows out (as :func:`layer_patches` does) for the paths that need them in memory.
    """

    m: int
    k: int
    patches: torch.Tensor | None = None
    nhwc: torch.Tensor | None = None
    conv: torch.Tensor | None = None
    _view: torch.Tensor | None = None  # (N, OH, OW, KH, KW, C) strided view of nhwc

    def rows(self) -> torch.Tensor:
        """All patch rows as a (M, K) uint8 tensor with unit column stride (copied once)."""
        if self.patches is None:
            assert self._view is not None
            self.patches = self._view.reshape(self.m, self.k)
        return self.patches

    @property
    def device(self) -> torch.device:
        held = self.patches if self.patches is not None else self.nhwc
        assert held is not None
        return held.device

    def to(self, device: torch.device) -> "PatchSource":
        """The same rows on ``device`` (self when already there); moves the uint8 input, not patches."""
        if self.device == device:
            return self
        if self.patches is None and self.nhwc is not None and self._view is not None:
            nhwc = self.nhwc.to(device)  # dense: the strides (and the view's) are kept
            offset = self._view.storage_offset() - self.nhwc.storage_offset()
            view = nhwc.as_strided(self._view.shape, self._view.stride(), nhwc.storage_offset() + offset)
            return PatchSource(self.m, self.k, nhwc=nhwc, conv=self.conv, _view=view)
        return PatchSource(self.m, self.k, patches=self.rows().to(device))

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """Patch rows ``index`` (int64) as a (len, K) uint8 tensor, without materialising the rest."""
        if self.patches is not None or self._view is None:
            return self.rows()[index]
        oh, ow = self._view.shape[1], self._view.shape[2]
        return self._view[index // (oh * ow), (index // ow) % oh, index % ow].reshape(-1, self.k)

    def byte_or(self) -> int:
        """Bitwise OR of every input byte (the padding adds only zeros)."""
        src = (self.nhwc if self.nhwc is not None else self.rows()).contiguous().view(-1)
        words = src[: src.numel() // 8 * 8].view(torch.int64).numpy()
        acc = int(np.bitwise_or.reduce(words)) if words.size else 0
        present = 0
        for shift in range(0, 64, 8):
            present |= (acc >> shift) & 0xFF
        for byte in src[src.numel() // 8 * 8:].tolist():
            present |= byte
        return present


def layer_source(layer: QuantLayerMixin, x_int: torch.Tensor) -> tuple[PatchSource, Geometry]:
    """:func:`layer_patches` without the patch copy for a conv (see :class:`PatchSource`)."""
    if not isinstance(layer, QuantConv2d):
        patches, geo = layer_patches(layer, x_int)
        return PatchSource(patches.shape[0], patches.shape[1], patches=patches), geo
    nhwc, view, geo = _conv_view(layer, x_int)
    n, oh, ow, kh, kw, c = view.shape
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    conv = torch.tensor([oh, ow, kh, kw, c, sh, sw, dh, dw, nhwc.shape[1], nhwc.shape[2]], dtype=torch.int64)
    return PatchSource(n * oh * ow, geo.k, nhwc=nhwc, conv=conv, _view=view), geo


def _conv_view(layer: QuantConv2d, x_int: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Geometry]:
    """(padded uint8 NHWC input, its (n, oh, ow, kh, kw, c) patch view without a copy, geometry)."""
    n, c, h, w = x_int.shape
    kh, kw = layer.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    nhwc = x_int.detach().permute(0, 2, 3, 1).to(torch.uint8)
    if ph or pw:
        nhwc = F.pad(nhwc, (0, 0, pw, pw, ph, ph))
    nhwc = nhwc.contiguous()
    s_n, s_h, s_w, s_c = nhwc.stride()
    view = nhwc.as_strided((n, oh, ow, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))
    geo = Geometry(n, oh * ow, kh * kw * c, layer.out_channels, (n, layer.out_channels, oh, ow), (oh, ow))
    return nhwc, view, geo


def to_output(acc: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """(M, O) results -> the shape the digital reference returns (NCHW for a conv)."""
    if geo.conv_hw is None:
        return acc.reshape(geo.out_shape)
    oh, ow = geo.conv_hw
    return acc.reshape(geo.batch, oh, ow, geo.out_features).permute(0, 3, 1, 2)


def row_tiles(k: int, rows: int) -> list[tuple[int, int]]:
    """[(start, stop)] of each array along the K rows; the last may hold fewer rows."""
    return [(start, min(start + rows, k)) for start in range(0, k, rows)]


def magnitude_bits(layer: QuantLayerMixin) -> int:
    """Bits of |w_int| (the sign is held by the pair / sign bit): 1 for binary, 7 for 8-bit."""
    return int(layer.weight_levels()).bit_length()


def magnitude_slices(w: torch.Tensor, cell_bits: int, n_slices: int) -> torch.Tensor:
    """(S, *w.shape) int64 slices of |w|, LSB slice first: |w| = sum_s 2^(k s) slice_s."""
    mag = w.abs()
    mask = (1 << cell_bits) - 1
    return torch.stack([(mag >> (cell_bits * s)) & mask for s in range(n_slices)])


def cycles(act_bits: int, bits_per_cycle: int) -> int:
    return -(-act_bits // bits_per_cycle)


def bit_planes(chunk: torch.Tensor, bits_per_cycle: int, n_cycles: int) -> torch.Tensor:
    """(T, m, K) planes of a uint8 chunk (m, K); plane t holds bits [v t, v t + v) as integers."""
    if n_cycles == 1:
        return chunk.unsqueeze(0)
    shifts = torch.arange(0, bits_per_cycle * n_cycles, bits_per_cycle, dtype=torch.uint8, device=chunk.device)
    mask = (1 << bits_per_cycle) - 1
    return torch.bitwise_and(torch.bitwise_right_shift(chunk.unsqueeze(0), shifts.view(-1, 1, 1)), mask)
