"""Threat models: what the attacker crafts on, and what the adversarial images are evaluated on.

- ``white-box``: the digital model, attacked and evaluated (the software baseline; the only
  threat for ``--backend digital``).
- ``non-adaptive``: crafted on the digital model (the attacker ignores the hardware),
  evaluated on each chip (Roy et al.'s setting).
- ``hardware-in-loop``: crafted through the evaluated chip itself (forward through the
  simulated arrays, straight-through backward, optional EOT over read noise), evaluated on it.
- ``chip-transfer``: crafted through other chips of the same design (the attacker owns a
  device of the same model, not the victim's), evaluated on the victim chip.

Chip seeds: victims are ``0 .. chips - 1`` (as in ``edgecloud eval --chips``); surrogates for
chip transfer are drawn from a disjoint range, so no surrogate is ever a victim.
"""

from __future__ import annotations

from typing import Literal

THREATS = ("white-box", "non-adaptive", "hardware-in-loop", "chip-transfer")
Threat = Literal["white-box", "non-adaptive", "hardware-in-loop", "chip-transfer"]
SURROGATE_BASE = 1_000_000


def surrogate_seeds(victim: int, count: int) -> list[int]:
    """Seeds of the chips an attacker crafts on in ``chip-transfer`` against chip ``victim``."""
    return [SURROGATE_BASE + victim * max(count, 1) + j for j in range(count)]


def crafted_digitally(threat: str) -> bool:
    """Whether the adversarial images do not depend on the victim chip (crafted once, reused)."""
    return threat in ("white-box", "non-adaptive")


def check_threats(backend: str, threats: list[str]) -> list[str]:
    """The threats that apply to ``backend`` (the digital backend only has ``white-box``)."""
    unknown = [t for t in threats if t not in THREATS]
    if unknown:
        raise ValueError(f"--threat: unknown {', '.join(unknown)}; choose from {', '.join(THREATS)}")
    if backend == "digital":
        return ["white-box"]
    return [t for t in threats if t != "white-box"] or ["non-adaptive"]
