"""Binary (XNOR-Net style) and k-bit layers with an exact integer form.

Every quantized layer computes, for real input x and weights W,

    y[o] = w_scale[o] * ( x_scale * MVM(x_int, w_int)[o] + x_zero * sum_i w_int[o, i] ) + bias[o]

where ``x = x_scale * x_int + x_zero`` with non-negative integer ``x_int`` and integer ``w_int``.
Padding is always ``x_int = 0`` (i.e. ``x = x_zero``), so the identity is exact at borders.
``MVM`` is the only part a compute-in-memory backend replaces (:mod:`edgecloud.cim`); the
digital reference is a plain integer convolution. Training uses the same arithmetic with
straight-through estimators, so what is trained is exactly what the backends run.

Activation encodings:
- ``act_bits == 1``: x = sign(BN(x)) in {-1, +1}; x_int = (x + 1) / 2 in {0, 1}, x_scale 2,
  x_zero -1 (one bit-plane: a single crossbar cycle).
- ``act_bits == k > 1``: x clipped to [0, 1], x_int = round(x (2^k - 1)) in [0, 2^k - 1],
  x_scale 1 / (2^k - 1), x_zero 0.
- ``act_bits == 0``: no input quantization (full precision input; digital only).
Weight encodings:
- ``weight_bits == 1``: w_int = sign(W - mean) in {-1, +1}, w_scale = mean |W| per filter.
- ``weight_bits == k > 1``: symmetric, w_int in [-(2^(k-1) - 1), 2^(k-1) - 1], per-filter
  scale = max |W| / (2^(k-1) - 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.cim.events import record

# An MVM implementation: (layer, x_int, w_int) -> integer-valued output before scaling.
MvmFn = Callable[["QuantLayerMixin", torch.Tensor, torch.Tensor], torch.Tensor]


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad


class _SignSTE(torch.autograd.Function):
    """sign with outputs in {-1, +1} (0 -> +1); gradient passed where |x| <= 1 (XNOR-Net)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    return _SignSTE.apply(x)


class QuantLayerMixin:
    """Shared quantization logic of :class:`QuantConv2d` and :class:`QuantLinear`."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_bits: int
    act_bits: int
    mvm_fn: MvmFn | None  # set by a backend; None = digital reference

    # ---- weights -------------------------------------------------------------------------
    def weight_levels(self) -> int:
        return 1 if self.weight_bits == 1 else 2 ** (self.weight_bits - 1) - 1

    def quantize_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_int, w_scale): integer-valued float weights (same shape as W) and [out] scales.

        Differentiable via straight-through estimators (w_scale * w_int ~= W).
        """
        w = self.weight
        dims = tuple(range(1, w.dim()))
        if self.weight_bits == 1:
            centred = w - w.mean(dim=dims, keepdim=True)
            scale = centred.abs().mean(dim=dims)
            w_int = sign_ste(centred)
            return w_int, scale
        levels = self.weight_levels()
        scale = w.detach().abs().amax(dim=dims).clamp_min(1e-8) / levels
        w_int = round_ste(w / scale.view(-1, *([1] * len(dims)))).clamp(-levels, levels)
        return w_int, scale

    # ---- activations ---------------------------------------------------------------------
    def input_encoding(self) -> tuple[float, float]:
        """(x_scale, x_zero) of the activation encoding."""
        if self.act_bits == 1:
            return 2.0, -1.0
        if self.act_bits > 1:
            return 1.0 / (2**self.act_bits - 1), 0.0
        return 1.0, 0.0

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x_int (non-negative, integer-valued float) with x ~= x_scale * x_int + x_zero."""
        if self.act_bits == 1:
            return (sign_ste(x) + 1.0) * 0.5
        if self.act_bits > 1:
            top = 2**self.act_bits - 1
            return round_ste(x.clamp(0.0, 1.0) * top)
        return x

    # ---- the integer product -------------------------------------------------------------
    def integer_mvm(self, x_int: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _weight_row_sums(self, w_int: torch.Tensor) -> torch.Tensor:
        return w_int.flatten(1).sum(dim=1)

    def macs_per_sample(self, x_int: torch.Tensor) -> int:
        raise NotImplementedError

    def quant_forward(self, x: torch.Tensor) -> torch.Tensor:
        x_int = self.quantize_input(x)
        w_int, w_scale = self.quantize_weight()
        if self.mvm_fn is not None and not torch.is_grad_enabled():
            acc = self.mvm_fn(self, x_int.detach(), w_int.detach())
        else:
            acc = self.integer_mvm(x_int, w_int)
            record("digital", self.digital_event(), self.macs_per_sample(x_int))
        x_scale, x_zero = self.input_encoding()
        shape = [1, -1] + [1] * (acc.dim() - 2)
        y = x_scale * acc
        if x_zero != 0.0:
            y = y + x_zero * self._weight_row_sums(w_int).view(shape)
        y = y * w_scale.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y

    def digital_event(self) -> str:
        """Energy-table event of one digital MAC of this layer (``mac_binary``, ``mac_int4``, ...)."""
        if self.act_bits == 0:
            return "mac_fp32"
        bits = max(self.weight_bits, self.act_bits)
        return "mac_binary" if bits == 1 else f"mac_int{bits}"


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """Conv2d with binary or k-bit weights and activations (see module docstring)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
        weight_bits: int = 1,
        act_bits: int = 1,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        if weight_bits < 1 or act_bits < 0:
            raise ValueError(f"weight_bits must be >= 1 and act_bits >= 0, got {weight_bits}/{act_bits}")
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.mvm_fn = None

    def integer_mvm(self, x_int: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x_int, w_int, None, self.stride, self.padding, self.dilation, self.groups)

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw) = self.stride, self.padding
        return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1

    def macs_per_sample(self, x_int: torch.Tensor) -> int:
        oh, ow = self.output_hw(x_int.shape[-2], x_int.shape[-1])
        kh, kw = self.kernel_size
        return oh * ow * self.out_channels * (self.in_channels // self.groups) * kh * kw

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.act_bits == 1 and self.mvm_fn is None and torch.is_grad_enabled() and self.groups == 1:
            return self._binary_train_forward(x)
        return self.quant_forward(x)

    def _binary_train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as :meth:`quant_forward` for binary inputs, in fewer passes (training speed).

        With x = 2 x_int - 1 = sign(x) and the border at x_int = 0, i.e. x = -1:
        2 MVM(x_int, w) - sum(w) = conv(pad(sign(x), -1), w).
        """
        w_int, w_scale = self.quantize_weight()
        s = sign_ste(x)
        ph, pw = self.padding if isinstance(self.padding, tuple) else (self.padding, self.padding)
        if ph or pw:
            s = F.pad(s, (pw, pw, ph, ph), value=-1.0)
        y = F.conv2d(s, w_int, None, self.stride, 0, self.dilation)
        y = y * w_scale.view(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self.weight_bits}, act_bits={self.act_bits}"


class QuantLinear(QuantLayerMixin, nn.Linear):
    """Linear with binary or k-bit weights and activations (see module docstring)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True,
        weight_bits: int = 1, act_bits: int = 1,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if weight_bits < 1 or act_bits < 0:
            raise ValueError(f"weight_bits must be >= 1 and act_bits >= 0, got {weight_bits}/{act_bits}")
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.mvm_fn = None

    def integer_mvm(self, x_int: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
        return F.linear(x_int, w_int)

    def macs_per_sample(self, x_int: torch.Tensor) -> int:
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.quant_forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self.weight_bits}, act_bits={self.act_bits}"


def quant_layers(module: nn.Module) -> Iterator[tuple[str, QuantLayerMixin]]:
    """All quantized layers of a model, with their qualified names."""
    for name, child in module.named_modules():
        if isinstance(child, QuantLayerMixin):
            yield name, child
