"""The NAX supernet: ``resnet_q`` whose block convs have an elastic kernel size (one-shot, weight sharing).

NAX (Negi et al., DAC'22; :mod:`edgecloud.codesign.nax`) picks, per layer, a conv kernel size
together with a crossbar size. Training every candidate network is out of reach, so the
candidates share one set of weights (Once-for-All, Cai et al. ICLR'20, "elastic kernel"):

- every block conv (conv1 and conv2 of each basic block) holds one ``k_max x k_max`` weight,
  ``k_max = max(kernel_choices)``, and runs at an *active* kernel ``k`` in ``kernel_choices``:
  the centre ``k x k`` of that weight, padding ``k // 2`` (feature maps keep their size, so
  every per-layer choice is compatible with every other);
- ``kernel_transform`` (on by default, as in OFA): the centre crop passes through a small
  learned linear map per conv and per smaller size (OFA's kernel-transform matrix, ``k^2 x k^2``,
  shared by all channels), chained from the largest size down: ``W_5 = crop_5(W_7) T_5``,
  ``W_3 = crop_3(W_5) T_3`` ... It lets a small kernel differ from the centre of the large one
  while they share weights. Stored as ``I + D`` with ``D`` (``transforms.<k>``) initialised to
  zero, so a fresh supernet crops exactly and weight decay pulls towards the plain crop;
- the stem (3x3) and the 1x1 projection shortcuts are plain ``resnet_q`` layers; BN layers are
  shared by all kernel sizes (recalibrate them per sub-network before measuring it:
  :func:`edgecloud.codesign.nax.recalibrate_bn`, as OFA does).

The quantizer sees the active kernel's weight (``float_weight``), so the per-filter weight
scale is that of the sub-network; :meth:`ElasticQuantResNet.extract` returns the plain
``resnet_q`` of a kernel configuration with those weights, which computes exactly what the
supernet computes at that configuration and is exported, evaluated on the crossbar backend and
fine-tuned like any ``resnet_q``. Training samples sub-networks per step (recipe ``supernet``:
the sandwich rule, :func:`sample_subnets`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import nn

from edgecloud.nets.cdhn import CIFAR10_MEAN, CIFAR10_STD, cifar_resnet_blocks
from edgecloud.nets.registry import register_model
from edgecloud.nets.resnet_quant import QuantBasicBlock, QuantResNet, check_kernels, fit_kernel, fit_kernels
from edgecloud.nn.quant import QuantConv2d

SANDWICH_KINDS = ("max", "min", "random")


def check_choices(kernel_choices: Sequence[int]) -> list[int]:
    """Distinct odd positive kernel sizes, ascending."""
    out = sorted({int(k) for k in kernel_choices})
    if not out or any(k < 1 or k % 2 == 0 for k in out):
        raise ValueError(f"kernel_choices must be odd positive ints, got {list(kernel_choices)}")
    return out


class ElasticQuantConv2d(QuantConv2d):
    """A quantized conv with one ``k_max x k_max`` weight that runs at any kernel of ``kernel_choices``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = False, weight_bits: int = 8, act_bits: int = 8, learn_range: bool = False, *,
                 kernel_choices: Sequence[int] = (1, 3, 5), kernel_transform: bool = True) -> None:
        choices = check_choices(kernel_choices)
        k_max = choices[-1]
        super().__init__(in_channels, out_channels, k_max, stride, k_max // 2, bias=bias,
                         weight_bits=weight_bits, act_bits=act_bits, learn_range=learn_range)
        self.k_max = k_max
        self.kernel_choices = choices
        self.kernel_transform = bool(kernel_transform)
        self.transforms = nn.ParameterDict()
        if self.kernel_transform:
            for k in choices[:-1]:  # D of T = I + D, zero: a plain crop until trained
                self.transforms[str(k)] = nn.Parameter(torch.zeros(k * k, k * k))
        self.active_kernel = k_max
        self.set_kernel(k_max)

    def set_kernel(self, k: int) -> None:
        """Run at kernel ``k`` (one of ``kernel_choices``), padding ``k // 2``."""
        k = int(k)
        if k not in self.kernel_choices:
            raise ValueError(f"kernel {k} is not one of this supernet's kernel_choices {self.kernel_choices}")
        self.active_kernel = k
        self.kernel_size = (k, k)
        self.padding = (k // 2, k // 2)

    def kernel_weight(self, k: int | None = None) -> torch.Tensor:
        """The (O, C, k, k) float weight of kernel ``k`` (default: the active one); differentiable."""
        k = self.active_kernel if k is None else int(k)
        if k not in self.kernel_choices:
            raise ValueError(f"kernel {k} is not one of this supernet's kernel_choices {self.kernel_choices}")
        w = self.weight
        for size in reversed(self.kernel_choices[:-1]):  # from the largest smaller size down to k
            if size < k:
                break
            w = fit_kernel(w, size)
            if self.kernel_transform:
                o, c = w.shape[:2]
                t = self.transforms[str(size)]
                eye = torch.eye(size * size, dtype=t.dtype, device=t.device)
                w = (w.reshape(o * c, size * size) @ (eye + t)).reshape(o, c, size, size)
        return w

    def float_weight(self) -> torch.Tensor:
        return self.kernel_weight()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel_choices={self.kernel_choices}, transform={self.kernel_transform}"


class ElasticQuantResNet(QuantResNet):
    """``resnet_q`` with elastic-kernel block convs (see module docstring)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, weight_bits: int = 8, act_bits: int = 8,
                 widths: Sequence[int] = (16, 32, 64), kernel_choices: Sequence[int] = (1, 3, 5),
                 kernel_transform: bool = True, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD) -> None:
        choices = check_choices(kernel_choices)
        self._elastic = {"kernel_choices": choices, "kernel_transform": bool(kernel_transform)}
        n_blocks = 2 * len(cifar_resnet_blocks(depth, widths))
        super().__init__(depth, num_classes, weight_bits, act_bits, widths, mean, std,
                         kernels=[choices[-1]] * n_blocks)
        self.kernel_choices = choices
        self.kernel_transform = bool(kernel_transform)

    def _block(self, cin: int, cout: int, stride: int, weight_bits: int, act_bits: int,
               kernels: tuple[int, int]) -> nn.Module:
        def conv(*args, **kwargs) -> ElasticQuantConv2d:
            return ElasticQuantConv2d(*args, **kwargs, **self._elastic)

        return QuantBasicBlock(cin, cout, stride, weight_bits, act_bits, kernels, conv=conv)

    # ---- kernel configurations ----------------------------------------------------------------
    @property
    def n_elastic(self) -> int:
        return len(self.block_convs())

    def active_kernels(self) -> list[int]:
        return [conv.active_kernel for _, conv in self.block_convs()]

    def set_kernels(self, kernels: Sequence[int] | None) -> None:
        """One kernel per block conv (conv1, conv2 of each block in order); None: all the largest.

        BatchNorm running statistics follow the largest configuration only (the supernet's default,
        what its bundle and its per-epoch validation run): at any other one the BN layers still
        normalise with the batch's statistics in training but leave the running ones as they are
        (momentum 0), so the sandwich's small sub-networks do not drag them to a mixture that fits
        no sub-network. A searched sub-network gets its own, recalibrated
        (:func:`edgecloud.codesign.nax.recalibrate_bn`)."""
        ks = [self.kernel_choices[-1]] * self.n_elastic if kernels is None else check_kernels(kernels, self.n_elastic)
        for (_, conv), k in zip(self.block_convs(), ks):
            conv.set_kernel(k)
        track = all(k == self.kernel_choices[-1] for k in ks)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if not hasattr(m, "_supernet_momentum"):
                    m._supernet_momentum = m.momentum
                m.momentum = m._supernet_momentum if track else 0.0

    def sample_kernels(self, kind: str, generator: torch.Generator) -> list[int]:
        """A configuration: ``max`` / ``min`` (every conv at the largest / smallest kernel) or
        ``random`` (each conv uniformly among ``kernel_choices``, drawn from ``generator``)."""
        n, choices = self.n_elastic, self.kernel_choices
        if kind == "max":
            return [choices[-1]] * n
        if kind == "min":
            return [choices[0]] * n
        if kind == "random":
            return [choices[int(i)] for i in torch.randint(len(choices), (n,), generator=generator)]
        raise ValueError(f"unknown sub-network kind {kind!r}; choose one of {SANDWICH_KINDS}")

    # ---- export -------------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, kernels: Sequence[int] | None = None) -> QuantResNet:
        """The plain ``resnet_q`` of a configuration (default: the active one) with the supernet's
        weights at it: same function, ordinary state_dict (no transforms), in eval mode."""
        ks = self.active_kernels() if kernels is None else check_kernels(kernels, self.n_elastic)
        for k in ks:
            if k not in self.kernel_choices:
                raise ValueError(f"kernel {k} is not one of this supernet's kernel_choices {self.kernel_choices}")
        net = QuantResNet(**self.arch, kernels=ks)
        state = {key: value for key, value in self.state_dict().items() if ".transforms." not in key}
        for (name, conv), k in zip(self.block_convs(), ks):
            state[f"{name}.weight"] = conv.kernel_weight(k).detach().clone().contiguous()
        net.load_state_dict(state)
        return net.eval()

    @torch.no_grad()
    def init_from(self, source: nn.Module) -> list[str]:
        """From another supernet (every weight), a ``resnet_q`` run or bundle (its block convs
        zero-padded to ``k_max`` in the centre: at its own kernel size the supernet then computes
        exactly that network) or a full-precision CIFAR ResNet (through ``resnet_q``'s folding)."""
        net = getattr(source, "net", source)
        if isinstance(net, ElasticQuantResNet):
            try:
                self.load_state_dict(net.state_dict())
            except RuntimeError as exc:
                raise ValueError(f"init_from: the source supernet has another architecture: {exc}") from exc
            return []
        if not isinstance(net, QuantResNet):
            base = QuantResNet(**self.arch)
            base.init_from(net)
            net = base
        state = fit_kernels(net.state_dict(), self.state_dict())
        try:
            result = self.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ValueError(f"init_from: the source network has another architecture: {exc}") from exc
        left = [k for k in result.missing_keys if ".transforms." not in k]  # transforms: identity by design
        if result.unexpected_keys or left:
            raise ValueError(f"init_from: the source network does not match (missing {left}, "
                             f"unexpected {result.unexpected_keys})")
        return []


def sample_subnets(model: nn.Module, kinds: Sequence[str], seed: int, step: int) -> list[list[int]]:
    """The kernel configurations one training step trains (sandwich rule), seeded by (seed, step)
    so a resumed run draws the same ones."""
    if not isinstance(model, ElasticQuantResNet):
        raise ValueError(f"recipe section supernet needs an elastic-kernel family (resnet_q_elastic), "
                         f"not {type(model).__name__}")
    gen = torch.Generator().manual_seed(zlib.crc32(f"supernet:{seed}:{step}".encode()))
    return [model.sample_kernels(kind, gen) for kind in kinds]


@register_model("resnet_q_elastic")
def resnet_q_elastic(depth: int = 20, num_classes: int = 10, weight_bits: int = 8, act_bits: int = 8,
                     widths: Sequence[int] = (16, 32, 64), kernel_choices: Sequence[int] = (1, 3, 5),
                     kernel_transform: bool = True) -> ElasticQuantResNet:
    """The NAX supernet: ``resnet_q`` with elastic-kernel block convs (see module docstring)."""
    return ElasticQuantResNet(depth, num_classes, weight_bits, act_bits, widths=tuple(widths),
                              kernel_choices=[int(k) for k in kernel_choices], kernel_transform=kernel_transform)


__all__ = ["ElasticQuantConv2d", "ElasticQuantResNet", "check_choices", "resnet_q_elastic", "sample_subnets",
           "SANDWICH_KINDS"]
