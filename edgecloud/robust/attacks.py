"""White-box gradient attacks (FGSM, PGD in L-inf and L2) and the black-box Square attack.

FGSM and PGD are short loops over a model's input gradient, written here so that what makes
them hardware-aware stays visible: the model they differentiate may be a
:class:`~edgecloud.robust.hardware.HardwareModel` (forward through the simulated chip, backward
straight-through, averaged over noise draws or chips), and every random start comes from a
seeded generator. They agree with IBM ART's implementations (``tests/test_robust_attacks.py``).
Square (Andriushchenko et al. 2020), a score-based random search (:func:`square`), needs only
the model's outputs, so it runs the backend's plain inference: L-inf in
:mod:`edgecloud.robust.square` (ART's spends three forward passes per iteration), L2 through
IBM ART.

Images are pixels in [0, 1]; ``eps`` is in the same units (1/255 = one grey level).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Logits = Callable[[torch.Tensor], torch.Tensor]
Norm = Literal["linf", "l2"]


def _logits_grad(model: Logits, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x).float()
        loss = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return logits.detach(), grad


def _loss_grad(model: Logits, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _logits_grad(model, x, y)[1]


def _l2_normalise(g: torch.Tensor) -> torch.Tensor:
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / norm.view(-1, *([1] * (g.dim() - 1)))


def _project(delta: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / n).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def fgsm(model: Logits, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one L-inf step of size ``eps``."""
    if eps <= 0:
        return x.clone()
    return (x + eps * _loss_grad(model, x, y).sign()).clamp(0.0, 1.0).detach()


def pgd(model: Logits, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 10,
        step_size: float | None = None, norm: Norm = "linf", random_start: bool = True,
        generator: torch.Generator | None = None, stop_on_success: bool = False) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) on the cross-entropy, within the ``norm``
    ball of radius ``eps`` around ``x`` and the pixel box [0, 1].

    ``step_size`` defaults to 2.5 eps / steps (Madry et al.); the random start is uniform in the
    L-inf ball, or uniform in direction with a uniform radius in the L2 ball, from ``generator``.
    ``stop_on_success``: an image whose current iterate the model already misclassifies (in the
    forward pass each step makes anyway) keeps that iterate and leaves the batch: the same attack
    success at a fraction of the cost when most images fall in a few steps (simulated hardware).
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eps <= 0:
        return x.clone()
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    x = x.detach()
    delta = torch.zeros_like(x)
    if random_start:
        if norm == "linf":
            delta = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1).to(x.device) * eps
        else:
            direction = _l2_normalise(torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device))
            radius = torch.rand(x.shape[0], generator=generator, dtype=x.dtype).to(x.device) * eps
            delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
        delta = (x + delta).clamp(0.0, 1.0) - x
    active = torch.arange(x.shape[0], device=x.device)
    for _ in range(steps):
        xa, ya, da = x[active], y[active], delta[active]
        logits, grad = _logits_grad(model, xa + da, ya)
        if stop_on_success:
            left = logits.argmax(1) == ya
            active, xa, da, grad = active[left], xa[left], da[left], grad[left]
            if active.numel() == 0:
                break
        step = grad.sign() if norm == "linf" else _l2_normalise(grad)
        da = _project(da + alpha * step, eps, norm)
        delta[active] = (xa + da).clamp(0.0, 1.0) - xa
    return (x + delta).detach()


def square(model: Logits, x: torch.Tensor, y: torch.Tensor, eps: float, *, queries: int = 1000,
           p_init: float = 0.05, seed: int = 0, batch_size: int = 256, norm: Norm = "linf") -> torch.Tensor:
    """Square attack (score-based, black-box: only ``model``'s outputs are used). L-inf is
    :func:`edgecloud.robust.square.square_linf` (the paper's algorithm, one query per robust
    image and iteration); L2 is IBM ART's ``SquareAttack``. ``queries``: iterations."""
    if eps <= 0:
        return x.clone()
    if norm == "linf":
        from edgecloud.robust.square import square_linf

        adv, _ = square_linf(model, x, y, eps, queries=queries, p_init=p_init,
                             generator=torch.Generator().manual_seed(seed & 0x7FFFFFFF))
        return adv.to(x.dtype)
    from art.attacks.evasion import SquareAttack

    from edgecloud.robust.estimator import art_classifier

    state = np.random.get_state()
    np.random.seed(seed & 0xFFFFFFFF)  # ART draws its squares from NumPy's global generator
    try:
        attack = SquareAttack(art_classifier(model, x.shape[1:], n_classes=_n_classes(model, x)),
                              norm=2, eps=float(eps), max_iter=int(queries),
                              p_init=p_init, nb_restarts=1, batch_size=batch_size, verbose=False)
        adv = attack.generate(x.detach().cpu().numpy().astype(np.float32), y=y.cpu().numpy())
    finally:
        np.random.set_state(state)
    return torch.from_numpy(adv).to(x.device, x.dtype)


def _n_classes(model: Logits, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])
