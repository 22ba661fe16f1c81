"""The controller replayed offline: a trace's reference answers fed through :class:`ExitController`.

Why: a served replay takes minutes (a cloud, an edge daemon, the radio link); tuning a
controller's settings or comparing bounds needs seconds. Given a :class:`~edgecloud.control.trace.Reference`
(every sample's edge score and class, the cloud's class, the energy and bytes of an offload),
this runs the real controller on the same stream in request-sized batches, exactly as the data
plane drives it: exits at the threshold in force, seeded shadow draws, observations with the
known disagreement of offloaded and shadowed samples, a step every ``step_samples``. What it
leaves out is timing: every shadow answer arrives before the next batch (the daemon's arrive
a little later), and there is no cloud latency or saturation. The served benchmark remains the
measurement; this is the design loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecloud.control.budgets import Budgets
from edgecloud.control.controller import ControlSettings, ExitController, Observations
from edgecloud.control.trace import Reference, exits_at


@dataclass
class OfflineRun:
    """Per sample: did it exit, was it shadowed, under which threshold; and its energy."""

    exited: np.ndarray     # bool [N]
    shadowed: np.ndarray   # bool [N]
    threshold: np.ndarray  # float [N] (NaN: no gate)
    energy_j: np.ndarray   # float [N]: edge compute + offload or shadow radio/cloud
    sent_bytes: np.ndarray  # float [N]

    @property
    def shadow_share(self) -> float:
        return float(self.shadowed.mean()) if self.shadowed.size else 0.0


def replay_offline(ref: Reference, budgets: Budgets, settings: ControlSettings, *,
                   threshold: float | None = None, batch: int = 50) -> OfflineRun:
    """Drive an :class:`ExitController` with ``ref`` in batches of ``batch`` samples.

    ``threshold``: the starting threshold (default: the reference's static one). Steps happen
    every ``settings.step_samples`` observed samples (0: after every batch)."""
    n = len(ref)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    start = ref.static_threshold if threshold is None else threshold
    bytes_per_offload = float(np.mean(ref.offload_bytes)) if n else 0.0
    radio_j = float(np.mean(ref.offload_j)) if n else 0.0
    clock = _Clock()
    controller = ExitController(ref.policy, start, budgets, settings,  # type: ignore[arg-type]
                                bytes_per_offload=bytes_per_offload, radio_j_per_offload=radio_j,
                                clock=clock)
    exited = np.zeros(n, dtype=bool)
    shadowed = np.zeros(n, dtype=bool)
    used = np.full(n, np.nan)
    disagree_all = (~ref.edge_agrees).astype(np.float64)
    since_step = 0
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        clock.now += 0.01 * (hi - lo)  # a nominal 100 samples/s, for rate-based budgets
        t = controller.threshold
        out = exits_at(ref.score[lo:hi], t, ref.policy)
        mask, p = controller.shadow_mask(out)
        exited[lo:hi], shadowed[lo:hi] = out, mask
        used[lo:hi] = np.nan if t is None else t
        labelled = ~out | mask
        offload = ~out | mask
        controller.observe(Observations(
            score=ref.score[lo:hi], exited=out, shadowed=mask,
            shadow_prob=np.where(out, p, 1.0),
            disagree=np.where(labelled, disagree_all[lo:hi], np.nan),
            compute_j=ref.edge_j[lo:hi], radio_j=np.where(offload, ref.offload_j[lo:hi], 0.0),
            sent_bytes=np.where(offload, ref.offload_bytes[lo:hi], 0.0),
            latency_s=np.zeros(hi - lo), time_s=clock.now))
        since_step += hi - lo
        if settings.step_samples <= 0 or since_step >= settings.step_samples:
            controller.step()
            since_step = 0
    offload = ~exited | shadowed
    energy = ref.edge_j + np.where(offload, ref.offload_j, 0.0)
    sent = np.where(offload, ref.offload_bytes, 0.0)
    return OfflineRun(exited, shadowed, used, energy, sent)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


__all__ = ["OfflineRun", "replay_offline"]
