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
- ``act_bits == k > 1``: x clipped to [0, r], x_int = round(x / r (2^k - 1)) in [0, 2^k - 1],
  x_scale r / (2^k - 1), x_zero 0. The range r is 1 (a BN in front sets the scale), or with
  ``learn_range`` a learned per-layer clip (PACT, Choi et al. 2018), set on the first training
  batch from the inputs' 99.9th percentile: what lets a plain ResNet, whose activations are
  unbounded ReLU outputs, run every layer at k bits.
- ``act_bits == 0``: no input quantization (full precision input; digital only).
Weight encodings:
- ``weight_bits == 1``: w_int = sign(W - mean) in {-1, +1}, w_scale = mean |W| per filter.
- ``weight_bits == k > 1``: symmetric, w_int in [-(2^(k-1) - 1), 2^(k-1) - 1], per-filter
  scale = max |W| / (2^(k-1) - 1).

Two-step binary training (Real-to-Binary, Martinez et al. 2020; ReActNet, Liu et al. 2020): while
a binary-weight layer's ``real_weights`` is set (:func:`set_real_weights`), it uses its float
weights as they are (w_int = W, w_scale = 1), with its activations still quantized; the identity
above holds with a float "integer" product, so only training may use it, never a backend.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.cim.events import record

# An MVM implementation: (layer, x_int, w_int) -> integer-valued output before scaling.
MvmFn = Callable[["QuantLayerMixin", torch.Tensor, torch.Tensor], torch.Tensor]


_HARDWARE_GRAD = threading.local()


@contextlib.contextmanager
def hardware_gradients(enabled: bool = True) -> Iterator[None]:
    """Within this block, layers with a backend run it even when gradients are on: the forward is
    the backend's (every non-ideality), the backward the ideal integer product's (straight-through,
    i.e. BPDA, Athalye et al. 2018). Hardware-in-loop attacks and hardware-aware studies use it."""
    before = getattr(_HARDWARE_GRAD, "on", False)
    _HARDWARE_GRAD.on = enabled
    try:
        yield
    finally:
        _HARDWARE_GRAD.on = before


def hardware_gradients_enabled() -> bool:
    return getattr(_HARDWARE_GRAD, "on", False)


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
    if not (torch.is_grad_enabled() and x.requires_grad):  # inference: the same values, one pass
        return (x >= 0).to(x.dtype).mul_(2.0).sub_(1.0)
    return _SignSTE.apply(x)


class QuantLayerMixin:
    """Shared quantization logic of :class:`QuantConv2d` and :class:`QuantLinear`."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_bits: int
    act_bits: int
    mvm_fn: MvmFn | None  # set by a backend; None = digital reference
    act_range: nn.Parameter | None  # learned clip of k-bit inputs (``learn_range``); None: 1
    # Two-step binary training, phase 1: binary-weight layers use their float weights (not in the
    # state_dict: the training loop sets it per epoch; see :func:`set_real_weights`).
    real_weights: bool = False

    # ---- weights -------------------------------------------------------------------------
    def float_weight(self) -> torch.Tensor:
        """The float weights the layer quantizes (its ``weight``; an elastic-kernel conv of a NAX
        supernet, :mod:`edgecloud.nets.resnet_elastic`, returns its active kernel's)."""
        return self.weight

    def weight_levels(self) -> int:
        return 1 if self.weight_bits == 1 else 2 ** (self.weight_bits - 1) - 1

    def quantize_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_int, w_scale): integer-valued float weights (same shape as W) and [out] scales.

        Differentiable via straight-through estimators (w_scale * w_int ~= W).
        """
        w = self.float_weight()
        dims = tuple(range(1, w.dim()))
        if self.weight_bits == 1 and self.real_weights:
            return w, torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
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
    def _init_range(self, act_bits: int, learn_range: bool) -> None:
        self.act_range = None
        if learn_range:
            if act_bits < 2:
                raise ValueError(f"learn_range needs k-bit inputs (act_bits >= 2), got act_bits={act_bits}")
            self.act_range = nn.Parameter(torch.ones(()))
            self.register_buffer("range_ready", torch.zeros((), dtype=torch.bool))

    def input_encoding(self) -> tuple[float | torch.Tensor, float]:
        """(x_scale, x_zero) of the activation encoding (x_scale a tensor with a learned range)."""
        if self.act_bits == 1:
            return 2.0, -1.0
        if self.act_bits > 1:
            top = 2**self.act_bits - 1
            return (1.0 / top if self.act_range is None else self.act_range / top), 0.0
        return 1.0, 0.0

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x_int (non-negative, integer-valued float) with x ~= x_scale * x_int + x_zero."""
        if self.act_bits == 1:
            if not (torch.is_grad_enabled() and x.requires_grad):  # inference: (sign + 1) / 2 exactly
                return (x >= 0).to(x.dtype)
            return (sign_ste(x) + 1.0) * 0.5
        if self.act_bits > 1:
            top = 2**self.act_bits - 1
            if self.act_range is None:
                if not (torch.is_grad_enabled() and x.requires_grad):  # inference: in place, same values
                    return x.clamp(0.0, 1.0).mul_(top).round_()
                return round_ste(x.clamp(0.0, 1.0) * top)
            if self.training and not bool(self.range_ready):
                self._calibrate_range(x)
            r = self.act_range.abs().clamp_min(1e-4)
            # PACT: clip(x, 0, r) = x - relu(x - r) for x >= 0, so r gets the gradient of the clipped part
            clipped = x.clamp_min(0.0) - F.relu(x - r)
            return round_ste(clipped / r * top)
        return x

    @torch.no_grad()
    def _calibrate_range(self, x: torch.Tensor) -> None:
        flat = x.detach().float().flatten()
        if flat.numel() > 1 << 20:
            flat = flat[torch.linspace(0, flat.numel() - 1, 1 << 20, device=flat.device).long()]
        self.act_range.fill_(float(torch.quantile(flat.clamp_min(0.0), 0.999)) or 1.0)
        self.range_ready.fill_(True)

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
        elif self.mvm_fn is not None and hardware_gradients_enabled():
            ideal = self.integer_mvm(x_int, w_int)
            acc = ideal + (self.mvm_fn(self, x_int.detach(), w_int.detach()) - ideal).detach()
        else:
            acc = self.integer_mvm(x_int, w_int)
            record("digital", self.digital_event(), self.macs_per_sample(x_int))
        x_scale, x_zero = self.input_encoding()
        shape = [1, -1] + [1] * (acc.dim() - 2)
        y = x_scale * acc
        if not torch.is_grad_enabled():  # inference: the same operations in place (no copies)
            if x_zero != 0.0:
                y.add_(x_zero * self._weight_row_sums(w_int).view(shape))
            y.mul_(w_scale.view(shape))
            if self.bias is not None:
                y.add_(self.bias.view(shape))
            return y
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
        learn_range: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        if weight_bits < 1 or act_bits < 0:
            raise ValueError(f"weight_bits must be >= 1 and act_bits >= 0, got {weight_bits}/{act_bits}")
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.mvm_fn = None
        self._init_range(act_bits, learn_range)

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
        weight_bits: int = 1, act_bits: int = 1, learn_range: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if weight_bits < 1 or act_bits < 0:
            raise ValueError(f"weight_bits must be >= 1 and act_bits >= 0, got {weight_bits}/{act_bits}")
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.mvm_fn = None
        self._init_range(act_bits, learn_range)

    def integer_mvm(self, x_int: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
        return F.linear(x_int, w_int)

    def macs_per_sample(self, x_int: torch.Tensor) -> int:
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.quant_forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_bits={self.weight_bits}, act_bits={self.act_bits}"


def set_real_weights(module: nn.Module, on: bool) -> int:
    """Switch every binary-weight layer of ``module`` to its float weights (``on``; phase 1 of
    two-step binary training) or back to binary weights; returns how many layers it set."""
    n = 0
    for _, layer in quant_layers(module):
        if layer.weight_bits == 1:
            layer.real_weights = on
            n += 1
    return n


def quant_layers(module: nn.Module) -> Iterator[tuple[str, QuantLayerMixin]]:
    """All quantized layers of a model, with their qualified names."""
    for name, child in module.named_modules():
        if isinstance(child, QuantLayerMixin):
            yield name, child
