"""The Square attack (Andriushchenko et al., ECCV 2020), L-inf, score-based and black-box.

Why our own and not IBM ART's ``SquareAttack``: ART's loop evaluates three forward passes per
iteration, one of them over every image including those already fooled, and it draws one
square position per iteration for the whole batch. On a simulated crossbar a forward pass costs
~9 ms per image, so that is the difference between hours and minutes. This follows the paper's
reference code (``square_attack_linf``): vertical-stripe initialisation, the margin loss, the
``p`` schedule over the iterations, a fresh square position and per-channel sign per image and
iteration, redrawn when it would not change the image, and one query per iteration for each
image still classified right.

Noisy models (``deterministic`` False: a crossbar with read noise) answer each query with a
fresh draw, so a single read saying "fooled" is not trusted: such an image gets one confirming
read of its best image (counted as a query), and leaves only if that read is fooled too;
otherwise its stored margin becomes the confirming read's and the search goes on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Logits = Callable[[torch.Tensor], torch.Tensor]

# The paper's schedule: the share of pixels a square covers halves at these fractions of the
# iterations (rescaled from the reference code's 10,000-iteration grid).
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
             (8000, 256), (10000, 512))


def p_selection(p_init: float, iteration: int, iterations: int) -> float:
    """The share of the image a square covers at ``iteration`` (the reference code's schedule)."""
    it = int(iteration / max(iterations, 1) * 10000)
    divisor = 1
    for limit, div in _SCHEDULE:
        if it > limit:
            continue
        divisor = 1 if it <= 10 else div
        break
    else:
        divisor = 1  # past the grid: the reference code falls back to p_init
    return p_init / divisor


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j``: negative once the image is misclassified."""
    z = logits.float()
    true = z.gather(1, y.view(-1, 1)).squeeze(1)
    other = z.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
    return true - other


def _signs(n: int, c: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n, c, 1, 1), generator=generator).float() * 2 - 1


@torch.no_grad()
def square_linf(model: Logits, x: torch.Tensor, y: torch.Tensor, eps: float, *, queries: int = 1000,
                p_init: float = 0.05, generator: torch.Generator | None = None,
                confirm: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Adversarial images within ``eps`` (L-inf) of ``x`` in [0, 1], and the queries each used.

    ``queries``: iterations after the initialisation (one query each per image still robust).
    ``confirm``: re-read an image that looks fooled before it leaves (default: when ``model``
    is not deterministic).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if confirm is None:
        confirm = not getattr(model, "deterministic", True)
    n, c, h, w = x.shape
    x = x.detach().float()
    if eps <= 0 or n == 0:
        return x.clone(), torch.zeros(n, dtype=torch.long)
    # Initialisation: vertical stripes of +-eps per channel and column.
    stripes = _signs(n, c * w, gen).view(n, c, 1, w) * eps
    x_best = (x + stripes).clamp(0.0, 1.0)
    best = margin(model(x_best), y)
    used = torch.ones(n, dtype=torch.long)
    if confirm:
        best = _confirm(model, x_best, y, best, torch.arange(n), used)
    rows_h = torch.arange(h).view(1, h)
    rows_w = torch.arange(w).view(1, w)
    for iteration in range(queries):
        active = torch.nonzero(best >= 0).flatten()
        if active.numel() == 0:
            break
        m = active.numel()
        xa, xb = x[active], x_best[active]
        size = int(round((p_selection(p_init, iteration, queries) * h * w) ** 0.5))
        size = min(max(size, 1), h - 1)
        top = torch.randint(0, h - size, (m, 1), generator=gen)
        left = torch.randint(0, w - size, (m, 1), generator=gen)
        window = (((rows_h >= top) & (rows_h < top + size)).view(m, 1, h, 1)
                  & ((rows_w >= left) & (rows_w < left + size)).view(m, 1, 1, w))
        delta = xb - xa
        signs = _signs(m, c, gen) * eps
        for _ in range(16):  # redraw a square that would leave the image as it is
            candidate = (xa + torch.where(window, signs, delta)).clamp(0.0, 1.0)
            same = ((candidate - xb).abs() < 1e-7).flatten(1).all(1)
            if not bool(same.any()):
                break
            redraw = _signs(int(same.sum()), c, gen) * eps
            signs[same] = redraw
        score = margin(model(candidate), y[active])
        used[active] += 1
        better = score < best[active]
        x_best[active[better]] = candidate[better]
        best[active[better]] = score[better]
        if confirm:
            fooled = active[better & (score < 0)]
            if fooled.numel():
                best = _confirm(model, x_best, y, best, fooled, used)
    return x_best, used


def _confirm(model: Logits, x_best: torch.Tensor, y: torch.Tensor, best: torch.Tensor,
             rows: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """One more read of the images in ``rows`` that look fooled; keep the new margin where the
    re-read disagrees (a noisy model's single read is not proof)."""
    look = rows[best[rows] < 0]
    if look.numel() == 0:
        return best
    again = margin(model(x_best[look]), y[look])
    used[look] += 1
    best = best.clone()
    best[look] = torch.where(again < 0, best[look], again)
    return best


__all__ = ["margin", "p_selection", "square_linf"]
