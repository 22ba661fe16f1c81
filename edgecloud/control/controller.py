"""The exit controller of one served model: observations in; a threshold and a shadow rate out.

INTERFACE FIXED (the data plane codes against it); bodies to be written.

Why shadow sampling: an edge exit means the cloud never sees the sample, so the edge cannot know
whether its answer agreed with the cloud's. A random share ``p`` of the edge-exited samples is
also sent to the cloud, off the response path; weighted by ``1/p`` they give an unbiased
estimate of the disagreement among exited samples. Offloaded samples are labelled for free
(the cloud answered them, and the edge's best exit had an answer too), so for every candidate
threshold the disagreement it would cause is estimated from offloaded samples (exact) plus
shadowed ones (inverse-probability weighted); see :mod:`edgecloud.control.estimate`.

Thresholds are in the policy's own units: entropy in nats (exit when H < t) or max probability
(exit when p >= t). ``score`` in :class:`Observations` is in the same units.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from edgecloud.control.budgets import Budgets
from edgecloud.exits import PolicyKind


@dataclass(frozen=True)
class ControlSettings:
    """How the controller estimates and moves (not what it holds: that is :class:`Budgets`)."""

    window: int = 4000             # samples the estimates look back over (sliding)
    min_samples: int = 200         # no move before the window holds this many samples
    interval_s: float = 1.0        # the daemon calls step() this often (timer) ...
    step_samples: int = 0          # ... and/or after every this many observed samples (0: timer
    # only); a replayed trace uses this so that steps fall at the same samples on every run
    shadow_min: float = 0.01       # shadow rate bounds (share of edge-exited samples)
    shadow_max: float = 0.25
    shadow_target: int = 200       # shadowed samples wanted per window (p adapts to reach it)
    bound: Literal["clopper-pearson", "anytime"] = "clopper-pearson"
    act_on: Literal["bound", "estimate"] = "bound"  # the agreement budget acts on the lower
    # confidence bound (the guarantee) or on the point estimate
    max_step: float | None = None  # largest threshold move per step (policy units); None: jump
    backoff_s: float = 10.0        # how long a cloud saturation report caps offloads
    backoff_factor: float = 0.5    # the cap: this share of the offload share before the report
    seed: int = 0                  # shadow draws


@dataclass
class Observations:
    """One batch of samples as the edge saw them; every array has one row per sample."""

    score: np.ndarray        # float: the controlled exit's score, in policy units
    exited: np.ndarray       # bool: answered at the edge by policy
    shadowed: np.ndarray     # bool: exited AND also sent to the cloud as a shadow sample
    shadow_prob: np.ndarray  # float: P(shadowed) this sample had (exited rows; 1.0 elsewhere)
    disagree: np.ndarray     # float: 1.0 / 0.0 where the cloud's answer is known (offloaded and
    # answered, or shadowed and answered: the edge's best-exit class != the cloud's), NaN else
    compute_j: np.ndarray    # float: edge compute energy
    radio_j: np.ndarray      # float: radio energy actually spent (offload + shadow)
    sent_bytes: np.ndarray   # int: bytes actually sent (offload + shadow)
    latency_s: np.ndarray    # float: latency of the request the sample came in
    time_s: float = field(default_factory=time.monotonic)


@dataclass
class BudgetStatus:
    """One budget at the chosen threshold."""

    name: str                # agreement | energy | uplink | latency
    target: float
    value: float             # the estimate at the current threshold (NaN: no data yet)
    bound: float | None      # agreement: the (1 - delta) lower confidence bound
    met: bool                # the (bound, or estimate) satisfies the target
    reachable: bool          # some threshold would satisfy it (given higher-priority budgets)
    message: str = ""        # why not, in words (for logs, metrics help and the admin API)


@dataclass
class ControlState:
    """What the controller knows and did at its last step (metrics and admin API show this)."""

    threshold: float | None
    shadow_rate: float
    window_samples: int
    window_shadowed: int
    agreement: float          # system agreement with the cloud at ``threshold`` (estimate)
    agreement_lower: float    # its (1 - delta) lower confidence bound
    exit_agreement: float     # agreement among edge-exited samples only (estimate)
    exit_agreement_lower: float
    exit_share: float         # share of samples the edge answers at ``threshold``
    budgets: list[BudgetStatus] = field(default_factory=list)
    backoff: bool = False     # a cloud saturation report caps offloads right now
    steps: int = 0
    time_s: float = 0.0


class ExitController:
    """Holds a model's :class:`Budgets` by moving one exit's threshold and the shadow rate.

    Thread-safe: the data plane calls :meth:`shadow_mask` and :meth:`observe` from request
    threads and :meth:`step` from a timer thread; the admin API calls :meth:`set_budgets`.
    """

    def __init__(
        self,
        kind: PolicyKind,
        threshold: float | None,
        budgets: Budgets,
        settings: ControlSettings = ControlSettings(),
        *,
        bytes_per_offload: float,
        radio_j_per_offload: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        raise NotImplementedError

    @property
    def threshold(self) -> float | None:
        """The threshold the exit should use now."""
        raise NotImplementedError

    @property
    def budgets(self) -> Budgets:
        raise NotImplementedError

    def shadow_rate(self) -> float:
        raise NotImplementedError

    def shadow_mask(self, exited: np.ndarray) -> tuple[np.ndarray, float]:
        """Which of these samples to shadow (seeded Bernoulli draws at the current rate, only
        where ``exited``), and that rate."""
        raise NotImplementedError

    def observe(self, obs: Observations) -> None:
        """Add one batch to the window (call once its shadow answers are in, or have failed)."""
        raise NotImplementedError

    def step(self) -> ControlState:
        """Re-estimate and choose the threshold and shadow rate; returns the new state."""
        raise NotImplementedError

    def state(self) -> ControlState:
        """The last step's state (a state with NaN estimates before the first step)."""
        raise NotImplementedError

    def set_budgets(self, budgets: Budgets) -> None:
        """Replace the budgets; the next :meth:`step` acts on them."""
        raise NotImplementedError

    def on_cloud_saturated(self) -> None:
        """The cloud said RESOURCE_EXHAUSTED (or the breaker opened): cap offloads for
        ``settings.backoff_s`` and shadow at the minimum rate."""
        raise NotImplementedError

    def threshold_for(self, agreement: float) -> float | None:
        """The threshold that meets a per-request agreement target on the current window
        (None: not enough data yet; the caller keeps the model's threshold)."""
        raise NotImplementedError


__all__ = ["BudgetStatus", "ControlSettings", "ControlState", "ExitController", "Observations"]
