"""A differentiable model of a bundle running on a simulated chip (BPDA, optional EOT).

Forward: the backend's own inference (crossbar or SRAM arrays, every non-ideality, the ADC, a
seeded chip), i.e. what ``edgecloud eval --backend ...`` computes. Backward: the ideal integer
product of each quantized layer (straight-through; Athalye et al. 2018's BPDA), via
:func:`edgecloud.nn.quant.hardware_gradients`. At ideal settings the forward is the digital
model's, so the gradient is exactly the digital model's gradient.

Expectation over transformation (EOT): ``eot_reads`` forward passes per call (fresh read and ADC
noise each) and/or several chips (``seeds``), logits averaged: an attacker who knows the noise
model but not the draw (or not which chip of a batch) averages over them.

Optionally an input discretiser (``input_bits``, :mod:`edgecloud.nn.discretize`) runs first,
with an identity gradient (BPDA through the defence).
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgecloud.cim.backend import create_backend
from edgecloud.nn.quant import hardware_gradients
from edgecloud.nn.discretize import Discretize


def output_index(model: nn.Module, output: str | None) -> int:
    """The index in ``model(x)`` of a named output: an exit name, ``final``, or None (the last)."""
    names = list(getattr(model, "exit_names", []))
    if output is None or output == "final":
        return -1
    if output in names:
        return names.index(output)
    raise ValueError(f"unknown output {output!r}: this model's outputs are {', '.join(names + ['final'])}")


class HardwareModel(nn.Module):
    """Pixels in [0, 1] -> logits of one output of ``net``, on ``backend`` (see module docstring).

    ``net``: a model whose ``forward`` returns a list of logits (every bundle's model); it is
    copied once per chip, never modified. ``seeds``: one chip per seed (several: EOT over chips).
    """

    def __init__(self, net: nn.Module, backend: str = "digital", options: dict[str, Any] | None = None,
                 seeds: Sequence[int] = (0,), *, output: str | None = None, eot_reads: int = 1,
                 input_bits: int | None = None) -> None:
        super().__init__()
        if not seeds:
            raise ValueError("seeds: at least one chip")
        if eot_reads < 1:
            raise ValueError(f"eot_reads must be >= 1, got {eot_reads}")
        self.backend_name = backend
        self.options = dict(options or {})
        self.seeds = [int(s) for s in seeds]
        self.index = output_index(net, output)
        self.eot_reads = int(eot_reads)
        self.discretize = Discretize(input_bits) if input_bits is not None else nn.Identity()
        chips, self.backends = [], []
        for seed in self.seeds:
            chip = copy.deepcopy(net).eval()
            chip.requires_grad_(False)
            self.backends.append(create_backend(backend, self.options, seed=seed))
            self.backends[-1].prepare(chip)
            chips.append(chip)
        self.chips = nn.ModuleList(chips)

    @property
    def deterministic(self) -> bool:
        """Whether two calls on the same input agree (the digital model; simulated chips read noise)."""
        return self.backend_name == "digital"

    @property
    def draws(self) -> int:
        return len(self.chips) * self.eot_reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.discretize(x)
        total: torch.Tensor | None = None
        with hardware_gradients(torch.is_grad_enabled()):
            for chip in self.chips:
                for _ in range(self.eot_reads):
                    logits = chip(x)[self.index].float()
                    total = logits if total is None else total + logits
        assert total is not None
        return total / self.draws

    def restart_reads(self, key: str) -> None:
        """Put every chip's read noise on the sub-stream named ``key`` (see ReadNoise.restart)."""
        stream = zlib.crc32(key.encode())
        for backend in self.backends:
            noise = getattr(backend, "noise", None)
            if noise is not None:
                noise.restart(stream)

    def read_state(self) -> list[dict | None]:
        """Every chip's read-noise position (for a checkpoint mid-attack)."""
        return [noise.state() if (noise := getattr(b, "noise", None)) is not None else None for b in self.backends]

    def set_read_state(self, states: list[dict | None]) -> None:
        """Continue every chip's read noise from :meth:`read_state`."""
        if len(states) != len(self.backends):
            raise ValueError(f"read state of {len(states)} chips for a model of {len(self.backends)}")
        for backend, state in zip(self.backends, states):
            noise = getattr(backend, "noise", None)
            if (noise is None) != (state is None):
                raise ValueError("read state does not match this model's chips (noise on one, not the other)")
            if noise is not None:
                noise.set_state(state)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, batch_size: int = 256) -> None:
        """Run clean inputs through every chip once (ADC ranges calibrated on them, not on attacks)."""
        for start in range(0, len(x), batch_size):
            self(x[start:start + batch_size])

    def train(self, mode: bool = True) -> "HardwareModel":  # the chips always infer
        super().train(False)
        return self
